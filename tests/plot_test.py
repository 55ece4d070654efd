"""A 2-round tiny federated and centralized run record every metric, and the plot command draws
them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedjax_pt.configs import tiny
from fedjax_pt import plot
from fedjax_pt import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMON_ROUND_KEYS = {'kind', 'round', 'tokens', 'val_loss', 'val_ppl', 'train_loss', 'train_ppl',
                     'global_norm', 'bytes_sent', 'bytes_received', 'round_time_s',
                     'tokens_per_s', 'lr', 'global_norm_per_module'}
FEDERATED_ROUND_KEYS = COMMON_ROUND_KEYS | {
    'clients', 'client_train_loss', 'client_val_loss', 'client_val_ppl', 'client_norm',
    'mean_client_norm', 'client_delta_norm', 'client_grad_norm', 'client_update_norm',
    'pseudo_grad_norm', 'outer_update_norm', 'outer_momentum_norm', 'client_download_bytes',
    'client_upload_bytes', 'pseudo_grad_norm_per_module'}
CENTRALIZED_ROUND_KEYS = COMMON_ROUND_KEYS | {'grad_norm', 'update_norm'}
STEP_KEYS = {'kind', 'round', 'client', 'step', 'local_step', 'loss', 'grad_norm', 'update_norm',
             'lr'}


def _config(mode):
  config = tiny.get_config('test')
  config.mode = mode
  config.eval.per_client = mode == 'federated'
  config.fl.num_clients = config.fl.clients_per_round = 2
  config.fl.local_steps = 4
  config.log.every_steps, config.log.per_layer_norms = 2, True
  return config


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('runs')
  for mode in ('federated', 'centralized'):
    train.run(_config(mode), str(root / mode))
  return root


def _records(workdir, kind):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [r for r in map(json.loads, f) if r['kind'] == kind]


@pytest.mark.parametrize('mode, keys', [('federated', FEDERATED_ROUND_KEYS),
                                        ('centralized', CENTRALIZED_ROUND_KEYS)])
def test_round_records_hold_every_metric(runs, mode, keys):
  initial, *rounds = _records(runs / mode, 'round')
  assert [r['round'] for r in rounds] == [1, 2]
  for record in rounds:
    assert keys <= set(record), keys - set(record)
  # Round 0, the untrained model: evaluated (on each client's set too), nothing trained yet.
  assert initial['round'] == 0 and initial['tokens'] == 0 and initial['train_loss'] is None
  assert initial['val_loss'] > rounds[-1]['val_loss']
  if mode == 'federated':
    assert set(initial['client_val_ppl']) == {'0', '1'}
  steps = _records(runs / mode, 'step')
  assert [s['local_step'] for s in steps if s['round'] == 1][:2] == [2, 4]
  for record in steps:
    assert STEP_KEYS <= set(record)


def test_federated_bytes_and_norms_are_consistent(runs):
  rounds = _records(runs / 'federated', 'round')[1:]
  model_bytes = rounds[0]['client_upload_bytes']['0']
  # float32 deltas: the wire headers (names, shapes) are all the bytes beyond the values.
  assert 0.99 < rounds[0]['compression_ratio'] < 1
  assert rounds[1]['bytes_sent'] == rounds[1]['bytes_received'] == 2 * 2 * model_bytes
  for r in rounds:
    assert set(r['client_val_ppl']) == {'0', '1'}
    assert r['pseudo_grad_norm'] > 0 and r['outer_update_norm'] > 0
    assert set(r['global_norm_per_module']) >= {'wte', 'wpe', 'block_0', 'norm_f'}
  # Nesterov with mu = 0.9: after round 1 the momentum is the pseudo-gradient itself.
  assert rounds[0]['outer_momentum_norm'] == pytest.approx(rounds[0]['pseudo_grad_norm'],
                                                           rel=1e-5)


def test_plot_command_writes_non_empty_pngs(runs, tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'fedjax_pt.plot', f'--workdir={runs / "federated"}',
       f'--workdir={runs / "centralized"}', f'--out={tmp_path}'],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  for name in ('perplexity', 'norms', 'gradients'):
    path = tmp_path / f'{name}.png'
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and path.stat().st_size > 10_000


def test_labels_come_from_configs(runs):
  federated = plot.load_run(str(runs / 'federated'))
  assert federated.label == 'nesterov lr=0.7 mu=0.9 K=2/2 tau=4 d32x2'
  assert plot.load_run(str(runs / 'centralized')).label == 'centralized d32x2'


def test_plot_of_a_directory_without_a_run_is_a_one_line_error(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'fedjax_pt.plot', f'--workdir={tmp_path}'],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2
  assert result.stderr.strip() == (f'fedjax_pt.plot: error: {tmp_path}/metrics.jsonl not found: '
                                   f'is --workdir={tmp_path} a fedjax_pt run?')


def test_an_output_path_that_is_a_file_is_a_one_line_error(tmp_path):
  (tmp_path / 'plots').write_text('')
  result = subprocess.run([sys.executable, '-m', 'fedjax_pt.plot', f'--workdir={tmp_path}',
                           f'--out={tmp_path / "plots"}'], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.returncode == 2
  assert result.stderr.strip() == (f'fedjax_pt.plot: error: --out={tmp_path / "plots"} is a '
                                   'file, not a directory')


def test_labels_name_outer_warmups_and_warm_starts():
  fl = {'outer_optimizer': 'nesterov', 'outer_lr': 0.7, 'outer_momentum': 0.9,
        'clients_per_round': 8, 'num_clients': 8, 'local_steps': 50, 'outer_lr_warmup_rounds': 4,
        'outer_momentum_warmup_rounds': 0}
  model = {'d_model': 64, 'num_layers': 2}
  assert plot.run_label({'fl': fl, 'model': model}) == (
      'nesterov lr=0.7 mu=0.9 lr warmup 4 K=8/8 tau=50 d64x2')
  warm = {'mode': 'centralized', 'fl': fl, 'model': model, 'init': {'from_checkpoint': 'runs/pre'}}
  assert plot.run_label(warm) == 'centralized d64x2 warm-started'


def test_perplexity_figure_compares_like_with_like(runs, tmp_path, monkeypatch):
  """Both modes draw the held-out perplexity from round 0 (the untrained model, at x = 0) and, as
  their train curve, the mean training loss of each round (never the last step's), on one axis."""
  figures = []
  monkeypatch.setattr(plot, 'save', lambda fig, path, dpi=120: figures.append(fig) or path)
  federated, centralized = (plot.load_run(str(runs / m)) for m in ('federated', 'centralized'))
  plot.plot_perplexity([federated, centralized], 'tokens', str(tmp_path / 'p.png'))
  lines = {line.get_label(): line for line in figures[0].axes[0].get_lines()}
  for run, test, train_ in ((federated, ': server model (test)', ': clients, mean over the round '
                             '(train)'), (centralized, ' (test)', ' (train)')):
    val = lines[run.label + test]
    assert val.get_xdata()[0] == 0 and val.get_ydata()[0] == pytest.approx(run.rounds[0].val_ppl)
    assert list(val.get_xdata()) == [r.tokens for r in run.rounds]
    train_y = np.asarray(lines[run.label + train_].get_ydata(), float)
    assert np.isnan(train_y[0])  # nothing trained at round 0
    np.testing.assert_allclose(train_y[1:], [r.train_ppl for r in run.rounds[1:]])
