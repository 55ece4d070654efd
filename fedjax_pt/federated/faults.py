"""Client faults: what the server tolerates, and seeded fault injection to test that it does.

A sampled client can fail three ways: it raises (crash, lost connection), it returns non-finite
parameters (divergence, corruption), or it reports late: after `fl.round_timeout_s` of real time, or
after `fl.round_deadline_s` of simulated time (`fedjax_pt.federated.sim_clock`). Such a client is
left out of the round's average. Injected faults are a pure function of (seed, round, client,
attempt), so a resumed run meets exactly the faults an uninterrupted one did.

A client can also be wrong without failing: `fl.fault.poison` makes the clients of
`fl.fault.poison_clients` send, every round, a delta that is finite but harmful ('scale': times
`fl.fault.poison_scale`; 'sign_flip': negated; 'noise': Gaussian noise of the delta's norm;
'stale': zero, as from a node that did not train). Only a robust `fl.aggregation` resists them.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax


POISONS = ('none', 'scale', 'sign_flip', 'noise', 'stale')


class InjectedFailure(RuntimeError):
  """A client crash simulated by `fl.fault.failure_prob`."""


@dataclasses.dataclass(frozen=True)
class FaultConfig:
  min_clients: int = 1
  round_timeout_s: float = 0.0
  round_deadline_s: float = 0.0
  on_too_few_clients: str = 'retry'
  max_round_retries: int = 2
  failure_prob: float = 0.0
  nan_prob: float = 0.0
  poison: str = 'none'  # one of POISONS
  poison_clients: tuple[int, ...] = ()
  poison_scale: float = 10.0

  def __post_init__(self):
    if self.min_clients <= 0:
      raise ValueError(f'fl.min_clients must be positive, got {self.min_clients}')
    if self.round_timeout_s < 0:
      raise ValueError(f'fl.round_timeout_s must be >= 0 (0 = no deadline), got '
                       f'{self.round_timeout_s}')
    if self.round_deadline_s < 0:
      raise ValueError(f'fl.round_deadline_s must be >= 0 (0 = no deadline), got '
                       f'{self.round_deadline_s}')
    if self.on_too_few_clients not in ('retry', 'skip'):
      raise ValueError("fl.on_too_few_clients must be 'retry' or 'skip', got "
                       f'{self.on_too_few_clients!r}')
    if self.max_round_retries < 0:
      raise ValueError(f'fl.max_round_retries must be >= 0, got {self.max_round_retries}')
    for name in ('failure_prob', 'nan_prob'):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(f'fl.fault.{name} must be in [0, 1], got {getattr(self, name)}')
    if self.poison not in POISONS:
      raise ValueError(f'fl.fault.poison must be one of {POISONS}, got {self.poison!r}')
    if self.poison != 'none' and not self.poison_clients:
      raise ValueError(f'fl.fault.poison={self.poison!r} names no client: set '
                       'fl.fault.poison_clients, e.g. (0,)')

  @classmethod
  def from_config(cls, fl: ml_collections.ConfigDict) -> 'FaultConfig':
    cfg = cls(min_clients=fl.min_clients, round_timeout_s=float(fl.round_timeout_s),
              round_deadline_s=float(fl.round_deadline_s),
              on_too_few_clients=fl.on_too_few_clients, max_round_retries=fl.max_round_retries,
              failure_prob=float(fl.fault.failure_prob), nan_prob=float(fl.fault.nan_prob),
              poison=fl.fault.get('poison', 'none'),
              poison_clients=_clients(fl.fault.get('poison_clients', ())),
              poison_scale=float(fl.fault.get('poison_scale', 10.0)))
    bad = [k for k in cfg.poison_clients if not 0 <= k < fl.num_clients]
    if bad or len(set(cfg.poison_clients)) != len(cfg.poison_clients):
      raise ValueError(f'fl.fault.poison_clients={cfg.poison_clients} must name distinct clients '
                       f'in 0..{fl.num_clients - 1}')
    if cfg.min_clients > fl.clients_per_round:
      raise ValueError(f'fl.min_clients={cfg.min_clients} exceeds '
                       f'fl.clients_per_round={fl.clients_per_round}')
    return cfg


def _clients(value: Any) -> tuple[int, ...]:
  if isinstance(value, int) or not all(isinstance(k, int) for k in value):
    raise ValueError(f'fl.fault.poison_clients must be a tuple of client indices, got {value!r}')
  return tuple(value)


def injected_fault(cfg: FaultConfig, seed: int, round_idx: int, client: int, attempt: int,
                   fragment: int = 0) -> str | None:
  """'fail', 'nan' or None for this client in this round (at the sync of this fragment, with
  streaming fragments), reproducibly."""
  if not cfg.failure_prob and not cfg.nan_prob:
    return None
  # A stream of its own (the trailing 7) so faults never shift client sampling or data order.
  key = [seed, round_idx, client, attempt, 7] + ([fragment] if fragment else [])
  draw = np.random.default_rng(key).random()
  if draw < cfg.failure_prob:
    return 'fail'
  if draw < cfg.failure_prob + cfg.nan_prob:
    return 'nan'
  return None


def verdict(params, elapsed_s: float, cfg: FaultConfig, sim_time_s: float = 0.0) -> str | None:
  """Why the server leaves out parameters it received, or None to average them."""
  if cfg.round_deadline_s and sim_time_s > cfg.round_deadline_s:
    return f'late: simulated {sim_time_s:.1f}s > fl.round_deadline_s={cfg.round_deadline_s:g}'
  if not bool(all_finite(params)):
    return 'non-finite parameters'
  if cfg.round_timeout_s and elapsed_s > cfg.round_timeout_s:
    return f'late: {elapsed_s:.1f}s > fl.round_timeout_s={cfg.round_timeout_s:g}'
  return None


@jax.jit
def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def poisoned(tree):
  """The parameters of a diverged client: every value NaN."""
  return jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), tree)


def poisoned_delta(kind: str, delta, scale: float, key: jax.Array):
  """What a client poisoned with `kind` (`POISONS`) sends instead of its true `delta`."""
  if kind == 'scale':
    return jax.tree.map(lambda d: scale * d, delta)
  if kind == 'sign_flip':
    return jax.tree.map(jnp.negative, delta)
  if kind == 'stale':
    return jax.tree.map(jnp.zeros_like, delta)
  if kind == 'noise':
    leaves, treedef = jax.tree.flatten(delta)
    keys = jax.random.split(key, len(leaves))
    noise = [jax.random.normal(k, d.shape, d.dtype) for k, d in zip(keys, leaves)]
    ratio = optax.tree.norm(leaves) / optax.tree.norm(noise)
    return jax.tree.unflatten(treedef, [(ratio * z).astype(z.dtype) for z in noise])
  raise ValueError(f'fl.fault.poison must be one of {POISONS[1:]}, got {kind!r}')


def poison_of(cfg: FaultConfig, client: int) -> str | None:
  """The poison `client` applies to every delta it sends, or None."""
  return cfg.poison if client in cfg.poison_clients else None


def poison_key(seed: int, round_idx: int, client: int, attempt: int, fragment: int) -> jax.Array:
  """The draw of a 'noise' poison: its own stream, reproducible in a resumed run and a node."""
  key = jax.random.fold_in(jax.random.key(seed), 0x9015)
  for value in (round_idx, client, attempt, fragment):
    key = jax.random.fold_in(key, value)
  return key
