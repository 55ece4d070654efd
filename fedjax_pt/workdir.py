"""What a workdir means for a run: refusing the wrong one, resuming, and setting aside, never
deleting.

A workdir holds config.json, metrics.jsonl, tensorboard/ and checkpoints/. It holds a run once it
has a checkpoint or a record in metrics.jsonl; a run that failed before its first round leaves
none, so the corrected command starts afresh there. Re-running the same command resumes from the
latest good checkpoint: metrics.jsonl is cut back to the length it had at that checkpoint, so its
records are exactly those of an uninterrupted run. Nothing is deleted: a metrics file with no
checkpoint to continue from is renamed, and unreadable checkpoints are moved aside.
"""

from collections.abc import Callable
import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import time
from typing import Any

from absl import logging

from fedjax_pt import checkpoint as checkpoint_lib
from fedjax_pt import distributed
from fedjax_pt import errors
from fedjax_pt import records
from fedjax_pt.configs import base as base_config
from fedjax_pt.run_spec import RunSpec

# Keys that may change between the sessions of one run: training longer, checkpointing or logging
# differently, or on other devices (the mesh places arrays, it does not change the results), or
# with the tokenised corpus kept elsewhere (the cache never changes the data), or scoring other
# extra held-out files (eval.extra_files: read by no training step, each under its own record
# key, so a file added later starts its own curve and the others are untouched). Anything else
# would silently mix two experiments in one metrics.jsonl.
RESUMABLE_CHANGES = ('fl.rounds', 'ckpt.', 'log.', 'mesh.', 'data.cache_dir', 'eval.extra_files')


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


@dataclasses.dataclass
class Session:
  """An open workdir: where the run writes, and what it resumes from."""
  writer: records.RecordWriter
  checkpointer: checkpoint_lib.Checkpointer
  restored: checkpoint_lib.Restored | None
  previous_rounds: list[records.RoundRecord]

  def close(self, failing: bool = False) -> None:
    """Waits for the last checkpoint and closes the files. While another error is on its way
    out (`failing`), a second one here (the same full disk) is logged, not raised over it."""
    first = None
    for close in (self.checkpointer.close, self.writer.close):
      try:
        close()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('while stopping: %s: %s', type(e).__name__, e)
        first = first or e
    if first is not None and not failing:
      raise first


def writer_of(path: str) -> str | None:
  """Who holds `path`'s lock (a run writing there), or None. Creates nothing."""
  lock = os.path.join(path, '.lock')
  if not os.path.isfile(lock):
    return None
  fd = os.open(lock, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return None  # released when fd closes
  except BlockingIOError:
    return os.pread(fd, 200, 0).decode(errors='replace').strip() or 'unknown process'
  finally:
    os.close(fd)


def has_checkpoint(workdir: str) -> bool:
  checkpoints = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(checkpoints) and any(name.isdigit() for name in os.listdir(checkpoints))


class Workdir:
  """The directory of one run, described by `resolved` (the run's config.json)."""

  @contextlib.contextmanager
  def lock(self):
    """Holds an exclusive lock on the workdir for the whole run.

    A second process on the same workdir (a forgotten run, a sweep's orphaned trainer) is refused
    with the holder's pid instead of appending to the same metrics.jsonl. The lock is an flock on
    `.lock`: the operating system releases it when the holder exits, however it exits. Of the
    processes of one multi-process run, process 0 holds it (it writes the files).
    """
    if not distributed.is_primary():
      yield
      return
    path = os.path.join(self.path, '.lock')
    made = not os.path.exists(self.path)
    try:
      os.makedirs(self.path, exist_ok=True)
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # under a file, not writable, a read-only file system: the first write
      raise OSError(f'--workdir={self.path} is not usable: {e.strerror} ({e.filename})') from None
    try:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors='replace').strip() or 'unknown process'
        raise errors.WorkdirBusy(f'--workdir={self.path} is in use by another run ({holder}); '
                                 'wait for it to end or stop it') from None
      os.ftruncate(fd, 0)
      os.pwrite(fd, (f'pid {os.getpid()} on {socket.gethostname()}, since '
                     f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n').encode(), 0)
      yield
    except BaseException:
      if made and os.listdir(self.path) == ['.lock']:
        # A check failed before anything was written: leave no directory behind for it.
        os.remove(path)
        os.rmdir(self.path)
      raise
    finally:
      os.close(fd)  # releases the lock

  def __init__(self, path: str, spec: RunSpec, resolved: dict[str, Any]):
    self.path, self._spec, self._resolved = path, spec, resolved
    self._metrics = os.path.join(path, 'metrics.jsonl')
    self._config = os.path.join(path, 'config.json')
    self._held: bool | None = None  # holds_run() as `check` saw it

  def holds_run(self) -> bool:
    """Whether an earlier session left a checkpoint or the record of a trained round here (a
    session that stopped in its first round has only the initial model's: nothing to keep)."""
    if has_checkpoint(self.path):
      return True
    if not os.path.isfile(self._metrics) or not os.path.getsize(self._metrics):
      return False
    return any(r.round > 0 for r in records.read_records(self._metrics).rounds)

  def check(self) -> None:
    """Refuses a workdir that holds another experiment (or any run, with ckpt.restore=False).

    Reads only: call it before the data is read, so a wrong command fails in a second. Every
    process of a multi-process run checks, then waits for the others (process 0 writes next)."""
    self._held = self.holds_run()
    self._check()
    distributed.barrier('workdir checked')

  def _check(self) -> None:
    if not self._held:
      return
    if not self._spec.ckpt.restore:
      raise errors.WorkdirRefused(f'--workdir={self.path} already holds a run and '
                                  'ckpt.restore=False refuses to overwrite it; choose a new '
                                  '--workdir')
    if not os.path.isfile(self._config):
      return
    with open(self._config, encoding='utf-8') as f:
      saved = _flatten(json.load(f))
    # As config.json holds it (a tuple is a JSON list), so that only real changes differ.
    current = _flatten(json.loads(json.dumps(self._resolved)))
    # A key added to fedjax_pt after the run started is absent from its config.json: the run
    # used what the key's default does, so the default matches it.
    defaults = _flatten(json.loads(json.dumps(base_config.get_config().to_dict())))
    changed = sorted(k for k in saved.keys() | current.keys()
                     if saved.get(k, defaults.get(k)) != current.get(k) and
                     not k.startswith(RESUMABLE_CHANGES))
    if changed:
      details = ', '.join(f'{k}: {saved.get(k, defaults.get(k))!r} -> {current.get(k)!r}'
                          for k in changed[:4])
      raise errors.WorkdirRefused(
          f'{self._config} was written by a different experiment ({details}); resume with the '
          'same config or choose a new --workdir')

  def open(self, abstract_state: Callable[[dict[str, Any]], Any]) -> Session:
    """Restores the latest good checkpoint (if any), writes config.json and opens the writers.

    `abstract_state(meta)` gives the arrays to restore into (shapes and shardings). Every process
    restores its shards; process 0 alone writes config.json, metrics.jsonl and TensorBoard.
    """
    holds_run = self.holds_run() if self._held is None else self._held
    os.makedirs(self.path, exist_ok=True)
    checkpointer = checkpoint_lib.Checkpointer(self.path, self._spec.ckpt)
    try:
      restored = checkpointer.restore_latest(abstract_state) if holds_run else None
      if not distributed.is_primary():
        return Session(records.NullWriter(), checkpointer, restored, [])
      # Metrics of a session that trained no round are set aside too.
      leftovers = holds_run or os.path.exists(self._metrics)
      previous = self._continue_metrics(restored) if leftovers else None
      with open(self._config, 'w', encoding='utf-8') as f:
        json.dump(self._resolved, f, indent=2, sort_keys=True)
      writer = records.RecordWriter(self.path, tensorboard=self._spec.tensorboard,
                                    previous=previous)
    except BaseException:
      checkpointer.close()
      raise
    return Session(writer, checkpointer, restored, previous.rounds if previous else [])

  def _continue_metrics(self, restored: checkpoint_lib.Restored | None) -> records.Records | None:
    """Cuts metrics.jsonl back to the restored checkpoint and returns what it keeps, or sets it
    aside if there is none (None)."""
    exists = os.path.exists(self._metrics)
    if restored is None:
      if exists:
        aside = _set_aside(self._metrics)
        logging.warning('%s has no usable checkpoint: starting over; its old metrics are in %s',
                        self.path, aside)
      tensorboard = os.path.join(self.path, 'tensorboard')
      if os.path.isdir(tensorboard):
        _set_aside(tensorboard)
      return None
    size = os.path.getsize(self._metrics) if exists else 0
    keep = restored.meta.get('metrics_bytes', 0)
    if size < keep:
      logging.warning('%s is shorter (%d bytes) than at the checkpoint of round %d (%d bytes)',
                      self._metrics, size, restored.round, keep)
    elif size > keep:
      # Records written after that checkpoint will be written again, identically.
      os.truncate(self._metrics, keep)
    logging.info('resuming %s from the checkpoint of round %d', self.path, restored.round)
    return records.read_records(self._metrics) if size else records.Records([], [])


def _set_aside(path: str) -> str:
  n = 1
  while os.path.exists(f'{path}.stale-{n}'):
    n += 1
  os.rename(path, f'{path}.stale-{n}')
  return f'{path}.stale-{n}'
