"""What a run measures: held-out loss of the server model, L2 norms, bytes of a model.

The records these numbers go into, and their writers, are in `fedjax_pt.records`.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pt import model as model_lib
from fedjax_pt import sharding


def make_eval_step(model_cfg: model_lib.ModelConfig, layout: sharding.Layout | None = None):
  """Jitted `eval_step(params, batch_BxL1, mask_B) -> (sum of token losses, token count)`.

  Only sequences with mask 1 count: batches are padded to a size every device takes evenly. With
  a layout, the step is jitted with the training step's shardings of parameters and batches.
  """
  decoder = model_lib.Decoder(model_cfg)

  def eval_step(params, batch_BxL1, mask_B):
    logits_BxLxV = decoder.apply({'params': params}, batch_BxL1[:, :-1])
    losses_BxL = model_lib.next_token_losses(logits_BxLxV, batch_BxL1[:, 1:])
    return (losses_BxL * mask_B[:, None]).sum(), mask_B.sum() * losses_BxL.shape[1]

  if layout is None:
    return jax.jit(eval_step)

  def sharded_step(params, batch_BxL1, mask_B):
    with layout.activate():
      return eval_step(params, batch_BxL1, mask_B)

  return jax.jit(sharded_step,
                 in_shardings=(layout.params(model_cfg), layout.batch(), layout.named(('batch',))),
                 out_shardings=layout.replicated())


EvalBatch = tuple[np.ndarray, np.ndarray]  # tokens [B, L+1] int32, mask [B] float32


def padded(batches: list[np.ndarray], multiple: int, min_size: int = 0) -> list[EvalBatch]:
  """Batches padded with masked-out rows to one size, a multiple of `multiple` (the devices that
  split a batch) and at least `min_size` (another set's, whose compiled step it then reuses), so
  that every batch has the same shape and compiles once."""
  size = max([min_size, *(len(b) for b in batches)])
  size = -(-size // multiple) * multiple
  out = []
  for batch in batches:
    pad = size - len(batch)
    tokens = np.concatenate([batch, np.zeros((pad, batch.shape[1]), batch.dtype)])
    mask = np.concatenate([np.ones(len(batch), np.float32), np.zeros(pad, np.float32)])
    out.append((tokens, mask))
  return out


def perplexity(loss: float) -> float:
  return math.exp(min(loss, 700.0))  # exp overflows float64 past ~709


def evaluate(eval_step, params, batches: list[EvalBatch]) -> dict[str, float]:
  """Token-weighted mean loss over all batches and its perplexity."""
  total_loss, total_tokens = 0.0, 0.0
  for tokens, mask in batches:
    loss_sum, count = eval_step(params, tokens, mask)
    total_loss += float(loss_sum)
    total_tokens += float(count)
  loss = total_loss / total_tokens
  return {'loss': loss, 'ppl': perplexity(loss)}


class Evaluator:
  """The server model's held-out loss every `every_rounds` rounds (and at the last), on the global
  validation set and, when given, on each client's own (`client_batches`) and on extra held-out
  files (`extra_batches`: {name: batches}, `eval.extra_files`)."""

  def __init__(self, eval_step, batches: list[EvalBatch], client_batches: list[list[EvalBatch]],
               every_rounds: int, last_round: int,
               extra_batches: dict[str, list[EvalBatch]] | None = None):
    self._step, self._batches, self._client_batches = eval_step, batches, client_batches
    self._extra_batches = extra_batches or {}
    self._every, self._last = every_rounds, last_round

  def __call__(self, params, round_idx: int, force: bool = False) -> dict[str, Any]:
    """Record keys: val_loss and val_ppl (None when this round is not evaluated), per client and
    per extra file."""
    if not force and round_idx % self._every and round_idx != self._last:
      return {'val_loss': None, 'val_ppl': None}
    result = evaluate(self._step, params, self._batches)
    out = {'val_loss': result['loss'], 'val_ppl': result['ppl']}
    if self._client_batches:
      per_client = [evaluate(self._step, params, b) for b in self._client_batches]
      out['client_val_loss'] = {k: r['loss'] for k, r in enumerate(per_client)}
      out['client_val_ppl'] = {k: r['ppl'] for k, r in enumerate(per_client)}
    if self._extra_batches:
      per_file = {name: evaluate(self._step, params, b) for name, b in self._extra_batches.items()}
      out['extra_val_loss'] = {name: r['loss'] for name, r in per_file.items()}
      out['extra_val_ppl'] = {name: r['ppl'] for name, r in per_file.items()}
    return out


def global_norm(tree) -> jax.Array:
  """sqrt(sum of squares) over every leaf, in float32 (traced inline in a jitted step)."""
  return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


l2_norm = jax.jit(global_norm)  # the same, called on its own


def per_module_norms(tree) -> dict[str, float]:
  """L2 norm of each top-level module (wte, wpe, block_0, ..., norm_f)."""
  return {name: float(l2_norm(sub)) for name, sub in tree.items()}


def outer_momentum_norm(opt_state) -> float:
  """Norm of the outer optimizer's first moment (SGD/Nesterov 'trace', Adam 'mu'), over all the
  states in `opt_state` (one per fragment with streaming fragments); 0 if none."""
  for name in ('trace', 'mu'):
    found = optax.tree_utils.tree_get_all_with_path(opt_state, name)
    if found:
      return float(l2_norm([tree for _, tree in found]))
  return 0.0


def tree_bytes(tree) -> int:
  """Bytes needed to send every leaf of `tree` as stored (float32 parameters: 4 per value)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
