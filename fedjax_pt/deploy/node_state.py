"""What a node keeps between rounds, on its own disk: where its data iterator is and, with
fl.reset_optimizer=False, its Adam moments, and with fl.compression.error_feedback the residual
of its messages. One snapshot per (round, attempt) it trained.

Every message names its round and attempt, and the node starts from its latest snapshot *before*
them. A server that restarts from an older checkpoint and replays rounds therefore finds each node
as it was at that checkpoint, exactly as the simulation restores its iterators from the
checkpoint; snapshots at or after the replayed round belong to the lost future and are deleted.
A snapshot is written to a temporary directory and renamed, so a node killed mid-write leaves
the previous one intact.
"""

import dataclasses
import json
import os
import re
import shutil
from typing import Any

import orbax.checkpoint as ocp

_NAME = re.compile(r'^r(\d+)-a(\d+)$')


@dataclasses.dataclass
class Snapshot:
  iterator: dict[str, Any] | None = None  # grain iterator state; None: start of the data
  opt_state: Any | None = None  # kept Adam state; None: fresh moments
  residual: Any | None = None  # what its messages could not carry yet; None: zeros


class NodeState:
  """The snapshots of one client of one run, under `directory`."""

  def __init__(self, directory: str):
    self.directory = directory

  def _keys(self) -> list[tuple[int, int]]:
    if not os.path.isdir(self.directory):
      return []
    return sorted((int(m[1]), int(m[2])) for m in map(_NAME.match, os.listdir(self.directory))
                  if m)

  def _path(self, key: tuple[int, int]) -> str:
    return os.path.join(self.directory, f'r{key[0]:06d}-a{key[1]}')

  def start(self, round_idx: int, attempt: int, opt_like: Any, params_like: Any = None
            ) -> Snapshot:
    """The state to train (round_idx, attempt) from; drops snapshots from a lost future.

    `opt_like` and `params_like` are the Adam state's and the parameters' shapes, dtypes and
    shardings, to restore into (the residual has the parameters' layout)."""
    keys = self._keys()
    for key in keys:
      if key >= (round_idx, attempt):
        shutil.rmtree(self._path(key))
    earlier = [key for key in keys if key < (round_idx, attempt)]
    if not earlier:
      return Snapshot()
    path = self._path(earlier[-1])
    with open(os.path.join(path, 'iterator.json'), encoding='utf-8') as f:
      iterator = json.load(f)
    arrays = {}
    for name, like in (('opt_state', opt_like), ('residual', params_like)):
      if os.path.isdir(os.path.join(path, name)):
        with ocp.StandardCheckpointer() as checkpointer:
          arrays[name] = checkpointer.restore(os.path.join(path, name), like)
    return Snapshot(iterator, **arrays)

  def save(self, round_idx: int, attempt: int, snapshot: Snapshot, keep: int) -> None:
    """Records the state after (round_idx, attempt) and keeps the newest `keep` snapshots."""
    final = self._path((round_idx, attempt))
    tmp = f'{final}.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, 'iterator.json'), 'w', encoding='utf-8') as f:
      json.dump(snapshot.iterator, f)
    for name in ('opt_state', 'residual'):
      if getattr(snapshot, name) is not None:
        with ocp.StandardCheckpointer() as checkpointer:
          checkpointer.save(os.path.join(tmp, name), getattr(snapshot, name))
          checkpointer.wait_until_finished()
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for key in self._keys()[:-max(keep, 1)]:
      shutil.rmtree(self._path(key))
