"""Local training: the AdamW train step and a client's round of tau local steps.

The train step is pure and built once per run (`make_train_step`), so every client of every round
reuses one compiled executable. `client_update` drives it over a client's batches.
"""

from collections.abc import Callable, Iterator
import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pt import model as model_lib
from fedjax_pt import optimizers


class LocalState(flax.struct.PyTreeNode):
  """What a client carries through its local steps.

  `step` is the global local-step index (round * local_steps + t); it drives the learning-rate
  schedule, so the schedule continues across rounds when the optimizer state is reset.
  """
  params: Any
  opt_state: Any
  step: jax.Array


def next_token_loss(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """Mean cross-entropy in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV.astype(jnp.float32), targets_BxL).mean()


def make_loss_fn(model_cfg: model_lib.ModelConfig) -> Callable[[Any, jax.Array], jax.Array]:
  decoder = model_lib.Decoder(model_cfg)

  def loss_fn(params, batch_BxL1: jax.Array) -> jax.Array:
    logits = decoder.apply({'params': params}, batch_BxL1[:, :-1])
    return next_token_loss(logits, batch_BxL1[:, 1:])

  return loss_fn


def _loss_and_grad(loss_fn, params, batch_BxL1: jax.Array, micro_batch_size: int):
  """Gradient of the mean loss, accumulated over micro-batches to bound activation memory."""
  batch_size = batch_BxL1.shape[0]
  if not micro_batch_size or micro_batch_size == batch_size:
    return jax.value_and_grad(loss_fn)(params, batch_BxL1)
  num_micro = batch_size // micro_batch_size
  micro_batches = batch_BxL1.reshape(num_micro, micro_batch_size, -1)

  def accumulate(carry, micro_batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, micro_batch)
    return jax.tree.map(jnp.add, carry, (loss, grads)), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (loss, grads), _ = jax.lax.scan(accumulate, zeros, micro_batches)
  return jax.tree.map(lambda x: x / num_micro, (loss, grads))


def make_train_step(model_cfg: model_lib.ModelConfig, opt_cfg: optimizers.OptConfig,
                    micro_batch_size: int = 0):
  """Returns a jitted `train_step(state, batch) -> (state, metrics)` that donates `state`."""
  loss_fn = make_loss_fn(model_cfg)
  tx = optimizers.local_optimizer(opt_cfg)
  schedule = optimizers.lr_schedule(opt_cfg)

  def train_step(state: LocalState, batch_BxL1: jax.Array):
    loss, grads = _loss_and_grad(loss_fn, state.params, batch_BxL1, micro_batch_size)
    direction, opt_state = tx.update(grads, state.opt_state, state.params)
    lr = schedule(state.step)
    updates = optimizers.apply_lr(direction, lr)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        'loss': loss,
        'grad_norm': optimizers.global_norm(grads),
        'update_norm': optimizers.global_norm(updates),
        'lr': lr,
    }
    return LocalState(params, opt_state, state.step + 1), metrics

  return jax.jit(train_step, donate_argnums=0)


def init_local_state(params, opt_cfg: optimizers.OptConfig, step: int) -> LocalState:
  """A fresh local optimizer state (Adam moments at zero) starting at global step `step`."""
  return LocalState(params, optimizers.local_optimizer(opt_cfg).init(params),
                    jnp.asarray(step, jnp.int32))


@dataclasses.dataclass
class ClientResult:
  state: LocalState
  mean_loss: float
  last_loss: float
  mean_grad_norm: float
  mean_update_norm: float
  num_tokens: int
  step_metrics: list[dict[str, float]]  # every `log_every` steps: {'local_step', 'loss', ...}


_AVERAGED = ('loss', 'grad_norm', 'update_norm')


def client_update(train_step, state: LocalState, batches: Iterator[np.ndarray], num_steps: int,
                  log_every: int = 0, on_step: Callable[[int], None] | None = None
                  ) -> ClientResult:
  """Runs `num_steps` local steps; reads device values only at logging steps (no per-step sync)."""
  sums = {k: jnp.zeros((), jnp.float32) for k in _AVERAGED}
  step_metrics, num_tokens, metrics = [], 0, None
  for t in range(num_steps):
    batch = next(batches)
    num_tokens += batch.shape[0] * (batch.shape[1] - 1)
    state, metrics = train_step(state, batch)
    sums = {k: sums[k] + metrics[k] for k in _AVERAGED}
    if log_every and ((t + 1) % log_every == 0 or t + 1 == num_steps):
      step_metrics.append({'local_step': t + 1,
                           **{k: float(v) for k, v in jax.device_get(metrics).items()}})
    if on_step is not None:
      on_step(t + 1)
  means = {k: float(v) / max(num_steps, 1) for k, v in jax.device_get(sums).items()}
  return ClientResult(
      state=state,
      mean_loss=means['loss'],
      last_loss=float(metrics['loss']) if metrics is not None else float('nan'),
      mean_grad_norm=means['grad_norm'],
      mean_update_norm=means['update_norm'],
      num_tokens=num_tokens,
      step_metrics=step_metrics,
  )
