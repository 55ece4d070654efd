"""The paper's 1p3b MPT model (1.31B parameters): 8 clients, all sampled each round, tau = 500.

  python -m fedjax_pt.main --config=configs/1p3b.py --workdir=runs/1p3b \\
      --config.data.source=jsonl --config.data.path='/data/c4/en/c4-train.*.json.gz' \\
      --config.data.tokenizer=/data/tokenizers/gpt-neox-20b/tokenizer.json

Needs GPUs (bf16 compute). Recipe from DESIGN.md: d_model 2048, 24 layers, 16 heads, seq 2048,
batch 512 per client, peak lr 0.0002, warmup 100, cosine over 24,800 steps to 0.1x, outer Nesterov
lr 0.7 (DiLoCo's; the paper also ran 0.1) / momentum 0.9. Expected: the federated model's
validation perplexity tracks the centralized baseline's after the first rounds (the paper's
Figure 2).
"""

from fedjax_pt.configs import paper


def get_config():
  return paper.paper_config(
      d_model=2048, num_layers=24, num_heads=16, seq_len=2048, batch_size=512, lr=2e-4,
      warmup_steps=100, schedule_steps=24_800, outer_lr=0.7)
