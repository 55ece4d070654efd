"""The server's state and its outer step: the outer optimizer applied to the pseudo-gradient."""

import dataclasses
from typing import Any

import flax.struct
import jax
import ml_collections
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from fedjax_pt import aggregation
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
    if self.weighting not in aggregation.WEIGHTINGS:
      raise ValueError(f'fl.weighting must be one of {aggregation.WEIGHTINGS}, got '
                       f'{self.weighting!r}')

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


def make_server_update(tx: optax.GradientTransformation, like: ServerState | None = None):
  """Returns `apply(state, mean_params) -> (state, metrics)`: the jitted outer step.

  Given a sharded state `like` (from `init_server_state` with shardings), the step keeps every
  array of the state where it is in `like` and updates the state in place (donation).
  """

  def server_update(params, opt_state, mean_client_params):
    delta = aggregation.pseudo_gradient(params, mean_client_params)
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
