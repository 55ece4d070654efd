"""What a run's communication is measured against: data-parallel training at the same tokens.

A data-parallel (DDP) run of K workers, each with the clients' per-step batch, all-reduces the
float32 gradient (M bytes, the size of the model) at every step. With ring all-reduce each worker
sends 2 (K - 1) / K x M bytes a step (reduce-scatter, then all-gather) and receives as many, so
the K workers together send

    ddp_equivalent_bytes = K x 2 (K - 1) / K x M x S = 2 (K - 1) x M x S,

S = tokens / (K x batch tokens per worker) being the steps that process the run's tokens. A
federated round sends every message once (server to client, or client to server), so its
`bytes_sent + bytes_received` counts the same thing: bytes put on the network by anyone. The ratio
of the two is the "x less communication than DDP" of the run summary. (Each side counted per
worker instead divides both by K: the same ratio.)
"""


def ddp_equivalent_bytes(model_bytes: int, workers: int, batch_tokens: int, tokens: int) -> int:
  """Bytes that K = `workers` ring all-reduce workers send to process `tokens` tokens, each step
  all-reducing a `model_bytes` gradient over `workers` x `batch_tokens` tokens."""
  steps = tokens / (workers * batch_tokens)
  return round(2 * (workers - 1) * model_bytes * steps)


def ddp_ratio(ddp_bytes: int | None, bytes_communicated: int | None) -> float | None:
  """How many times fewer bytes the run sent than DDP would have (None when either is unknown,
  or nothing was sent)."""
  if not ddp_bytes or not bytes_communicated:
    return None
  return ddp_bytes / bytes_communicated
