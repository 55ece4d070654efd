"""Simulated wall clock: how long a round would take on the clients' own hardware and links.

The simulation trains clients one after another on this host, so its measured time says nothing of
a federation whose organisations train at the same time on their own GPUs. Every report is
instead timed under its client's profile (`fedjax_pt.federated.profiles`):

    client time = latency + download bytes / downlink + compute + latency + upload bytes / uplink

compute being the client's tokens / tokens_per_s, or its measured compute time here when the
profile gives no throughput; a link without a bandwidth costs no time. A synchronisation lasts
until its slowest included client arrives, or until `fl.round_deadline_s` if the server waited for
a client that came later (that client is left out, as `late`); retries and streaming fragments'
synchronisations follow one another. The server's own work (decoding, averaging, the outer step)
is measured here and added: `sim_round_time_s` in the round records, `sim_wall_time_s` their
running sum.
"""

from collections.abc import Iterable

from fedjax_pt.federated.profiles import ClientProfile

_IDEAL = ClientProfile()


def transfer_s(num_bytes: int, mbps: float | None) -> float:
  """Seconds to move `num_bytes` over a link of `mbps` Mbit/s (none: no time)."""
  return num_bytes * 8 / (mbps * 1e6) if mbps else 0.0


def client_time_s(profile: ClientProfile | None, download_bytes: int, upload_bytes: int,
                  num_tokens: int, measured_compute_s: float) -> float:
  """From the server sending the model to it receiving the client's update."""
  p = profile or _IDEAL
  compute = num_tokens / p.tokens_per_s if p.tokens_per_s else measured_compute_s
  return (2 * p.latency_ms / 1e3 + transfer_s(download_bytes, p.downlink_mbps) + compute +
          transfer_s(upload_bytes, p.uplink_mbps))


def wait_s(included: Iterable[float], any_late: bool, deadline_s: float) -> float:
  """How long the server waits in one attempt of a synchronisation: for its slowest included
  client, or until the deadline when a client it waited for never came in time."""
  slowest = max(included, default=0.0)
  return max(slowest, deadline_s) if any_late and deadline_s else slowest
