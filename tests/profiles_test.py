"""Client profiles: parsing and up-front validation, local work from time budgets by hand, and
seeded availability."""

import json
import subprocess
import sys

import numpy as np
import pytest

from fedjax_pt.configs import tiny
from fedjax_pt import build
from fedjax_pt.planning import memory
from fedjax_pt.federated import profiles
from fedjax_pt.run_spec import RunSpec

REPO = __file__.rsplit('/tests/', 1)[0]


def _spec(profile_list, mesh=None, **fl):
  config = tiny.get_config('test')  # batch 4 x seq 32: 128 tokens a step; 3 local steps
  config.fl.num_clients = config.fl.clients_per_round = 4
  config.mesh.fsdp = 1
  config.mesh.update(mesh or {})
  config.fl.profiles = profile_list if isinstance(profile_list, str) else json.dumps(profile_list)
  config.fl.update(fl)
  return RunSpec.from_config(config)


def test_no_profiles_means_identical_clients():
  spec = _spec('')
  assert spec.fl.profiles == () and spec.uniform_clients
  assert spec.client_plan(3) == profiles.ClientPlan(batch_size=4, local_steps=3)


def test_time_budget_gives_the_steps_that_fit_by_hand():
  spec = _spec([{'tokens_per_s': 1000, 'time_budget_s': 2.5},  # 2500 / 128 = 19.5: 19 steps
                {'tokens_per_s': 1000, 'time_budget_s': 1.28},  # 1280 / 128 = 10 exactly
                {'local_steps': 7, 'batch_size': 8},
                {'tokens_per_s': 640, 'time_budget_s': 1, 'batch_size': 2}])  # 640 / 64 = 10
  assert [spec.client_plan(k) for k in range(4)] == [
      profiles.ClientPlan(4, 19), profiles.ClientPlan(4, 10), profiles.ClientPlan(8, 7),
      profiles.ClientPlan(2, 10)]
  assert spec.client_plan(2).tokens(32) == 7 * 8 * 32
  assert not spec.uniform_clients


def test_client_k_gets_profile_k_mod_len():
  spec = _spec([{'local_steps': 1}, {'local_steps': 2}])
  assert [spec.client_plan(k).local_steps for k in range(4)] == [1, 2, 1, 2]
  assert [p.local_steps for p in spec.fl.profiles] == [1, 2, 1, 2]


@pytest.mark.parametrize('suffix, text', [
    ('.json', '[{"uplink_mbps": 100, "latency_ms": 20}]'),
    ('.yaml', '- uplink_mbps: 100\n  latency_ms: 20\n'),
])
def test_profiles_from_a_file(tmp_path, suffix, text):
  path = tmp_path / f'profiles{suffix}'
  path.write_text(text)
  spec = _spec(str(path))
  assert spec.fl.profiles == (profiles.ClientProfile(uplink_mbps=100.0, latency_ms=20.0),) * 4
  assert spec.uniform_clients  # links alone do not change the local work


@pytest.mark.parametrize('value, message', [
    ([{'tokens_per_second': 1}], r"fl.profiles\[0\] has unknown key 'tokens_per_second'"),
    ([{}, {'tokens_per_s': -1}], r'fl.profiles\[1\].tokens_per_s must be positive, got -1'),
    ([{'local_steps': 0}], r'fl.profiles\[0\].local_steps must be a positive integer, got 0'),
    ([{'local_steps': 2.5}], r'fl.profiles\[0\].local_steps must be a positive integer, got 2.5'),
    ([{'uplink_mbps': 'fast'}],
     r"fl.profiles\[0\].uplink_mbps must be a finite number, got 'fast'"),
    ([{'local_steps': 2, 'time_budget_s': 1, 'tokens_per_s': 1}],
     r'fl.profiles\[0\] gives both local_steps and time_budget_s'),
    ([{'time_budget_s': 1}], r'fl.profiles\[0\].time_budget_s needs tokens_per_s'),
    ([{'availability': 0}], r'fl.profiles\[0\].availability must be in \(0, 1\], got 0'),
    ([{'latency_ms': -5}], r'fl.profiles\[0\].latency_ms must be >= 0, got -5'),
    ([{}] * 5, 'fl.profiles has 5 profiles for fl.num_clients=4'),
    ([], 'fl.profiles must be a non-empty list'),
    ('{"tokens_per_s": 5}', 'fl.profiles must be a non-empty list'),
    ('[{"tokens_per_s": 5}', 'fl.profiles is not valid JSON'),
    ('no/such/profiles.yaml', "fl.profiles='no/such/profiles.yaml': no such file"),
    ([{'tokens_per_s': 100, 'time_budget_s': 1}],
     r'fl.profiles\[0\].time_budget_s=1 fits no local step at tokens_per_s=100 \(4 x 32 tokens'),
    ([{'batch_size': 3}], r'fl.profiles\[0\].batch_size=3 must be divisible by mesh.data x '
                          r'mesh.fsdp = 2'),
])
def test_bad_profiles_are_one_line_errors(value, message):
  with pytest.raises(ValueError, match=message) as e:
    _spec(value, mesh={'data': 2} if 'mesh.data' in message else None)
  assert '\n' not in str(e.value)


def test_different_local_work_needs_one_client_at_a_time_and_no_fragments():
  different = [{'local_steps': 1}, {'local_steps': 3}]
  with pytest.raises(ValueError, match='they train one at a time, so mesh.clients must be 1, '
                                       'got 2'):
    _spec(different, mesh={'clients': 2})
  with pytest.raises(ValueError, match='streaming fragments cannot schedule: fl.fragments must '
                                       'be 1, got 3'):
    _spec(different, fragments=3)
  # The same work everywhere (links differ) keeps both.
  assert _spec([{'uplink_mbps': 1}, {'uplink_mbps': 10}], fragments=3).fl.fragments == 3


def test_a_bad_profile_through_main_is_one_line_and_exit_2(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'fedjax_pt.main', '--config=configs/tiny.py:test',
       f'--workdir={tmp_path}', '--config.fl.profiles=[{"tokens_per_s": 0}]'],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      'fedjax_pt: error: fl.profiles[0].tokens_per_s must be positive, got 0')
  assert not (tmp_path / 'metrics.jsonl').exists()


def test_availability_is_seeded_and_has_the_stated_rate():
  table = (profiles.ClientProfile(availability=0.25), profiles.ClientProfile())
  draws = [profiles.absent(table, seed=3, round_idx=r) for r in range(1, 4001)]
  assert draws == [profiles.absent(table, seed=3, round_idx=r) for r in range(1, 4001)]
  assert all(1 not in d for d in draws)  # availability 1: always there
  rate = np.mean([0 in d for d in draws])
  # Binomial(4000, 0.75): standard deviation 0.0068; 5 of them cannot fail by chance.
  assert abs(rate - 0.75) < 5 * np.sqrt(0.75 * 0.25 / 4000)
  assert draws != [profiles.absent(table, seed=4, round_idx=r) for r in range(1, 4001)]


def test_a_profiles_file_is_recorded_by_its_contents(tmp_path):
  path = tmp_path / 'fleet.yaml'
  path.write_text('- {tokens_per_s: 2048, uplink_mbps: 20}\n- {local_steps: 2}\n')
  text = profiles.canonical(str(path), 4)
  assert json.loads(text) == [{'tokens_per_s': 2048.0, 'uplink_mbps': 20.0}, {'local_steps': 2},
                              {'tokens_per_s': 2048.0, 'uplink_mbps': 20.0}, {'local_steps': 2}]
  assert profiles.parse(text, 4) == profiles.parse(str(path), 4)  # the same clients, inline
  assert profiles.canonical('', 4) == ''


def test_the_memory_estimate_counts_the_largest_client_batch():
  config = tiny.get_config('test')
  plain = memory.estimate(_spec(''), build.model_config(config))
  bigger = memory.estimate(_spec([{}, {'batch_size': 8}]), build.model_config(config))
  assert bigger.activations == 2 * plain.activations  # batch 8 against data.batch_size=4
  assert bigger.params == plain.params
