"""Overlapped rounds (fl.overlap): the client's rule and the simulated clock by hand, the
refusals, and a real run that resumes exactly."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scripted
from fedjax_pt import local_training
from fedjax_pt import records
from fedjax_pt import train
from fedjax_pt.configs import tiny
from fedjax_pt.federated import algorithm as federation
from fedjax_pt.federated import client_round
from fedjax_pt.federated import compression
from fedjax_pt.federated import faults
from fedjax_pt.federated import fragments
from fedjax_pt.federated import profiles
from fedjax_pt.federated.config import FLConfig

WHOLE = fragments.Segment(fragment=0, start=0, steps=1)


def _trained(params, target):
  """A client's "training": half way from where it starts to its target."""
  return _result(jax.tree.map(lambda p: p + 0.5 * (target - p), params))


def _result(moved):
  return local_training.ClientResult(
      state=local_training.LocalState(moved, None, 0),
      summary=local_training.TrainingSummary(num_tokens=1, mean_loss=0.0, mean_grad_norm=0.0,
                                             mean_update_norm=0.0),
      step_metrics=[], last_loss=0.0)


def test_the_overlap_rule_by_hand():
  """Two clients with targets 4 and 8, the global model from 0, FedAvg at the server (outer SGD
  lr 1: theta_{r+1} = theta_r + the mean delta).
    round 1: both start at theta_1 = 0 -> 2 and 4; deltas 2, 4; theta_2 = 3; they keep
             theta_1 + delta = 2 and 4.
    round 2: they start from 2 and 4 (their own: theta_2 = 3 has "not arrived"), -> 3 and 6;
             deltas 1, 2; theta_3 = 4.5; they keep theta_2 + delta = 4 and 5.
    round 3: they start from 4 and 5 -> 4 and 6.5; deltas 0, 1.5; theta_4 = 5.25.
  A synchronous round 2 would start both from theta_2 = 3."""
  fl = FLConfig(num_clients=2, clients_per_round=2, rounds=3, local_steps=1, overlap=True)
  like = {'w': jnp.zeros((), jnp.float32)}
  rule = client_round.ClientRule(fl, faults.FaultConfig(), seed=0, like=like)
  memories = {0: client_round.ClientMemory(), 1: client_round.ClientMemory()}
  targets = {0: 4.0, 1: 8.0}
  theta, seen = {'w': jnp.zeros((), jnp.float32)}, []
  for round_idx in (1, 2, 3):
    deltas = []
    for k in (0, 1):
      start, memory = rule.receive(memories[k], theta, None, round_idx, WHOLE)
      result = _trained(start.params, targets[k])
      message, memories[k], _ = rule.finish(k, memory, start, result, None, WHOLE, round_idx, 0,
                                            1, 1)
      delta = compression.decode(message)['w']
      seen.append((round_idx, k, float(start.params['w']), float(delta)))
      deltas.append(delta)
    theta = {'w': theta['w'] + (deltas[0] + deltas[1]) / 2}
  assert seen == [(1, 0, 0.0, 2.0), (1, 1, 0.0, 4.0),
                  (2, 0, 2.0, 1.0), (2, 1, 4.0, 2.0),
                  (3, 0, 4.0, 0.0), (3, 1, 5.0, 1.5)]
  assert float(theta['w']) == 5.25
  # A client that missed a round (here: asked about round 5 after round 3) starts from the
  # global model it receives, as in a synchronous round.
  start, _ = rule.receive(memories[0], {'w': jnp.full((), 9.0)}, None, 5, WHOLE)
  assert float(start.params['w']) == 9.0


def test_streaming_fragments_with_overlap_by_hand():
  """F = 2 (fragment 0: wte, 1: norm_f), one client whose "training" adds 1 to every value, FedAvg
  (the global fragment moves by the client's delta), alpha = 0 (replace). Each segment the client
  trains on without the fragment synced at the end of the previous one, and merges it when it
  has trained (Streaming DiLoCo's overlap), so that segment's progress on it is replaced:
    r1 s1 (syncs norm_f): whole model (0, 0) -> (1, 1); delta 1; global norm_f 1.
    r1 s2 (syncs wte): starts (1, 1) -> (2, 2); delta wte 2 - 0; global wte 2; merges norm_f = 1.
    r2 s1 (norm_f): starts (2, 1) -> (3, 2); delta 2 - 1 = 1; global norm_f 2; merges wte = 2.
    r2 s2 (wte): starts (2, 2) -> (3, 3); delta 3 - 2 = 1; global wte 3; merges norm_f = 2."""
  fl = FLConfig(num_clients=1, clients_per_round=1, rounds=2, local_steps=2, fragments=2,
                overlap=True)
  like = {'wte': jnp.zeros((), jnp.float32), 'norm_f': jnp.zeros((), jnp.float32)}
  rule = client_round.ClientRule(fl, faults.FaultConfig(), seed=0, like=like)
  memory, theta, seen = client_round.ClientMemory(), dict(like), []
  for round_idx in (1, 2):
    for segment in fragments.schedule(2, 2):
      if memory.model is None:
        fragment, received = None, theta
      else:
        fragment = (segment.fragment - 1) % 2
        received = rule.fragment(theta, fragment)
      start, memory = rule.receive(memory, received, fragment, round_idx, segment)
      result = _result(jax.tree.map(lambda p: p + 1.0, start.params))
      message, memory, _ = rule.finish(0, memory, start, result, None, segment, round_idx, 0, 1,
                                       1)
      delta = compression.decode(message)
      theta = jax.tree.map(lambda t, d: t + d, theta,
                           fragments.replace(jax.tree.map(jnp.zeros_like, theta), delta,
                                             rule.assignment, segment.fragment))
      seen.append((segment.fragment, {k: float(v) for k, v in start.params.items()},
                   {k: float(v) for k, v in memory.model.items()}))
  assert seen == [
      (1, {'wte': 0.0, 'norm_f': 0.0}, {'wte': 1.0, 'norm_f': 1.0}),
      (0, {'wte': 1.0, 'norm_f': 1.0}, {'wte': 2.0, 'norm_f': 1.0}),
      (1, {'wte': 2.0, 'norm_f': 1.0}, {'wte': 2.0, 'norm_f': 2.0}),
      (0, {'wte': 2.0, 'norm_f': 2.0}, {'wte': 3.0, 'norm_f': 2.0})]
  assert {k: float(v) for k, v in theta.items()} == {'wte': 3.0, 'norm_f': 2.0}


class TimedClients:
  """Client k trains (to w = k) for compute_s[k] "here" and sends a 250,000-float delta."""

  def __init__(self, compute_s):
    self.compute_s = compute_s

  def unavailable(self):
    return ()

  def refused(self):
    return {}

  def train(self, broadcast, round_idx, client_ids, attempt, segment):
    del round_idx, attempt, segment
    params = scripted.params_of(broadcast)
    for k in client_ids:
      delta = {'w': jnp.full_like(params['w'], float(k)) - params['w']}
      yield scripted.trained(k, delta, 1000, examples=1, local_steps=1,
                             compute_s=self.compute_s[k], elapsed_s=0.01)


def test_the_overlapped_clock_by_hand():
  """Both clients: 8 Mbit/s each way (1 MB: 1 s), no latency; client 0 computes 2 s, client 1
  5 s. Round 1 is synchronous: arrivals 1 + 2 + 1 = 4 and 1 + 5 + 1 = 7; it lasts P1 = 7 + S1
  (the server's measured work). In round 2 each client starts when it has finished round 1 and
  holds theta_1 (received at 1 s): at max(1 + 2, 1) - P1 and max(1 + 5, 1) - P1, and arrives
  compute + 1 s of upload later: 3 - P1 + 3 and 6 - P1 + 6. A synchronous round 2 would take
  7 + S2 again."""
  link = profiles.ClientProfile(downlink_mbps=8.0, uplink_mbps=8.0)
  model = {'w': jnp.zeros((250_000,), jnp.float32)}
  fl = FLConfig(num_clients=2, clients_per_round=2, rounds=2, local_steps=1,
                outer_optimizer='sgd', outer_lr=1.0, outer_momentum=0.0, weighting='uniform',
                profiles=(link, link), overlap=True)
  algorithm = federation.FederatedAlgorithm(fl, faults.FaultConfig(), seed=0)
  state = algorithm.init(model)
  clients = TimedClients({0: 2.0, 1: 5.0})
  state, first = algorithm.apply(state, 1, clients)
  one_mb = (first.stats.client_download_bytes[0]) * 8 / 8e6  # the payload: 1 MB + headers
  assert first.stats.client_sim_time_s == pytest.approx({0: 2 * one_mb + 2, 1: 2 * one_mb + 5})
  p1 = first.stats.sim_round_time_s
  assert p1 == pytest.approx(2 * one_mb + 5 + first.stats.server_time_s)
  state, second = algorithm.apply(state, 2, clients)
  assert second.stats.client_sim_time_s == pytest.approx(
      {0: one_mb + 2 - p1 + 2 + one_mb, 1: one_mb + 5 - p1 + 5 + one_mb})
  assert second.stats.sim_round_time_s == pytest.approx(
      2 * one_mb + 10 - p1 + second.stats.server_time_s)
  assert second.stats.client_sim_compute_s == pytest.approx({0: 2.0, 1: 5.0})


@pytest.mark.parametrize('keys, faults_cfg, message', [
    (dict(overlap=1), {}, 'fl.overlap must be True or False, got 1'),
    (dict(overlap=True, fragment_mixing=0.5), {},
     'fl.overlap=True with fl.fragment_mixing=0.5 and one fragment is not built'),
    (dict(overlap=True, clients_per_round=1), {},
     'fl.overlap=True keeps every client\'s model between syncs: it needs fl.clients_per_round'),
    (dict(overlap=True), {'round_deadline_s': 5.0},
     'fl.overlap=True with fl.round_deadline_s=5.0 is not built yet'),
])
def test_what_overlap_cannot_do_is_refused_in_one_line(keys, faults_cfg, message):
  with pytest.raises(ValueError, match=message.replace('(', r'\(')):
    fl = FLConfig(**{'num_clients': 2, 'clients_per_round': 2, 'rounds': 1, 'local_steps': 2,
                     **keys})
    federation.FederatedAlgorithm(fl, faults.FaultConfig(**faults_cfg), seed=0)


def _config(rounds, overlap=True):
  config = tiny.get_config('test')
  config.fl.rounds, config.fl.overlap, config.fl.reset_optimizer = rounds, overlap, False
  config.fl.compression.upload, config.fl.compression.error_feedback = 'int8', True
  return config


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [{k: v for k, v in r.items() if k not in records.CLOCK_KEYS}
            for r in map(json.loads, f)]


def test_an_overlapped_run_resumes_exactly_and_differs_from_a_synchronous_one(tmp_path):
  """Kept Adam states, int8 deltas with error feedback: 3 rounds at once, and 2 then 1 more from
  the checkpoint (each client's own model and anchor are in it), give the same records; a
  synchronous run does not (its round 2 starts every client from the global model)."""
  whole = train.run(_config(3), str(tmp_path / 'whole'))
  train.run(_config(2), str(tmp_path / 'split'))
  split = train.run(_config(3), str(tmp_path / 'split'))
  jax.tree.map(np.testing.assert_array_equal, split.params, whole.params)
  assert _records(tmp_path / 'split') == _records(tmp_path / 'whole')
  synchronous = train.run(_config(3, overlap=False), str(tmp_path / 'sync'))
  losses = lambda result: [r.val_loss for r in result.rounds]
  assert losses(synchronous)[:2] == losses(whole)[:2]  # round 1 is the same in both
  assert losses(synchronous)[2] != losses(whole)[2]
  assert whole.rounds[-1].sim_compute_utilization is not None
