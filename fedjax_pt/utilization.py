"""Compute utilisation: the share of the wall time that the clients spend training.

A client's utilisation in a round is its training time / the round's wall time; the round's is the
mean over the clients whose update arrived, Σ compute_k / (n × wall), each client's share at
most 1. A synchronous round pays
for its slowest client, its transfers and the server's work with everybody's idle time, which is
what overlapped and quorum rounds hide (INTELLECT-1 reports 83-96% across continents).

Two clocks give two utilisations (`records.RoundRecord`):
- simulated, in every federated run: `client_sim_compute_s` / `sim_round_time_s`;
- measured, where clients train in parallel on their own hosts (a deployment):
  `client_compute_s` / `round_time_s`. The simulation trains its clients one after another on
  this host, so its measured times make no utilisation.
Over a run (`summaries.RunSummary`): all the clients' training / (the number of clients that
trained × the run's wall time), idle clients (not sampled, or waiting) counting as idle.
"""

from collections.abc import Iterable, Mapping
import math

from fedjax_pt import records


def _finite(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value)


def of_round(compute_s: Mapping[int, float] | None,
             wall_s: float | None) -> tuple[float | None, dict[int, float] | None]:
  """(mean utilisation, {client: utilisation}) of a round; (None, None) when no client's training
  time is known or the round took no time."""
  if not compute_s or not _finite(wall_s) or wall_s <= 0:
    return None, None
  # A late update of a quorum round (`federated.quorum`) may have trained longer than its round:
  # its client computed through all of it, and on into the rounds it was not sampled for.
  per_client = {k: min(c / wall_s, 1.0) for k, c in compute_s.items()}
  return sum(per_client.values()) / len(per_client), per_client


def add_to(record: records.RoundRecord, measured: bool) -> None:
  """Fills `record`'s utilisation keys from its training and round times (`measured`: also from
  the measured clock, for clients that train in parallel on their own hosts)."""
  record.sim_compute_utilization, record.client_sim_compute_utilization = of_round(
      record.client_sim_compute_s, record.sim_round_time_s)
  if measured:
    record.compute_utilization, record.client_compute_utilization = of_round(
        record.client_compute_s, record.round_time_s)


def of_run(rounds: Iterable[records.RoundRecord], measured: bool) -> float | None:
  """A run's utilisation on one clock: all the training of its clients (every client that
  reported a training time, counted once per update) / their number x the run's wall time,
  at most 1 (a late update may outlast the run)."""
  compute = wall = 0.0
  clients = set()
  for r in rounds:
    per_client = r.client_compute_s if measured else r.client_sim_compute_s
    round_s = r.round_time_s if measured else r.sim_round_time_s
    utilization = r.compute_utilization if measured else r.sim_compute_utilization
    if per_client and _finite(round_s) and utilization is not None:
      compute += sum(per_client.values())
      wall += round_s
      clients.update(str(k) for k in per_client)
  return min(compute / (len(clients) * wall), 1.0) if wall > 0 else None
