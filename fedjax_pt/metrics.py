"""What a run measures: held-out loss, L2 norms, bytes communicated, and the writers that record them.

Record names are the public `metrics.jsonl` contract (DESIGN.md; README.md lists every key).
"""

import json
import math
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pt import model as model_lib


def make_eval_step(model_cfg: model_lib.ModelConfig):
  """Jitted `eval_step(params, batch) -> (sum of token losses, token count)`."""
  decoder = model_lib.Decoder(model_cfg)

  @jax.jit
  def eval_step(params, batch_BxL1):
    logits = decoder.apply({'params': params}, batch_BxL1[:, :-1])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch_BxL1[:, 1:])
    return losses.sum(), jnp.asarray(losses.size, jnp.float32)

  return eval_step


def perplexity(loss: float) -> float:
  return math.exp(min(loss, 700.0))  # exp overflows float64 past ~709


def evaluate(eval_step, params, batches: list[np.ndarray]) -> dict[str, float]:
  """Token-weighted mean loss over all batches and its perplexity."""
  total_loss, total_tokens = 0.0, 0.0
  for batch in batches:
    loss_sum, count = eval_step(params, batch)
    total_loss += float(loss_sum)
    total_tokens += float(count)
  loss = total_loss / total_tokens
  return {'loss': loss, 'ppl': perplexity(loss)}


@jax.jit
def l2_norm(tree) -> jax.Array:
  """sqrt(sum of squares) over every leaf, in float32."""
  return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


@jax.jit
def distance(a, b) -> jax.Array:
  """||a - b||: a client's own pseudo-gradient when a is the global model and b the client's."""
  return l2_norm(jax.tree.map(jnp.subtract, a, b))


def per_module_norms(tree) -> dict[str, float]:
  """L2 norm of each top-level module (wte, wpe, block_0, ..., norm_f)."""
  return {name: float(l2_norm(sub)) for name, sub in tree.items()}


def outer_momentum_norm(opt_state) -> float:
  """Norm of the outer optimizer's first moment (SGD/Nesterov 'trace', Adam 'mu'); 0 if none."""
  for name in ('trace', 'mu'):
    found = optax.tree_utils.tree_get_all_with_path(opt_state, name)
    if found:
      return float(l2_norm(found[0][1]))
  return 0.0


def tree_bytes(tree) -> int:
  """Bytes needed to send every leaf of `tree` as stored (float32 parameters: 4 per value)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    return _jsonable(np.asarray(value).tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return None  # JSON has no NaN/Inf; null keeps every line parseable by any JSON reader
  return value


def _scalars(record: dict[str, Any], prefix: str = ''):
  """Flattens nested dicts of numbers into (tag, value) pairs: client_val_ppl/3."""
  for key, value in record.items():
    tag = f'{prefix}{key}'
    if isinstance(value, dict):
      yield from _scalars(value, f'{tag}/')
    elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
      yield tag, float(value)


class MetricWriter:
  """Writes each record to `metrics.jsonl` and, optionally, to TensorBoard event files.

  The JSON line is flushed at every record, so a crash never leaves a half-written line and a live
  run can be tailed or plotted. TensorBoard steps are rounds for round records and global local
  steps for step records (under `step/`, one curve per client).
  """

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._file = open(self.path, 'a', encoding='utf-8')
    self._tb = None
    if tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'), flush_secs=30)

  def write(self, record: dict[str, Any]) -> None:
    self._file.write(json.dumps(_jsonable(record)) + '\n')
    self._file.flush()
    if self._tb is None:
      return
    if record['kind'] == 'round':
      skip = {'round', 'kind', 'clients'}
      for tag, value in _scalars({k: v for k, v in record.items() if k not in skip}):
        self._tb.add_scalar(tag, value, record['round'])
    else:
      for key in ('loss', 'grad_norm', 'update_norm', 'lr'):
        self._tb.add_scalar(f'step/{key}/client_{record["client"]}', float(record[key]),
                            record['step'])

  def tell(self) -> int:
    """Bytes of metrics.jsonl written so far: where a resumed run cuts the file back to."""
    return self._file.tell()

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """Records of a metrics.jsonl; a torn last line (a run killed mid-write) is skipped and logged."""
  records = []
  with open(path, encoding='utf-8') as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        logging.warning('%s:%d is not valid JSON; skipped', path, i)
  return records
