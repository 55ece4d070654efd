"""What a node keeps between messages, on its own disk: where its data iterator is and its
`ClientMemory` (Adam state with fl.reset_optimizer=False, the residual of its messages with
fl.compression.error_feedback, its own model with streaming fragments or mixing). One snapshot
per synchronisation (round, segment, attempt) it trained.

Every message names its synchronisation and the snapshot the server expects the node to continue
from: the state after the last synchronisation whose reply the server received from this client
(kept in the server's checkpoints). A server that restarts from an older checkpoint and replays
rounds therefore finds each node as it was at that checkpoint; snapshots after the expected one
belong to a lost future (or to work whose reply never arrived) and are deleted. A node that does
not have the expected snapshot (its state directory was lost, or is another machine's) refuses
in one line rather than train from another state, unless its operator chose to start the client
afresh (node config reset-state). A snapshot is written to a temporary directory and renamed, so
a node killed mid-write leaves the previous one intact.
"""

import dataclasses
import json
import os
import re
import shutil
from typing import Any

import orbax.checkpoint as ocp

from fedjax_pt.deploy import protocol
from fedjax_pt.federated import client_round

# r<round>-s<segment start>-a<attempt>; snapshots of fedjax_pt before streaming fragments in the
# deployment have no segment (it was 0).
_NAME = re.compile(r'^r(\d+)(?:-s(\d+))?-a(\d+)$')


@dataclasses.dataclass
class Snapshot:
  iterator: dict[str, Any] | None = None  # grain iterator state; None: start of the data
  memory: client_round.ClientMemory = dataclasses.field(
      default_factory=client_round.ClientMemory)


Key = tuple[int, int, int]  # (round, segment start, attempt): the order messages come in


def _key(name: str) -> Key:
  match = _NAME.match(name)
  if not match:
    raise ValueError(f'{name!r} names no snapshot (r<round>-s<step>-a<attempt>)')
  return int(match[1]), int(match[2] or 0), int(match[3])


class SnapshotMissing(ValueError):
  """The node lacks the snapshot the server expects it to continue from."""


class NodeState:
  """The snapshots of one client of one run, under `directory`."""

  def __init__(self, directory: str):
    self.directory = directory

  def _keys(self) -> dict[Key, str]:
    if not os.path.isdir(self.directory):
      return {}
    keys = {}
    for name in os.listdir(self.directory):
      if _NAME.match(name):
        keys[_key(name)] = name
    return dict(sorted(keys.items()))

  def _path(self, name: str) -> str:
    return os.path.join(self.directory, name)

  def start(self, key: Key, like: dict[str, Any], expected: str = protocol.UNKNOWN,
            reset: bool = False) -> Snapshot:
    """The state to train synchronisation `key` from: snapshot `expected` ('' none;
    `protocol.UNKNOWN`: the latest before `key`); drops later ones. Raises SnapshotMissing when
    `expected` is not here, unless `reset` (then the client starts afresh).

    `like` gives the shapes, dtypes and shardings of each part a memory may hold
    ({'opt_state': ..., 'residual': ..., ...}), to restore into."""
    keys = self._keys()
    known = expected != protocol.UNKNOWN
    wanted = _key(expected) if known and expected else None
    missing = wanted is not None and wanted not in keys
    if missing and not reset:
      have = ', '.join(keys.values()) or 'none'
      raise SnapshotMissing(
          f'this node has no snapshot {expected} of client state in {self.directory} (the state '
          f'after its last synchronisation the server received; it has: {have}): the state '
          'directory was lost or is not the one that trained this client; restore it, or set '
          'node config reset-state=true to start the client afresh (its data from the start)')
    for later, name in keys.items():
      if later >= key or (known and (wanted is None or missing or later > wanted)):
        shutil.rmtree(self._path(name))
    earlier = [name for k, name in self._keys().items() if k < key]
    if not earlier:
      return Snapshot()
    path = self._path(earlier[-1])
    with open(os.path.join(path, 'iterator.json'), encoding='utf-8') as f:
      iterator = json.load(f)
    merged = None
    if os.path.isfile(os.path.join(path, 'memory.json')):
      with open(os.path.join(path, 'memory.json'), encoding='utf-8') as f:
        merged = json.load(f).get('merged')
    parts = {}
    for name in client_round.PARTS:
      if os.path.isdir(os.path.join(path, name)):
        with ocp.StandardCheckpointer() as checkpointer:
          parts[name] = checkpointer.restore(os.path.join(path, name), like[name])
    return Snapshot(iterator, client_round.ClientMemory(
        **parts, merged=tuple(merged) if merged else None))

  def save(self, key: Key, snapshot: Snapshot, keep: int) -> None:
    """Records the state after synchronisation `key` and keeps the newest `keep` snapshots."""
    round_idx, start, attempt = key
    final = self._path(protocol.snapshot_name(round_idx, start, attempt))
    tmp = f'{final}.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, 'iterator.json'), 'w', encoding='utf-8') as f:
      json.dump(snapshot.iterator, f)
    with open(os.path.join(tmp, 'memory.json'), 'w', encoding='utf-8') as f:
      json.dump({'merged': snapshot.memory.merged}, f)
    for name in snapshot.memory.parts():
      with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(tmp, name), getattr(snapshot.memory, name))
        checkpointer.wait_until_finished()
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    names = list(self._keys().values())
    for name in names[:-max(keep, 1)]:
      shutil.rmtree(self._path(name))
