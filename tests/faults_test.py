"""Client faults: crashes, NaN updates and late clients are left out; the global model stays finite.
"""

import math

import jax
import numpy as np
import pytest

from fedjax_pt.configs import tiny
from fedjax_pt import errors
from fedjax_pt.federated import faults
from fedjax_pt import records
from fedjax_pt import train


def _config(rounds=3, **fl):
  config = tiny.get_config('test')
  config.opt.warmup_steps, config.opt.schedule_steps = 2, 60
  config.fl.rounds = rounds
  config.log.every_steps = 0
  config.ckpt.every_rounds = 0
  for key, value in fl.items():
    if key.startswith('fault_'):
      config.fl.fault[key[len('fault_'):]] = value
    else:
      config.fl[key] = value
  return config


def _finite(params):
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_injected_faults_are_seeded_and_have_the_right_rates():
  cfg = faults.FaultConfig(failure_prob=0.2, nan_prob=0.05)
  draws = [faults.injected_fault(cfg, 0, r, k, 0) for r in range(500) for k in range(8)]
  assert draws == [faults.injected_fault(cfg, 0, r, k, 0) for r in range(500) for k in range(8)]
  assert abs(draws.count('fail') / len(draws) - 0.2) < 0.02
  assert abs(draws.count('nan') / len(draws) - 0.05) < 0.01
  assert faults.injected_fault(faults.FaultConfig(), 0, 1, 1, 0) is None


def test_all_finite_and_poisoned():
  tree = {'a': np.ones(3, np.float32), 'b': {'c': np.zeros(2, np.float32)}}
  assert bool(faults.all_finite(tree))
  assert not bool(faults.all_finite(faults.poisoned(tree)))
  tree['b']['c'][1] = np.inf
  assert not bool(faults.all_finite(tree))


@pytest.fixture(scope='module')
def fault_free(tmp_path_factory):
  return train.run(_config(rounds=20), str(tmp_path_factory.mktemp('clean')))


def test_twenty_rounds_with_failures_and_nan_updates(fault_free, tmp_path):
  faulty = train.run(_config(rounds=20, fault_failure_prob=0.2, fault_nan_prob=0.05),
                     str(tmp_path))
  assert _finite(faulty.params)
  failures = [reason for r in faulty.rounds[1:] for reason in r.failed_clients.values()]
  assert any('injected failure' in f for f in failures)
  assert any('non-finite' in f for f in failures)
  for r in faulty.rounds[1:]:  # round 0 is the initial model
    assert math.isfinite(r.val_ppl) and r.num_aggregated >= 1 and not r.skipped
  clean_ppl, faulty_ppl = fault_free.last_round.val_ppl, faulty.last_round.val_ppl
  print(f'val_ppl after 20 rounds: fault-free {clean_ppl:.3f}, with faults {faulty_ppl:.3f}')
  assert abs(faulty_ppl - clean_ppl) / clean_ppl < 0.1


def _rounds(workdir):
  return records.read_records(str(workdir)).rounds


def test_skipped_rounds_keep_the_model_and_a_run_of_only_skips_fails(tmp_path):
  with pytest.raises(errors.TrainingFailed, match='no round aggregated a client update: all 2 '
                     'rounds were skipped'):
    train.run(_config(rounds=2, fault_failure_prob=1.0, min_clients=1,
                      on_too_few_clients='skip'), str(tmp_path))
  initial, *skipped = _rounds(tmp_path)
  assert [r.round for r in skipped] == [1, 2]
  assert all(r.skipped and r.num_aggregated == 0 for r in skipped)
  assert all(r.global_norm == initial.global_norm and r.val_loss == initial.val_loss
             for r in skipped)


def test_too_few_clients_retries_with_fresh_draws(tmp_path):
  result = train.run(_config(rounds=4, fault_failure_prob=0.5, min_clients=4,
                             max_round_retries=3), str(tmp_path))
  assert any(r.retries for r in result.rounds[1:])
  assert any('@' in str(k) for r in result.rounds[1:] for k in r.failed_clients)
  for r in result.rounds[1:]:
    # A retry tops the round up: every client is averaged at most once.
    assert r.num_aggregated == len(r.client_train_loss) <= 4
  assert _finite(result.params)


def test_late_clients_are_left_out(tmp_path):
  with pytest.raises(errors.TrainingFailed, match='no round aggregated'):
    train.run(_config(rounds=1, round_timeout_s=1e-6, on_too_few_clients='skip'), str(tmp_path))
  record = _rounds(tmp_path)[1]
  assert record.skipped and all(f.startswith('late') for f in record.failed_clients.values())
  # The server received the late clients' parameters before rejecting them.
  assert record.bytes_received == record.bytes_sent


@pytest.mark.parametrize('overrides, message', [
    ({'min_clients': 5}, 'fl.min_clients=5 exceeds fl.clients_per_round=4'),
    ({'fault_nan_prob': 1.5}, r'fl.fault.nan_prob must be in \[0, 1\]'),
    ({'on_too_few_clients': 'wait'}, 'fl.on_too_few_clients'),
    ({'round_timeout_s': -1.0}, 'fl.round_timeout_s must be >= 0'),
])
def test_fault_config_errors(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    train.run(_config(**overrides), str(tmp_path))
