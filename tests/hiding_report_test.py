"""The slow-link study's report (experiments/hiding_report.py) on hand-made runs."""

import types

import pytest

from experiments import hiding_report
from fedjax_pt import records


def _run(seed, points, compute=None):
  """A run evaluated at (simulated time, val_ppl) points; rounds of 8 clients, each computing
  `compute` s of each round."""
  rounds = []
  for i, (t, ppl) in enumerate(points):
    r = records.RoundRecord(round=i, tokens=i, val_ppl=ppl, sim_wall_time_s=t,
                            num_aggregated=8)
    if i:
      r.sim_round_time_s = t - points[i - 1][0]
      r.client_sim_compute_s = {k: compute for k in range(8)}
      r.sim_compute_utilization = compute / r.sim_round_time_s
    rounds.append(r)
  return types.SimpleNamespace(config={'seed': seed}, rounds=rounds, workdir='')


def test_time_to_target_and_the_paired_table_by_hand():
  sync = _run(0, [(0, 50.0), (10, 20.0), (20, 10.0)], compute=5.0)
  fast = _run(0, [(0, 50.0), (4, 20.0), (8, 10.5)], compute=4.0)
  # sync's final 10 + 2% = 10.2: fast never gets there; sync at 19.8 s (between 20 at 10 s and
  # 10 at 20 s: 10 + 10 x 9.8 / 10); the curve reaches 15 at 15 s.
  assert hiding_report.time_to(sync, 15.0) == pytest.approx(15.0)
  assert hiding_report.time_to(fast, 10.2) is None
  table = {r['rounds']: r for r in hiding_report.rows({'sync': [sync], 'quorum6': [fast]})}
  assert table['sync']['time_to_target_s'] == pytest.approx(19.8)
  assert table['quorum6']['vs_sync'] == pytest.approx(0.05)  # 10.5 / 10 - 1
  assert table['quorum6']['reached_target'] == '0/1'
  # Utilisation: 2 rounds x 8 clients x 4 s / (8 clients x 8 s) = 1; sync 10 / 20.
  assert table['quorum6']['utilization'] == pytest.approx(1.0)
  assert table['sync']['utilization'] == pytest.approx(0.5)
  assert table['sync']['sim_round_s'] == pytest.approx(10.0)
