"""The server's state and its outer step: the outer optimizer applied to the pseudo-gradient."""

import dataclasses
from typing import Any

import flax.struct
import jax
import ml_collections
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from fedjax_pt.federated import aggregation
from fedjax_pt.federated import compression as compression_lib
from fedjax_pt.federated import fragments as fragments_lib
from fedjax_pt import optimizers
from fedjax_pt.federated import privacy
from fedjax_pt.federated import profiles as profiles_lib
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
  outer_lr_warmup_rounds: int = 0  # R: the outer lr ramps as lr * min(1, r / R) at round r
  outer_momentum_warmup_rounds: int = 0  # the same ramp for the outer momentum
  reset_optimizer: bool = True
  weighting: str = 'tokens'
  fragments: int = 1
  fragment_mixing: float = 0.0
  compression: compression_lib.CompressionConfig = compression_lib.CompressionConfig()
  profiles: tuple[profiles_lib.ClientProfile, ...] = ()  # one per client, or () (identical)
  dp: privacy.DPConfig = privacy.DPConfig()
  secagg: privacy.SecAggConfig = privacy.SecAggConfig()

  @property
  def keeps_client_models(self) -> bool:
    """Whether clients carry their own model from one synchronisation to the next (streaming
    fragments, or mixing); otherwise every round starts from the global model."""
    return self.fragments > 1 or self.fragment_mixing > 0

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
    for name in ('outer_lr_warmup_rounds', 'outer_momentum_warmup_rounds'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f'fl.{name} must be an integer >= 0 (0: no warmup), got {value!r}')
    if self.outer_momentum_warmup_rounds and not self.outer_momentum:
      raise ValueError(f'fl.outer_momentum_warmup_rounds={self.outer_momentum_warmup_rounds} '
                       'ramps a momentum of 0: set fl.outer_momentum, or the warmup to 0')
    if self.weighting not in aggregation.WEIGHTINGS:
      raise ValueError(f'fl.weighting must be one of {aggregation.WEIGHTINGS}, got '
                       f'{self.weighting!r}')
    if not isinstance(self.fragments, int) or self.fragments < 1:
      raise ValueError(f'fl.fragments must be a positive integer, got {self.fragments!r}')
    if self.fragments > self.local_steps:
      raise ValueError(f'fl.fragments={self.fragments} exceeds fl.local_steps='
                       f'{self.local_steps} (a fragment syncs every tau / F steps)')
    if not 0 <= self.fragment_mixing < 1:
      raise ValueError(f'fl.fragment_mixing must be in [0, 1), got {self.fragment_mixing}')
    if self.keeps_client_models and self.clients_per_round != self.num_clients:
      # A client left out of a synchronisation would train on from a stale model.
      raise ValueError(f'fl.fragments={self.fragments} / fl.fragment_mixing='
                       f'{self.fragment_mixing} keep every client\'s model between syncs: they '
                       f'need fl.clients_per_round = fl.num_clients, got {self.clients_per_round} '
                       f'of {self.num_clients}')
    self._check_privacy()

  def _check_privacy(self) -> None:
    dp, secagg = self.dp, self.secagg
    if dp.enabled or secagg.enabled:
      what = 'fl.dp' if dp.enabled else 'fl.secagg'
      if self.fragments > 1 or self.fragment_mixing:
        raise ValueError(f'{what} needs whole-model synchronisations: fl.fragments must be 1 and '
                         f'fl.fragment_mixing 0, got {self.fragments} and {self.fragment_mixing}')
      if self.weighting == 'examples':
        raise ValueError(f"{what} averages the clients uniformly (a weight that depends on a "
                         f"client's data would unbound its influence): fl.weighting must be "
                         f"'uniform' or 'tokens' with identical clients, got 'examples'")
    if secagg.enabled:
      secagg.check(self.clients_per_round)
      if self.compression.upload != 'none':
        raise ValueError(f'fl.secagg quantises the deltas itself: fl.compression.upload must be '
                         f"'none', got {self.compression.upload!r}")
      if dp.enabled and dp.noise_at != 'clients':
        raise ValueError("fl.secagg hides each client's delta from the server, which can then "
                         "neither clip it nor noise it alone: fl.dp.noise_at must be 'clients', "
                         f'got {dp.noise_at!r}')

  @classmethod
  def from_config(cls, fl: ml_collections.ConfigDict) -> 'FLConfig':
    groups = {'compression', 'profiles', 'dp', 'secagg'}
    fields = {f.name for f in dataclasses.fields(cls)} - groups
    return cls(**{k: v for k, v in fl.to_dict().items() if k in fields},
               compression=compression_lib.CompressionConfig.from_config(fl.compression),
               profiles=profiles_lib.parse(fl.get('profiles', ''), fl.num_clients),
               dp=privacy.DPConfig.from_config(fl.dp) if 'dp' in fl else privacy.DPConfig(),
               secagg=(privacy.SecAggConfig.from_config(fl.secagg) if 'secagg' in fl else
                       privacy.SecAggConfig()))

  def profile(self, k: int) -> profiles_lib.ClientProfile | None:
    return self.profiles[k] if self.profiles else None


class ServerState(flax.struct.PyTreeNode):
  """The global model and the outer optimizer's state: one state, or with F > 1 streaming
  fragments a tuple of F, one per fragment (each fragment steps at its own syncs)."""
  params: Any
  opt_state: Any
  round: int = flax.struct.field(pytree_node=False, default=0)


def init_server_state(params, tx: optax.GradientTransformation, shardings: Any = None,
                      assignment: Any = None, fragments: int = 1) -> ServerState:
  """With the parameters' `shardings` (NamedShardings), the outer optimizer's state is created
  already split like them. With `fragments` > 1, one state per fragment of `assignment`."""
  if fragments == 1:
    return ServerState(params=params, opt_state=_init_opt(tx, params, shardings), round=0)
  parts = tuple(_init_opt(tx, fragments_lib.select(params, assignment, f),
                          None if shardings is None else
                          fragments_lib.select(shardings, assignment, f))
                for f in range(fragments))
  return ServerState(params=params, opt_state=parts, round=0)


def _init_opt(tx: optax.GradientTransformation, params, shardings: Any):
  if shardings is None:
    return tx.init(params)
  shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  init = jax.jit(tx.init, out_shardings=sharding.optimizer_shardings(
      tx, shapes, shardings, _replicated(shardings)))
  return init(params)


def _replicated(shardings: Any) -> NamedSharding:
  return NamedSharding(jax.tree.leaves(shardings)[0].mesh, PartitionSpec())


def make_server_update(tx: optax.GradientTransformation, like: ServerState | None = None,
                       assignment: Any = None, fragment: int | None = None):
  """Returns `apply(state, mean_delta) -> (state, metrics)`: the jitted outer step on the clients'
  mean delta (sum_k w_k (theta_k - theta); the pseudo-gradient is its negation).

  With a `fragment` (streaming fragments), `mean_delta` is a fragment tree (`fedjax_pt.federated.fragments`)
  and the step moves that fragment of the model and its own optimizer state only. Given a sharded
  state `like` (from `init_server_state` with shardings), the step keeps every array of the state
  where it is in `like` and updates the state in place (donation).
  """
  part = ((lambda tree: tree) if fragment is None else
          (lambda tree: fragments_lib.select(tree, assignment, fragment)))

  def server_update(params, opt_state, mean_delta):
    delta = aggregation.pseudo_gradient_of_deltas(mean_delta)
    updates, opt_state = tx.update(delta, opt_state, part(params))
    new_params = optax.apply_updates(part(params), updates)
    if fragment is not None:
      new_params = fragments_lib.replace(params, new_params, assignment, fragment)
    metrics = {
        'pseudo_grad_norm': optimizers.global_norm(delta),
        'outer_update_norm': optimizers.global_norm(updates),
    }
    return new_params, opt_state, metrics

  def opt_part(opt_state):
    return opt_state if fragment is None else opt_state[fragment]

  if like is None:
    server_update = jax.jit(server_update)
  else:
    params_sh, opt_sh = (jax.tree.map(lambda x: x.sharding, t) for t in (like.params,
                                                                         opt_part(like.opt_state)))
    server_update = jax.jit(server_update, in_shardings=(params_sh, opt_sh, part(params_sh)),
                            out_shardings=(params_sh, opt_sh, _replicated(params_sh)),
                            donate_argnums=(0, 1))

  def apply(state: ServerState, mean_delta) -> tuple[ServerState, dict]:
    params, opt_state, metrics = server_update(state.params, opt_part(state.opt_state),
                                               mean_delta)
    if fragment is not None:
      opt_state = tuple(opt_state if f == fragment else s for f, s in enumerate(state.opt_state))
    # A round ends with the sync of fragment 0 (or of the whole model).
    return ServerState(params=params, opt_state=opt_state,
                       round=state.round + (fragment in (None, 0))), metrics

  return apply
