"""The paper's 350m MPT model (354M parameters): 8 clients, all sampled each round, tau = 500.

  python -m fedjax_pt.main --config=configs/350m.py --workdir=runs/350m \\
      --config.data.source=jsonl --config.data.path='/data/c4/en/c4-train.*.json.gz' \\
      --config.data.tokenizer=/data/tokenizers/gpt-neox-20b/tokenizer.json

Needs GPUs (bf16 compute). Recipe from DESIGN.md: d_model 1024, 24 layers, 16 heads, seq 2048,
batch 256 per client, peak lr 0.0003, warmup 100, cosine over 13,400 steps to 0.1x, outer Nesterov
lr 0.1 / momentum 0.9. Expected: the federated model's validation perplexity tracks the
centralized baseline's after the first rounds (the paper's Figure 2).
"""

from fedjax_pt.configs import paper


def get_config():
  return paper.paper_config(
      d_model=1024, num_layers=24, num_heads=16, seq_len=2048, batch_size=256, lr=3e-4,
      warmup_steps=100, schedule_steps=13_400, outer_lr=0.1)
