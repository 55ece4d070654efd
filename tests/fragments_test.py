"""Streaming fragments: the schedule and the partition by hand, per-fragment outer steps, and
F = 1 through the fragment machinery equal to plain federated training, bit for bit."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scripted
from fedjax_pt.configs import tiny
from fedjax_pt.federated import faults
from fedjax_pt.federated import algorithm as federation
from fedjax_pt.federated import fragments
from fedjax_pt.federated.config import FLConfig
from fedjax_pt import metrics
from fedjax_pt import records
from fedjax_pt import train


def test_schedule_staggers_the_fragments():
  # tau = 12, F = 4: fragment f syncs at local step 3 f (mod 12); fragment 0 at the round's end.
  assert fragments.schedule(12, 4) == [
      fragments.Segment(fragment=1, start=0, steps=3), fragments.Segment(2, 3, 3),
      fragments.Segment(3, 6, 3), fragments.Segment(0, 9, 3)]
  assert fragments.schedule(5, 1) == [fragments.Segment(0, 0, 5)]
  # tau = 50, F = 4: syncs at steps 12, 25, 37 and 50 (f * 12.5 rounded down).
  assert [(s.fragment, s.start, s.steps) for s in fragments.schedule(50, 4)] == [
      (1, 0, 12), (2, 12, 13), (3, 25, 12), (0, 37, 13)]


def _tree(sizes):
  """A model-like tree with arrays of the given sizes, in forward order."""
  names = ['wte', 'wpe'] + [f'block_{i}' for i in range(len(sizes) - 3)] + ['norm_f']
  return {name: jnp.zeros((size,)) for name, size in zip(names, sizes)}


@pytest.mark.parametrize('sizes, count, expected', [
    # Equal arrays: equal runs, in forward order (block_10 after block_9, wte first).
    ([4] * 12, 4, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]),
    # An embedding larger than half the model still leaves every fragment an array: the middles
    # (0.30, 0.61, 0.67, 0.77, 0.87, 0.96 of the model) ask for fragments 1, 2, 2, 3, 3, 3; the
    # first must be 0 and none may skip one.
    ([60, 2, 10, 10, 10, 8], 4, [0, 1, 2, 3, 3, 3]),
    ([5, 5, 5], 3, [0, 1, 2]),
])
def test_partition_by_hand(sizes, count, expected):
  tree = _tree(sizes)
  assignment = fragments.partition(tree, count)
  names = list(tree)
  assert [assignment[name] for name in names] == expected


def test_partition_refuses_more_fragments_than_arrays():
  with pytest.raises(ValueError, match='fl.fragments=4 exceeds the model\'s 3 parameter arrays'):
    fragments.partition(_tree([1, 1, 1]), 4)


def test_select_replace_and_mix():
  tree = {'wte': jnp.ones(2), 'norm_f': jnp.full(2, 3.0)}
  assignment = fragments.partition(tree, 2)
  part = fragments.select(tree, assignment, 1)
  assert part['wte'] is None and part['norm_f'] is tree['norm_f']
  other = fragments.replace(tree, {'wte': None, 'norm_f': jnp.zeros(2)}, assignment, 1)
  np.testing.assert_array_equal(other['norm_f'], [0, 0])
  np.testing.assert_array_equal(other['wte'], [1, 1])
  mixed = fragments.mix(part, {'wte': None, 'norm_f': jnp.full(2, 1.0)}, 0.25)
  np.testing.assert_allclose(mixed['norm_f'], [0.25 * 3 + 0.75 * 1] * 2)
  received = {'wte': None, 'norm_f': jnp.asarray([-0.0, 1.0])}
  assert fragments.mix(part, received, 0.0) is received


class FragmentClients:
  """Every client's delta is -0.2 on every value of the segment's fragment."""

  def __init__(self):
    self.segments = []

  def unavailable(self):
    return frozenset()

  def refused(self):
    return {}

  def train(self, broadcast, round_idx, client_ids, attempt, segment):
    del round_idx, attempt
    self.segments.append(segment)
    params = scripted.params_of(broadcast)
    assignment = fragments.partition(params, 2)
    delta = fragments.select(jax.tree.map(lambda p: jnp.full_like(p, -0.2), params), assignment,
                             segment.fragment)
    for k in client_ids:
      yield scripted.trained(k, delta, loss=1.0)


def test_each_fragment_steps_its_own_outer_optimizer():
  # Nesterov lr 0.5, mu 0.9 on fresh momenta: each fragment's pseudo-gradient is 0.2, its
  # momentum v = 0.2 and it moves by -0.5 (0.2 + 0.9 * 0.2) = -0.19 at its own sync, once a
  # round. A shared state would move fragment 1 again (by -0.5 * 0.9 * 0.81 * 0.2) at the sync
  # of fragment 0, when its momentum decays under a zero gradient.
  fl = FLConfig(num_clients=2, clients_per_round=2, rounds=1, local_steps=4,
                       outer_optimizer='nesterov', outer_lr=0.5, outer_momentum=0.9, fragments=2)
  algorithm = federation.FederatedAlgorithm(fl, faults.FaultConfig(), seed=0)
  state = algorithm.init({'wte': jnp.zeros(3), 'norm_f': jnp.zeros(2)})
  clients = FragmentClients()
  state, result = algorithm.apply(state, 1, clients)
  assert [s.fragment for s in clients.segments] == [1, 0]
  np.testing.assert_allclose(state.params['wte'], [-0.19] * 3, rtol=1e-6)
  np.testing.assert_allclose(state.params['norm_f'], [-0.19] * 2, rtol=1e-6)
  assert state.round == 1
  # Norms of the round combine its fragments: the whole pseudo-gradient and momentum.
  assert result.stats.pseudo_grad_norm == pytest.approx(0.2 * np.sqrt(5), rel=1e-6)
  assert result.stats.outer_momentum_norm == pytest.approx(0.2 * np.sqrt(5), rel=1e-6)
  assert result.stats.client_delta_norm == {0: pytest.approx(0.2 * np.sqrt(5), rel=1e-6),
                                               1: pytest.approx(0.2 * np.sqrt(5), rel=1e-6)}


def _config(**fl):
  config = tiny.get_config('test')
  config.fl.rounds = 3
  for key, value in fl.items():
    node = config.fl
    *groups, name = key.split('__')
    for group in groups:
      node = node[group]
    node[name] = value
  return config


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [{k: v for k, v in r.items() if k not in records.CLOCK_KEYS}
            for r in map(json.loads, f)]


@pytest.mark.parametrize('fl', [
    {},
    # Diverged clients (dropping their model and residual), kept Adam states, compressed deltas
    # with error feedback and a compressed broadcast.
    dict(fault__nan_prob=0.3, reset_optimizer=False, compression__upload='int8',
         compression__download='bf16', compression__error_feedback=True),
])
def test_one_fragment_is_plain_federated_training(tmp_path, monkeypatch, fl):
  """F = 1 with clients that keep their model between syncs and merge the global one into it
  (alpha = 0): the machinery of streaming fragments, reduced to plain training, bit for bit."""
  plain = train.run(_config(**fl), str(tmp_path / 'plain'))
  monkeypatch.setattr(FLConfig, 'keeps_client_models', property(lambda self: True))
  streaming = train.run(_config(**fl), str(tmp_path / 'streaming'))
  jax.tree.map(np.testing.assert_array_equal, streaming.params, plain.params)
  assert _records(tmp_path / 'streaming') == _records(tmp_path / 'plain')


@pytest.mark.parametrize('count, local_steps', [(3, 3), (2, 4)])
def test_one_client_fedavg_with_fragments_trains_as_if_alone(tmp_path, count, local_steps):
  """One client, FedAvg (outer SGD lr 1, no momentum), alpha = 0: each sync sets the global
  fragment to the client's own and gives it back, so the segments, their learning rates, data
  and kept Adam moments must add up to the client training alone: the same loss at every step,
  up to the rounding of theta + (theta_k - theta) at each sync (tolerance of
  train_test.test_one_client_fedavg_without_reset_equals_centralized). The global model is not
  the client's: a fragment synced earlier in the round lags by the steps since."""
  one = dict(num_clients=1, clients_per_round=1, local_steps=local_steps, reset_optimizer=False)
  config = _config(**one)
  config.mode = 'centralized'
  config.log.every_steps = 1
  train.run(config, str(tmp_path / 'centralized'))
  config = _config(**one, fragments=count, outer_optimizer='sgd', outer_lr=1.0,
                   outer_momentum=0.0)
  config.log.every_steps = 1
  train.run(config, str(tmp_path / 'federated'))
  alone, federated = ([(r['step'], r['loss']) for r in _records(tmp_path / name)
                       if r['kind'] == 'step'] for name in ('centralized', 'federated'))
  assert [s for s, _ in federated] == [s for s, _ in alone] == list(range(1, 3 * local_steps + 1))
  np.testing.assert_allclose([l for _, l in federated], [l for _, l in alone], rtol=1e-5)


def test_fragments_divide_the_peak_traffic(tmp_path):
  one = train.run(_config(), str(tmp_path / 'one'))
  three = train.run(_config(fragments=3), str(tmp_path / 'three'))
  sizes = fragments.fragment_sizes(one.params, fragments.partition(one.params, 3), 3)
  # A plain sync carries the model down to 4 clients and back up (+ headers, under 1%); a sync of
  # one fragment carries that fragment (from round 2 on: in round 1 every client first receives
  # the whole model).
  model_bytes = metrics.tree_bytes(one.params)
  assert one.last_round.peak_sync_bytes == pytest.approx(2 * 4 * model_bytes, rel=0.01)
  assert three.last_round.peak_sync_bytes < one.last_round.peak_sync_bytes * (
      max(sizes) / sum(sizes) + 0.01)

  def round_bytes(run, key):
    return getattr(run.rounds[-1], key) - getattr(run.rounds[-2], key)

  # Over a round every value still travels once each way, as in plain training.
  for key in ('bytes_sent', 'bytes_received'):
    assert round_bytes(three, key) == pytest.approx(round_bytes(one, key), rel=0.01)
