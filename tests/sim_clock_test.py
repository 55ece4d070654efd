"""The simulated wall clock and the round deadline against hand-computed times, through the round
object with scripted clients."""

import jax.numpy as jnp
import ml_collections
import pytest

import scripted
from fedjax_pt import records
from fedjax_pt import summaries
from fedjax_pt import utilization
from fedjax_pt.federated import algorithm as federation
from fedjax_pt.federated import compression
from fedjax_pt.federated import faults
from fedjax_pt.federated import profiles
from fedjax_pt.federated import sim_clock
from fedjax_pt.federated.config import FLConfig

# Client 0: 100 Mbit/s down, 50 up, 20 ms each way, 1000 tokens/s. Client 1: no links given, its
# compute measured (3.5 s here).
FAST = profiles.ClientProfile(tokens_per_s=1000.0, downlink_mbps=100.0, uplink_mbps=50.0,
                              latency_ms=20.0)
MEASURED = profiles.ClientProfile()
# The model is 250,000 float32 values: the broadcast and every delta, sent uncompressed, are
# 1 MB plus the payload's headers (the server counts both).
MODEL = {'w': jnp.zeros((250_000,), jnp.float32)}
BYTES = compression.payload_bytes(compression.encode(MODEL, 'none'))
# Client 0: 2 x 20 ms + B x 8 / 100e6 + 2000 / 1000 + B x 8 / 50e6 ~ 0.04 + 0.08 + 2 + 0.16
CLIENT_0_S = 0.04 + BYTES * 8 / 100e6 + 2.0 + BYTES * 8 / 50e6
CLIENT_1_S = 3.5


class TimedClients:
  """Client k "trains" to w = values[k] on tokens[k] tokens; its compute took compute_s[k]
  here."""

  def __init__(self, values, tokens=(2000, 500), compute_s=(99.0, 3.5)):
    self.values, self.tokens, self.compute_s = values, tokens, compute_s
    self.calls = []

  def unavailable(self):
    return ()

  def refused(self):
    return {}

  def train(self, broadcast, round_idx, client_ids, attempt, segment):
    del segment
    params = scripted.params_of(broadcast)
    for k in client_ids:
      self.calls.append((round_idx, attempt, k))
      delta = {'w': jnp.full_like(params['w'], self.values[k]) - params['w']}
      yield scripted.trained(k, delta, self.tokens[k], examples=1, local_steps=k + 1,
                             compute_s=self.compute_s[k], elapsed_s=0.01)


def _round(clients, table, deadline=0.0, **fl):
  cfg = FLConfig(num_clients=len(table), clients_per_round=len(table), rounds=1,
                        local_steps=1, outer_optimizer='sgd', outer_lr=1.0, outer_momentum=0.0,
                        weighting='uniform', profiles=table, **fl)
  algorithm = federation.FederatedAlgorithm(cfg, faults.FaultConfig(round_deadline_s=deadline),
                                            seed=0)
  return algorithm.apply(algorithm.init(MODEL), 1, clients)


def test_client_time_by_hand():
  # 2 x 20 ms + 1e6 B x 8 / 100e6 + 2000 / 1000 + 5e5 B x 8 / 50e6 = 0.04 + 0.08 + 2 + 0.08
  assert sim_clock.client_time_s(FAST, 1_000_000, 500_000, 2000, 99.0) == pytest.approx(2.2)
  assert sim_clock.client_time_s(FAST, BYTES, BYTES, 2000, 99.0) == pytest.approx(CLIENT_0_S)
  # No throughput in the profile: the compute time measured here; no links: no transfer time.
  assert sim_clock.client_time_s(MEASURED, 1_000_000, 500_000, 500, 3.5) == 3.5
  assert sim_clock.client_time_s(None, 10, 10, 10, 1.25) == 1.25
  assert sim_clock.transfer_s(125_000_000, 1000.0) == 1.0  # 1 Gbit over 1 Gbit/s


def test_the_transport_clock_by_hand():
  """fl.clock: a fixed 3 s a round trip, and the transport's 40 Mbit/s serial with the links."""
  clock = sim_clock.ClockConfig(round_trip_s=3.0, transport_mbps=40.0)
  # FAST as above (2.2 s) + 3 s + (1e6 + 5e5) B x 8 / 40e6 = 2.2 + 3 + 0.3
  assert sim_clock.client_time_s(FAST, 1_000_000, 500_000, 2000, 99.0, clock) == pytest.approx(
      5.5)
  # No links in the profile: the transport's time alone; its rate of 0 costs no time.
  assert sim_clock.client_time_s(None, 1_000_000, 500_000, 10, 1.25, clock) == pytest.approx(
      1.25 + 3.0 + 0.3)
  assert sim_clock.client_time_s(None, 10**9, 10**9, 10, 1.25,
                                 sim_clock.ClockConfig(round_trip_s=0.5)) == pytest.approx(1.75)
  # What the round object charges: the slowest client, through fl.clock.
  _, result = _round(TimedClients([1.0, 3.0]), (FAST, MEASURED), clock=clock)
  transport = 2 * BYTES * 8 / 40e6
  assert result.stats.client_sim_time_s == pytest.approx(
      {0: CLIENT_0_S + 3.0 + transport, 1: CLIENT_1_S + 3.0 + transport})


@pytest.mark.parametrize('clock, message', [
    ({'round_trip_s': -1.0}, 'fl.clock.round_trip_s must be a finite number >= 0'),
    ({'transport_mbps': float('inf')}, 'fl.clock.transport_mbps must be a finite number >= 0'),
    ({'transport_mbps': '100'}, 'fl.clock.transport_mbps must be a finite number >= 0'),
    ({'rate': 1.0}, "fl.clock has unknown key 'rate'"),
])
def test_a_bad_clock_is_refused_in_one_line(clock, message):
  with pytest.raises(ValueError, match=message):
    sim_clock.ClockConfig.from_config(ml_collections.ConfigDict(clock))


def test_a_round_lasts_until_its_slowest_client_plus_the_server():
  state, result = _round(TimedClients([1.0, 3.0]), (FAST, MEASURED))
  stats = result.stats
  assert stats.client_sim_time_s == pytest.approx({0: CLIENT_0_S, 1: CLIENT_1_S})
  assert stats.client_local_steps == {0: 1, 1: 2}
  assert 0 < stats.server_time_s < 5  # measured here
  assert stats.sim_round_time_s == pytest.approx(CLIENT_1_S + stats.server_time_s)
  assert float(state.params['w'][0]) == 2.0  # both averaged


def test_the_deadline_drops_exactly_the_late_clients_and_the_server_waits_for_it():
  state, result = _round(TimedClients([1.0, 3.0]), (FAST, MEASURED), deadline=3.0)
  stats = result.stats
  assert stats.failed_clients == {1: 'late: simulated 3.5s > fl.round_deadline_s=3'}
  assert stats.num_aggregated == 1 and float(state.params['w'][0]) == 1.0  # client 0 alone
  # The server waited for client 1 until the deadline, not only for client 0 (2.2 s).
  assert stats.sim_round_time_s == pytest.approx(3.0 + stats.server_time_s)
  # A deadline that both meet drops nobody.
  _, result = _round(TimedClients([1.0, 3.0]), (FAST, MEASURED), deadline=3.6)
  assert result.stats.failed_clients == {} and result.stats.num_aggregated == 2


def test_a_late_round_is_retried_and_its_attempts_add_up():
  """min_clients=2 with one late client: the retry samples the late client again (it was not
  aggregated); both attempts wait until the deadline."""
  cfg = FLConfig(num_clients=2, clients_per_round=2, rounds=1, local_steps=1,
                        profiles=(FAST, MEASURED))
  policy = faults.FaultConfig(min_clients=2, round_deadline_s=3.0, max_round_retries=1)
  algorithm = federation.FederatedAlgorithm(cfg, policy, seed=0)
  clients = TimedClients([1.0, 3.0])
  _, result = algorithm.apply(algorithm.init(MODEL), 1, clients)
  assert clients.calls == [(1, 0, 0), (1, 0, 1), (1, 1, 1)]
  assert result.stats.skipped and result.stats.retries == 1
  assert result.stats.sim_round_time_s == pytest.approx(2 * 3.0 + result.stats.server_time_s)


def test_absent_clients_are_not_asked_and_are_recorded():
  table = (profiles.ClientProfile(availability=0.5), FAST)
  absent_rounds = [r for r in range(1, 50) if profiles.absent(table, 0, r)]
  present_round = next(r for r in range(1, 50) if not profiles.absent(table, 0, r))
  cfg = FLConfig(num_clients=2, clients_per_round=2, rounds=1, local_steps=1,
                        profiles=table)
  algorithm = federation.FederatedAlgorithm(cfg, faults.FaultConfig(), seed=0)
  state = algorithm.init(MODEL)
  clients = TimedClients([1.0, 3.0])
  _, result = algorithm.apply(state, absent_rounds[0], clients)
  assert result.stats.absent_clients == [0] and result.stats.clients == [1]
  assert [k for _, _, k in clients.calls] == [1]
  _, result = algorithm.apply(state, present_round, clients)
  assert result.stats.absent_clients is None and result.stats.clients == [0, 1]


def test_wait_by_hand():
  assert sim_clock.wait_s([1.0, 2.0], any_late=False, deadline_s=5.0) == 2.0
  assert sim_clock.wait_s([1.0], any_late=True, deadline_s=5.0) == 5.0
  assert sim_clock.wait_s([], any_late=False, deadline_s=5.0) == 0.0


def test_the_calibration_fit_recovers_a_known_clock():
  """benchmarks/deploy_clock.py fits measured - simulated round time = round_trip_s + 8 x bytes /
  transport_mbps over the rounds of its runs: rounds made with 5 s + 100 Mbit/s give them back,
  and a transport that costs nothing per byte gives a rate of 0."""
  import os  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from benchmarks import deploy_clock  # pylint: disable=import-outside-toplevel

  def run(sizes, seconds):
    return {'rounds': [{'client_download_bytes': {'0': n // 2, '1': 10},
                        'client_upload_bytes': {'0': n // 2, '1': 10},
                        'sim_round_time_s': 3.0, 'round_time_s': 3.0 + seconds(n)}
                       for n in sizes]}

  clock = lambda n: 5.0 + 8 * n / 100e6
  fitted = deploy_clock.fit([run([1000, 2000], clock), run([50_000_000, 60_000_000], clock)])
  assert fitted == pytest.approx({'round_trip_s': 5.0, 'transport_mbps': 100.0})
  flat = deploy_clock.fit([run([1000, 50_000_000], lambda n: 7.0)])
  assert flat == pytest.approx({'round_trip_s': 7.0, 'transport_mbps': 0.0})


def test_compute_utilisation_by_hand():
  """Client 0 trains 2000 tokens at 1000/s (2 s) but its round trip is CLIENT_0_S; client 1's
  compute was measured, 3.5 s of its 3.5 s: the slower client and the server set the round."""
  _, result = _round(TimedClients([1.0, 3.0]), (FAST, MEASURED))
  stats = result.stats
  assert stats.client_compute_s == {0: 99.0, 1: 3.5}  # measured on "its host"
  assert stats.client_sim_compute_s == pytest.approx({0: 2.0, 1: 3.5})  # as the clock charges
  record = records.RoundRecord(round=1, tokens=2500, client_compute_s=stats.client_compute_s,
                               client_sim_compute_s=stats.client_sim_compute_s,
                               sim_round_time_s=CLIENT_1_S + 0.5, round_time_s=200.0)
  utilization.add_to(record, measured=False)
  assert record.client_sim_compute_utilization == pytest.approx({0: 2.0 / 4.0, 1: 3.5 / 4.0})
  assert record.sim_compute_utilization == pytest.approx((0.5 + 0.875) / 2)
  assert record.compute_utilization is None  # clients in turn on one host: not measured
  utilization.add_to(record, measured=True)
  assert record.client_compute_utilization == pytest.approx({0: 99 / 200, 1: 3.5 / 200})
  assert record.compute_utilization == pytest.approx((99 + 3.5) / 400)
  # Over a run: all training over the clients that trained x the run's time (client 1, not in
  # round 2, idles through it), not the mean of the rounds'.
  second = records.RoundRecord(round=2, tokens=0, client_sim_compute_s={0: 1.0},
                               sim_round_time_s=1.0)
  utilization.add_to(second, measured=False)
  assert utilization.of_run([record, second], measured=False) == pytest.approx(
      (2.0 + 3.5 + 1.0) / (2 * (4.0 + 1.0)))
  assert utilization.of_run([record, second], measured=True) == pytest.approx(102.5 / 400)
  assert summaries.summarize([record, second]).sim_compute_utilization == pytest.approx(0.65)
  # A late quorum update that trained 10 s in a 4 s round: its share of the round is 1.
  assert utilization.of_round({0: 10.0, 1: 2.0}, 4.0) == (0.75, {0: 1.0, 1: 0.5})
  assert utilization.of_round({}, 1.0) == (None, None)
  assert utilization.of_round({0: 1.0}, 0.0) == (None, None)
