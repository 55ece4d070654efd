"""Quorum rounds (fl.quorum, fl.grace_s): the rule by hand through the round object, the late
update in a checkpoint, and the refusals."""


import jax.numpy as jnp
import numpy as np
import pytest

import scripted
from fedjax_pt.configs import tiny
from fedjax_pt.federated import algorithm as federation
from fedjax_pt.federated import faults
from fedjax_pt.federated import quorum
from fedjax_pt.federated.config import FLConfig


class TimedClients:
  """Client k "trains" to w = values[k] in compute_s[k] seconds (no links: that is its time)."""

  def __init__(self, values, compute_s):
    self.values, self.compute_s, self.calls = values, compute_s, []

  def unavailable(self):
    return ()

  def refused(self):
    return {}

  def train(self, broadcast, round_idx, client_ids, attempt, segment):
    del attempt, segment
    params = scripted.params_of(broadcast)
    self.calls.append((round_idx, list(client_ids)))
    for k in client_ids:
      delta = {'w': jnp.full_like(params['w'], self.values[k]) - params['w']}
      yield scripted.trained(k, delta, 10, examples=1, local_steps=1,
                             compute_s=self.compute_s[k], elapsed_s=0.01)


def _algorithm(**fl):
  cfg = FLConfig(num_clients=3, clients_per_round=3, rounds=3, local_steps=1,
                 outer_optimizer='sgd', outer_lr=1.0, outer_momentum=0.0, weighting='uniform',
                 **fl)
  return federation.FederatedAlgorithm(cfg, faults.FaultConfig(), seed=0)


def test_the_quorum_rule_by_hand():
  """Three clients reaching w = 1, 2, 10 in 1, 2 and 4 s; quorum 2, grace 0.5 s; FedAvg.
    round 1: arrivals 1, 2, 4: it closes at 2 + 0.5 = 2.5 and averages clients 0 and 1: theta_2
             = 1.5. Client 2's delta (10 - 0) is kept, due 4 - 2.5 = 1.5 s into round 2.
    round 2: client 2 is in flight, clients 0 and 1 train again (arrivals 1 and 2) and client 2's
             update comes at 1.5: it closes at 1.5 + 0.5 = 2.0 with all three, client 2's weight
             (1 + 1) ^ -0.5: theta_3 = 1.5 + (-0.5 + 0.5 + 0.70711 x 10) / 2.70711 = 4.11204.
    round 3: all three are sampled again."""
  algorithm = _algorithm(quorum=2, grace_s=0.5)
  clients = TimedClients({0: 1.0, 1: 2.0, 2: 10.0}, {0: 1.0, 1: 2.0, 2: 4.0})
  state = algorithm.init({'w': jnp.zeros((3,), jnp.float32)})
  state, first = algorithm.apply(state, 1, clients)
  np.testing.assert_allclose(state.params['w'], 1.5, rtol=1e-6)
  assert first.stats.late_clients == {2: 4.0} and first.stats.stale_clients == {}
  assert first.stats.num_aggregated == 2
  assert first.stats.sim_round_time_s == pytest.approx(2.5 + first.stats.server_time_s)
  assert [(u.client, u.due_s, u.born) for u in state.pending] == [(2, 1.5, 1)]
  state, second = algorithm.apply(state, 2, clients)
  assert clients.calls[1] == (2, [0, 1])
  w = 2 ** -0.5
  np.testing.assert_allclose(state.params['w'], 1.5 + w * 10 / (2 + w), rtol=1e-6)
  assert float(state.params['w'][0]) == pytest.approx(4.11204, abs=1e-5)
  assert second.stats.stale_clients == {2: 1} and second.stats.late_clients == {}
  assert second.stats.num_aggregated == 3 and state.pending == ()
  assert second.stats.sim_round_time_s == pytest.approx(2.0 + second.stats.server_time_s)
  state, _ = algorithm.apply(state, 3, clients)
  assert clients.calls[2] == (3, [0, 1, 2])


def test_without_grace_a_quorum_of_all_is_a_synchronous_round():
  clients = TimedClients({0: 1.0, 1: 2.0, 2: 10.0}, {0: 1.0, 1: 2.0, 2: 4.0})
  for fl in ({}, {'quorum': 3}):
    algorithm = _algorithm(**fl)
    state, result = algorithm.apply(algorithm.init({'w': jnp.zeros((2,))}), 1, clients)
    np.testing.assert_allclose(state.params['w'], 13 / 3, rtol=1e-6)
    assert result.stats.sim_round_time_s == pytest.approx(4.0 + result.stats.server_time_s)


def test_close_and_staleness_by_hand():
  assert quorum.close_s([3.0, -1.0, 2.0], 2, 0.25) == 2.25  # an early arrival counts at 0
  assert quorum.close_s([3.0], 2, 1.0) == 3.0  # fewer than the quorum: the last one
  assert quorum.close_s([], 2, 1.0) == 0.0
  assert quorum.staleness_weight(2.0, 3, 0.5) == 1.0  # 2 x 4 ^ -0.5
  assert quorum.staleness_weight(2.0, 0, 0.5) == 2.0


@pytest.mark.parametrize('keys, message', [
    (dict(quorum=4), 'fl.quorum must be an integer in 0..fl.clients_per_round=3'),
    (dict(quorum=True), 'fl.quorum must be an integer'),
    (dict(quorum=1, grace_s=-1.0), 'fl.grace_s must be a finite number >= 0'),
    (dict(grace_s=2.0), 'fl.grace_s=2.0 is set but fl.quorum=0 ignores it'),
    (dict(staleness_exponent=1.0), 'fl.staleness_exponent=1.0 is set but fl.quorum=0'),
    (dict(quorum=2, overlap=True), 'fl.quorum=2 with fl.overlap=True is not built yet'),
    (dict(quorum=2, fragments=2), 'fl.quorum=2 with fl.fragments=2'),
])
def test_what_quorum_rounds_cannot_do_is_refused_in_one_line(keys, message):
  with pytest.raises(ValueError, match=message):
    FLConfig(num_clients=3, clients_per_round=3, rounds=1, local_steps=2, **keys)


def test_quorum_with_dp_or_a_deadline_is_refused():
  config = tiny.get_config('test')
  config.fl.quorum, config.fl.dp.enabled, config.fl.dp.noise_multiplier = 1, True, 0.0
  with pytest.raises(ValueError, match='fl.quorum=1 cannot be used with fl.dp: its accounting'):
    FLConfig.from_config(config.fl)
  cfg = FLConfig(num_clients=2, clients_per_round=2, rounds=1, local_steps=1, quorum=1)
  with pytest.raises(ValueError, match='fl.quorum=1 with fl.round_deadline_s=3.0 is not built'):
    federation.FederatedAlgorithm(cfg, faults.FaultConfig(round_deadline_s=3.0), seed=0)
