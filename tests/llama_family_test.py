"""The Llama family through the whole system: the command line, and the federated features that act
on the parameter tree (Muon, compressed deltas, streaming fragments, robust aggregation, DP) on its
SwiGLU, grouped-key and untied-output parameters."""

import importlib
import json
import math
import os
import subprocess
import sys

import pytest

from fedjax_pt import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [r for r in map(json.loads, f) if r['kind'] == 'round']


def test_the_tiny_llama_config_trains_through_main(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'fedjax_pt.main', '--config=configs/llama_tiny.py:test',
       f'--workdir={tmp_path}'], cwd=REPO, capture_output=True, text=True, timeout=300,
      check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  rounds = _records(tmp_path)
  assert [r['round'] for r in rounds] == [0, 1, 2]
  assert rounds[2]['val_loss'] < rounds[0]['val_loss']
  with open(tmp_path / 'config.json', encoding='utf-8') as f:
    model = json.load(f)['model']
  assert (model['family'], model['num_kv_heads'], model['tie_embeddings']) == ('llama', 1, False)


@pytest.mark.parametrize('settings', [
    {'opt.optimizer': 'muon', 'opt.muon_lr': 0.02, 'fl.compression.upload': 'topk',
     'fl.compression.error_feedback': True, 'fl.fragments': 3},
    {'fl.compression.upload': 'int4', 'fl.compression.download': 'int8',
     'fl.aggregation': 'trimmed_mean', 'fl.aggregation_trim': 1.0, 'fl.weighting': 'uniform'},
    {'fl.dp.enabled': True, 'fl.dp.clip_norm': 1.0, 'fl.dp.noise_multiplier': 0.01},
], ids=['muon-topk-fragments', 'int4-trimmed-mean', 'dp'])
def test_federated_features_train_the_llama_family(tmp_path, settings):
  config = importlib.import_module('fedjax_pt.configs.llama_tiny').get_config('test')
  for key, value in settings.items():
    *groups, name = key.split('.')
    node = config
    for group in groups:
      node = node[group]
    node[name] = value
  result = train.run(config, str(tmp_path))
  first, last = result.rounds[0], result.last_round
  assert last.round == 2 and math.isfinite(last.val_loss)
  assert last.val_loss < first.val_loss  # trained, not merely ran
  assert 'lm_head' in result.params and 'gate_proj' in result.params['block_0']['mlp']
