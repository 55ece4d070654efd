"""Tiny federated run of the Llama-style family: CPU, offline, the recipe of configs/tiny.py.

  python -m fedjax_pt.main --config=configs/llama_tiny.py --workdir=runs/llama_tiny

RMSNorm, SwiGLU, rotary positions, grouped-query attention (4 query heads sharing 2 key/value
heads) and a separate output matrix. Its 455,296 parameters are within 1% of configs/tiny.py's MPT
block (459,392), so the two compare at equal size: the SwiGLU width 336 pays for the untied output
matrix. `:test` is the few-second variant that the tests build on.
"""

from fedjax_pt.configs import tiny


def get_config(variant: str = ''):
  c = tiny.get_config(variant)
  c.model.family = 'llama'
  c.model.position_embedding = 'rope'
  c.model.num_kv_heads = 1 if variant == 'test' else 2  # test: 2 query heads share 1
  c.model.tie_embeddings = False
  c.model.mlp_dim = 64 if variant == 'test' else 336
  return c
