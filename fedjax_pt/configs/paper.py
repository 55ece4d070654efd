"""The recipe shared by the paper's four MPT configs (DESIGN.md), parametrised by their row."""

from fedjax_pt.configs import base


def paper_config(*, d_model: int, num_layers: int, num_heads: int, seq_len: int, batch_size: int,
                 lr: float, warmup_steps: int, schedule_steps: int, outer_lr: float):
  """8 clients, all sampled each round, tau = 500 local steps, as many rounds as the schedule."""
  c = base.get_config()
  c.model.vocab_size = 50368  # GPT-NeoX-20B's 50,277 tokens padded as in the paper's configs.
  c.model.d_model = d_model
  c.model.num_layers = num_layers
  c.model.num_heads = num_heads
  c.model.dtype = 'bfloat16'

  c.opt.lr = lr
  c.opt.warmup_steps = warmup_steps
  c.opt.schedule_steps = schedule_steps

  c.fl.num_clients = 8
  c.fl.clients_per_round = 8
  c.fl.local_steps = 500
  c.fl.rounds = -(-schedule_steps // c.fl.local_steps)
  c.fl.outer_lr = outer_lr
  c.fl.outer_momentum = 0.9

  c.data.source = 'jsonl'
  c.data.seq_len = seq_len
  c.data.batch_size = batch_size
  c.eval.batch_size = 32
  c.eval.max_batches = 64
  c.log.every_steps = 50
  return c
