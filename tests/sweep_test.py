"""Tests of experiments/sweep*.py: grid expansion and naming, skip / resume / restart, results
tables.

Most tests drive the sweep with a fake trainer (a few lines of Python that speak fedjax_pt.main's
command line and write its files), so skip and resume logic is checked quickly and exactly; one test
runs the real trainer end to end, interrupts it and resumes it.
"""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from experiments import sweep_report
from experiments import sweep_runner
from experiments import sweep_spec
from fedjax_pt import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Speaks `python -m fedjax_pt.main --config=... --workdir=... --config.KEY=VALUE` and writes
# config.json and metrics.jsonl like it. FAKE_RESUME=1: continues an existing metrics.jsonl (the
# checkpoint/resume behaviour); otherwise refuses it as fedjax_pt.main refuses a workdir it cannot
# continue (exit code errors.EXIT_WORKDIR_REFUSED). FAKE_DIE_AT=r:
# dies after logging round r-1, once (a marker file in the workdir remembers that it died).
FAKE_TRAINER = textwrap.dedent('''\
    import json, os, sys, time
    args = dict(a[2:].split('=', 1) for a in sys.argv[1:])
    workdir = args['workdir']
    rounds = int(args.get('config.fl.rounds', 3))
    metrics = os.path.join(workdir, 'metrics.jsonl')
    done = 0
    if os.path.exists(metrics):
      if os.environ.get('FAKE_RESUME') != '1':
        print(f'fedjax_pt: error: --workdir={workdir} holds another run', file=sys.stderr)
        sys.exit(REFUSED)
      done = sum(1 for l in open(metrics) if '"kind": "round"' in l)
    source = args.get('config.init.from_checkpoint')
    if source and not os.path.exists(os.path.join(source, 'metrics.jsonl')):
      print(f'fedjax_pt: error: init.from_checkpoint={source}: no such run', file=sys.stderr)
      sys.exit(2)
    time.sleep(float(args.get('config.sleep', 0)))
    os.makedirs(workdir, exist_ok=True)
    config = {'mode': args.get('config.mode', 'federated'), 'fl': {'rounds': rounds},
              'overrides': {k: v for k, v in args.items() if k.startswith('config.')}}
    json.dump(config, open(os.path.join(workdir, 'config.json'), 'w'))
    die_at = int(os.environ.get('FAKE_DIE_AT', 0))
    marker = os.path.join(workdir, 'died')
    with open(metrics, 'a') as f:
      for r in range(done + 1, rounds + 1):
        if r == die_at and not os.path.exists(marker):
          open(marker, 'w').close()
          sys.exit(1)
        lr = float(args.get('config.opt.lr', 1.0))
        record = {'kind': 'round', 'round': r, 'tokens': 100 * r, 'val_loss': 1.0,
                  'val_ppl': (10.0 / r / lr + (5 if r == rounds else 0) +
                              int(args.get('config.seed', 0))),
                  'round_time_s': 0.5}
        if 'config.bytes' in args:
          record['bytes_sent'] = record['bytes_received'] = 1000 * r
        f.write(json.dumps({'kind': 'step', 'round': r}) + '\\n')
        f.write(json.dumps(record) + '\\n')
    print('done')
    ''').replace('REFUSED', str(errors.EXIT_WORKDIR_REFUSED))


@pytest.fixture
def fake(tmp_path):
  (tmp_path / 'fake_main.py').write_text(FAKE_TRAINER)
  return tmp_path


def _spec(tmp_path, spec, name='spec.json'):
  # JSON is YAML: the sweep reads it with yaml.safe_load.
  path = tmp_path / name.replace('.json', '.yaml')
  path.write_text(json.dumps(spec))
  return str(path)


def _sweep(spec_path, root, *flags, cwd, env=None):
  return subprocess.run(
      [sys.executable, os.path.join(REPO, 'experiments', 'sweep.py'), spec_path, f'--root={root}',
       '--module=fake_main', f'--cwd={cwd}', *flags],
      capture_output=True, text=True, timeout=120, check=False,
      env={**os.environ, **(env or {})}, cwd=REPO)


def _results(root):
  with open(os.path.join(root, 'results.csv'), encoding='utf-8') as f:
    return {row['run']: row for row in csv.DictReader(f)}


def _attempts(root, name):
  with open(os.path.join(root, name, sweep_runner.STATE_FILE), encoding='utf-8') as f:
    return json.load(f)['attempts']


# --- expansion and naming -------------------------------------------------------------------------

def test_product_zip_variants_and_groups():
  spec = {
      'config': 'configs/tiny.py',
      'base': {'data.seq_len': 32, 'fl.rounds': 5},
      'grid': [
          {'model.d_model': [32, 64]},
          {'fl.local_steps': [10, 50], 'fl.rounds': [50, 10]},
          [{'_name': 'nesterov'}, {'_name': 'fedavg', 'fl.outer_lr': 1.0, 'fl.outer_momentum': 0}],
      ],
      'groups': [{'name': 'central', 'base': {'mode': 'centralized'},
                  'grid': [{'model.d_model': [32]}]}],
  }
  runs = sweep_spec.expand(spec, {'eval.max_batches': 2})
  assert [r.name for r in runs] == [
      'd_model=32,local_steps=10,rounds=50,nesterov', 'd_model=32,local_steps=10,rounds=50,fedavg',
      'd_model=32,local_steps=50,rounds=10,nesterov', 'd_model=32,local_steps=50,rounds=10,fedavg',
      'd_model=64,local_steps=10,rounds=50,nesterov', 'd_model=64,local_steps=10,rounds=50,fedavg',
      'd_model=64,local_steps=50,rounds=10,nesterov', 'd_model=64,local_steps=50,rounds=10,fedavg',
      'central,d_model=32']
  fedavg = runs[1]
  assert fedavg.overrides == {'data.seq_len': 32, 'fl.rounds': 50, 'eval.max_batches': 2,
                              'model.d_model': 32, 'fl.local_steps': 10, 'fl.outer_lr': 1.0,
                              'fl.outer_momentum': 0}
  assert fedavg.command('W', python='py') == [
      'py', '-m', 'fedjax_pt.main', '--config=configs/tiny.py', '--workdir=W',
      '--config.data.seq_len=32', '--config.fl.rounds=50', '--config.eval.max_batches=2',
      '--config.model.d_model=32', '--config.fl.local_steps=10', '--config.fl.outer_lr=1.0',
      '--config.fl.outer_momentum=0']
  assert runs[-1].overrides['mode'] == 'centralized' and runs[-1].overrides['fl.rounds'] == 5


def test_set_wins_over_the_grid_and_values_format_for_config_flags():
  runs = sweep_spec.expand({'config': 'c.py', 'grid': [{'fl.rounds': [5, 6]}]},
                           sweep_spec.parse_set(['fl.rounds=2', 'fl.reset_optimizer=false',
                                                 'opt.lr=1e-3', 'data.path=/a/b.jsonl']))
  assert [r.name for r in runs] == ['rounds=5', 'rounds=6']
  assert runs[0].command('W')[5:] == [
      '--config.fl.rounds=2', '--config.fl.reset_optimizer=False', '--config.opt.lr=0.001',
      '--config.data.path=/a/b.jsonl']


def test_names_disambiguate_keys_shorten_paths_and_stay_short():
  assert sweep_spec.run_name([('data.batch_size', 8), ('eval.batch_size', 4)]) == (
      'data.batch_size=8,eval.batch_size=4')
  assert sweep_spec.run_name([('data.path', '/x/y/c4 sample.jsonl')]) == 'path=c4_sample.jsonl'
  assert sweep_spec.run_name([]) == 'base'
  long = sweep_spec.run_name([(f'k{i}', 'v' * 20) for i in range(20)])
  assert len(long) == 120 and long != sweep_spec.run_name([(f'k{i}', 'w' * 20) for i in range(20)])


@pytest.mark.parametrize('spec, message', [
    ({'grid': [{'fl.rounds': [1]}]}, 'config .* is required'),
    ({'config': 'c', 'grid': [{'fl.rounds': [1, 2], 'fl.local_steps': [1]}]}, 'equal length'),
    ({'config': 'c', 'grid': [{'fl.rounds': 3}]}, 'non-empty list'),
    ({'config': 'c', 'grid': [[{'_name': 'a'}, {'_name': 'a', 'seed': 1}]]}, 'share the workdir'),
    ({'config': 'c', 'base': {'fl rounds': 1}}, 'is not a config key'),
    ({'config': 'c', 'grids': []}, r'unknown key\(s\) grids'),
    ({'config': 'c', 'grid': [[{'_name': '..'}]]},
     r"spec.grid\[0\]\[0\]._name: '..' is not a name"),
    ({'config': 'c', 'groups': [{'name': '.', 'grid': []}]},
     r"groups\[0\].name: '.' is not a name"),
])
def test_bad_specs_name_the_culprit(spec, message):
  with pytest.raises(sweep_spec.SpecError, match=message):
    sweep_spec.expand(spec)


def test_a_python_spec_that_does_not_load_is_one_line(tmp_path):
  path = tmp_path / 'broken.py'
  path.write_text("SPEC = {'config': 'c.py',\n")
  result = subprocess.run([sys.executable, os.path.join(REPO, 'experiments', 'sweep.py'),
                           str(path), f'--root={tmp_path / "root"}'], capture_output=True,
                          text=True, timeout=120, check=False, cwd=REPO)
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert result.stderr.strip().startswith(f'sweep: error: {path} does not load: SyntaxError')
  assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize('spec, flags, message', [
    ({'config': 'configs/tiny.py', 'grid': [{'fl.outer_lrr': [0.1, 0.7]}]}, [],
     'outer_lrr=0.1: config=.*fl.outer_lrr'),
    ({'config': 'configs/nope.py', 'grid': [{'seed': [0]}]}, [],
     r'seed=0: config configs/nope.py is not a file'),
    ({'config': 'configs/tiny.py', 'grid': [{'seed': [0]}]}, ['--only=(['],
     r"--only='\(\[' is not a regular expression"),
])
def test_the_real_trainer_s_runs_are_checked_before_any_starts(tmp_path, spec, flags, message):
  """Keys, values' types and config files of every run, and the flags: one line, exit 2, and no
  run's workdir made."""
  result = subprocess.run([sys.executable, os.path.join(REPO, 'experiments', 'sweep.py'),
                           _spec(tmp_path, spec), f'--root={tmp_path / "root"}', *flags],
                          capture_output=True, text=True, timeout=120, check=False, cwd=REPO)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and re.search(message, lines[0]), lines
  assert not (tmp_path / 'root').exists()


def test_a_root_that_is_a_file_is_one_line(tmp_path):
  (tmp_path / 'root').write_text('')
  result = subprocess.run([sys.executable, os.path.join(REPO, 'experiments', 'sweep.py'),
                           _spec(tmp_path, {'config': 'configs/tiny.py', 'grid': []}),
                           f'--root={tmp_path / "root"}'], capture_output=True, text=True,
                          timeout=120, check=False, cwd=REPO)
  assert result.returncode == 2
  assert result.stderr.strip() == (f'sweep: error: --root={tmp_path / "root"} is a file, not a '
                                   'directory')


def test_python_spec(tmp_path):
  path = tmp_path / 'spec.py'
  path.write_text("SPEC = {'config': 'c.py', 'grid': [{'seed': [0, 1]}]}\n")
  runs = sweep_spec.expand(sweep_spec.load_spec(str(path)))
  assert [r.name for r in runs] == ['seed=0', 'seed=1']


# --- status and results ---------------------------------------------------------------------------

def _fake_run(workdir, rounds_total, rounds_done, torn=False, **extra):
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump({'mode': 'federated', 'fl': {'rounds': rounds_total}}, f)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w', encoding='utf-8') as f:
    for r in range(1, rounds_done + 1):
      f.write(json.dumps({'kind': 'round', 'round': r, 'tokens': 10 * r,
                          'val_ppl': [9.0, 4.0, 6.0, float('nan')][r - 1], **extra}) + '\n')
    if torn:
      f.write('{"kind": "round", "rou')


def test_status_reads_config_rounds_and_tolerates_a_torn_line(tmp_path):
  assert sweep_runner.status(str(tmp_path / 'none')) == 'new'
  _fake_run(tmp_path / 'a', 3, 3)
  _fake_run(tmp_path / 'b', 3, 2, torn=True)
  assert sweep_runner.status(str(tmp_path / 'a')) == 'finished'
  assert sweep_runner.status(str(tmp_path / 'b')) == 'unfinished'


def test_summary_final_best_and_blank_for_missing_keys(tmp_path):
  _fake_run(tmp_path / 'a', 4, 4)
  _fake_run(tmp_path / 'b', 4, 2, bytes_sent=5, bytes_received=7)
  rows = [sweep_report.summarize(sweep_spec.Run(n, 'c', {}, {}), str(tmp_path / n)) for n in 'ab']
  assert rows[0]['final_val_ppl'] == 6.0  # the last evaluated round (round 4 was not)
  assert (rows[0]['best_val_ppl'], rows[0]['best_round']) == (4.0, 2)
  assert rows[0]['bytes_sent'] is None and rows[0]['tokens'] == 40
  assert rows[1]['status'] == 'unfinished' and rows[1]['bytes_received'] == 7
  csv_path, md_path = sweep_report.write_results(rows, str(tmp_path))[:2]
  with open(csv_path, encoding='utf-8') as f:
    got = list(csv.DictReader(f))
  assert got[0]['bytes_sent'] == '' and got[1]['bytes_sent'] == '5'
  with open(md_path, encoding='utf-8') as f:
    table = f.read()
  assert '| `a` | finished | 4/4 | 40 | 6.00 | 4.00 (2) |  |' in table
  assert '| `b` | unfinished | 2/4 | 20 | 4.00 | 4.00 (2) | 0.0 |' in table


def test_study_report_tables_crossings_and_figure(tmp_path):
  from experiments import study_report  # pylint: disable=import-outside-toplevel
  spec = _spec(tmp_path, {'config': 'c.py', 'base': {'fl.local_steps': 50},
                          'grid': [{'model.d_model': [32]},
                                   [{'_name': 'nesterov'}, {'_name': 'centralized'},
                                    {'_name': 'solo'}]]})
  curves = {'nesterov': [30, 20, 11, 9], 'centralized': [25, 15, 12, 8], 'solo': [26, 21, 14, 10]}
  for variant, ppls in curves.items():
    workdir = tmp_path / 'root' / f'd_model=32,{variant}'
    workdir.mkdir(parents=True)
    (workdir / 'config.json').write_text(json.dumps({
        'mode': 'federated' if variant == 'nesterov' else 'centralized',
        'fl': {'local_steps': 50, 'rounds': 4}, 'model': {'d_model': 32}, 'data': {}}))
    (workdir / 'metrics.jsonl').write_text(''.join(
        json.dumps({'kind': 'round', 'round': r + 1, 'tokens': 100 * (r + 1), 'val_ppl': p,
                    'bytes_sent': 10, 'bytes_received': 10}) + '\n'
        for r, p in enumerate(ppls)))
  out = tmp_path / 'out'
  assert study_report.main([f'--root={tmp_path / "root"}', f'--spec={spec}', f'--out={out}']) == 0
  table = (out / 'study.md').read_text()
  assert '| `d_model=32,nesterov` | k | 50 | 4/4 | 0.00M | 9.00 | 9.00 | +12.5% | -10.0% |' in table
  assert ('| `d_model=32,nesterov` | `d_model=32,solo` | crosses below between step 50 and step '
          '100 and stays below |') in table
  assert ('| `d_model=32,nesterov` | `d_model=32,centralized` | below at step 150 only, above '
          'from step 200 on (last +12.5%) |') in table
  assert (out / 'study.png').stat().st_size > 0
  with open(out / 'study.csv', encoding='utf-8') as f:
    assert [r['variant'] for r in csv.DictReader(f)] == ['nesterov', 'centralized', 'solo']


def test_references_to_keys_and_to_earlier_runs():
  runs = sweep_spec.expand({
      'config': 'c.py',
      'groups': [{'name': 'pre', 'grid': [{'model.d_model': [32, 64]}]},
                 {'name': 'warm',
                  'base': {'init.from_checkpoint': '{root}/pre,d_model={model.d_model}'},
                  'grid': [{'model.d_model': [32, 64]}, {'seed': [0, 1]}]}]})
  warm = {r.name: r for r in runs}['warm,d_model=64,seed=1']
  assert warm.overrides['init.from_checkpoint'] == '{root}/pre,d_model=64'
  assert warm.needs == ('pre,d_model=64',)
  assert [r.needs for r in runs[:2]] == [(), ()]
  assert '--config.init.from_checkpoint=/sweeps/x/pre,d_model=64' in warm.command('/sweeps/x/w')


@pytest.mark.parametrize('value, message', [
    ('{root}/nope', "names no earlier run of the sweep ('nope')"),
    ('{root}/b', "names no earlier run of the sweep ('b')"),  # a later run
    ('{model.width}', '{model.width} names no key of the run'),
])
def test_bad_references_name_the_culprit(value, message):
  spec = {'config': 'c.py', 'grid': [[{'_name': 'a', 'init.from_checkpoint': value},
                                      {'_name': 'b'}]]}
  with pytest.raises(sweep_spec.SpecError, match=re.escape(message)):
    sweep_spec.expand(spec)


def test_over_seeds_mean_std_min_max_of_finished_runs():
  rows = [{'run': f'lr=1,seed={s}', 'status': 'finished', 'final_val_ppl': v, 'best_val_ppl': v - 1}
          for s, v in enumerate([10.0, 12.0, 14.0])]
  rows += [{'run': 'lr=2,seed=0', 'status': 'finished', 'final_val_ppl': 9.0, 'best_val_ppl': 9.0},
           {'run': 'lr=2,seed=1', 'status': 'unfinished', 'final_val_ppl': 99.0,
            'best_val_ppl': 99.0},
           {'run': 'alone', 'status': 'finished', 'final_val_ppl': 1.0, 'best_val_ppl': 1.0}]
  cells = {c['cell']: c for c in sweep_report.over_seeds(rows)}
  assert list(cells) == ['lr=1', 'lr=2']  # a run without a seed is no cell
  one = cells['lr=1']
  # mean 12, sample std sqrt(((-2)^2 + 0 + 2^2) / 2) = 2
  assert (one['final_val_ppl_mean'], one['final_val_ppl_std']) == (12.0, 2.0)
  assert (one['final_val_ppl_min'], one['final_val_ppl_max'], one['seeds']) == (10.0, 14.0, '3/3')
  assert cells['lr=2']['final_val_ppl_mean'] == 9.0 and cells['lr=2']['seeds'] == '1/2'
  table = sweep_report.seeds_markdown_table(list(cells.values()))
  assert '| `lr=1` | 3/3 | 12.00 ± 2.00 (10.00–14.00) | 11.00 ± 2.00 (9.00–13.00) |' in table
  assert '| `lr=2` | 1/2 | 9.00 | 9.00 |' in table


def test_diloco_report_over_seeds_pairs_each_seed_with_its_reference(tmp_path):
  from experiments import diloco_report  # pylint: disable=import-outside-toplevel
  spec = _spec(tmp_path, {'config': 'c.py', 'grid': [{'model.d_model': [64]}, [
      {'_name': 'baseline', 'mode': 'centralized'}, {'_name': 'nesterov_tau50'}],
                                                     {'seed': [0, 1, 2]}]})
  # (val_ppl at rounds 1, 2) per seed. Nesterov is below the baseline at round 2 for every seed,
  # at round 1 for seeds 0 and 1 only.
  curves = {'baseline': {0: [12, 10], 1: [13, 11], 2: [11, 10]},
            'nesterov_tau50': {0: [11, 9], 1: [12, 10], 2: [12, 9]}}
  for variant, by_seed in curves.items():
    for seed, ppls in by_seed.items():
      workdir = tmp_path / 'root' / f'd_model=64,{variant},seed={seed}'
      workdir.mkdir(parents=True)
      (workdir / 'config.json').write_text(json.dumps({
          'mode': 'centralized' if variant == 'baseline' else 'federated', 'seed': seed,
          'fl': {'local_steps': 50, 'rounds': 2}, 'model': {'d_model': 64}, 'data': {}}))
      (workdir / 'metrics.jsonl').write_text(''.join(
          json.dumps({'kind': 'round', 'round': r, 'tokens': 100 * r, 'val_ppl': p}) + '\n'
          for r, p in enumerate([20] + ppls)))
  out = tmp_path / 'out'
  assert diloco_report.main([f'--root={tmp_path / "root"}', f'--spec={spec}', f'--out={out}']) == 0
  table = (out / 'diloco.md').read_text()
  # Baseline finals 10, 11, 10: mean 10.33, sample std 0.58. Nesterov 9, 10, 9 against them:
  # -10%, -9.09%, -10%: mean -9.70%, std 0.52%, all three below.
  assert '| 64 | `baseline` |  | 3/3 | 10.33 ± 0.58 (10.00–11.00) | 10.00 11.00 10.00 |' in table
  assert ('| 64 | `nesterov_tau50` | 50 | 3/3 | 9.33 ± 0.58 (9.00–10.00) | 9.00 10.00 9.00 | '
          '-9.7% ± 0.5% (3/3 below) | `baseline`: below for all 3 seeds from step 100 on '
          '(last -9.7% ± 0.5%) |') in table
  assert (out / 'diloco.png').stat().st_size > 0


# --- running with a fake trainer ------------------------------------------------------------------

SPEC = {'config': 'configs/tiny.py', 'base': {'fl.rounds': 3, 'bytes': 1},
        'grid': [{'opt.lr': [1.0, 2.0]}, [{'_name': 'fed'}, {'_name': 'central',
                                                            'mode': 'centralized'}]]}
NAMES = ['lr=1.0,fed', 'lr=1.0,central', 'lr=2.0,fed', 'lr=2.0,central']


def test_clean_root_runs_everything_then_skips_finished_runs(fake):
  spec, root = _spec(fake, SPEC), str(fake / 'root')
  result = _sweep(spec, root, '--parallel=2', cwd=fake)
  assert result.returncode == 0, result.stderr
  rows = _results(root)
  assert list(rows) == NAMES
  assert all(r['status'] == 'finished' and r['rounds'] == '3' for r in rows.values())
  assert rows['lr=2.0,fed']['final_val_ppl'] == str(10 / 3 / 2 + 5)
  assert rows['lr=2.0,fed']['best_val_ppl'] == '2.5' and rows['lr=2.0,fed']['best_round'] == '2'
  assert rows['lr=1.0,central']['mode'] == 'centralized'
  assert rows['lr=1.0,fed']['bytes_sent'] == '3000' and rows['lr=1.0,fed']['train_time_s'] == '1.5'
  with open(os.path.join(root, 'lr=1.0,central', 'config.json'), encoding='utf-8') as f:
    assert json.load(f)['overrides']['config.mode'] == 'centralized'
  assert '| `lr=1.0,fed` | finished | 3/3 | 300 |' in open(os.path.join(root, 'results.md')).read()

  again = _sweep(spec, root, cwd=fake)
  assert again.returncode == 0, again.stderr
  assert again.stdout.count('finished, skipped') == 4
  assert all(len(_attempts(root, n)) == 1 for n in NAMES)


def test_a_run_waits_for_the_run_it_starts_from_and_seeds_are_summarized(fake):
  spec = _spec(fake, {'config': 'configs/tiny.py', 'base': {'fl.rounds': 2},
                      'groups': [{'name': 'pre', 'base': {'sleep': 2.0},
                                  'grid': [{'seed': [0, 1]}]},
                                 {'name': 'warm',
                                  'base': {'init.from_checkpoint': '{root}/pre,seed={seed}'},
                                  'grid': [{'seed': [0, 1]}]}]})
  root = str(fake / 'root')
  # Two at a time: without the dependency, warm,seed=0 would start beside pre,seed=1 and find
  # pre,seed=0 unfinished or absent (the fake trainer then exits 2).
  result = _sweep(spec, root, '--parallel=2', cwd=fake)
  assert result.returncode == 0, result.stdout + result.stderr
  rows = _results(root)
  assert all(r['status'] == 'finished' for r in rows.values()), rows
  with open(os.path.join(root, 'warm,seed=1', 'config.json'), encoding='utf-8') as f:
    source = json.load(f)['overrides']['config.init.from_checkpoint']
  assert source == os.path.join(os.path.abspath(root), 'pre,seed=1')
  with open(os.path.join(root, 'results_seeds.csv'), encoding='utf-8') as f:
    cells = {c['cell']: c for c in csv.DictReader(f)}
  # Final val_ppl of the fake: 10 / 2 + 5 + seed: 10 and 11; mean 10.5, std 0.707.
  assert float(cells['warm']['final_val_ppl_mean']) == 10.5 and cells['warm']['seeds'] == '2/2'
  assert '## Over seeds' in open(os.path.join(root, 'results.md'), encoding='utf-8').read()


def test_a_run_whose_source_failed_is_not_started(fake):
  spec = _spec(fake, {'config': 'configs/tiny.py', 'base': {'fl.rounds': 3},
                      'grid': [[{'_name': 'pre'},
                                {'_name': 'warm', 'init.from_checkpoint': '{root}/pre'}]]})
  root = str(fake / 'root')
  result = _sweep(spec, root, '--parallel=2', cwd=fake, env={'FAKE_DIE_AT': '2'})
  assert result.returncode == 1
  assert 'warm: not started, it needs pre, which is failed' in result.stdout
  assert not os.path.exists(os.path.join(root, 'warm', 'config.json'))


def test_unresumable_run_is_moved_aside_and_restarted(fake):
  spec, root = _spec(fake, SPEC), str(fake / 'root')
  first = _sweep(spec, root, '--only=lr=1.0,fed', cwd=fake, env={'FAKE_DIE_AT': '3'})
  assert first.returncode == 1 and 'not finished: lr=1.0,fed' in first.stderr
  assert _results(root)['lr=1.0,fed']['status'] == 'unfinished'
  second = _sweep(spec, root, '--only=lr=1.0,fed', cwd=fake)
  assert second.returncode == 0, second.stderr
  assert 'cannot resume it; moved aside' in second.stdout
  assert _results(root)['lr=1.0,fed']['status'] == 'finished'
  aside = os.path.join(root, 'lr=1.0,fed.incomplete-1')
  assert len(sweep_runner.read_rounds(aside)) == 2  # the partial run is kept, not deleted
  assert [a['refused'] for a in _attempts(root, 'lr=1.0,fed')] == [False]


def test_resumable_run_is_continued_in_place(fake):
  spec, root = _spec(fake, SPEC), str(fake / 'root')
  env = {'FAKE_RESUME': '1'}
  _sweep(spec, root, '--only=lr=2.0', cwd=fake, env={**env, 'FAKE_DIE_AT': '2'})
  assert {r['status'] for r in _results(root).values()} == {'unfinished'}
  result = _sweep(spec, root, '--only=lr=2.0', cwd=fake, env=env)
  assert result.returncode == 0, result.stderr
  rows = _results(root)
  assert [rows[n]['status'] for n in NAMES[2:]] == ['finished', 'finished']
  assert [r.round for r in sweep_runner.read_rounds(os.path.join(root, 'lr=2.0,fed'))] == [1, 2, 3]
  assert [a['resumed'] for a in _attempts(root, 'lr=2.0,fed')] == [False, True]
  assert not [d for d in os.listdir(root) if 'incomplete' in d]


def test_restart_mode_moves_aside_first_and_changed_spec_is_refused(fake):
  spec, root = _spec(fake, SPEC), str(fake / 'root')
  _sweep(spec, root, '--only=lr=1.0,central', cwd=fake, env={'FAKE_DIE_AT': '2'})
  result = _sweep(spec, root, '--only=lr=1.0,central', '--resume=restart', cwd=fake)
  assert result.returncode == 0 and os.path.isdir(os.path.join(root, 'lr=1.0,central.incomplete-1'))
  changed = _sweep(spec, root, '--only=lr=1.0,central', '--set=fl.local_steps=7', cwd=fake)
  assert changed.returncode == 2
  assert 'was run with other values of fl.local_steps' in changed.stderr


def test_raising_rounds_continues_a_finished_run(fake):
  """fl.rounds may change between sessions: a finished run asked for more rounds is resumed."""
  spec, root = _spec(fake, SPEC), str(fake / 'root')
  env = {'FAKE_RESUME': '1'}
  assert _sweep(spec, root, '--only=lr=1.0,fed', cwd=fake, env=env).returncode == 0
  longer = _sweep(spec, root, '--only=lr=1.0,fed', '--set=fl.rounds=5', cwd=fake, env=env)
  assert longer.returncode == 0, longer.stderr
  assert 'finished, skipped' not in longer.stdout
  workdir = os.path.join(root, 'lr=1.0,fed')
  assert [r.round for r in sweep_runner.read_rounds(workdir)] == [1, 2, 3, 4, 5]
  assert _results(root)['lr=1.0,fed']['rounds_total'] == '5'
  # The requested rounds, not config.json's, decide: a run asked for more is unfinished.
  assert sweep_runner.status(workdir, 5) == 'finished'
  assert sweep_runner.status(workdir, 6) == 'unfinished'


SLEEPY_TRAINER = textwrap.dedent('''\
    import os, sys, time
    args = dict(a[2:].split('=', 1) for a in sys.argv[1:])
    os.makedirs(args['workdir'], exist_ok=True)
    with open(os.path.join(args['workdir'], 'pid'), 'w') as f:
      f.write(str(os.getpid()))
    time.sleep(300)
    ''')


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f'/proc/{pid}/stat', encoding='utf-8') as f:
    return f.read().split()[2] != 'Z'  # a zombie has exited


def test_trainers_die_with_a_killed_sweep(fake):
  """A sweep killed with SIGKILL cannot stop its trainers itself: the kernel does (SIGTERM)."""
  (fake / 'sleepy.py').write_text(SLEEPY_TRAINER)
  spec, root = _spec(fake, SPEC), fake / 'root'
  sweep = subprocess.Popen(
      [sys.executable, os.path.join(REPO, 'experiments', 'sweep.py'), spec, f'--root={root}',
       '--module=sleepy', f'--cwd={fake}', '--only=lr=1.0,fed'], cwd=REPO,
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  pid_file = root / 'lr=1.0,fed' / 'pid'
  trainer = None
  try:
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
      time.sleep(0.05)
    trainer = int(pid_file.read_text())
    sweep.kill()
    sweep.wait(timeout=30)
    deadline = time.time() + 30
    while _alive(trainer) and time.time() < deadline:
      time.sleep(0.05)
    assert not _alive(trainer), 'the trainer outlived its sweep'
  finally:
    sweep.kill()
    if trainer is not None and _alive(trainer):
      os.kill(trainer, signal.SIGKILL)


def test_dry_run_prints_commands_and_runs_nothing(fake):
  result = _sweep(_spec(fake, SPEC), str(fake / 'root'), '--dry-run', cwd=fake)
  assert result.returncode == 0, result.stderr
  assert result.stdout.count('-m fake_main --config=configs/tiny.py') == 4
  assert not os.path.exists(fake / 'root')


# --- the real trainer -----------------------------------------------------------------------------

def test_real_sweep_from_clean_root_interrupted_and_resumed(tmp_path):
  """Two tiny fedjax_pt runs; the sweep is interrupted during the second and then completed.

  Until fedjax_pt can resume a workdir, the interrupted run is moved aside and restarted; once it
  can, it is continued in place. Either way nothing is lost and every run ends finished.
  """
  small = {'model.d_model': 32, 'model.num_heads': 2, 'data.seq_len': 32, 'data.batch_size': 4,
           'eval.max_batches': 1, 'fl.local_steps': 2, 'fl.num_clients': 2,
           'fl.clients_per_round': 2, 'opt.warmup_steps': 1, 'opt.schedule_steps': 400,
           'log.progress': False}
  spec = _spec(tmp_path, {'config': 'configs/tiny.py', 'base': small,
                          'grid': [[{'_name': 'short', 'fl.rounds': 2},
                                    {'_name': 'long', 'fl.rounds': 25}]]})
  root = tmp_path / 'root'
  command = [sys.executable, os.path.join(REPO, 'experiments', 'sweep.py'), spec,
             f'--root={root}']
  proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 240
  # A few rounds in, so that a trainer that checkpoints every round has something to resume from.
  while len(sweep_runner.read_rounds(str(root / 'long'))) < 3 and proc.poll() is None:
    assert time.time() < deadline, 'the long run logged too few rounds in time'
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=60)
  assert sweep_runner.status(str(root / 'short')) == 'finished', out + err
  if sweep_runner.status(str(root / 'long')) == 'finished':
    pytest.skip('the long run finished before the interrupt reached it')
  assert proc.returncode == 130, out + err

  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert 'short: finished, skipped' in result.stdout
  rows = _results(root)
  assert rows['long']['status'] == 'finished' and rows['long']['rounds'] == '25'
  assert float(rows['long']['final_val_ppl']) > 1
  aside = [d for d in os.listdir(root) if d.startswith('long.incomplete-')]
  if aside:  # restarted: the interrupted run's rounds are kept beside it
    assert sweep_runner.read_rounds(str(root / aside[0]))
  else:  # resumed in place: every round logged once
    assert [r.round for r in sweep_runner.read_rounds(str(root / 'long'))] == list(range(26))


def test_two_sweeps_on_one_root_both_end_finished(tmp_path):
  """The second sweep finds its run held by the first's trainer (exit 5): it waits for it instead
  of counting the run as not finished."""
  small = {'model.d_model': 32, 'model.num_heads': 2, 'data.seq_len': 32, 'data.batch_size': 4,
           'eval.max_batches': 1, 'fl.local_steps': 2, 'fl.num_clients': 2,
           'fl.clients_per_round': 2, 'opt.warmup_steps': 1, 'opt.schedule_steps': 400,
           'log.progress': False, 'fl.rounds': 40}
  # 40 rounds: the first trainer must still hold its run when the second sweep, which starts a
  # Python and checks its spec first, gets there (6 rounds were over first on a loaded machine).
  spec = _spec(tmp_path, {'config': 'configs/tiny.py', 'base': small, 'grid': [{'seed': [0]}]})
  command = [sys.executable, os.path.join(REPO, 'experiments', 'sweep.py'), spec,
             f'--root={tmp_path / "root"}']
  first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
  try:
    lock = tmp_path / 'root' / 'seed=0' / '.lock'
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
      time.sleep(0.2)
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            check=False)
    first_out, first_err = first.communicate(timeout=600)
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode == 0, first_err[-2000:]
  assert second.returncode == 0, second.stderr[-2000:]
  assert 'another process is running it; waiting for it to end' in second.stdout + second.stderr
  assert _results(tmp_path / 'root')['seed=0']['status'] == 'finished'
  del first_out
