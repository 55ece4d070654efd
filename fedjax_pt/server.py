"""Server side of a round: client sampling, weighted averaging, pseudo-gradient, outer step."""

from collections.abc import Sequence
import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from fedjax_pt import optimizers
from fedjax_pt import sharding


@dataclasses.dataclass(frozen=True)
class FLConfig:
  num_clients: int
  clients_per_round: int
  rounds: int
  local_steps: int
  outer_optimizer: str = 'nesterov'
  outer_lr: float = 0.1
  outer_momentum: float = 0.9
  outer_b2: float = 0.95
  reset_optimizer: bool = True
  weighting: str = 'tokens'

  def __post_init__(self):
    for name in ('num_clients', 'clients_per_round', 'rounds', 'local_steps'):
      if getattr(self, name) <= 0:
        raise ValueError(f'fl.{name} must be positive, got {getattr(self, name)}')
    if self.clients_per_round > self.num_clients:
      raise ValueError(f'fl.clients_per_round={self.clients_per_round} exceeds '
                       f'fl.num_clients={self.num_clients}')
    if self.outer_optimizer not in optimizers.OUTER_OPTIMIZERS:
      raise ValueError(f'fl.outer_optimizer must be one of {optimizers.OUTER_OPTIMIZERS}, got '
                       f'{self.outer_optimizer!r}')
    if self.outer_lr <= 0 or not 0 <= self.outer_momentum < 1:
      raise ValueError(f'fl.outer_lr must be > 0 and fl.outer_momentum in [0, 1), got '
                       f'{self.outer_lr} and {self.outer_momentum}')
    if self.weighting not in ('tokens', 'uniform'):
      raise ValueError(f"fl.weighting must be 'tokens' or 'uniform', got {self.weighting!r}")

  @classmethod
  def from_config(cls, fl: ml_collections.ConfigDict) -> 'FLConfig':
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in fl.to_dict().items() if k in fields})


class ServerState(flax.struct.PyTreeNode):
  params: Any
  opt_state: Any
  round: int = flax.struct.field(pytree_node=False, default=0)


def init_server_state(params, tx: optax.GradientTransformation,
                      shardings: Any = None) -> ServerState:
  """With the parameters' `shardings` (NamedShardings), the outer optimizer's state is created
  already split like them."""
  if shardings is None:
    return ServerState(params=params, opt_state=tx.init(params), round=0)
  shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  init = jax.jit(tx.init, out_shardings=sharding.optimizer_shardings(
      tx, shapes, shardings, _replicated(shardings)))
  return ServerState(params=params, opt_state=init(params), round=0)


def _replicated(shardings: Any) -> NamedSharding:
  return NamedSharding(jax.tree.leaves(shardings)[0].mesh, PartitionSpec())


def client_groups(clients: Sequence[int], size: int) -> list[list[int]]:
  """The sampled clients in groups of `size` (mesh.clients) that train at the same time."""
  if len(clients) % size:
    raise ValueError(f'fl.clients_per_round={len(clients)} is not divisible by mesh.clients={size}')
  return [list(clients[i:i + size]) for i in range(0, len(clients), size)]


def sample_clients(num_clients: int, clients_per_round: int, seed: int, round_idx: int,
                   attempt: int = 0) -> np.ndarray:
  """Uniform sample without replacement, a pure function of (seed, round, attempt): reproducible on
  resume; a retried round (attempt > 0) draws afresh."""
  if clients_per_round == num_clients:
    return np.arange(num_clients)
  rng = np.random.default_rng([seed, round_idx] + ([attempt] if attempt else []))
  return np.sort(rng.choice(num_clients, size=clients_per_round, replace=False))


def client_weights(num_tokens: Sequence[int], weighting: str) -> np.ndarray:
  """Normalised aggregation weights: w_k ∝ n_k ('tokens') or 1/K ('uniform')."""
  n = np.asarray(num_tokens, np.float64)
  w = n if weighting == 'tokens' else np.ones_like(n)
  return w / w.sum()


def weighted_average(client_params: Sequence[Any], weights: Sequence[float]) -> Any:
  """sum_k w_k theta_k (weights must already sum to one)."""
  return jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights, xs)), *client_params)


@jax.jit
def _scaled(params, weight):
  return jax.tree.map(lambda p: weight * p.astype(jnp.float32), params)


@jax.jit
def _add_scaled(acc, params, weight):
  return jax.tree.map(lambda a, p: a + weight * p.astype(a.dtype), acc, params)


class RunningAverage:
  """Weighted mean of client parameters accumulated one client at a time.

  Memory stays at one extra copy of the model whatever the number of clients, which matters at
  1.3B parameters x 8 clients.
  """

  def __init__(self):
    self._sum = None
    self._total_weight = 0.0
    self.count = 0

  def add(self, params, weight: float) -> None:
    # The sum starts from the first client's scaled copy, so it is split over the devices exactly
    # like the clients' parameters (a zeros tree would sit whole on one device).
    if self._sum is None:
      self._sum = _scaled(params, jnp.float32(weight))
    else:
      self._sum = _add_scaled(self._sum, params, jnp.float32(weight))
    self._total_weight += float(weight)
    self.count += 1

  def result(self):
    if self._sum is None:
      raise ValueError('no client was added to the average')
    return jax.tree.map(lambda s: s / self._total_weight, self._sum)


def pseudo_gradient(global_params, mean_client_params):
  """Delta = theta - sum_k w_k theta_k: the direction the clients moved, negated."""
  return jax.tree.map(jnp.subtract, global_params, mean_client_params)


def make_server_update(tx: optax.GradientTransformation, like: ServerState | None = None):
  """Returns `apply(state, mean_params) -> (state, metrics)`: the jitted outer step.

  Given a sharded state `like` (from `init_server_state` with shardings), the step keeps every
  array of the state where it is in `like` and updates the state in place (donation).
  """

  def server_update(params, opt_state, mean_client_params):
    delta = pseudo_gradient(params, mean_client_params)
    updates, opt_state = tx.update(delta, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    metrics = {
        'pseudo_grad_norm': optimizers.global_norm(delta),
        'outer_update_norm': optimizers.global_norm(updates),
    }
    return new_params, opt_state, metrics

  if like is None:
    server_update = jax.jit(server_update)
  else:
    params_sh, opt_sh = (jax.tree.map(lambda x: x.sharding, t) for t in (like.params,
                                                                         like.opt_state))
    server_update = jax.jit(server_update, in_shardings=(params_sh, opt_sh, params_sh),
                            out_shardings=(params_sh, opt_sh, _replicated(params_sh)),
                            donate_argnums=(0, 1))

  def apply(state: ServerState, mean_client_params) -> tuple[ServerState, dict]:
    params, opt_state, metrics = server_update(state.params, state.opt_state, mean_client_params)
    return ServerState(params=params, opt_state=opt_state, round=state.round + 1), metrics

  return apply
