"""Simulated wall clock: how long a round would take on the clients' own hardware and links.

The simulation trains clients one after another on this host, so its measured time says nothing of
a federation whose organisations train at the same time on their own GPUs. Every report is
instead timed under its client's profile (`fedjax_pt.federated.profiles`):

    client time = fl.clock.round_trip_s + latency + download bytes / downlink + compute
                  + latency + upload bytes / uplink
                  + (download + upload bytes) / fl.clock.transport_mbps

compute being the client's tokens / tokens_per_s, or its measured compute time here when the
profile gives no throughput; a link without a bandwidth costs no time. `fl.clock` is what a
deployment adds to every client's round trip (both 0 by default: the ideal transport): a fixed
time (dispatch, polling, a fresh ClientApp process, its build) and a rate at which the transport
itself moves the bytes, charged in series with the link (Flower's SuperLink stores and forwards
every message; measured, the two partly overlap, which the fitted rate absorbs).
`python -m benchmarks.deploy_clock --calibrate` fits both for Flower on a machine.

A synchronisation lasts until its slowest included client arrives, or until `fl.round_deadline_s`
if the server waited for a client that came later (that client is left out, as `late`); retries
and streaming fragments' synchronisations follow one another. The server's own work is measured
here and added: decoding, averaging, the outer step, the evaluation of the new model and the
blocking part of the previous round's checkpoint (`server_time_s`). `sim_round_time_s` in the
round records, `sim_wall_time_s` their running sum.
"""

from collections.abc import Iterable
import dataclasses
import math

import ml_collections

from fedjax_pt.federated.profiles import ClientProfile

_IDEAL = ClientProfile()


@dataclasses.dataclass(frozen=True)
class ClockConfig:
  """`fl.clock`: what the transport adds to every client's round trip (0: nothing)."""
  round_trip_s: float = 0.0  # fixed seconds per round trip, whatever the bytes
  transport_mbps: float = 0.0  # Mbit/s at which the transport moves the bytes (0: no time)

  def __post_init__(self):
    for name in ('round_trip_s', 'transport_mbps'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
          math.isfinite(value) and value >= 0):
        raise ValueError(f'fl.clock.{name} must be a finite number >= 0 (0: none), got '
                         f'{value!r}')

  @classmethod
  def from_config(cls, clock: ml_collections.ConfigDict | None) -> 'ClockConfig':
    if clock is None:
      return cls()
    unknown = sorted(set(clock) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f'fl.clock has unknown key {unknown[0]!r}; known: round_trip_s, '
                       'transport_mbps')
    return cls(**{k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
                  for k, v in clock.to_dict().items()})


def transfer_s(num_bytes: int, mbps: float | None) -> float:
  """Seconds to move `num_bytes` over a link of `mbps` Mbit/s (none: no time)."""
  return num_bytes * 8 / (mbps * 1e6) if mbps else 0.0


def communication_s(download_bytes: int, upload_bytes: int, downlink_mbps: float | None,
                    uplink_mbps: float | None, latency_s: float,
                    clock: ClockConfig = ClockConfig()) -> float:
  """A client's round trip less its compute: what the clock and the planner charge a message."""
  return (clock.round_trip_s + 2 * latency_s + transfer_s(download_bytes, downlink_mbps) +
          transfer_s(upload_bytes, uplink_mbps) +
          transfer_s(download_bytes + upload_bytes, clock.transport_mbps))


def compute_s(profile: ClientProfile | None, num_tokens: int, measured_compute_s: float) -> float:
  """A client's training time on its own hardware: its profile's throughput, else as measured."""
  p = profile or _IDEAL
  return num_tokens / p.tokens_per_s if p.tokens_per_s else measured_compute_s


def one_way_s(num_bytes: int, mbps: float | None, latency_s: float,
              clock: ClockConfig = ClockConfig()) -> float:
  """One message's share of `communication_s`: half the transport's fixed cost, the latency,
  the link and the transport's rate."""
  return (clock.round_trip_s / 2 + latency_s + transfer_s(num_bytes, mbps) +
          transfer_s(num_bytes, clock.transport_mbps))


def overlapped_client_time_s(ready_s: float, profile: ClientProfile | None, upload_bytes: int,
                             compute: float, clock: ClockConfig = ClockConfig()) -> float:
  """fl.overlap: when a client's update arrives, from the round's start, if it could start
  training at `ready_s` (before the broadcast: negative) and trains for `compute` seconds."""
  p = profile or _IDEAL
  return ready_s + compute + one_way_s(upload_bytes, p.uplink_mbps, p.latency_ms / 1e3, clock)


def client_time_s(profile: ClientProfile | None, download_bytes: int, upload_bytes: int,
                  num_tokens: int, measured_compute_s: float,
                  clock: ClockConfig = ClockConfig()) -> float:
  """From the server sending the model to it receiving the client's update."""
  p = profile or _IDEAL
  compute = compute_s(p, num_tokens, measured_compute_s)
  return compute + communication_s(download_bytes, upload_bytes, p.downlink_mbps, p.uplink_mbps,
                                   p.latency_ms / 1e3, clock)


def wait_s(included: Iterable[float], any_late: bool, deadline_s: float) -> float:
  """How long the server waits in one attempt of a synchronisation: for its slowest included
  client, or until the deadline when a client it waited for never came in time."""
  # Never below 0: with fl.overlap every update may have arrived before the round began.
  slowest = max(max(included, default=0.0), 0.0)
  return max(slowest, deadline_s) if any_late and deadline_s else slowest


@dataclasses.dataclass
class OverlapPipeline:
  """fl.overlap on the simulated clock, per synchronisation (a round, or with streaming fragments
  a segment of one). A client that took part in the previous synchronisation starts this one as
  soon as it has finished training for that one and holds what it merges at its end (the global
  model or fragment that came with it; `client_round`), which may be before the server's
  broadcast: times are from the start of the synchronisation, negative before it. Any other
  client starts when the broadcast has reached it, as in a synchronous round.

  The server's evaluation and checkpoint (`accounting.with_server_work`) are not subtracted,
  which shortens no round. The pipeline lives in memory: a resumed run times its first
  synchronisation as a synchronous one.
  """
  sync: int = -1  # the synchronisation `carried` came from
  carried: dict[int, tuple[float, float]] = dataclasses.field(default_factory=dict)
  pending: dict[int, tuple[float, float]] = dataclasses.field(default_factory=dict)

  def ready_s(self, client: int, sync: int, received_s: float) -> float:
    """When `client` can start training in synchronisation `sync` (numbered through the run);
    `received_s`: when this synchronisation's broadcast reaches it."""
    if self.sync == sync - 1 and client in self.carried:
      return max(self.carried[client])
    return received_s

  def trained(self, client: int, end_s: float, received_s: float) -> None:
    """`client` finished training at `end_s` and received this sync's broadcast at `received_s`."""
    self.pending[client] = (end_s, received_s)

  def sync_ended(self, sync: int, duration_s: float) -> None:
    """Synchronisation `sync` lasted `duration_s`: the next one starts then."""
    self.carried = {k: (end - duration_s, received - duration_s)
                    for k, (end, received) in self.pending.items()}
    self.sync, self.pending = sync, {}
