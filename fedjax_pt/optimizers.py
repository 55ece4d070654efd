"""Local (client) AdamW or Muon with warmup + cosine schedule, and the server's outer optimizers."""

import dataclasses
from typing import Any

import jax
import ml_collections
import optax


@dataclasses.dataclass(frozen=True)
class OptConfig:
  lr: float
  warmup_steps: int
  schedule_steps: int
  final_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  optimizer: str = 'adamw'  # 'adamw' | 'muon' (MuLoCo: Muon on the blocks' matrices)
  # Muon's keys: its peak lr (the schedule's shape, scaled), momentum and Newton-Schulz steps.
  muon_lr: float = 0.02
  muon_beta: float = 0.95
  muon_ns_steps: int = 5
  # Added to the step before the schedule reads it: a warm start (`init.step`) continues the
  # schedule of the run it starts from. Not an `opt.*` key.
  step_offset: int = 0

  def __post_init__(self):
    if self.lr <= 0:
      raise ValueError(f'opt.lr must be positive, got {self.lr}')
    if self.warmup_steps < 0 or self.schedule_steps <= 0:
      raise ValueError(f'opt.warmup_steps must be >= 0 and opt.schedule_steps > 0, got '
                       f'{self.warmup_steps} and {self.schedule_steps}')
    if self.warmup_steps >= self.schedule_steps:
      raise ValueError(f'opt.warmup_steps={self.warmup_steps} must be smaller than '
                       f'opt.schedule_steps={self.schedule_steps}')
    if self.step_offset < 0:
      raise ValueError(f'init.step must be >= 0, got {self.step_offset}')
    if not 0 <= self.final_lr_ratio <= 1:
      raise ValueError(f'opt.final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}')
    for name in ('b1', 'b2'):
      if not 0 <= getattr(self, name) < 1:
        raise ValueError(f'opt.{name} must be in [0, 1) (1 never forgets, dividing by zero in '
                         f"Adam's bias correction), got {getattr(self, name)}")
    if self.eps <= 0:
      raise ValueError(f'opt.eps must be positive (it bounds Adam\'s step), got {self.eps}')
    if self.weight_decay < 0:
      raise ValueError(f'opt.weight_decay must be >= 0, got {self.weight_decay}')
    if self.grad_clip < 0:
      raise ValueError(f'opt.grad_clip must be >= 0 (0: no clipping), got {self.grad_clip}')
    self._check_muon()

  def _check_muon(self):
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f'opt.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}')
    if self.optimizer != 'muon':
      defaults = {f.name: f.default for f in dataclasses.fields(OptConfig)}
      for name in ('muon_lr', 'muon_beta', 'muon_ns_steps'):
        if getattr(self, name) != defaults[name]:
          raise ValueError(f'opt.{name}={getattr(self, name)} is set but opt.optimizer='
                           f"{self.optimizer!r}, which ignores it: set opt.optimizer='muon', or "
                           f'leave opt.muon_* at their defaults')
    if self.muon_lr <= 0:
      raise ValueError(f'opt.muon_lr must be positive, got {self.muon_lr}')
    if not 0 <= self.muon_beta < 1:
      raise ValueError(f'opt.muon_beta must be in [0, 1), got {self.muon_beta}')
    if (not isinstance(self.muon_ns_steps, int) or isinstance(self.muon_ns_steps, bool)
        or self.muon_ns_steps < 1):
      raise ValueError(f'opt.muon_ns_steps must be an integer >= 1, got {self.muon_ns_steps!r}')

  @classmethod
  def from_config(cls, opt: ml_collections.ConfigDict) -> 'OptConfig':
    return cls(**opt.to_dict())


OPTIMIZERS = ('adamw', 'muon')


def lr_schedule(cfg: OptConfig) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine decay to `final_lr_ratio` x the peak; with a
  `step_offset` the run's step 0 is the schedule's step `step_offset`."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
      decay_steps=cfg.schedule_steps, end_value=cfg.lr * cfg.final_lr_ratio)
  if not cfg.step_offset:
    return schedule
  return lambda step: schedule(step + cfg.step_offset)


def _decay_mask(params):
  # Weight decay on matrices only: norms' scales are left alone, as in MPT/GPT recipes.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def muon_mask(params):
  """True for the parameters Muon orthogonalises: the blocks' 2-D Dense kernels (attention and
  MLP). The embeddings (tied with the output), positions, norm scales and any bias stay on AdamW,
  as in Muon's and MuLoCo's recipes."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: len(p.shape) == 2 and getattr(path[-1], 'key', None) == 'kernel', params)


def _labels(params):
  return jax.tree.map(lambda muon: 'muon' if muon else 'adamw', muon_mask(params))


def _matrices(updates):
  # Muon's updates are masked trees (optax.partition): each leaf is one (fan_in, fan_out) matrix.
  return jax.tree.map(lambda _: optax.contrib.MuonDimensionNumbers(0, 1), updates)


def _width_scaling(updates, params):
  # optax.contrib.muon's default scaling, sqrt(max(1, fan_out / fan_in)), which optax does not
  # export on its own.
  del params
  return jax.tree.map(lambda u: u * max(1.0, u.shape[1] / u.shape[0]) ** 0.5, updates)


def local_optimizer(cfg: OptConfig) -> optax.GradientTransformation:
  """AdamW's or Muon's direction *without* the learning rate.

  The learning rate is applied by the train step from the *global* step (round * local_steps +
  local step) so the schedule runs across rounds even though the optimizer state is reset each
  round, as in Photon/DiLoCo. Muon's matrices follow the same schedule scaled to `muon_lr`.
  """
  clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
  adam = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  decay = optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask)
  if cfg.optimizer == 'adamw':
    return optax.chain(clip, adam, decay)
  # optax.contrib.muon's alias applies the lr itself and gives its AdamW Nesterov momentum; built
  # from its parts (scale_by_muon: momentum and Newton-Schulz), the lr stays outside and the other
  # parameters get exactly the AdamW above.
  muon = optax.chain(
      optax.contrib.scale_by_muon(ns_steps=cfg.muon_ns_steps, beta=cfg.muon_beta,
                                  weight_dimension_numbers=_matrices),
      optax.stateless(_width_scaling),
      optax.add_decayed_weights(cfg.weight_decay),
      optax.scale(cfg.muon_lr / cfg.lr))
  return optax.chain(clip, optax.partition({'muon': muon, 'adamw': optax.chain(adam, decay)},
                                           _labels))


def state_copies(cfg: OptConfig, params) -> Any:
  """Parameter-sized arrays the local optimizer keeps per parameter: Adam's two moments, Muon's
  one momentum (the planner's memory formula)."""
  if cfg.optimizer == 'adamw':
    return jax.tree.map(lambda _: 2, params)
  return jax.tree.map(lambda muon: 1 if muon else 2, muon_mask(params))


def apply_lr(direction, lr: jax.Array):
  return jax.tree.map(lambda d: (-lr * d).astype(d.dtype), direction)


OUTER_OPTIMIZERS = ('nesterov', 'sgd', 'adam')


def outer_optimizer(name: str, lr: float, momentum: float, b2: float = 0.95,
                    lr_warmup_rounds: int = 0,
                    momentum_warmup_rounds: int = 0) -> optax.GradientTransformation:
  """The server optimizer, applied to the pseudo-gradient as if it were a gradient.

  'nesterov' (Photon/DiLoCo default): v <- mu v + g; theta <- theta - lr (g + mu v).
  'sgd': heavy-ball momentum v <- mu v + g; theta <- theta - lr v (plain SGD when mu = 0).
  'adam': Adam with b1 = momentum.

  Warmups ramp the outer lr and/or the momentum linearly over the first R outer steps (`warmup`):
  step t (0-based) uses value * min(1, (t + 1) / R). From scratch the first pseudo-gradients are
  large and Nesterov takes lr (1 + mu) of the first one, then keeps pushing in its direction: the
  round-2 overshoot that a ramp damps. Without warmups the optimizer (and its state in
  checkpoints) is exactly what it was before they existed.
  """
  if name not in OUTER_OPTIMIZERS:
    raise ValueError(f'fl.outer_optimizer must be one of {OUTER_OPTIMIZERS}, got {name!r}')
  if not lr_warmup_rounds and not momentum_warmup_rounds:
    return _outer(name, lr, momentum, b2)
  return optax.inject_hyperparams(_outer, static_args=('name', 'b2'))(
      name=name, lr=warmup(lr, lr_warmup_rounds), momentum=warmup(momentum, momentum_warmup_rounds),
      b2=b2)


def warmup(value: float, rounds: int) -> optax.ScalarOrSchedule:
  """value * min(1, (t + 1) / rounds) at outer step t; `value` itself when rounds <= 1."""
  if rounds <= 1:
    return value
  return optax.linear_schedule(init_value=value / rounds, end_value=value,
                               transition_steps=rounds - 1)


def _outer(name: str, lr, momentum, b2: float) -> optax.GradientTransformation:
  # `momentum` is a float, or a traced scalar under a momentum warmup: then it is never None.
  has_momentum = not isinstance(momentum, (int, float)) or momentum > 0
  if name == 'nesterov':
    return optax.sgd(lr, momentum=momentum if has_momentum else None, nesterov=has_momentum)
  if name == 'sgd':
    return optax.sgd(lr, momentum=momentum if has_momentum else None)
  return optax.adam(lr, b1=momentum, b2=b2)
