"""A 1.08B-parameter Llama-style model (Llama 3.2 1B's shape with GPT-NeoX-20B's tokenizer), on the
recipe of the paper's 1p3b config: 8 clients, all sampled each round, tau = 500.

  python -m fedjax_pt.main --config=configs/llama_1b.py --workdir=runs/llama_1b \\
      --config.data.source=jsonl --config.data.path='/data/c4/en/c4-train.*.json.gz' \\
      --config.data.tokenizer=/data/tokenizers/gpt-neox-20b/tokenizer.json

Needs GPUs (bf16 compute). d_model 2048, 16 layers, 32 query heads sharing 8 key/value heads,
SwiGLU width 8192, rotary base 500,000, tied embeddings, seq 2048. Exports to Hugging Face's Llama
(`python -m fedjax_pt.export`).
"""

from fedjax_pt.configs import paper


def get_config():
  c = paper.paper_config(
      d_model=2048, num_layers=16, num_heads=32, seq_len=2048, batch_size=512, lr=2e-4,
      warmup_steps=100, schedule_steps=24_800, outer_lr=0.7)
  c.model.family = 'llama'
  c.model.position_embedding = 'rope'
  c.model.num_kv_heads = 8
  c.model.mlp_dim = 8192
  c.model.rope_theta = 500_000.0
  c.model.norm_eps = 1e-5
  return c
