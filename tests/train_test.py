"""End-to-end: the round loop through `main`, federated == centralized in the degenerate case, and
one-line errors for bad input."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from fedjax_pt import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ['--config.model.d_model=32', '--config.model.num_heads=2', '--config.data.seq_len=32',
         '--config.data.batch_size=4', '--config.eval.max_batches=2', '--config.fl.local_steps=3',
         '--config.opt.warmup_steps=1', '--config.opt.schedule_steps=20', '--config.log.progress=False']


def _main(workdir, *flags, timeout=300):
  return subprocess.run([sys.executable, '-m', 'fedjax_pt.main', f'--workdir={workdir}', *flags],
                        cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


def _records(workdir, kind):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [r for r in map(json.loads, f) if r['kind'] == kind]


def test_tiny_config_two_rounds_through_main(tmp_path):
  result = _main(tmp_path, *SMALL, '--config.fl.rounds=2', '--config.fl.num_clients=2',
                 '--config.fl.clients_per_round=2')
  assert result.returncode == 0, result.stderr[-3000:]
  rounds = _records(tmp_path, 'round')
  assert [r['round'] for r in rounds] == [1, 2]
  tokens_per_round = 2 * 3 * 4 * 32  # clients x local steps x batch x seq_len
  assert [r['tokens'] for r in rounds] == [tokens_per_round, 2 * tokens_per_round]
  for r in rounds:
    assert math.isfinite(r['val_loss']) and math.isfinite(r['train_loss'])
    np.testing.assert_allclose(r['val_ppl'], math.exp(r['val_loss']), rtol=1e-6)
    assert r['clients'] == [0, 1]
  steps = _records(tmp_path, 'step')
  assert {(s['round'], s['client']) for s in steps} == {(1, 0), (1, 1), (2, 0), (2, 1)}
  with open(tmp_path / 'config.json', encoding='utf-8') as f:
    config = json.load(f)
  assert config['model']['vocab_size'] == 384 and config['model']['d_model'] == 32
  assert 'val_ppl' in result.stdout


def _config(**overrides):
  config = tiny.get_config()
  config.model.d_model, config.model.num_heads = 32, 2
  config.data.seq_len, config.data.batch_size = 32, 4
  config.eval.max_batches = 2
  config.opt.warmup_steps, config.opt.schedule_steps = 1, 20
  config.log.progress = False
  config.fl.rounds, config.fl.local_steps = 2, 3
  for key, value in overrides.items():
    group, name = key.split('__')
    if group == 'mode':
      config.mode = value
    else:
      config[group][name] = value
  return config


def _final_params(tmp_path, name, **overrides):
  return train.run(_config(**overrides), str(tmp_path / name)).params


def test_one_client_fedavg_without_reset_equals_centralized(tmp_path):
  one_client = dict(fl__num_clients=1, fl__clients_per_round=1)
  fedavg = dict(fl__outer_optimizer='sgd', fl__outer_lr=1.0, fl__outer_momentum=0.0)
  centralized = _final_params(tmp_path, 'c', mode__mode='centralized', **one_client)
  federated = _final_params(tmp_path, 'f', fl__reset_optimizer=False, **one_client, **fedavg)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               federated, centralized)
  # Resetting Adam's moments at the round boundary is a different algorithm: it must show.
  reset = _final_params(tmp_path, 'r', fl__reset_optimizer=True, **one_client, **fedavg)
  assert not all(jax.tree.leaves(jax.tree.map(np.allclose, reset, centralized)))


@pytest.mark.parametrize('flags, message', [
    (['--config.fl.outer_lrr=0.7'], 'unknown config key among --config.fl.outer_lrr'),
    (['--config.fl.rounds=abc'], 'flag --config.fl.rounds=abc'),
    (['--config.fl.clients_per_round=9'], 'fl.clients_per_round=9 exceeds fl.num_clients=4'),
    (['--config.data.source=jsonl', '--config.data.path=/nonexistent/c4-*.jsonl'],
     "'/nonexistent/c4-*.jsonl' matches no file"),
    (['--config=configs/nope.py'], 'configs/nope.py: no such config file'),
])
def test_bad_input_exits_with_one_line(tmp_path, flags, message):
  result = _main(tmp_path / 'run', *flags)
  assert result.returncode != 0
  errors = [line for line in result.stderr.splitlines() if 'error' in line.lower()]
  assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'run' / 'metrics.jsonl').exists()


def test_empty_corpus_exits_with_one_line(tmp_path):
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('')
  result = _main(tmp_path / 'run', '--config.data.source=jsonl', f'--config.data.path={empty}')
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  assert str(empty) in result.stderr.strip().splitlines()[-1]
