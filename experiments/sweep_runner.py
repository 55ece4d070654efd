"""Running a sweep: each run's trainer in its own workdir, N at a time, skipped once finished.

A run is finished when its metrics.jsonl holds a round record at or past the fl.rounds it asks
for now, so raising fl.rounds in the spec continues a finished run. A started but unfinished run is
resumed by invoking the same command on the same workdir; if the trainer refuses that workdir
(exit code `errors.EXIT_WORKDIR_REFUSED`), `resume='auto'` moves it aside to
`NAME.incomplete-<n>` (nothing is deleted) and starts it again.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from experiments.sweep_spec import Run, SpecError, format_value, requested_rounds
from fedjax_pt import errors
from fedjax_pt import records
from fedjax_pt import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATE_FILE = 'sweep_run.json'  # per workdir: the overrides, command, attempts and wall time
LOG_FILE = 'sweep.log'  # per workdir: the trainer's stdout and stderr, appended per attempt
STOP_GRACE_S = 30  # time a trainer gets to finish writing a checkpoint after SIGINT
BUSY_POLL_S = 2.0  # how often a run that another sweep is running is looked at


def read_rounds(workdir: str) -> list[records.RoundRecord]:
  """The round records of workdir/metrics.jsonl ([] if there is none)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  return records.read_records(path).rounds if os.path.isfile(path) else []


def _read_json(path: str) -> dict[str, Any]:
  """The object in a JSON file; {} if it is missing or torn (a run killed while writing it)."""
  if not os.path.isfile(path):
    return {}
  with open(path, encoding='utf-8') as f:
    try:
      return json.load(f)
    except json.JSONDecodeError:
      return {}


def read_config(workdir: str) -> dict[str, Any]:
  return _read_json(os.path.join(workdir, 'config.json'))


def total_rounds(config: Mapping[str, Any]) -> int | None:
  value = (config.get('fl') or {}).get('rounds')
  return value if isinstance(value, int) else None


def status(workdir: str, rounds: int | None = None) -> str:
  """'new' (nothing there), 'finished' (a round >= `rounds` logged; by default the workdir's own
  fl.rounds) or 'unfinished' (anything else)."""
  if not os.path.isdir(workdir) or not (
      os.path.exists(os.path.join(workdir, 'metrics.jsonl')) or
      os.path.exists(os.path.join(workdir, 'config.json'))):
    return 'new'
  rounds = rounds if rounds is not None else total_rounds(read_config(workdir))
  if rounds is not None and any(r.round >= rounds for r in read_rounds(workdir)):
    return 'finished'
  return 'unfinished'


def read_state(workdir: str) -> dict[str, Any]:
  return _read_json(os.path.join(workdir, STATE_FILE))


def _write_state(workdir: str, state: Mapping[str, Any]) -> None:
  tmp = os.path.join(workdir, STATE_FILE + '.tmp')
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(state, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(workdir, STATE_FILE))


def _jsonable_overrides(overrides: Mapping[str, Any]) -> dict[str, str]:
  return {k: format_value(v) for k, v in overrides.items()}


def check_consistent(run: Run, workdir: str) -> None:
  """Refuses a workdir that an earlier sweep ran with other values of keys that change the
  experiment (those the trainer allows to change between sessions, like fl.rounds, are fine)."""
  recorded = read_state(workdir).get('overrides')
  if recorded is None:
    return
  current = _jsonable_overrides(run.overrides)
  changed = sorted(k for k in set(recorded) | set(current)
                   if recorded.get(k) != current.get(k) and
                   not k.startswith(workdir_lib.RESUMABLE_CHANGES))
  if changed:
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

  def status(self, run: Run) -> str:
    return status(self.workdir(run), requested_rounds(run, self.cwd))

  def run_one(self, run: Run) -> str:
    """Brings one run to 'finished' if it can; returns its status afterwards ('failed' too)."""
    workdir = self.workdir(run)
    before = self.status(run)
    if before == 'finished':
      return 'finished'
    if before == 'unfinished' and self.resume == 'restart':
      self.echo(f'[sweep] {run.name}: unfinished; moved aside to {move_aside(workdir)}')
    code = self._attempt(run, workdir)
    if code == errors.EXIT_WORKDIR_BUSY and not self.stopping:
      # Another sweep on the same root runs it: its result is this run's too.
      self.echo(f'[sweep] {run.name}: another process is running it; waiting for it to end')
      while workdir_lib.writer_of(workdir) and not self.stopping:
        time.sleep(BUSY_POLL_S)
      if self.status(run) != 'finished' and not self.stopping:
        code = self._attempt(run, workdir)
    if code == errors.EXIT_WORKDIR_REFUSED and self.resume == 'auto' and not self.stopping:
      self.echo(f'[sweep] {run.name}: the trainer cannot resume it; moved aside to '
                f'{move_aside(workdir)}, starting again')
      self._attempt(run, workdir)
    if self.status(run) == 'finished':
      return 'finished'
    return 'interrupted' if self.stopping else 'failed'

  def _attempt(self, run: Run, workdir: str) -> int | None:
    """Runs the trainer once; its exit code (None: the sweep was stopping)."""
    os.makedirs(workdir, exist_ok=True)
    state = read_state(workdir) or {'name': run.name, 'config': run.config, 'attempts': [],
                                    'wall_s': 0.0}
    state['overrides'] = _jsonable_overrides(run.overrides)
    command = run.command(workdir, self.python, self.module)
    state['command'] = command
    if self.nice:
      command = ['nice', '-n', str(self.nice), *command]
    attempt = {'started': time.strftime('%Y-%m-%dT%H:%M:%S'),
               'resumed': status(workdir) != 'new'}
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
          return None
        proc = subprocess.Popen(command, cwd=self.cwd, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)
        self._procs.add(proc)
      code = proc.wait()
      with self._lock:
        self._procs.discard(proc)
    elapsed = time.perf_counter() - start
    # A refused workdir holds another run: it may be moved aside. A busy one (another live trainer
    # holds its lock) never is.
    refused = code == errors.EXIT_WORKDIR_REFUSED
    attempt.update(returncode=code, wall_s=round(elapsed, 3), refused=refused)
    state['wall_s'] = round(state.get('wall_s', 0.0) + elapsed, 3)
    _write_state(workdir, state)
    if code != 0 and not refused and not self.stopping:
      with open(os.path.join(workdir, LOG_FILE), encoding='utf-8', errors='replace') as log:
        log.seek(offset)
        lines = [line for line in log.read()[-4000:].splitlines() if line.strip()]
      self.echo(f'[sweep] {run.name}: exit {code}: {(lines or [""])[-1][:300]} '
                f'(log: {workdir}/{LOG_FILE})')
    elif code == 0:
      self.echo(f'[sweep] {run.name}: done in {elapsed:.0f}s')
    return code

  def stop(self) -> None:
    """Interrupts every running trainer (SIGINT to its process group, SIGKILL after a grace)."""
    with self._lock:
      self.stopping = True
      procs = list(self._procs)
    for proc in procs:
      try:
        os.killpg(proc.pid, signal.SIGINT)
      except ProcessLookupError:
        pass
    deadline = time.time() + STOP_GRACE_S
    for proc in procs:
      try:
        proc.wait(timeout=max(0.0, deadline - time.time()))
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _die_with_parent() -> None:
  """In the trainer's process, before it starts: the kernel sends it SIGTERM (which it turns into
  a clean stop at the next step) when the sweep dies, even by SIGKILL, so no orphaned trainer
  keeps writing beside a re-run sweep's."""
  if sys.platform.startswith('linux'):
    pr_set_pdeathsig = 1
    ctypes.CDLL('libc.so.6', use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def run_all(runs: Sequence[Run], runner: Runner, parallel: int = 1) -> dict[str, str]:
  """Runs every unfinished run, `parallel` at a time; returns {name: status}."""
  results = {}
  todo = []
  for run in runs:
    check_consistent(run, runner.workdir(run))
    if runner.status(run) == 'finished':
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
      # A run waits for the runs it needs (`Run.needs`). They come before it in the spec, so the
      # pool (first in, first out) has started them by then: waiting cannot deadlock.
      started: dict[str, concurrent.futures.Future] = {}
      for run in todo:
        needed = {name: started[name] for name in run.needs if name in started}
        started[run.name] = pool.submit(_guarded, runner, run, needed)
      futures = {future: name for name, future in started.items()}
      for future in concurrent.futures.as_completed(futures):
        results[futures[future]] = future.result()
  finally:
    if in_main_thread:
      for sig, handler in previous.items():
        signal.signal(sig, handler)
  return {run.name: results[run.name] for run in runs}


def _guarded(runner: Runner, run: Run,
             needed: Mapping[str, concurrent.futures.Future] | None = None) -> str:
  for name, future in (needed or {}).items():
    outcome = future.result()
    if outcome != 'finished':
      runner.echo(f'[sweep] {run.name}: not started, it needs {name}, which is {outcome}')
      return 'failed' if outcome != 'interrupted' else 'interrupted'
  if runner.stopping:
    return 'interrupted'
  return runner.run_one(run)
