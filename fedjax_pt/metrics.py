"""Evaluation of a model on held-out batches, and the `metrics.jsonl` writer."""

import json
import math
import os
from typing import Any

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


def evaluate(eval_step, params, batches: list[np.ndarray]) -> dict[str, float]:
  """Token-weighted mean loss over all batches and its perplexity."""
  total_loss, total_tokens = 0.0, 0.0
  for batch in batches:
    loss_sum, count = eval_step(params, batch)
    total_loss += float(loss_sum)
    total_tokens += float(count)
  loss = total_loss / total_tokens
  return {'loss': loss, 'ppl': math.exp(min(loss, 700.0))}


def _jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(value).tolist()
  return value


class JsonlWriter:
  """Appends one JSON object per line to `workdir/metrics.jsonl`, flushed at every record so that a
  crash never leaves a half-written line and a live run can be tailed or plotted."""

  def __init__(self, workdir: str, filename: str = 'metrics.jsonl'):
    self.path = os.path.join(workdir, filename)
    self._file = open(self.path, 'a', encoding='utf-8')

  def write(self, record: dict[str, Any]) -> None:
    self._file.write(json.dumps(_jsonable(record), allow_nan=True) + '\n')
    self._file.flush()

  def close(self) -> None:
    self._file.close()
