"""Heterogeneous clients end to end: time budgets give clients different step counts, token
weighting then weighs their models by the work they did, and the records carry the simulated
clock (also across a resume, and on the plot's simulated-time axis)."""

import json

import jax
import numpy as np
import pytest

from fedjax_pt.configs import tiny
from fedjax_pt import plot
from fedjax_pt import train

# Test config: batch 4 x seq 32 = 128 tokens a step. At 128 tokens/s, a 4 s budget fits 4 steps
# and a 1 s budget 1 step.
BUDGETS = [{'tokens_per_s': 128, 'time_budget_s': 4.0, 'downlink_mbps': 8.0},
           {'tokens_per_s': 128, 'time_budget_s': 1.0, 'uplink_mbps': 4.0, 'latency_ms': 100}]


def _config(**fl):
  config = tiny.get_config('test')
  config.fl.num_clients = config.fl.clients_per_round = 2
  config.fl.update(outer_optimizer='sgd', outer_lr=1.0, outer_momentum=0.0, rounds=1)
  config.fl.update(fl)
  config.log.progress = False
  return config


def _alone(tmp_path, client, steps):
  """Client `client` training alone for `steps` steps: the model it sends in the federated run."""
  config = _config()
  config.mode = 'centralized'
  config.data.only_client = client
  config.fl.local_steps = steps
  return train.run(config, str(tmp_path / f'alone{client}')).params


def test_time_budgets_weight_clients_by_the_tokens_they_trained(tmp_path):
  result = train.run(_config(profiles=json.dumps(BUDGETS), weighting='tokens'),
                     str(tmp_path / 'fed'))
  record = result.last_round
  assert record.client_local_steps == {0: 4, 1: 1}
  assert record.tokens == (4 + 1) * 128
  theta_0, theta_1 = _alone(tmp_path, 0, 4), _alone(tmp_path, 1, 1)
  # FedAvg weighted by tokens: (4 theta_0 + 1 theta_1) / 5, where a uniform mean would be
  # (theta_0 + theta_1) / 2. Same steps in the same order: equal up to float32 rounding of the
  # average (a few ulp of values below 1).
  weighted = jax.tree.map(lambda a, b: 0.8 * a + 0.2 * b, theta_0, theta_1)
  uniform = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, theta_0, theta_1)
  jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6),
               result.params, weighted)
  gap = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(weighted),
                                                        jax.tree.leaves(uniform)))
  assert gap > 100 * 1e-6  # the weighting shows far above the tolerance


def _by_client(values):
  return {int(k): v for k, v in values.items()}  # str keys when read back from metrics.jsonl


def test_simulated_clock_in_the_records_across_a_resume_and_on_the_plot(tmp_path):
  workdir = str(tmp_path / 'run')
  first = train.run(_config(profiles=json.dumps(BUDGETS)), workdir)
  resumed = train.run(_config(profiles=json.dumps(BUDGETS), rounds=2), workdir)
  rounds = resumed.rounds
  assert [r.round for r in rounds] == [0, 1, 2]
  assert rounds[1].sim_wall_time_s == first.rounds[1].sim_wall_time_s  # read back from disk
  model_bytes = _by_client(rounds[1].client_download_bytes)[0]
  # Client 0: 4 s of compute + the model over 8 Mbit/s; client 1: 1 s + 0.2 s of latency + its
  # delta over 4 Mbit/s. The round waits for the slower, then for the server.
  expected = {0: 4.0 + model_bytes * 8 / 8e6,
              1: 1.0 + 0.2 + _by_client(rounds[1].client_upload_bytes)[1] * 8 / 4e6}
  for r in rounds[1:]:
    assert _by_client(r.client_sim_time_s) == pytest.approx(expected)
    assert r.sim_round_time_s == pytest.approx(max(expected.values()) + r.server_time_s)
  assert rounds[0].sim_wall_time_s == 0.0
  assert rounds[2].sim_wall_time_s == pytest.approx(rounds[1].sim_round_time_s +
                                                    rounds[2].sim_round_time_s)
  run = plot.load_run(workdir)
  assert list(plot._round_x(run, 'sim_time')) == [r.sim_wall_time_s for r in rounds]
  paths = plot.make_figures([run], str(tmp_path / 'plots'), x='sim_time')
  assert all(p.endswith('.png') for p in paths)
