"""Which SuperNode holds which client seat, bound to keys, and the run's identity: the
federation's part of the server's workdir (`federation.json`).

A seat is a client id k. A node claims seat k by the name it was registered under on the
SuperLink (`flwr supernode register KEY.pub ... --name client-k`, with node authentication), or
else by the `partition-id` of its node config, which it answers when asked (`fleet.py`). Flower
lets several keys register under one name, and anyone who reaches the SuperLink's Control API can
register one, so a name alone proves nothing: the first key that claims a seat is bound to it
(its SHA-256 fingerprint is recorded here), and another key claiming that seat later is refused —
it gets no message, every round records it in `refused_nodes`, and the run's log warns with both
fingerprints. An operator re-binds a seat deliberately with `python -m fedjax_pt.deploy.status
--release=client-k` (the next key to claim it is bound). A name that is no seat of the run
(`client-99` with 4 clients, `alice`) is refused too. Without node authentication (plain-text
development federations) nodes have no key, and seats are not bound: the log says so once.

`run_id` names the run's state on the nodes (their snapshots). It is made once, when the workdir
is new, and kept here, so a server that resumes on another host, or from a copy of the workdir at
another path, finds the nodes' state. Workdirs of fedjax_pt before this file existed keep their
old identity (a hash of the host name and the workdir), so their nodes' snapshots are still found.
"""

import dataclasses
import hashlib
import json
import os
import re
import socket
import time
import uuid
from typing import Any

FILE = 'federation.json'
SEAT = re.compile(r'client-(\d+)')  # a seat's name; a node registered under it claims it
_LAYOUT = 1


def fingerprint(public_key: bytes) -> str:
  """A node's key as the operator can compare it: SHA-256 of its public key, first 16 hex."""
  return hashlib.sha256(public_key).hexdigest()[:16]


def seat_name(client: int) -> str:
  return f'client-{client}'


@dataclasses.dataclass
class FederationState:
  """What `federation.json` holds: the run's id, each bound seat's key, and what was last seen."""
  run_id: str
  seats: dict[str, str] = dataclasses.field(default_factory=dict)  # seat -> key fingerprint
  # node id -> {seat, key, refused, online, since}: the server's last view of each node.
  nodes: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

  @classmethod
  def load(cls, workdir: str) -> 'FederationState | None':
    path = os.path.join(workdir, FILE)
    if not os.path.exists(path):
      return None
    try:
      with open(path, encoding='utf-8') as f:
        data = json.load(f)
      if data.get('layout') != _LAYOUT:
        raise ValueError(f'layout {data.get("layout")!r}, this fedjax_pt reads {_LAYOUT}')
      return cls(run_id=str(data['run_id']), seats=dict(data.get('seats', {})),
                 nodes=dict(data.get('nodes', {})))
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ValueError(f'{path} is not a federation state file ({e}); restore it from a backup '
                       '(it binds seats to keys and names the nodes\' state)') from None

  @classmethod
  def open(cls, workdir: str, holds_run: bool) -> 'FederationState':
    """The workdir's state, made on first use (`holds_run`: the workdir already has a run)."""
    state = cls.load(workdir)
    if state is None:
      if holds_run:  # a workdir of fedjax_pt before federation.json: its nodes' state key
        legacy = f'{socket.gethostname()}:{workdir}'
        state = cls(run_id=hashlib.sha256(legacy.encode()).hexdigest()[:16])
      else:
        state = cls(run_id=uuid.uuid4().hex[:16])
      state.save(workdir)
    return state

  def save(self, workdir: str) -> None:
    """Atomically: a crash mid-write leaves the previous file."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, FILE)
    tmp = f'{path}.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump({'layout': _LAYOUT, 'run_id': self.run_id, 'seats': self.seats,
                 'nodes': self.nodes}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class Claim:
  """A node's claim on a seat: how it claims it, and its key (b'' without node auth)."""
  node_id: int
  client: int | None  # None: its name is no seat of this run
  how: str  # 'registered name client-k', 'partition-id', or the bad name
  public_key: bytes = b''


class Seats:
  """Decides which claims hold, binds seats on first use, and records it in the workdir."""

  def __init__(self, workdir: str | None, state: FederationState, num_clients: int):
    self._workdir, self.state, self._num_clients = workdir, state, num_clients
    self.refused: dict[int, str] = {}  # node id -> why it holds no seat, for the round records

  def settle(self, claims: list[Claim]) -> tuple[dict[int, int], dict[int, str]]:
    """The seat of each admitted node ({client: node id}, later claims of the same key win: a
    restarted node) and each refused node's reason. Binds unbound seats to the first key."""
    if self._workdir:  # an operator may have released a seat while the run goes on
      on_disk = FederationState.load(self._workdir)
      if on_disk is not None:
        self.state.seats = on_disk.seats
    node_of, refused, changed = {}, {}, False
    for claim in claims:
      seat = None if claim.client is None else seat_name(claim.client)
      if claim.client is None or not 0 <= claim.client < self._num_clients:
        refused[claim.node_id] = (f'its {claim.how} names no seat of this run (client-0 .. '
                                  f'client-{self._num_clients - 1})')
        continue
      key = fingerprint(claim.public_key) if claim.public_key else None
      bound = self.state.seats.get(seat)
      if key is not None and bound is None:
        self.state.seats[seat] = bound = key
        changed = True
      if key is not None and key != bound:
        refused[claim.node_id] = (f'claims {seat} by its {claim.how} with key {key}, but {seat} '
                                  f'is bound to key {bound} (python -m fedjax_pt.deploy.status '
                                  f'--release={seat} re-binds it)')
        continue
      node_of[claim.client] = claim.node_id
    self.refused = refused
    now, nodes = time.time(), {}
    for c in claims:
      old = self.state.nodes.get(str(c.node_id), {})
      view = {'seat': None if c.client is None else seat_name(c.client),
              'key': fingerprint(c.public_key) if c.public_key else None,
              'refused': refused.get(c.node_id), 'online': True}
      if {k: old.get(k) for k in view} != view:
        changed = True
      view['since'] = old['since'] if old.get('online') else now  # online since
      nodes[str(c.node_id)] = view
    for node_id, old in self.state.nodes.items():
      if node_id not in nodes:
        changed |= bool(old.get('online'))
        nodes[node_id] = {**old, 'online': False,
                          'since': now if old.get('online') else old.get('since')}
    self.state.nodes = nodes
    if changed and self._workdir:
      self.state.save(self._workdir)
    return node_of, refused


def release(workdir: str, seat: str) -> str | None:
  """Unbinds `seat` (the next key to claim it is bound): the key it was bound to, or None."""
  state = FederationState.load(workdir)
  if state is None:
    raise ValueError(f'{os.path.join(workdir, FILE)} does not exist: --workdir holds no '
                     'deployed run')
  key = state.seats.pop(seat, None)
  state.save(workdir)
  return key
