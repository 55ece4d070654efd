"""Robust aggregation (`fl.aggregation`) and poisoned clients (`fl.fault.poison`), by hand."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scripted
from fedjax_pt import local_training
from fedjax_pt import train
from fedjax_pt.configs import tiny
from fedjax_pt.federated import algorithm as federation
from fedjax_pt.federated import client_round
from fedjax_pt.federated import faults
from fedjax_pt.federated import fragments
from fedjax_pt.federated.config import FLConfig


class Clients:
  """Client k sends the delta `deltas[k]` (a list of floats) with `tokens[k]` tokens; clients in
  `poisoned` alter it as `faults.poisoned_delta` does."""

  def __init__(self, deltas, tokens=None, poisoned=(), poison='scale', scale=100.0):
    self.deltas, self.tokens = deltas, tokens or [10] * len(deltas)
    self.poisoned, self.poison, self.scale = set(poisoned), poison, scale

  def unavailable(self):
    return ()

  def refused(self):
    return {}

  def train(self, broadcast, round_idx, client_ids, attempt, segment):
    del broadcast, round_idx, attempt, segment
    for k in client_ids:
      delta = {'w': jnp.asarray(self.deltas[k], jnp.float32)}
      if k in self.poisoned:
        delta = faults.poisoned_delta(self.poison, delta, self.scale, jax.random.key(k))
      yield scripted.trained(k, delta, self.tokens[k])


def _round(deltas, aggregation, weighting='uniform', **kw):
  """The new global model (from 0, outer SGD with lr 1: the aggregated delta) and the stats."""
  clients = Clients(deltas, **{k: kw.pop(k) for k in ('tokens', 'poisoned') if k in kw})
  fl = FLConfig(num_clients=len(deltas), clients_per_round=len(deltas), rounds=1, local_steps=1,
                outer_optimizer='sgd', outer_lr=1.0, outer_momentum=0.0, weighting=weighting,
                aggregation=aggregation, **kw)
  algorithm = federation.FederatedAlgorithm(fl, faults.FaultConfig(), seed=0)
  state = algorithm.init({'w': jnp.zeros(len(deltas[0]), jnp.float32)})
  state, result = algorithm.apply(state, 1, clients)
  return np.asarray(state.params['w']), result.stats


# Per coordinate: [1, 2, 100] and [0, -1, 3] (clients 0, 1, 2).
THREE = [[1.0, 0.0], [2.0, -1.0], [100.0, 3.0]]
# Two more clients: coordinate 0 is [1, 2, 100, 4, -50], coordinate 1 [0, -1, 3, 10, 2].
FIVE = THREE + [[4.0, 10.0], [-50.0, 2.0]]


def test_median_and_trimmed_mean_by_hand():
  np.testing.assert_allclose(_round(THREE, 'mean')[0], [103 / 3, 2 / 3], rtol=1e-6)
  median, stats = _round(THREE, 'median')
  np.testing.assert_array_equal(median, [2.0, 0.0])
  # Each coordinate keeps one value of three: client 0 is kept in coordinate 1 (0) only...
  assert stats.robust_trimmed_values == {0: 0.5, 1: 0.5, 2: 1.0}
  np.testing.assert_array_equal(_round(FIVE, 'median')[0], [2.0, 2.0])
  # t = 1: sorted [-50, 1, 2, 4, 100] -> (1 + 2 + 4) / 3; sorted [-1, 0, 2, 3, 10] -> 5 / 3.
  for trim in (1.0, 0.2):  # a count, or a fraction of 5 clients
    trimmed, stats = _round(FIVE, 'trimmed_mean', aggregation_trim=trim)
    np.testing.assert_allclose(trimmed, [7 / 3, 5 / 3], rtol=1e-6)
    # Dropped: 100 and -50 (clients 2, 4) in coordinate 0, -1 and 10 (clients 1, 3) in 1.
    assert stats.robust_trimmed_values == {1: 0.5, 2: 0.5, 3: 0.5, 4: 0.5}
    assert stats.robust_clipped_clients is None


def test_norm_clipped_by_hand():
  deltas = [[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]]  # norms 5, 1, 10: median 5, bound 1.5 x 5
  clipped, stats = _round(deltas, 'norm_clipped', aggregation_clip=1.5)
  # Client 2 is scaled by 7.5 / 10 to [4.5, 6]; the mean of [3, 4], [0, 1], [4.5, 6].
  np.testing.assert_allclose(clipped, [2.5, 11 / 3], rtol=1e-6)
  assert stats.robust_clipped_clients == pytest.approx({2: 0.75})
  assert stats.robust_trimmed_values is None
  # Token weights 1/4, 1/4, 1/2 apply to the clipped deltas.
  weighted, _ = _round(deltas, 'norm_clipped', 'tokens', aggregation_clip=1.5, tokens=[10, 10, 20])
  np.testing.assert_allclose(weighted, [3.0, 4.25], rtol=1e-6)
  _, unclipped = _round(deltas, 'norm_clipped', aggregation_clip=2.0)
  assert unclipped.robust_clipped_clients == {}


def test_one_poisoned_client_of_four_moves_the_mean_but_not_the_robust_rules():
  honest = [[1.0], [1.1], [0.9], [1.05]]
  honest_mean = np.mean(honest)
  mean, _ = _round(honest, 'mean', poisoned=[0])  # client 0 sends 100 x its delta
  assert abs(mean[0] - honest_mean) > 20
  for rule, kw in (('median', {}), ('trimmed_mean', {}),
                   ('norm_clipped', {'aggregation_clip': 2.0})):
    robust, stats = _round(honest, rule, poisoned=[0], **kw)
    assert abs(robust[0] - honest_mean) < 0.3, rule
  assert stats.robust_clipped_clients == pytest.approx({0: 2.15 / 100})


DELTA = {'a': jnp.asarray([3.0, -4.0]), 'b': jnp.asarray([[0.0]])}


@pytest.mark.parametrize('kind, expected', [
    ('scale', {'a': [300.0, -400.0], 'b': [[0.0]]}),
    ('sign_flip', {'a': [-3.0, 4.0], 'b': [[-0.0]]}),
    ('stale', {'a': [0.0, 0.0], 'b': [[0.0]]}),
])
def test_each_poison_does_what_it_says(kind, expected):
  out = faults.poisoned_delta(kind, DELTA, 100.0, jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, out, expected)


def test_noise_poison_has_the_norm_of_the_delta_and_is_seeded():
  out = faults.poisoned_delta('noise', DELTA, 100.0, jax.random.key(0))
  norm = float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(out))))
  assert norm == pytest.approx(5.0, rel=1e-6)
  assert not np.allclose(out['a'], DELTA['a']) and out['b'].shape == (1, 1)
  again = faults.poisoned_delta('noise', DELTA, 100.0, jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, out, again)


def test_the_client_round_sends_the_poisoned_delta():
  """`client_round` applies the poison (so a Flower node does too): stale sends zero, scale x3."""
  received = {'w': jnp.asarray([1.0, 2.0])}
  trained = {'w': jnp.asarray([1.5, 1.0])}
  fl = FLConfig(num_clients=2, clients_per_round=2, rounds=1, local_steps=1)
  segment = fragments.schedule(1, 1)[0]
  summary = local_training.TrainingSummary(num_tokens=1, mean_loss=0.0, mean_grad_norm=0.0,
                                           mean_update_norm=0.0)
  result = types.SimpleNamespace(state=types.SimpleNamespace(params=trained, opt_state=None),
                                 summary=summary, step_metrics=[])
  for kind, expected in (('stale', [0.0, 0.0]), ('scale', [1.5, -3.0])):
    cfg = faults.FaultConfig(poison=kind, poison_clients=(1,), poison_scale=3.0)
    rule = client_round.ClientRule(fl, cfg, 0, received)
    start = client_round.Start(received, received)
    sent = [rule.finish(k, client_round.ClientMemory(), start, result, None, segment, 1, 0, 1, 1)
            for k in (0, 1)]
    np.testing.assert_allclose(scripted.params_of(types.SimpleNamespace(
        payload=sent[0][0]))['w'], [0.5, -1.0])  # client 0 is honest
    np.testing.assert_allclose(scripted.params_of(types.SimpleNamespace(
        payload=sent[1][0]))['w'], expected)


@pytest.mark.parametrize('kw, message', [
    (dict(aggregation='median', weighting='tokens'),
     "fl.aggregation='median' counts each client once"),
    (dict(aggregation='trimmed_mean', aggregation_trim=2.0),
     'fl.aggregation_trim=2.0 trims 2 of fl.clients_per_round=4 clients from each end'),
    (dict(aggregation='trimmed_mean', aggregation_trim=0.1),
     'fl.aggregation_trim=0.1 trims 0 of fl.clients_per_round=4'),
    (dict(aggregation='trimmed_mean', aggregation_trim=1.5),
     'fl.aggregation_trim must be a fraction in (0, 1) or a whole count'),
    (dict(aggregation='norm_clipped', aggregation_clip=0.0), 'fl.aggregation_clip must be'),
    (dict(aggregation='krum'), 'fl.aggregation must be one of'),
])
def test_rules_that_cannot_work_are_refused_in_one_line(kw, message):
  kw = {'weighting': 'uniform', **kw}
  with pytest.raises(ValueError, match=None) as info:
    FLConfig(num_clients=4, clients_per_round=4, rounds=1, local_steps=1, **kw)
  assert message in str(info.value) and '\n' not in str(info.value)


def test_a_run_names_the_poisoned_client_it_clipped(tmp_path):
  """A real (tiny) run with sharded parameters: node 0 sends 100 x its delta every round and is
  the one client norm_clipped scales down, to about 2 / 100 (its honest norm is near the median)."""
  config = tiny.get_config('test')
  config.fl.aggregation, config.fl.aggregation_clip = 'norm_clipped', 2.0
  config.fl.fault.poison, config.fl.fault.poison_clients = 'scale', (0,)
  config.fl.fault.poison_scale = 100.0
  rounds = train.run(config, str(tmp_path / 'run')).rounds[1:]
  assert [set(r.robust_clipped_clients) for r in rounds] == [{0}, {0}]
  assert all(0.01 < r.robust_clipped_clients[0] < 0.04 for r in rounds)
  assert all(r.robust_trimmed_values is None for r in rounds)


def test_streaming_fragments_with_the_median(tmp_path):
  """With fl.fragments=3 a round is three medians, one per fragment; the trimmed fractions
  combine them over the whole model (each coordinate keeps 2 of 4 values: half is dropped)."""
  config = tiny.get_config('test')
  config.fl.aggregation, config.fl.weighting, config.fl.fragments = 'median', 'uniform', 3
  config.fl.fault.poison, config.fl.fault.poison_clients = 'sign_flip', (1,)
  rounds = train.run(config, str(tmp_path / 'run')).rounds[1:]
  for r in rounds:
    assert set(r.robust_trimmed_values) == {0, 1, 2, 3}
    assert sum(r.robust_trimmed_values.values()) == pytest.approx(2.0)
    assert math.isfinite(r.val_loss)
