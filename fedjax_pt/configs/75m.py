"""The paper's 75m MPT model (74M parameters): 8 clients, all sampled each round, tau = 500.

  python -m fedjax_pt.main --config=configs/75m.py --workdir=runs/75m \\
      --config.data.source=jsonl --config.data.path='/data/c4/en/c4-train.*.json.gz' \\
      --config.data.tokenizer=/data/tokenizers/gpt-neox-20b/tokenizer.json

Needs GPUs (bf16 compute). Recipe from DESIGN.md: d_model 896, 3 layers, 16 heads, seq 1024,
batch 512 per client, peak lr 0.0004, warmup 1000, cosine over 88,000 steps to 0.1x, outer Nesterov
lr 0.1 / momentum 0.9. Expected: the federated model's validation perplexity tracks the
centralized baseline's after the first rounds (the paper's Figure 2).
"""

from fedjax_pt.configs import paper


def get_config():
  return paper.paper_config(
      d_model=896, num_layers=3, num_heads=16, seq_len=1024, batch_size=512, lr=4e-4,
      warmup_steps=1000, schedule_steps=88_000, outer_lr=0.1)
