"""The server's state and its outer step: the outer optimizer applied to the pseudo-gradient."""

from typing import Any

import flax.struct
import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from fedjax_pt import metrics
from fedjax_pt import sharding
from fedjax_pt.federated import aggregation
from fedjax_pt.federated import fragments as fragments_lib


class ServerState(flax.struct.PyTreeNode):
  """The global model and the outer optimizer's state: one state, or with F > 1 streaming
  fragments a tuple of F, one per fragment (each fragment steps at its own syncs)."""
  params: Any
  opt_state: Any
  round: int = flax.struct.field(pytree_node=False, default=0)
  # Clients known to hold a model of their own (streaming fragments, mixing), as their last
  # reports said: they are sent only the fragment synchronised last, the others the whole model.
  holders: frozenset[int] = flax.struct.field(pytree_node=False, default=frozenset())
  # fl.quorum: the late updates in flight to a later round (`quorum.LateUpdate`).
  pending: tuple = flax.struct.field(pytree_node=False, default=())


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

  With a `fragment` (streaming fragments), `mean_delta` is a fragment tree
  (`fedjax_pt.federated.fragments`) and the step moves that fragment of the model and its own
  optimizer state only. Given a sharded state `like` (from `init_server_state` with shardings), the
  step keeps every array of the state where it is in `like` and updates the state in place
  (donation).
  """
  part = ((lambda tree: tree) if fragment is None else
          (lambda tree: fragments_lib.select(tree, assignment, fragment)))

  def server_update(params, opt_state, mean_delta):
    delta = aggregation.pseudo_gradient_of_deltas(mean_delta)
    updates, opt_state = tx.update(delta, opt_state, part(params))
    new_params = optax.apply_updates(part(params), updates)
    if fragment is not None:
      new_params = fragments_lib.replace(params, new_params, assignment, fragment)
    step_metrics = {
        'pseudo_grad_norm': metrics.global_norm(delta),
        'outer_update_norm': metrics.global_norm(updates),
    }
    return new_params, opt_state, step_metrics

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
    params, opt_state, step_metrics = server_update(state.params, opt_part(state.opt_state),
                                               mean_delta)
    if fragment is not None:
      opt_state = tuple(opt_state if f == fragment else s for f, s in enumerate(state.opt_state))
    # A round ends with the sync of fragment 0 (or of the whole model).
    return state.replace(params=params, opt_state=opt_state,
                         round=state.round + (fragment in (None, 0))), step_metrics

  return apply
