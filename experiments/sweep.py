r"""Sweeps over `--config.*` overrides: a grid of runs from a small spec, one workdir per run.

  python experiments/sweep.py experiments/study.yaml --root=runs/study [--parallel=2] [--nice=10]
      [--set data.path=/data/c4.jsonl ...] [--only=REGEX] [--dry-run] [--report-only]

The spec (YAML, or Python defining `SPEC`) names a config file, overrides shared by every run, and a
grid; the runs are the product of the grid's axes:

  config: configs/tiny.py
  base: {data.source: jsonl, fl.rounds: 12}
  grid:
    - {model.d_model: [64, 128]}                        # one key: one value per run
    - {fl.local_steps: [10, 50], fl.rounds: [60, 12]}   # several keys: zipped, one run per column
    - [{_name: nesterov}, {_name: fedavg, fl.outer_lr: 1.0, fl.outer_momentum: 0.0}]  # variants
  groups:                                               # optional: more grids, each may add a base
    - {name: central, base: {mode: centralized}, grid: [{model.d_model: [64, 128]}]}

Each run's workdir is ROOT/NAME, NAME made of its grid values (`d_model=64,local_steps=10,nesterov`,
group name first), so a run keeps its workdir across invocations. A run is finished when its
metrics.jsonl holds the round record `round == fl.rounds` (from its config.json): it is skipped. A
started but unfinished run is resumed by invoking the same command on the same workdir; if the
trainer refuses that workdir (no checkpoint/resume), `--resume=auto` moves it aside to
`NAME.incomplete-<n>` (nothing is deleted) and starts it again. Every invocation then writes
ROOT/results.csv and ROOT/results.md: final and best validation perplexity, tokens, time and bytes
communicated of every run (blank where a run has not logged it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import runpy
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATE_FILE = 'sweep_run.json'  # per workdir: the overrides, command, attempts and wall time
LOG_FILE = 'sweep.log'  # per workdir: the trainer's stdout and stderr, appended per attempt
# What fedjax_pt.main prints when a workdir already holds a run it cannot resume.
_REFUSED = re.compile(r'already holds a run')
_NAME_MAX = 120


class SpecError(ValueError):
  """A malformed spec or an inconsistent sweep root; the message names the culprit."""


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  config: str
  overrides: dict[str, Any]  # every --config.KEY=VALUE, base and grid, in order
  varying: dict[str, Any]  # the grid's share of them (what the name is made of)

  def command(self, workdir: str, python: str = sys.executable,
              module: str = 'fedjax_pt.main') -> list[str]:
    return [python, '-m', module, f'--config={self.config}', f'--workdir={workdir}',
            *(f'--config.{k}={format_value(v)}' for k, v in self.overrides.items())]


# --- spec ----------------------------------------------------------------------------------------

def load_spec(path: str) -> dict[str, Any]:
  """A spec from a .yaml/.yml file or a .py file that defines SPEC (a dict) or get_spec()."""
  if not os.path.isfile(path):
    raise SpecError(f'spec not found: {path}')
  if path.endswith(('.yaml', '.yml')):
    import yaml  # pylint: disable=import-outside-toplevel  (a dependency of flax)
    with open(path, encoding='utf-8') as f:
      try:
        spec = yaml.safe_load(f)
      except yaml.YAMLError as e:
        raise SpecError(f'{path}: not valid YAML ({" ".join(str(e).split())})') from e
  elif path.endswith('.py'):
    namespace = runpy.run_path(path)
    spec = namespace['get_spec']() if 'get_spec' in namespace else namespace.get('SPEC')
  else:
    raise SpecError(f'{path}: a spec is a .yaml, .yml or .py file')
  if not isinstance(spec, dict):
    raise SpecError(f'{path}: the spec must be a mapping (YAML) or define SPEC / get_spec() (Python)')
  return spec


def expand(spec: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> list[Run]:
  """The runs of a spec, in grid order; `extra` overrides the base of every run (from --set)."""
  _check_keys(spec, {'config', 'base', 'grid', 'groups', 'description'}, 'spec')
  groups = spec.get('groups') or []
  if not isinstance(groups, list):
    raise SpecError('spec: groups must be a list of {name, base, grid}')
  labelled = [(f'groups[{i}]', group) for i, group in enumerate(groups)]
  if 'grid' in spec or not groups:
    labelled.insert(0, ('spec', {'grid': spec.get('grid') or []}))
  runs = []
  for where, group in labelled:
    _check_keys(group, {'name', 'config', 'base', 'grid'}, where)
    config = group.get('config') or spec.get('config')
    if not config:
      raise SpecError('spec: config (a config file, e.g. configs/tiny.py) is required')
    base = {**_overrides(spec.get('base'), 'base'),
            **_overrides(group.get('base'), f'{where}.base'), **dict(extra or {})}
    for parts, varying in _grid(group.get('grid') or [], f'{where}.grid'):
      name = run_name([str(group.get('name') or ''), *parts])
      runs.append(Run(name, config, {**base, **varying, **dict(extra or {})}, varying))
  seen: dict[str, Run] = {}
  for run in runs:
    if run.name in seen:
      raise SpecError(f'two runs would share the workdir {run.name!r}: {seen[run.name].varying} '
                      f'and {run.varying}; give the variants a _name or the groups a name')
    seen[run.name] = run
  return runs


def _check_keys(mapping: Any, allowed: set[str], where: str) -> None:
  if not isinstance(mapping, Mapping):
    raise SpecError(f'{where}: expected a mapping, got {mapping!r}')
  unknown = sorted(set(mapping) - allowed)
  if unknown:
    raise SpecError(f'{where}: unknown key(s) {", ".join(unknown)}; allowed: {sorted(allowed)}')


def _overrides(value: Any, where: str) -> dict[str, Any]:
  if value is None:
    return {}
  if not isinstance(value, Mapping):
    raise SpecError(f'{where}: expected a mapping of config keys to values, got {value!r}')
  out = {}
  for key, v in value.items():
    key = str(key).removeprefix('--').removeprefix('config.')
    if not re.fullmatch(r'[A-Za-z_][\w.]*', key):
      raise SpecError(f'{where}: {key!r} is not a config key (e.g. fl.local_steps)')
    if isinstance(v, (list, dict)):
      raise SpecError(f'{where}: {key} must be a single value, got {v!r}')
    out[key] = v
  return out


def _grid(axes: Any, where: str) -> Iterable[tuple[list[Any], dict[str, Any]]]:
  """(name parts, overrides) of every point of the product of `axes`.

  A name part is a variant's label (str) or a (key, value) pair of a key axis.
  """
  if not isinstance(axes, list):
    raise SpecError(f'{where}: expected a list of axes')
  points = [_axis(axis, f'{where}[{i}]') for i, axis in enumerate(axes)]
  for combo in itertools.product(*points):
    parts, overrides = [], {}
    for axis_parts, axis_overrides in combo:
      parts += axis_parts
      overrides.update(axis_overrides)
    yield parts, overrides


def _axis(axis: Any, where: str) -> list[tuple[list[Any], dict[str, Any]]]:
  if isinstance(axis, list):  # variants: each a mapping of overrides, named by its _name
    out = []
    for j, variant in enumerate(axis):
      if not isinstance(variant, Mapping):
        raise SpecError(f'{where}[{j}]: a variant is a mapping of overrides, got {variant!r}')
      variant = dict(variant)
      label = variant.pop('_name', None)
      overrides = _overrides(variant, f'{where}[{j}]')
      parts = [str(label)] if label is not None else list(overrides.items())
      out.append((parts, overrides))
    return out
  if isinstance(axis, Mapping):  # one key, or several keys zipped together
    for key, values in axis.items():
      if not isinstance(values, list) or not values:
        raise SpecError(f'{where}: {key} must map to a non-empty list of values, got {values!r}')
    lengths = {len(v) for v in axis.values()}
    if len(lengths) != 1:
      raise SpecError(f'{where}: zipped keys need lists of equal length, got '
                      + ', '.join(f'{k}: {len(v)}' for k, v in axis.items()))
    out = []
    for values in zip(*axis.values()):
      overrides = _overrides(dict(zip(axis, values)), where)
      out.append((list(overrides.items()), overrides))
    return out
  raise SpecError(f'{where}: an axis is a mapping {{key: [values]}} or a list of variants')


def format_value(value: Any) -> str:
  """A value as config_flags parses it on the command line."""
  if isinstance(value, bool):
    return 'True' if value else 'False'
  if isinstance(value, float):
    return repr(value)
  return str(value)


def run_name(parts: Sequence[Any]) -> str:
  """`label,key=value,...` from variant labels and (key, value) pairs; filesystem-safe.

  Keys are shortened to their last component unless that is ambiguous within the run. A name too
  long for a directory keeps a readable head and a hash of the whole.
  """
  shorts = [p[0].rsplit('.', 1)[-1] for p in parts if isinstance(p, tuple)]
  out = []
  for part in parts:
    if isinstance(part, tuple):
      key, value = part
      short = key.rsplit('.', 1)[-1]
      out.append(f'{short if shorts.count(short) == 1 else key}={_safe(format_value(value))}')
    elif part:
      out.append(_safe(part))
  name = ','.join(out) or 'base'
  if len(name) > _NAME_MAX:
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    name = f'{name[:_NAME_MAX - 11]}-{digest}'
  return name


def _safe(text: str) -> str:
  # Paths (data files, tokenizers) are named by their file name.
  text = os.path.basename(text.rstrip('/')) if '/' in text else text
  return re.sub(r'[^\w.+=-]', '_', text) or '_'


# --- status of a workdir -------------------------------------------------------------------------

def read_rounds(workdir: str) -> list[dict[str, Any]]:
  """The round records of workdir/metrics.jsonl; a torn last line (a killed run) is skipped."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    return []
  rounds = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict) and record.get('kind') == 'round':
        rounds.append(record)
  return rounds


def read_config(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    return {}
  with open(path, encoding='utf-8') as f:
    try:
      return json.load(f)
    except json.JSONDecodeError:
      return {}


def total_rounds(config: Mapping[str, Any]) -> int | None:
  value = (config.get('fl') or {}).get('rounds')
  return value if isinstance(value, int) else None


def status(workdir: str) -> str:
  """'new' (nothing there), 'finished' (round fl.rounds logged) or 'unfinished' (anything else)."""
  if not os.path.isdir(workdir) or not (
      os.path.exists(os.path.join(workdir, 'metrics.jsonl')) or
      os.path.exists(os.path.join(workdir, 'config.json'))):
    return 'new'
  rounds = total_rounds(read_config(workdir))
  if rounds is not None and any(r.get('round') == rounds for r in read_rounds(workdir)):
    return 'finished'
  return 'unfinished'


def _read_state(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, STATE_FILE)
  if not os.path.isfile(path):
    return {}
  with open(path, encoding='utf-8') as f:
    try:
      return json.load(f)
    except json.JSONDecodeError:
      return {}


def _write_state(workdir: str, state: Mapping[str, Any]) -> None:
  tmp = os.path.join(workdir, STATE_FILE + '.tmp')
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(state, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(workdir, STATE_FILE))


def _jsonable_overrides(overrides: Mapping[str, Any]) -> dict[str, str]:
  return {k: format_value(v) for k, v in overrides.items()}


def check_consistent(run: Run, workdir: str) -> None:
  """Refuses a workdir that an earlier sweep ran with other overrides (the spec changed)."""
  recorded = _read_state(workdir).get('overrides')
  if recorded is not None and recorded != _jsonable_overrides(run.overrides):
    changed = sorted(k for k in set(recorded) | set(run.overrides)
                     if recorded.get(k) != _jsonable_overrides(run.overrides).get(k))
    raise SpecError(f'{workdir} was run with other values of {", ".join(changed)}; move it away or '
                    'sweep into another --root')


def move_aside(workdir: str) -> str:
  """Renames workdir to the first free workdir.incomplete-<n>; returns the new path."""
  for n in itertools.count(1):
    target = f'{workdir}.incomplete-{n}'
    if not os.path.exists(target):
      os.rename(workdir, target)
      return target
  raise AssertionError('unreachable')


# --- running -------------------------------------------------------------------------------------

class Runner:
  """Runs each run's command in its workdir's log, N at a time, and stops them all on a signal."""

  def __init__(self, root: str, python: str = sys.executable, module: str = 'fedjax_pt.main',
               cwd: str = REPO, nice: int = 0, resume: str = 'auto', env: Mapping[str, str] = (),
               echo=print):
    self.root, self.python, self.module, self.cwd = os.path.abspath(root), python, module, cwd
    self.nice, self.resume, self.echo = nice, resume, echo
    self.env = {**os.environ, **dict(env)}
    self._procs: set[subprocess.Popen] = set()
    self._lock = threading.Lock()
    self.stopping = False

  def workdir(self, run: Run) -> str:
    return os.path.join(self.root, run.name)

  def run_one(self, run: Run) -> str:
    """Brings one run to 'finished' if it can; returns its status afterwards ('failed' too)."""
    workdir = self.workdir(run)
    before = status(workdir)
    if before == 'finished':
      return 'finished'
    if before == 'unfinished' and self.resume == 'restart':
      self.echo(f'[sweep] {run.name}: unfinished; moved aside to {move_aside(workdir)}')
    refused = self._attempt(run, workdir)
    if refused and self.resume == 'auto' and not self.stopping:
      # The trainer cannot resume this workdir (no checkpoint/resume): start it again, keeping
      # the partial run beside it.
      self.echo(f'[sweep] {run.name}: the trainer cannot resume it; moved aside to '
                f'{move_aside(workdir)}, starting again')
      self._attempt(run, workdir)
    if status(workdir) == 'finished':
      return 'finished'
    return 'interrupted' if self.stopping else 'failed'

  def _attempt(self, run: Run, workdir: str) -> bool:
    """Runs the trainer once; True if it refused the workdir (it cannot resume it)."""
    os.makedirs(workdir, exist_ok=True)
    state = _read_state(workdir) or {'name': run.name, 'config': run.config, 'attempts': [],
                                      'wall_s': 0.0}
    state['overrides'] = _jsonable_overrides(run.overrides)
    command = run.command(workdir, self.python, self.module)
    state['command'] = command
    if self.nice:
      command = ['nice', '-n', str(self.nice), *command]
    attempt = {'started': time.strftime('%Y-%m-%dT%H:%M:%S'), 'resumed': status(workdir) != 'new'}
    state['attempts'].append(attempt)
    _write_state(workdir, state)
    self.echo(f'[sweep] {run.name}: {"resuming" if attempt["resumed"] else "starting"}')
    start = time.perf_counter()
    with open(os.path.join(workdir, LOG_FILE), 'a', encoding='utf-8') as log:
      log.write(f'$ {" ".join(command)}\n')
      log.flush()
      offset = log.tell()
      with self._lock:
        if self.stopping:
          return False
        proc = subprocess.Popen(command, cwd=self.cwd, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self._procs.add(proc)
      code = proc.wait()
      with self._lock:
        self._procs.discard(proc)
    elapsed = time.perf_counter() - start
    with open(os.path.join(workdir, LOG_FILE), encoding='utf-8', errors='replace') as log:
      log.seek(offset)
      tail = log.read()[-4000:]  # this attempt's output only
    refused = code != 0 and bool(_REFUSED.search(tail))
    attempt.update(returncode=code, wall_s=round(elapsed, 3), refused=refused)
    state['wall_s'] = round(state.get('wall_s', 0.0) + elapsed, 3)
    _write_state(workdir, state)
    if code != 0 and not refused and not self.stopping:
      last = [l for l in tail.splitlines() if l.strip()][-1:] or ['']
      self.echo(f'[sweep] {run.name}: exit {code}: {last[0][:300]} (log: {workdir}/{LOG_FILE})')
    elif code == 0:
      self.echo(f'[sweep] {run.name}: done in {elapsed:.0f}s')
    return refused

  def stop(self) -> None:
    """Interrupts every running trainer (SIGINT to its process group, SIGKILL after 30 s)."""
    with self._lock:
      self.stopping = True
      procs = list(self._procs)
    for proc in procs:
      try:
        os.killpg(proc.pid, signal.SIGINT)
      except ProcessLookupError:
        pass
    deadline = time.time() + 30  # time to finish writing a checkpoint
    for proc in procs:
      try:
        proc.wait(timeout=max(0.0, deadline - time.time()))
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def run_all(runs: Sequence[Run], runner: Runner, parallel: int = 1) -> dict[str, str]:
  """Runs every unfinished run, `parallel` at a time; returns {name: status}."""
  results = {}
  todo = []
  for run in runs:
    check_consistent(run, runner.workdir(run))
    if status(runner.workdir(run)) == 'finished':
      results[run.name] = 'finished'
      runner.echo(f'[sweep] {run.name}: finished, skipped')
    else:
      todo.append(run)
  previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

  def on_signal(signum, frame):
    del frame
    runner.echo(f'[sweep] signal {signum}: stopping the running trainers')
    runner.stop()

  in_main_thread = threading.current_thread() is threading.main_thread()
  if in_main_thread:
    for sig in previous:
      signal.signal(sig, on_signal)
  try:
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
      futures = {pool.submit(_guarded, runner, run): run for run in todo}
      for future in concurrent.futures.as_completed(futures):
        results[futures[future].name] = future.result()
  finally:
    if in_main_thread:
      for sig, handler in previous.items():
        signal.signal(sig, handler)
  return {run.name: results[run.name] for run in runs}


def _guarded(runner: Runner, run: Run) -> str:
  if runner.stopping:
    return 'interrupted'
  return runner.run_one(run)


# --- results -------------------------------------------------------------------------------------

COLUMNS = ('run', 'status', 'mode', 'rounds', 'rounds_total', 'tokens', 'final_val_ppl',
           'best_val_ppl', 'best_round', 'bytes_sent', 'bytes_received', 'train_time_s', 'wall_s',
           'overrides')


def summarize(run: Run, workdir: str) -> dict[str, Any]:
  """One row of the results table; a value a run has not logged is None (blank)."""
  config = read_config(workdir)
  rounds = read_rounds(workdir)
  evaluated = [r for r in rounds if _finite(r.get('val_ppl'))]
  best = min(evaluated, key=lambda r: r['val_ppl']) if evaluated else None
  last = rounds[-1] if rounds else {}
  times = [r['round_time_s'] for r in rounds if _finite(r.get('round_time_s'))]
  return {
      'run': run.name,
      'status': status(workdir),
      'mode': config.get('mode', run.overrides.get('mode')),
      'rounds': last.get('round'),
      'rounds_total': total_rounds(config),
      'tokens': last.get('tokens'),
      'final_val_ppl': evaluated[-1]['val_ppl'] if evaluated else None,
      'best_val_ppl': best['val_ppl'] if best else None,
      'best_round': best['round'] if best else None,
      'bytes_sent': last.get('bytes_sent'),
      'bytes_received': last.get('bytes_received'),
      'train_time_s': sum(times) if times else None,
      'wall_s': _read_state(workdir).get('wall_s'),
      'overrides': ' '.join(f'{k}={format_value(v)}' for k, v in run.varying.items()),
  }


def _finite(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def write_results(rows: Sequence[Mapping[str, Any]], root: str) -> tuple[str, str]:
  """ROOT/results.csv (every column) and ROOT/results.md (a readable table)."""
  os.makedirs(root, exist_ok=True)
  csv_path, md_path = os.path.join(root, 'results.csv'), os.path.join(root, 'results.md')
  with open(csv_path, 'w', encoding='utf-8', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: '' if row.get(k) is None else row[k] for k in COLUMNS})
  with open(md_path, 'w', encoding='utf-8') as f:
    f.write(markdown_table(rows) + '\n')
  return csv_path, md_path


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
  header = ['run', 'status', 'rounds', 'tokens', 'final val ppl', 'best val ppl (round)',
            'MB communicated', 'train time', 'wall time']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for r in rows:
    sent, received = r.get('bytes_sent'), r.get('bytes_received')
    comm = (sent or 0) + (received or 0) if _finite(sent) or _finite(received) else None
    rounds = '' if r.get('rounds') is None else f"{r['rounds']}/{r.get('rounds_total') or '?'}"
    best = '' if r.get('best_val_ppl') is None else f"{r['best_val_ppl']:.2f} ({r['best_round']})"
    cells = [f"`{r['run']}`", r.get('status') or '', rounds, _tokens(r.get('tokens')),
             _num(r.get('final_val_ppl'), '.2f'), best, _num(comm and comm / 1e6, '.1f'),
             _duration(r.get('train_time_s')), _duration(r.get('wall_s'))]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _num(value: Any, fmt: str) -> str:
  return format(value, fmt) if _finite(value) else ''


def _tokens(n: Any) -> str:
  if not _finite(n):
    return ''
  for unit, scale in (('B', 1e9), ('M', 1e6), ('k', 1e3)):
    if n >= scale:
      return f'{n / scale:.2f}{unit}'
  return str(int(n))


def _duration(seconds: Any) -> str:
  if not _finite(seconds):
    return ''
  return f'{seconds / 60:.1f} min' if seconds >= 120 else f'{seconds:.0f} s'


# --- command line --------------------------------------------------------------------------------

def parse_set(items: Sequence[str]) -> dict[str, Any]:
  """--set KEY=VALUE items; values are parsed as YAML scalars (1 -> int, false -> bool)."""
  import yaml  # pylint: disable=import-outside-toplevel
  out = {}
  for item in items:
    if '=' not in item:
      raise SpecError(f'--set {item!r}: expected KEY=VALUE')
    key, value = item.split('=', 1)
    parsed = yaml.safe_load(value) if value else ''
    if isinstance(parsed, str):
      try:  # YAML 1.1 reads 1e-3 as a string
        parsed = float(parsed)
      except ValueError:
        pass
    out.update(_overrides({key: value if isinstance(parsed, (list, dict)) else parsed}, '--set'))
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('spec', help='sweep spec (.yaml/.yml, or .py defining SPEC)')
  parser.add_argument('--root', required=True, help='directory of the runs\' workdirs and results')
  parser.add_argument('--parallel', type=int, default=1, help='runs at a time (default 1)')
  parser.add_argument('--nice', type=int, default=0, help='run trainers under nice -n N')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='override KEY in every run (wins over the spec); repeatable')
  parser.add_argument('--only', default='', metavar='REGEX', help='only runs whose name matches')
  parser.add_argument('--resume', choices=('auto', 'rerun', 'restart'), default='auto',
                      help='unfinished runs: auto (same command; if the trainer refuses, move the '
                      'workdir aside and restart), rerun (same command only) or restart (move '
                      'aside first)')
  parser.add_argument('--python', default=sys.executable, help='interpreter of the trainers')
  parser.add_argument('--module', default='fedjax_pt.main', help='trainer module (python -m)')
  parser.add_argument('--cwd', default=REPO, help='directory the trainers run in (the repo)')
  parser.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
  parser.add_argument('--report-only', action='store_true', help='only write the results tables')
  args = parser.parse_args(argv)
  try:
    runs = expand(load_spec(args.spec), parse_set(args.set))
    if args.only:
      runs = [r for r in runs if re.search(args.only, r.name)]
    if args.parallel < 1:
      raise SpecError(f'--parallel must be >= 1, got {args.parallel}')
    runner = Runner(args.root, python=args.python, module=args.module, cwd=args.cwd,
                    nice=args.nice, resume=args.resume)
    if args.dry_run:
      for run in runs:
        print(f'{status(runner.workdir(run)):10s} ' +
              ' '.join(_quote(c) for c in run.command(runner.workdir(run), args.python,
                                                       args.module)))
      return 0
    outcome = {} if args.report_only else run_all(runs, runner, args.parallel)
  except SpecError as e:
    print(f'sweep: error: {e}', file=sys.stderr)
    return 2
  rows = [summarize(run, runner.workdir(run)) for run in runs]
  csv_path, md_path = write_results(rows, args.root)
  print(markdown_table(rows))
  print(f'[sweep] results: {csv_path}, {md_path}')
  bad = sorted(name for name, s in outcome.items() if s != 'finished')
  if bad:
    print(f'[sweep] {len(bad)} run(s) not finished: {", ".join(bad)}', file=sys.stderr)
    return 130 if runner.stopping else 1
  return 0


def _quote(arg: str) -> str:
  return arg if re.fullmatch(r'[\w./=,+:@-]+', arg) else "'" + arg.replace("'", "'\\''") + "'"


if __name__ == '__main__':
  sys.exit(main())
