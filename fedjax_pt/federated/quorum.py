"""Quorum rounds (fl.quorum, fl.grace_s): the server steps once Q updates are in, and keeps the
late ones for a later step instead of throwing their work away.

A synchronisation collects candidates: the updates of the clients sampled for it and the late
updates of earlier rounds still in flight. On the simulated clock each arrives at some time from
the start of the round (`sim_clock`; a late update carried over is due `due_s` after the start
of the round it is merged in, <= 0 when it came during the server's work). The synchronisation
closes `fl.grace_s` after the Q-th arrival (at the last one when fewer than Q arrive), and every
candidate in by then is averaged; a client's update that comes later is kept, with its due time,
and its client is not sampled again until it is merged. A late update merged `s` rounds after the
one it was trained in weighs its client's weight x (1 + s) ^ -fl.staleness_exponent (the
polynomial staleness function of FedAsync, Xie et al. 2019, arXiv 1903.03934; 0.5 there); the
client restarts from the newest global model when next sampled.

The decision reads the simulated clock only, in the simulation and in a deployment alike, so both
take the same updates in the same steps (with profiles that give throughputs, the same ones in
every run). The server's own work is not on it: a carried update's due time is its arrival less
the time until the close. Late updates are part of the server's checkpoint: a run resumes with
them in flight. Updates still in flight when the run ends are not merged.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.struct


class LateUpdate(flax.struct.PyTreeNode):
  """A client's decoded delta that missed its round's close, in flight to a later one."""
  delta: Any
  client: int = flax.struct.field(pytree_node=False)
  weight: float = flax.struct.field(pytree_node=False)  # its client's weight (fl.weighting)
  due_s: float = flax.struct.field(pytree_node=False)  # arrival, from the next round's start
  born: int = flax.struct.field(pytree_node=False)  # the round it was trained in

  def meta(self) -> dict[str, Any]:
    return {'client': self.client, 'weight': self.weight, 'due_s': self.due_s,
            'born': self.born}


@dataclasses.dataclass(frozen=True)
class Candidate:
  """An update that may be averaged in this synchronisation."""
  client: int
  delta: Any
  weight: float
  arrival_s: float  # from the start of the round
  born: int


def close_s(arrivals: Sequence[float], quorum: int, grace_s: float) -> float:
  """When the synchronisation closes: grace_s after the quorum-th arrival, or at the last one
  when fewer arrive (never before the round's start)."""
  ordered = sorted(max(a, 0.0) for a in arrivals)
  if not ordered:
    return 0.0
  if len(ordered) < quorum:
    return ordered[-1]
  return ordered[quorum - 1] + grace_s


def staleness_weight(weight: float, staleness: int, exponent: float) -> float:
  """A late update's weight: its client's, times (1 + staleness) ^ -exponent."""
  return weight * (1.0 + staleness) ** -exponent


def split(candidates: Sequence[Candidate], quorum: int,
          grace_s: float) -> tuple[list[Candidate], list[Candidate], float]:
  """(averaged now, in arrival order; late; the close) of a synchronisation's candidates."""
  close = close_s([c.arrival_s for c in candidates], quorum, grace_s)
  ordered = sorted(candidates, key=lambda c: (max(c.arrival_s, 0.0), c.client))
  return ([c for c in ordered if c.arrival_s <= close],
          [c for c in ordered if c.arrival_s > close], close)


def carried(late: Sequence[Candidate], close: float) -> tuple[LateUpdate, ...]:
  """The late updates as the server keeps them: due from the start of the next round."""
  return tuple(LateUpdate(c.delta, c.client, c.weight, c.arrival_s - close, c.born)
               for c in late)


def pending_candidates(pending: Sequence[LateUpdate]) -> list[Candidate]:
  return [Candidate(u.client, u.delta, u.weight, u.due_s, u.born) for u in pending]
