"""Which clients train in a round: a seeded uniform sample, and the groups that train at once."""

from collections.abc import Collection, Sequence

import numpy as np


def sample_clients(num_clients: int, count: int, seed: int, round_idx: int, attempt: int = 0,
                   exclude: Collection[int] = ()) -> list[int]:
  """`count` clients drawn uniformly without replacement from those not in `exclude`, sorted.

  A pure function of (seed, round, attempt, exclude): a resumed run draws what an uninterrupted
  one drew. A retried round (attempt > 0) draws afresh among the clients whose update it does not
  have yet. All clients (cross-silo, the paper's setting) need no draw.
  """
  pool = [k for k in range(num_clients) if k not in set(exclude)]
  if count >= len(pool):
    return pool
  rng = np.random.default_rng([seed, round_idx] + ([attempt] if attempt else []))
  return sorted(int(pool[i]) for i in rng.choice(len(pool), size=count, replace=False))


def client_groups(clients: Sequence[int], size: int) -> list[list[int]]:
  """The clients in groups of `size` (mesh.clients) that train at the same time; the last group
  may be smaller (a retry tops a round up with fewer clients than a full group)."""
  return [list(clients[i:i + size]) for i in range(0, len(clients), size)]
