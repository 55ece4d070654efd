"""Client faults: what the server tolerates, and seeded fault injection to test that it does.

A sampled client can fail three ways: it raises (crash, lost connection), it returns non-finite
parameters (divergence, corruption), or it reports late: after `fl.round_timeout_s` of real time, or
after `fl.round_deadline_s` of simulated time (`fedjax_pt.federated.sim_clock`). Such a client is
left out of the round's average. Injected faults are a pure function of (seed, round, client,
attempt), so a resumed run meets exactly the faults an uninterrupted one did.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


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

  @classmethod
  def from_config(cls, fl: ml_collections.ConfigDict) -> 'FaultConfig':
    cfg = cls(min_clients=fl.min_clients, round_timeout_s=float(fl.round_timeout_s),
              round_deadline_s=float(fl.round_deadline_s),
              on_too_few_clients=fl.on_too_few_clients, max_round_retries=fl.max_round_retries,
              failure_prob=float(fl.fault.failure_prob), nan_prob=float(fl.fault.nan_prob))
    if cfg.min_clients > fl.clients_per_round:
      raise ValueError(f'fl.min_clients={cfg.min_clients} exceeds '
                       f'fl.clients_per_round={fl.clients_per_round}')
    return cfg


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
