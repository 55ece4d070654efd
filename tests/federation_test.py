"""The round object against hand-computed numbers, with scripted clients instead of training."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import scripted
from fedjax_pt.federated import compression
from fedjax_pt.federated import algorithm as federation
from fedjax_pt.federated import faults
from fedjax_pt.federated.config import FLConfig
from fedjax_pt.federated.messages import ClientReport


class ScriptedClients:
  """Client k "trains" to the parameters {'w': [values[k]]} with tokens[k] tokens and sends its
  delta, uncompressed; (attempt, k) pairs in `crash` raise instead, (attempt, k) pairs in `lost`
  send nothing back, clients in `nan` return NaN and clients in `unavailable` have no node
  connected."""

  def __init__(self, values, tokens=None, examples=None, crash=(), nan=(), elapsed=0.0, lost=(),
               unavailable=()):
    self.values, self.crash, self.nan, self.elapsed = values, set(crash), set(nan), elapsed
    self.lost, self.absent = set(lost), set(unavailable)
    self.tokens = tokens or [10] * len(values)
    self.examples = examples or [100] * len(values)
    self.calls = []  # (round, attempt, client)

  def unavailable(self):
    return self.absent

  def refused(self):
    return {}

  def train(self, broadcast, round_idx, client_ids, attempt, segment):
    del segment
    params = scripted.params_of(broadcast)
    for k in client_ids:
      self.calls.append((round_idx, attempt, k))
      if (attempt, k) in self.lost:
        yield ClientReport(k, None, failure='late: no reply', lost=True)
        continue
      if (attempt, k) in self.crash:
        yield ClientReport(k, None, failure='raised OSError: disk on fire')
        continue
      value = math.nan if k in self.nan else self.values[k]
      delta = {'w': jnp.asarray([value], jnp.float32) - params['w']}
      yield scripted.trained(k, delta, self.tokens[k], self.examples[k], loss=float(k),
                             elapsed_s=self.elapsed)


def _fedavg(weighting='tokens', num_clients=2, clients_per_round=None, **fault_kw):
  """Outer SGD with lr 1 and no momentum: the new global model is exactly the weighted mean."""
  fl = FLConfig(num_clients=num_clients, clients_per_round=clients_per_round or num_clients,
                       rounds=3, local_steps=1, outer_optimizer='sgd', outer_lr=1.0,
                       outer_momentum=0.0, weighting=weighting)
  return federation.FederatedAlgorithm(fl, faults.FaultConfig(**fault_kw), seed=0)


def _round(algorithm, clients, theta=0.0):
  state = algorithm.init({'w': jnp.asarray([theta], jnp.float32)})
  state, result = algorithm.apply(state, 1, clients)
  return float(state.params['w'][0]), result


@pytest.mark.parametrize('weighting, expected', [
    # tokens 100 and 300: 0.25 * 2 + 0.75 * 6 = 5.
    ('tokens', 5.0),
    # training sets of 900 and 100 tokens: 0.9 * 2 + 0.1 * 6 = 2.4.
    ('examples', 2.4),
    ('uniform', 4.0),
])
def test_weighting_of_unequal_clients(weighting, expected):
  clients = ScriptedClients([2.0, 6.0], tokens=[100, 300], examples=[900, 100])
  theta, result = _round(_fedavg(weighting), clients)
  assert theta == pytest.approx(expected, rel=1e-6)
  assert result.tokens == 400 and result.stats.num_aggregated == 2


def test_nesterov_outer_step_on_the_weighted_mean():
  # theta 1, mean of clients 0.5 -> pseudo-gradient 0.5; Nesterov lr 0.5, mu 0.9 on a fresh
  # momentum: v = 0.5, update = lr * (g + mu v) = 0.5 * (0.5 + 0.45) = 0.475 -> theta 0.525.
  fl = FLConfig(num_clients=2, clients_per_round=2, rounds=1, local_steps=1,
                       outer_optimizer='nesterov', outer_lr=0.5, outer_momentum=0.9)
  algorithm = federation.FederatedAlgorithm(fl, faults.FaultConfig(), seed=0)
  theta, result = _round(algorithm, ScriptedClients([0.25, 0.75]), theta=1.0)
  assert theta == pytest.approx(0.525, rel=1e-6)
  assert result.stats.pseudo_grad_norm == pytest.approx(0.5, rel=1e-6)
  assert result.stats.outer_momentum_norm == pytest.approx(0.5, rel=1e-6)


def test_a_retry_tops_the_round_up_and_never_averages_a_client_twice():
  # Four clients, all sampled; 0 and 1 crash in the first attempt. The retry asks only them
  # again, so the mean is over the four distinct clients: (1 + 2 + 3 + 4) / 4.
  clients = ScriptedClients([1.0, 2.0, 3.0, 4.0], crash=[(0, 0), (0, 1)])
  theta, result = _round(_fedavg(num_clients=4, min_clients=4, max_round_retries=2), clients)
  assert theta == pytest.approx(2.5, rel=1e-6)
  assert clients.calls == [(1, 0, 0), (1, 0, 1), (1, 0, 2), (1, 0, 3), (1, 1, 0), (1, 1, 1)]
  assert result.stats.num_aggregated == 4 and result.stats.retries == 1
  assert result.stats.failed_clients == {0: 'raised OSError: disk on fire',
                                            1: 'raised OSError: disk on fire'}
  # The server sent the model 6 times (the crashed clients got it too) and received 4 deltas.
  message = compression.payload_bytes(compression.encode({'w': jnp.zeros(1)}, 'none'))
  assert result.bytes_sent == 6 * message and result.bytes_received == 4 * message


def test_a_retry_with_partial_participation_draws_among_the_missing_clients():
  clients = ScriptedClients([float(k) for k in range(8)],
                            crash=[(0, k) for k in range(8) if k % 2])
  _, result = _round(_fedavg(num_clients=8, clients_per_round=4, min_clients=4,
                             max_round_retries=5), clients)
  first = [k for _, attempt, k in clients.calls if attempt == 0]
  aggregated = [k for k in first if k % 2 == 0]
  for _, attempt, k in clients.calls:
    if attempt:
      assert k not in aggregated
  assert result.stats.num_aggregated == 4


def test_non_finite_and_late_updates_are_left_out():
  theta, result = _round(_fedavg(num_clients=3), ScriptedClients([1.0, 2.0, 3.0], nan=[1]))
  assert theta == pytest.approx(2.0, rel=1e-6)  # clients 0 and 2, 10 tokens each
  assert result.stats.failed_clients == {1: 'non-finite parameters'}
  _, late = _round(_fedavg(round_timeout_s=1.0, on_too_few_clients='skip'),
                   ScriptedClients([1.0, 2.0], elapsed=2.0))
  assert all(f.startswith('late') for f in late.stats.failed_clients.values())
  assert late.stats.skipped and not late.aggregated


def test_too_few_clients_skip_keeps_the_model():
  theta, result = _round(_fedavg(min_clients=2, on_too_few_clients='skip'),
                         ScriptedClients([5.0, 7.0], crash=[(0, 1)]), theta=3.0)
  assert theta == 3.0 and result.stats.skipped and result.stats.num_aggregated == 1


def test_every_client_raising_is_an_error_not_a_fault():
  with pytest.raises(RuntimeError, match='every client failed: raised OSError'):
    _round(_fedavg(), ScriptedClients([1.0, 2.0], crash=[(0, 0), (0, 1)]))


def test_unavailable_clients_are_not_sampled():
  clients = ScriptedClients([1.0, 2.0, 3.0], unavailable={1})
  theta, result = _round(_fedavg(num_clients=3), clients)
  assert theta == pytest.approx(2.0, rel=1e-6) and result.stats.clients == [0, 2]
  assert [k for _, _, k in clients.calls] == [0, 2] and not result.stats.failed_clients


def test_every_client_lost_is_a_fault_not_an_error():
  theta, result = _round(_fedavg(max_round_retries=1),
                         ScriptedClients([1.0, 2.0], lost=[(a, k) for a in (0, 1) for k in (0, 1)]),
                         theta=3.0)
  assert theta == 3.0 and result.stats.skipped and result.stats.retries == 1
  assert result.stats.failed_clients == {0: 'late: no reply', 1: 'late: no reply',
                                            '0@1': 'late: no reply', '1@1': 'late: no reply'}


def test_client_metrics_are_reported_per_client():
  _, result = _round(_fedavg(), ScriptedClients([2.0, 6.0]), theta=1.0)
  stats = result.stats
  assert stats.client_train_loss == {0: 0.0, 1: 1.0} and result.train_loss == 0.5
  np.testing.assert_allclose([stats.client_delta_norm[0], stats.client_delta_norm[1]],
                             [1.0, 5.0])
  assert stats.client_norm == {0: 2.0, 1: 6.0}
