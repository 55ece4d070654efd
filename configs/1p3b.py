"""The paper's 1p3b MPT model (1.31B parameters): 8 clients, all sampled each round, tau = 500.

  python -m fedjax_pt.main --config=configs/1p3b.py --workdir=runs/1p3b \\
      --config.data.source=jsonl --config.data.path='/data/c4/en/c4-train.*.json.gz' \\
      --config.data.tokenizer=/data/tokenizers/gpt-neox-20b/tokenizer.json

Needs GPUs (bf16 compute). Recipe from DESIGN.md: d_model 2048, 24 layers, 16 heads, seq 2048,
batch 512 per client, peak lr 0.0002, warmup 100, cosine over 24,800 steps to 0.1x, outer Nesterov
lr 0.7 (DiLoCo's; the paper also ran 0.1) / momentum 0.9. Expected: the federated model's validation perplexity tracks the
centralized baseline's after the first rounds (the paper's Figure 2).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.vocab_size = 50368  # GPT-NeoX-20B's 50,277 tokens padded as in the paper's configs.
  c.model.d_model = 2048
  c.model.num_layers = 24
  c.model.num_heads = 16
  c.model.dtype = 'bfloat16'

  c.opt.lr = 0.0002
  c.opt.warmup_steps = 100
  c.opt.schedule_steps = 24800

  c.fl.num_clients = 8
  c.fl.clients_per_round = 8
  c.fl.rounds = 50
  c.fl.local_steps = 500
  c.fl.outer_lr = 0.7
  c.fl.outer_momentum = 0.9

  c.data.source = 'jsonl'
  c.data.seq_len = 2048
  c.data.batch_size = 512
  c.eval.batch_size = 32
  c.eval.max_batches = 64
  c.log.every_steps = 50
  return c
