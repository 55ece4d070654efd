"""Differential privacy (DP-FedAvg) against hand-computed numbers and dp-accounting."""

import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting import rdp
from dp_accounting.pld import pld_privacy_accountant
from scipy import stats

import scripted
from fedjax_pt.configs import tiny
from fedjax_pt.federated import faults
from fedjax_pt.federated import algorithm as federation
from fedjax_pt.federated import privacy
from fedjax_pt.federated.config import FLConfig
from fedjax_pt import train


class TwoClients:
  """Client k "trains" to theta + deltas[k] and sends that delta, uncompressed."""

  def __init__(self, deltas):
    self.deltas = deltas

  def unavailable(self):
    return set()

  def refused(self):
    return {}

  def train(self, broadcast, round_idx, client_ids, attempt, segment):
    del broadcast, round_idx, attempt, segment
    for k in client_ids:
      yield scripted.trained(k, self.deltas[k], examples=10, loss=1.0)


def _fedavg_with_dp(**dp):
  """Outer SGD, lr 1, no momentum: the new global model is theta + the (noised) mean delta."""
  fl = FLConfig(num_clients=2, clients_per_round=2, rounds=1, local_steps=1,
                       outer_optimizer='sgd', outer_lr=1.0, outer_momentum=0.0,
                       dp=privacy.DPConfig(enabled=True, **dp))
  return federation.FederatedAlgorithm(fl, faults.FaultConfig(), seed=7)


def test_server_clips_each_delta_and_noises_the_sum_by_hand():
  # Client 0's delta has norm 5 (3, 4) and is clipped to C = 1: (0.6, 0.8); client 1's has norm
  # 0.5 and is kept. Mean (0.6 + 0.3, 0.8 + 0.4) / 2 = (0.45, 0.6); the noise on the sum has std
  # sigma * C = 0.5, on the mean 0.25, drawn from the server's key for round 1.
  deltas = [{'w': jnp.asarray([3.0, 4.0])}, {'w': jnp.asarray([0.3, 0.4])}]
  algorithm = _fedavg_with_dp(clip_norm=1.0, noise_multiplier=0.5)
  state = algorithm.init({'w': jnp.zeros(2)})
  state, result = algorithm.apply(state, 1, TwoClients(deltas))
  key, = jax.random.split(privacy.noise_key(7, 1, -1, 0), 1)  # one key per array
  noise = 0.25 * np.asarray(jax.random.normal(key, (2,), jnp.float32))
  np.testing.assert_allclose(state.params['w'], np.array([0.45, 0.6]) + noise, rtol=1e-6)
  assert np.abs(noise).max() > 1e-3  # the noise is there, and it is that draw
  assert result.stats.dp_clipped_clients == 1
  assert result.synchronisations == 1


def test_clients_share_the_noise_and_the_server_tops_up_what_is_missing():
  dp = privacy.DPConfig(enabled=True, clip_norm=2.0, noise_multiplier=1.5, noise_at='clients')
  share = privacy.client_noise(dp, clients_per_round=4)
  assert share.noise_std == pytest.approx(1.5 * 2.0 / 2)  # sigma C / sqrt(4)
  # 4 shares of variance (sigma C)^2 / 4 add up to (sigma C)^2; with 3 arrived the server adds
  # the fourth; with all 4 nothing.
  assert privacy.server_noise_std(dp, 4, 3) == pytest.approx(3.0 * math.sqrt(1 / 4))
  assert privacy.server_noise_std(dp, 4, 4) == 0.0
  server_side = privacy.DPConfig(enabled=True, clip_norm=2.0, noise_multiplier=1.5)
  assert privacy.server_noise_std(server_side, 4, 3) == pytest.approx(3.0)


def test_a_clients_noise_has_its_share_of_the_std():
  """On a zero delta of n values the client's message is pure noise: its sample std is within
  5 standard errors (std / sqrt(2 n)) of sigma C / sqrt(m)."""
  n, std = 200_000, 0.75
  noised = privacy.ClientNoise(clip_norm=1.0, noise_std=std)(
      {'a': jnp.zeros(n // 2), 'b': jnp.zeros((n // 4, 2))}, jax.random.key(0))
  values = np.concatenate([np.ravel(x) for x in jax.tree.leaves(noised)])
  assert abs(values.std() - std) < 5 * std / math.sqrt(2 * n)
  assert abs(values.mean()) < 5 * std / math.sqrt(n)


def test_clipping_by_hand_and_exactly_nothing_under_the_bound():
  tree = {'a': jnp.asarray([3.0]), 'b': jnp.asarray([[4.0]])}
  clipped, norm = privacy.clip(tree, 2.5)
  assert float(norm) == pytest.approx(5.0)
  np.testing.assert_allclose(clipped['a'], [1.5], rtol=1e-6)
  np.testing.assert_allclose(clipped['b'], [[2.0]], rtol=1e-6)
  small = {'a': jnp.asarray([0.1, -0.2], jnp.float32)}
  for bound in (1.0, math.inf):
    same, _ = privacy.clip(small, bound)
    assert np.array_equal(np.asarray(same['a']), np.asarray(small['a']))


def _gaussian_delta(epsilon, sigma):
  """The exact delta(epsilon) of one Gaussian mechanism of sensitivity 1 and std sigma
  (Balle & Wang 2018, Theorem 8)."""
  return (stats.norm.cdf(-epsilon * sigma + 1 / (2 * sigma))
          - math.exp(epsilon) * stats.norm.cdf(-epsilon * sigma - 1 / (2 * sigma)))


def test_epsilon_of_one_gaussian_release_is_the_exact_one():
  """PLD accounting of one unsampled release is tight: the exact delta at its epsilon is the
  asked 1e-5 (to the PLD discretisation); RDP is an upper bound, never below it."""
  sigma, delta = 1.2, 1e-5
  pld = privacy.epsilon(sigma, 1.0, 1, delta, 'pld')
  assert _gaussian_delta(pld, sigma) == pytest.approx(delta, rel=0.05)
  assert privacy.epsilon(sigma, 1.0, 1, delta, 'rdp') >= pld
  assert privacy.epsilon(sigma, 1.0, 0, delta) == 0.0
  # Subsampling never costs privacy, even where the subsampled RDP bound is loose (little noise).
  for noise in (0.05, 0.8, 3.0):
    assert privacy.epsilon(noise, 0.25, 8, delta) <= privacy.epsilon(noise, 1.0, 8, delta)
  assert privacy.epsilon(0.0, 1.0, 3, delta) == math.inf


@pytest.mark.parametrize('sigma, rate, releases', [(0.3, 1.0, 5), (0.2, 0.25, 5)])
def test_pld_grid_scaled_to_the_rdp_bound_agrees_with_the_default_grid(sigma, rate, releases):
  """Where the library's default grid (1e-4 nats a step) is affordable, the grid of fedjax_pt
  (1e-5 of the RDP epsilon a step, when that is coarser) gives its epsilon to the discretisation
  error: at most a step per release, relatively releases * 1e-5 * rdp / epsilon."""
  gaussian = dp_event.GaussianDpEvent(sigma)
  event = gaussian if rate >= 1 else dp_event.PoissonSampledDpEvent(rate, gaussian)
  accountant = pld_privacy_accountant.PLDAccountant()
  accountant.compose(event, releases)
  default = accountant.get_epsilon(1e-5)
  ours = privacy.epsilon(sigma, rate, releases, 1e-5, 'pld')
  rdp_bound = privacy.epsilon(sigma, rate, releases, 1e-5, 'rdp')
  assert abs(ours - default) / default <= releases * 1e-5 * rdp_bound / default


def test_pld_at_little_noise_gives_an_epsilon_instead_of_exhausting_memory():
  """At noise 0.001 the default grid needs billions of points (a MemoryError, which the run then
  reported as a training OOM); the scaled grid gives a bound below RDP's."""
  pld = privacy.epsilon(0.001, 1.0, 3, 1e-5, 'pld')
  assert 0 < pld <= privacy.epsilon(0.001, 1.0, 3, 1e-5, 'rdp')


def test_an_accountant_that_fails_is_named_not_taken_for_a_training_oom(monkeypatch):
  def exhausted(self, event, count=1):
    raise MemoryError('Unable to allocate 19.4 GiB')

  monkeypatch.setattr(pld_privacy_accountant.PLDAccountant, 'compose', exhausted)
  with pytest.raises(ValueError, match=r"fl.dp.accountant=pld failed at fl.dp.noise_multiplier="
                                       r"0.123 after 2 releases \(MemoryError.*use "
                                       r"fl.dp.accountant='rdp'"):
    privacy.epsilon(0.123, 1.0, 2, 1e-5, 'pld')


def _config(**dp):
  config = tiny.get_config('test')  # 2 rounds of 3 local steps
  config.fl.num_clients, config.fl.clients_per_round = 4, 2
  config.fl.dp.enabled = bool(dp)
  for key, value in dp.items():
    config.fl.dp[key] = value
  return config


@pytest.fixture(scope='module')
def plain(tmp_path_factory):
  return train.run(_config(), str(tmp_path_factory.mktemp('plain')))


def test_client_noise_epsilon_and_an_exact_resume(tmp_path, plain):
  """2 rounds, 2 of 4 clients, sigma 0.8 shared by the clients: the records' epsilon after round
  r is what dp-accounting gives for r Poisson-sampled (q = 1/2) Gaussian releases (RDP over
  integer orders, or unsampled over all orders if smaller). The noise is
  drawn per (seed, round, client): the run, resumed from round 1, ends exactly where it did,
  with the same epsilon, and away from the non-private run."""
  config = _config(noise_multiplier=0.8, clip_norm=0.3, noise_at='clients')
  workdir = tmp_path / 'run'
  whole = train.run(config, str(workdir))
  for record in whole.rounds[1:]:
    sampled = rdp.RdpAccountant(orders=list(range(2, 257)))
    sampled.compose(dp_event.PoissonSampledDpEvent(0.5, dp_event.GaussianDpEvent(0.8)),
                    record.round)
    unsampled = rdp.RdpAccountant()
    unsampled.compose(dp_event.GaussianDpEvent(0.8), record.round)
    expected = min(sampled.get_epsilon(1e-5), unsampled.get_epsilon(1e-5))
    assert expected < unsampled.get_epsilon(1e-5)  # sampling amplified the privacy here
    assert record.dp_epsilon == pytest.approx(expected, rel=1e-12)
    assert record.dp_delta == 1e-5
  assert 0 < whole.rounds[1].dp_epsilon < whole.rounds[2].dp_epsilon
  assert whole.rounds[0].dp_epsilon is None  # the initial model released nothing
  shutil.rmtree(workdir / 'checkpoints' / '2')
  resumed = train.run(config, str(workdir))
  assert [r.val_loss for r in resumed.rounds] == [r.val_loss for r in whole.rounds]
  assert [r.dp_epsilon for r in resumed.rounds] == [r.dp_epsilon for r in whole.rounds]
  assert whole.rounds[-1].val_loss != plain.rounds[-1].val_loss


@pytest.mark.parametrize('noise_at', ['server', 'clients'])
def test_no_noise_and_no_clipping_is_the_non_private_run_bit_for_bit(tmp_path, plain, noise_at):
  private = train.run(_config(noise_multiplier=0.0, clip_norm=math.inf, noise_at=noise_at),
                      str(tmp_path / 'dp'))
  assert [r.val_loss for r in private.rounds] == [r.val_loss for r in plain.rounds]
  for a, b in zip(jax.tree.leaves(private.params), jax.tree.leaves(plain.params)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  assert private.rounds[-1].dp_epsilon == math.inf  # no noise, no privacy: said so


@pytest.mark.parametrize('overrides, message', [
    ({'fl.dp.noise_multiplier': -1.0}, 'fl.dp.noise_multiplier must be a finite number >= 0'),
    ({'fl.dp.clip_norm': 0.0}, 'fl.dp.clip_norm must be > 0 (inf: no clipping), got 0.0'),
    ({'fl.dp.delta': 1.0}, 'fl.dp.delta must be in (0, 1), got 1.0'),
    ({'fl.dp.delta': 0.0}, 'fl.dp.delta must be in (0, 1), got 0.0'),
    ({'fl.dp.noise_at': 'network'}, "fl.dp.noise_at must be one of ('server', 'clients')"),
    ({'fl.dp.enabled': True, 'fl.weighting': 'examples'}, "fl.weighting must be 'uniform' or"),
    ({'fl.dp.enabled': True, 'fl.fragments': 3}, 'fl.dp needs whole-model synchronisations'),
    ({'fl.secagg.enabled': True, 'fl.clients_per_round': 1},
     'fl.secagg needs fl.clients_per_round >= 2 (the sum of one client is its update), got 1'),
    ({'fl.secagg.enabled': True}, 'fl.secagg.enabled=True runs in a Flower deployment'),
    ({'fl.secagg.enabled': True, 'fl.compression.upload': 'int8'},
     "fl.compression.upload must be 'none', got 'int8'"),
    ({'fl.secagg.enabled': True, 'fl.dp.enabled': True},
     "fl.dp.noise_at must be 'clients', got 'server'"),
    ({'fl.secagg.quantization_bits': 31}, 'fl.secagg.quantization_bits must be an integer in'),
    ({'fl.secagg.enabled': True, 'fl.secagg.quantization_bits': 30, 'fl.num_clients': 8,
      'fl.clients_per_round': 8}, 'the sum of 8 clients would overflow 2**32; use at most 29'),
])
def test_bad_privacy_settings_are_one_line_errors_before_anything_runs(tmp_path, overrides,
                                                                        message):
  config = tiny.get_config('test')
  for dotted, value in overrides.items():
    *groups, name = dotted.split('.')
    node = config
    for group in groups:
      node = node[group]
    node[name] = value
  with pytest.raises(ValueError) as info:
    train.run(config, str(tmp_path / 'run'))
  assert message in str(info.value) and '\n' not in str(info.value)
  assert not (tmp_path / 'run').exists()
