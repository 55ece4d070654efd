"""Compute utilisation: the share of the wall time that the clients spend training.

A client's utilisation in a round is its training time / the round's wall time; the round's is the
mean over the clients whose update arrived, Σ compute_k / (n × wall). A synchronous round pays
for its slowest client, its transfers and the server's work with everybody's idle time, which is
what overlapped and quorum rounds hide (INTELLECT-1 reports 83-96% across continents).

Two clocks give two utilisations (`records.RoundRecord`):
- simulated, in every federated run: `client_sim_compute_s` / `sim_round_time_s`;
- measured, where clients train in parallel on their own hosts (a deployment):
  `client_compute_s` / `round_time_s`. The simulation trains its clients one after another on
  this host, so its measured times make no utilisation.
Over a run (`summaries.RunSummary`): Σ over rounds of Σ compute_k / Σ over rounds of n × wall.
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
  per_client = {k: c / wall_s for k, c in compute_s.items()}
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
  """A run's utilisation on one clock: all clients' training time / the clients' wall time."""
  compute = wall = 0.0
  for r in rounds:
    per_client = r.client_compute_s if measured else r.client_sim_compute_s
    round_s = r.round_time_s if measured else r.sim_round_time_s
    utilization = r.compute_utilization if measured else r.sim_compute_utilization
    if per_client and _finite(round_s) and utilization is not None:
      compute += sum(per_client.values())
      wall += len(per_client) * round_s
  return compute / wall if wall > 0 else None
