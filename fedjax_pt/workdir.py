"""What a workdir means for a run: refusing the wrong one, resuming, and setting aside, never deleting.

A workdir holds config.json, metrics.jsonl, tensorboard/ and checkpoints/. It holds a run once it
has a checkpoint or a record in metrics.jsonl; a run that failed before its first round leaves
none, so the corrected command starts afresh there. Re-running the same command resumes from the
latest good checkpoint: metrics.jsonl is cut back to the length it had at that checkpoint, so its
records are exactly those of an uninterrupted run. Nothing is deleted: a metrics file with no
checkpoint to continue from is renamed, and unreadable checkpoints are moved aside.
"""

from collections.abc import Callable
import dataclasses
import json
import os
from typing import Any

from absl import logging

from configs import base as base_config
from fedjax_pt import checkpoint as checkpoint_lib
from fedjax_pt import errors
from fedjax_pt import records
from fedjax_pt.run_spec import RunSpec

# Keys that may change between the sessions of one run: training longer, checkpointing or logging
# differently, or on other devices (the mesh places arrays, it does not change the results).
# Anything else would silently mix two experiments in one metrics.jsonl.
RESUMABLE_CHANGES = ('fl.rounds', 'ckpt.', 'log.', 'mesh.')


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

  def close(self) -> None:
    try:
      self.checkpointer.close()
    finally:
      self.writer.close()


class Workdir:
  """The directory of one run, described by `resolved` (the run's config.json)."""

  def __init__(self, path: str, spec: RunSpec, resolved: dict[str, Any]):
    self.path, self._spec, self._resolved = path, spec, resolved
    self._metrics = os.path.join(path, 'metrics.jsonl')
    self._config = os.path.join(path, 'config.json')

  def holds_run(self) -> bool:
    """Whether an earlier session left a checkpoint or a record here."""
    checkpoints = os.path.join(self.path, 'checkpoints')
    has_checkpoint = os.path.isdir(checkpoints) and any(
        name.isdigit() for name in os.listdir(checkpoints))
    return has_checkpoint or (os.path.isfile(self._metrics) and os.path.getsize(self._metrics) > 0)

  def check(self) -> None:
    """Refuses a workdir that holds another experiment (or any run, with ckpt.restore=False).

    Reads only: call it before the data is read, so a wrong command fails in a second."""
    if not self.holds_run():
      return
    if not self._spec.ckpt.restore:
      raise errors.WorkdirRefused(f'--workdir={self.path} already holds a run and '
                                  'ckpt.restore=False refuses to overwrite it; choose a new '
                                  '--workdir')
    if not os.path.isfile(self._config):
      return
    with open(self._config, encoding='utf-8') as f:
      saved = _flatten(json.load(f))
    current = _flatten(self._resolved)
    # A key that an older run's config.json lacks was added since; its default reproduces what
    # that run did, so the run resumes unless the key is now set to something else.
    defaults = _flatten(base_config.get_config().to_dict())
    changed = sorted(k for k in saved.keys() | current.keys()
                     if saved.get(k, defaults.get(k)) != current.get(k) and
                     not k.startswith(RESUMABLE_CHANGES))
    if changed:
      details = ', '.join(f'{k}: {saved.get(k, defaults.get(k))!r} -> {current.get(k)!r}'
                          for k in changed[:4])
      raise errors.WorkdirRefused(
          f'{self._config} was written by a different experiment ({details}); resume with the '
          'same config or choose a new --workdir')

  def open(self, abstract_state: Callable[[checkpoint_lib.RunMeta], Any]) -> Session:
    """Restores the latest good checkpoint (if any), writes config.json and opens the writers.

    `abstract_state(meta)` gives the arrays to restore into (shapes and shardings).
    """
    holds_run = self.holds_run()
    os.makedirs(self.path, exist_ok=True)
    checkpointer = checkpoint_lib.Checkpointer(self.path, self._spec.ckpt)
    try:
      restored = checkpointer.restore_latest(abstract_state) if holds_run else None
      previous = self._continue_metrics(restored) if holds_run else []
      with open(self._config, 'w', encoding='utf-8') as f:
        json.dump(self._resolved, f, indent=2, sort_keys=True)
      writer = records.RecordWriter(self.path, tensorboard=self._spec.tensorboard)
    except BaseException:
      checkpointer.close()
      raise
    return Session(writer, checkpointer, restored, previous)

  def _continue_metrics(self, restored: checkpoint_lib.Restored | None
                        ) -> list[records.RoundRecord]:
    """Cuts metrics.jsonl back to the restored checkpoint, or sets it aside if there is none."""
    exists = os.path.exists(self._metrics)
    if restored is None:
      if exists:
        aside = _set_aside(self._metrics)
        logging.warning('%s has no usable checkpoint: starting over; its old metrics are in %s',
                        self.path, aside)
      return []
    size = os.path.getsize(self._metrics) if exists else 0
    keep = restored.meta.metrics_bytes
    if size < keep:
      logging.warning('%s is shorter (%d bytes) than at the checkpoint of round %d (%d bytes)',
                      self._metrics, size, restored.round, keep)
    elif size > keep:
      # Records written after that checkpoint will be written again, identically.
      os.truncate(self._metrics, keep)
    logging.info('resuming %s from the checkpoint of round %d', self.path, restored.round)
    return records.read_records(self._metrics).rounds if size else []


def _set_aside(path: str) -> str:
  n = 1
  while os.path.exists(f'{path}.stale-{n}'):
    n += 1
  os.rename(path, f'{path}.stale-{n}')
  return f'{path}.stale-{n}'
