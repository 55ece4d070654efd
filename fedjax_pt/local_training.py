"""Local training: the AdamW (or Muon) train step and a client's round of tau local steps.

The train step is pure and built once per run (`make_train_step`), so every client of every round
reuses one compiled executable. `client_update` drives it over a client's batches. `Trainer` does
the same on a device mesh (`fedjax_pt.sharding`), `mesh.clients` clients at a time.
"""

from collections.abc import Callable, Iterator, Sequence
import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pt import metrics as metrics_lib
from fedjax_pt import model as model_lib
from fedjax_pt import optimizers
from fedjax_pt import sharding


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
  return model_lib.next_token_losses(logits_BxLxV, targets_BxL).mean()


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
  # Micro-batch i takes every num_micro-th sequence: a batch split over devices (in contiguous
  # blocks) then splits every micro-batch the same way, and accumulating moves no tokens.
  micro_batches = batch_BxL1.reshape(micro_batch_size, num_micro, -1).swapaxes(0, 1)

  def accumulate(carry, micro_batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, micro_batch)
    return jax.tree.map(jnp.add, carry, (loss, grads)), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (loss, grads), _ = jax.lax.scan(accumulate, zeros, micro_batches)
  return jax.tree.map(lambda x: x / num_micro, (loss, grads))


def state_shardings(model_cfg: model_lib.ModelConfig, opt_cfg: optimizers.OptConfig,
                    layout: sharding.Layout, *, stacked: bool) -> LocalState:
  """Where a LocalState lives: parameters and Adam moments split by the rules (the moments on
  host memory with mesh.offload_optimizer), the step replicated."""
  params = layout.params(model_cfg, stacked=stacked)
  shapes = model_lib.param_shapes(model_cfg)
  opt_state = sharding.optimizer_shardings(
      optimizers.local_optimizer(opt_cfg), shapes, params, layout.replicated(stacked=stacked),
      host=layout.cfg.offload_optimizer)
  return LocalState(params, opt_state, layout.replicated(stacked=stacked))


def make_train_step(model_cfg: model_lib.ModelConfig, opt_cfg: optimizers.OptConfig,
                    micro_batch_size: int = 0, layout: sharding.Layout | None = None):
  """Returns a jitted `train_step(state, batch) -> (state, metrics)` that donates `state`.

  Without a layout the arrays stay where they are (one device). With one, the step is jitted with
  the layout's in/out shardings; when it trains P = layout.clients > 1 clients at once, `state` and
  `batch` carry a leading client axis [P, ...] (see `Trainer`) and the metrics are [P] vectors.
  """
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
        'grad_norm': metrics_lib.global_norm(grads),
        'update_norm': metrics_lib.global_norm(updates),
        'lr': lr,
    }
    return LocalState(params, opt_state, state.step + 1), metrics

  if layout is None:
    return jax.jit(train_step, donate_argnums=0)
  shardings = state_shardings(model_cfg, opt_cfg, layout, stacked=layout.stacked)
  # One program for P clients: vmap adds the client axis to every array and, through
  # spmd_axis_name, to the model's sharding constraints, so each client stays on its device group.
  step_fn = jax.vmap(train_step, spmd_axis_name='clients') if layout.stacked else train_step
  on_device = jax.tree.map(lambda s: s.with_memory_kind('device'), shardings.opt_state)

  def sharded_step(state: LocalState, batch_BxL1: jax.Array):
    if layout.cfg.offload_optimizer:
      # The moments wait in host memory between steps and visit the device for the update only.
      state = state.replace(opt_state=jax.device_put(state.opt_state, on_device))
    with layout.activate():
      return step_fn(state, batch_BxL1)

  return jax.jit(sharded_step, in_shardings=(shardings, layout.batch(stacked=layout.stacked)),
                 out_shardings=(shardings, layout.replicated(stacked=layout.stacked)),
                 donate_argnums=0)


def init_local_state(params, opt_cfg: optimizers.OptConfig, step: int) -> LocalState:
  """A fresh local optimizer state (Adam moments at zero) starting at global step `step`."""
  return LocalState(params, optimizers.local_optimizer(opt_cfg).init(params),
                    jnp.asarray(step, jnp.int32))


@dataclasses.dataclass(frozen=True)
class TrainingSummary:
  """What a client's local steps add up to: what it reports to the server."""
  num_tokens: int  # tokens it trained on
  mean_loss: float
  mean_grad_norm: float
  mean_update_norm: float


@dataclasses.dataclass
class ClientResult:
  state: LocalState
  summary: TrainingSummary
  step_metrics: list[dict[str, float]]  # every `log_every` steps: {'local_step', 'loss', ...}
  last_loss: float  # of the last step: what the progress bar shows


_AVERAGED = ('loss', 'grad_norm', 'update_norm')


def client_update(train_step, state: LocalState, batches: Iterator[np.ndarray], num_steps: int,
                  log_every: int = 0, on_step: Callable[[int], None] | None = None
                  ) -> ClientResult:
  """Runs `num_steps` local steps; reads device values only at logging steps (no per-step sync)."""
  state, steps = _local_steps(train_step, state, lambda: next(batches), num_steps, log_every,
                              on_step)
  return steps.result(state)


@dataclasses.dataclass
class _Steps:
  """What the loop of local steps saw, for one client or (as [P] vectors) for P at once."""
  means: dict[str, Any]
  last_loss: Any
  num_tokens: int  # per client
  logged: list[tuple[int, dict[str, Any]]]  # (local step, metrics) at logging steps

  def result(self, state: LocalState, client: int | None = None) -> ClientResult:
    pick = float if client is None else (lambda v: float(v[client]))
    summary = TrainingSummary(num_tokens=self.num_tokens, mean_loss=pick(self.means['loss']),
                              mean_grad_norm=pick(self.means['grad_norm']),
                              mean_update_norm=pick(self.means['update_norm']))
    return ClientResult(
        state=state, summary=summary,
        step_metrics=[{'local_step': t, **{k: pick(v) for k, v in m.items()}}
                      for t, m in self.logged],
        last_loss=pick(self.last_loss))


def _local_steps(train_step, state, next_batch: Callable[[], np.ndarray], num_steps: int,
                 log_every: int, on_step: Callable[[int], None] | None, clients: int = 1):
  sums = {k: jnp.zeros((), jnp.float32) for k in _AVERAGED}
  logged, num_tokens, metrics = [], 0, None
  for t in range(num_steps):
    batch = next_batch()
    num_tokens += batch.shape[-2] * (batch.shape[-1] - 1)
    state, metrics = train_step(state, batch)
    sums = {k: sums[k] + metrics[k] for k in _AVERAGED}
    if log_every and ((t + 1) % log_every == 0 or t + 1 == num_steps):
      logged.append((t + 1, jax.device_get(metrics)))
    if on_step is not None:
      on_step(t + 1)
  means = {k: np.asarray(v) / max(num_steps, 1) for k, v in jax.device_get(sums).items()}
  last_loss = (np.asarray(metrics['loss']) if metrics is not None else
               np.full(() if clients == 1 else clients, np.nan))
  return state, _Steps(means, last_loss, num_tokens, logged)


class Trainer:
  """Local training on the mesh of `layout`, built once per run.

  `train` runs a group of `parallel` = layout.clients clients from the global parameters. With
  P > 1 their states and batches are stacked along a leading client axis split over the mesh's
  'clients' axis: the P clients train at the same time, each on its own device group, in one
  program, and give the same results as training them one after another.
  """

  def __init__(self, model_cfg: model_lib.ModelConfig, opt_cfg: optimizers.OptConfig,
               layout: sharding.Layout, micro_batch_size: int = 0):
    self.parallel = layout.clients
    self._layout = layout
    self.train_step = make_train_step(model_cfg, opt_cfg, micro_batch_size, layout)
    tx = optimizers.local_optimizer(opt_cfg)
    one = state_shardings(model_cfg, opt_cfg, layout, stacked=False)
    group = state_shardings(model_cfg, opt_cfg, layout, stacked=layout.stacked)
    parallel = self.parallel

    def place(params, step, opt_states):
      # Copies: the train step donates its state, and the global parameters (and a client's kept
      # Adam state, should its round fail) must survive it.
      if parallel == 1:
        params = jax.tree.map(jnp.copy, params)
        opt_state = tx.init(params) if opt_states is None else jax.tree.map(jnp.copy,
                                                                            opt_states[0])
        return LocalState(params, opt_state, jnp.asarray(step, jnp.int32))
      params_P = jax.tree.map(lambda p: jnp.broadcast_to(p, (parallel, *p.shape)), params)
      opt_state_P = (jax.vmap(tx.init)(params_P) if opt_states is None else
                     jax.tree.map(lambda *xs: jnp.stack(xs), *opt_states))
      return LocalState(params_P, opt_state_P, jnp.full((parallel,), step, jnp.int32))

    self._place = jax.jit(place, out_shardings=group)
    self._init_opt = jax.jit(tx.init, out_shardings=one.opt_state)
    self._opt_shardings = one.opt_state
    param_shapes = model_lib.param_shapes(model_cfg)
    self._opt_shapes = jax.tree.map(
        lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where),
        jax.eval_shape(tx.init, param_shapes), one.opt_state)
    self._param_shapes = jax.tree.map(
        lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where), param_shapes,
        one.params)
    self._unstack = jax.jit(
        lambda state: [jax.tree.map(lambda x: x[i], state) for i in range(parallel)],
        out_shardings=[one] * parallel)

  def opt_state_shapes(self) -> Any:
    """One client's optimizer state (Adam's or Muon's) as shapes, dtypes and shardings,
    allocating nothing: what a kept state is restored into."""
    return self._opt_shapes

  def param_shapes(self) -> Any:
    """One client's parameters as shapes, dtypes and shardings: what a node restores its
    error-feedback residual into."""
    return self._param_shapes

  def global_batches(self, batches: Iterator[np.ndarray]) -> Iterator[Any]:
    """This process's rows of each batch as the global batch (`fedjax_pt.distributed`); the
    batches themselves with one process."""
    return map(self._layout.global_batch, batches)

  def init(self, params, step: int, opt_states: Sequence[Any | None] | None = None) -> LocalState:
    """The state of a group starting from `params` at global step `step`: fresh Adam moments, or
    the clients' own where `opt_states` has them (fl.reset_optimizer=False)."""
    if opt_states is not None and all(s is None for s in opt_states):
      opt_states = None
    if opt_states is not None:
      # Kept states may come from anywhere (a checkpoint restores them to one device): move them.
      opt_states = [self._init_opt(params) if s is None else
                    jax.device_put(s, self._opt_shardings) for s in opt_states]
    return self._place(params, step, opt_states)

  def train(self, params, step: int, batches: Sequence[Iterator[np.ndarray]],
            opt_states: Sequence[Any | None] | None, num_steps: int, log_every: int = 0,
            on_step: Callable[[int], None] | None = None) -> list[ClientResult]:
    """`num_steps` local steps of `parallel` clients (one batch iterator each) from `params`.

    `on_step` is called once per step (of the whole group). Each result holds its client's own
    state.
    """
    if len(batches) != self.parallel:
      raise ValueError(f'a group has mesh.clients={self.parallel} clients, got {len(batches)}')
    state = self.init(params, step, opt_states)
    if self.parallel == 1:
      return [client_update(self.train_step, state, self.global_batches(batches[0]), num_steps,
                            log_every, on_step)]
    state, steps = _local_steps(self.train_step, state,
                                lambda: np.stack([next(b) for b in batches]), num_steps,
                                log_every, on_step, clients=self.parallel)
    return [steps.result(s, i) for i, s in enumerate(self._unstack(state))]
