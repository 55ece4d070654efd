"""A node's snapshots: it starts from the latest one before the round it is asked for, and what a
restarted server replays overwrites the lost future."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pt.deploy import node_state


def _opt_state(value):
  return optax.adam(1e-3).init({'w': jnp.full((3,), value, jnp.float32)})


def test_start_from_the_latest_snapshot_before_the_round(tmp_path):
  state = node_state.NodeState(str(tmp_path / 'client-0'))
  like = jax.eval_shape(lambda: _opt_state(0.0))
  assert state.start(1, 0, like) == node_state.Snapshot()
  for key, position in [((1, 0), 10), ((2, 0), 20), ((2, 1), 21), ((3, 0), 30)]:
    state.save(*key, node_state.Snapshot({'position': position}), keep=10)
  assert state.start(4, 0, like).iterator == {'position': 30}
  # A retry of round 2 continues where attempt 0 left the node, as the simulation does.
  assert state.start(2, 1, like).iterator == {'position': 20}
  # That dropped (2, 1) and (3, 0): a server that restarted from round 1 replays them.
  assert state.start(2, 1, like).iterator == {'position': 20}
  assert state.start(3, 0, like).iterator == {'position': 20}


def test_kept_adam_state_round_trips_and_old_snapshots_are_pruned(tmp_path):
  state = node_state.NodeState(str(tmp_path / 'client-1'))
  like = jax.eval_shape(lambda: _opt_state(0.0))
  for r in range(1, 5):
    state.save(r, 0, node_state.Snapshot({'r': r}, _opt_state(float(r))), keep=2)
  assert sorted(p.name for p in (tmp_path / 'client-1').iterdir()) == ['r000003-a0', 'r000004-a0']
  restored = state.start(5, 0, like).opt_state
  jax.tree.map(np.testing.assert_array_equal, restored, _opt_state(4.0))


def test_error_feedback_residual_round_trips(tmp_path):
  state = node_state.NodeState(str(tmp_path / 'client-2'))
  opt_like = jax.eval_shape(lambda: _opt_state(0.0))
  params_like = {'w': jax.ShapeDtypeStruct((3,), jnp.float32)}
  residual = {'w': jnp.asarray([0.5, -0.25, 1e-8], jnp.float32)}
  state.save(1, 0, node_state.Snapshot({'r': 1}, None, residual), keep=2)
  restored = state.start(2, 0, opt_like, params_like)
  assert restored.opt_state is None
  np.testing.assert_array_equal(restored.residual['w'], residual['w'])
