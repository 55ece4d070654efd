"""A node's snapshots: it starts from the latest one before the synchronisation it is asked for,
and what a restarted server replays overwrites the lost future."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pt.deploy import node_state
from fedjax_pt.federated.client_round import ClientMemory

_PARAMS = {'w': jax.ShapeDtypeStruct((3,), jnp.float32)}


def _opt_state(value):
  return optax.adam(1e-3).init({'w': jnp.full((3,), value, jnp.float32)})


def _like():
  params = _PARAMS
  return {'opt_state': jax.eval_shape(lambda: _opt_state(0.0)), 'residual': params,
          'model': params, 'anchor': params}


def test_start_from_the_latest_snapshot_before_the_synchronisation(tmp_path):
  state = node_state.NodeState(str(tmp_path / 'client-0'))
  assert state.start((1, 0, 0), _like()) == node_state.Snapshot()
  for key, position in [((1, 0, 0), 10), ((2, 0, 0), 20), ((2, 0, 1), 21), ((2, 3, 0), 23),
                        ((3, 0, 0), 30)]:
    state.save(key, node_state.Snapshot({'position': position}), keep=10)
  assert state.start((4, 0, 0), _like()).iterator == {'position': 30}
  # A streaming segment starts where the round's previous one ended.
  assert state.start((2, 3, 1), _like()).iterator == {'position': 23}
  # A retry of round 2 continues where attempt 0 left the node, as the simulation does.
  assert state.start((2, 0, 1), _like()).iterator == {'position': 20}
  # That dropped (2, 0, 1) and later: a server that restarted from round 1 replays them.
  assert state.start((3, 0, 0), _like()).iterator == {'position': 20}


def test_memory_round_trips_and_old_snapshots_are_pruned(tmp_path):
  state = node_state.NodeState(str(tmp_path / 'client-1'))
  residual = {'w': jnp.asarray([0.5, -0.25, 1e-8], jnp.float32)}
  for r in range(1, 5):
    memory = ClientMemory(opt_state=_opt_state(float(r)), residual=residual, merged=(r, 2))
    state.save((r, 0, 0), node_state.Snapshot({'r': r}, memory), keep=2)
  assert sorted(p.name for p in (tmp_path / 'client-1').iterdir()) == ['r000003-s0-a0',
                                                                       'r000004-s0-a0']
  restored = state.start((5, 0, 0), _like()).memory
  jax.tree.map(np.testing.assert_array_equal, restored.opt_state, _opt_state(4.0))
  np.testing.assert_array_equal(restored.residual['w'], residual['w'])
  assert restored.model is None and restored.anchor is None and restored.merged == (4, 2)


def test_a_snapshot_of_the_layout_without_segments_is_read(tmp_path):
  """Snapshots written before streaming fragments reached the deployment are named r<round>-a<a>
  and hold opt_state/ and residual/ only: they are the segment that starts at step 0."""
  state = node_state.NodeState(str(tmp_path / 'client-2'))
  state.save((1, 0, 0), node_state.Snapshot({'r': 1}, ClientMemory(opt_state=_opt_state(1.0))),
             keep=2)
  (tmp_path / 'client-2' / 'r000001-s0-a0').rename(tmp_path / 'client-2' / 'r000001-a0')
  (tmp_path / 'client-2' / 'r000001-a0' / 'memory.json').unlink()
  restored = state.start((2, 0, 0), _like())
  assert restored.iterator == {'r': 1} and restored.memory.merged is None
  jax.tree.map(np.testing.assert_array_equal, restored.memory.opt_state, _opt_state(1.0))
