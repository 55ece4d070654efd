"""The bookkeeping of a round: what the server counts while it synchronises (`Tally`, `Sync`),
and what it hands the run afterwards (`RoundResult` with its typed `FederatedStats`).

Every field of `FederatedStats` is a `records.RoundRecord` field of the same name and meaning, so
a round record is its statistics plus what the run adds (totals, validation, timing).
"""

import dataclasses
import math
from typing import Any

from fedjax_pt import records
from fedjax_pt.federated import aggregation
from fedjax_pt.federated import robust as robust_lib


@dataclasses.dataclass
class FederatedStats:
  """A federated round's record fields (see `records.RoundRecord`)."""
  clients: list[int]
  num_aggregated: int
  retries: int
  skipped: bool
  failed_clients: dict[Any, str]
  client_download_bytes: dict[int, int]
  client_upload_bytes: dict[int, int]
  peak_sync_bytes: int
  compression_ratio: float | None
  sim_round_time_s: float
  server_time_s: float
  client_sim_time_s: dict[int, float]
  client_compute_s: dict[int, float]
  client_sim_compute_s: dict[int, float]
  client_local_steps: dict[int, int]
  client_train_loss: dict[int, float | None]
  client_grad_norm: dict[int, float | None]
  client_update_norm: dict[int, float | None]
  client_norm: dict[int, float]
  client_delta_norm: dict[int, float]
  outer_momentum_norm: float | None = None
  absent_clients: list[int] | None = None
  unavailable_clients: dict[int, str] | None = None
  refused_nodes: dict[int, str] | None = None
  dp_clipped_clients: int | None = None
  secagg_clipped_values: int | None = None
  mean_client_norm: float | None = None
  pseudo_grad_norm: float | None = None
  outer_update_norm: float | None = None
  pseudo_grad_norm_per_module: dict[str, float] | None = None
  robust_trimmed_values: dict[int, float] | None = None
  robust_clipped_clients: dict[int, float] | None = None
  late_clients: dict[int, float] | None = None
  stale_clients: dict[int, int] | None = None


@dataclasses.dataclass
class RoundResult:
  """What a round did, before evaluation: the run adds totals, validation and timing."""
  tokens: int
  stats: Any  # FederatedStats, or the centralized baseline's `centralized.CentralizedStats`
  bytes_sent: int = 0
  bytes_received: int = 0
  train_loss: float | None = None
  steps: list[records.StepRecord] = dataclasses.field(default_factory=list)
  aggregated: bool = True  # the global model moved (False: the round was skipped)
  synchronisations: int = 0  # that moved the model: with fl.dp, the mechanisms released


@dataclasses.dataclass
class Sync:
  """What the server has of one synchronisation so far."""
  average: aggregation.RunningAverage = dataclasses.field(
      default_factory=aggregation.RunningAverage)
  sampled: set[int] = dataclasses.field(default_factory=set)
  aggregated: set[int] = dataclasses.field(default_factory=set)
  bytes: int = 0  # both ways, all clients
  arrivals: list[float] = dataclasses.field(default_factory=list)  # this attempt, in sim time
  # fl.quorum: the updates waiting for the close, and those that missed it (`quorum`).
  candidates: list[Any] = dataclasses.field(default_factory=list)
  still_late: list[Any] = dataclasses.field(default_factory=list)
  late: bool = False  # this attempt waited for a client until fl.round_deadline_s
  index: int = 0  # the run's synchronisation number (fl.overlap's clock)


_PER_CLIENT = ('client_train_loss', 'client_grad_norm', 'client_update_norm', 'client_norm',
               'client_delta_norm')
_MODEL_NORMS = ('client_norm', 'client_delta_norm')  # combined over fragments, not averaged
_SQUARED = ('mean_client_norm', 'pseudo_grad_norm', 'outer_update_norm')


@dataclasses.dataclass
class Tally:
  """What the server has seen of a round so far (over its synchronisations)."""
  absent: frozenset[int] = frozenset()  # clients that did not show up (profile availability)
  unavailable: dict[int, str] = dataclasses.field(default_factory=dict)  # client -> why
  refused: dict[int, str] = dataclasses.field(default_factory=dict)  # node id -> why
  sampled: set[int] = dataclasses.field(default_factory=set)
  failed: dict[Any, str] = dataclasses.field(default_factory=dict)
  tokens: int = 0
  download: dict[int, int] = dataclasses.field(default_factory=dict)
  upload: dict[int, int] = dataclasses.field(default_factory=dict)
  uncompressed: int = 0
  steps: list[records.StepRecord] = dataclasses.field(default_factory=list)
  retries: int = 0
  num_aggregated: float = math.inf  # the fewest clients any synchronisation averaged
  skipped: bool = False  # some synchronisation was skipped
  synced: int = 0  # synchronisations that moved the model
  peak_sync_bytes: int = 0
  dp_clipped: int = 0  # deltas the server clipped (fl.dp.noise_at='server')
  secagg_clipped: int = 0  # delta values the clients clipped to ±fl.secagg.clip_range
  # fl.aggregation: per client, (values the coordinate-wise rule dropped, values it saw), and the
  # smallest scale norm_clipped multiplied its delta by, over the round's synchronisations.
  trimmed: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
  clipped: dict[int, float] = dataclasses.field(default_factory=dict)
  # fl.quorum: clients whose update missed the close (-> its simulated arrival), and late updates
  # of earlier rounds averaged in this one (-> their staleness in rounds).
  late: dict[int, float] = dataclasses.field(default_factory=dict)
  stale: dict[int, int] = dataclasses.field(default_factory=dict)
  secure_losses: list[tuple[float, int]] = dataclasses.field(default_factory=list)  # (mean, n)
  sim_s: float = 0.0  # simulated time the server waited for clients (`sim_clock`)
  server_s: float = 0.0  # measured time of the server's own work
  sim_times: dict[int, float] = dataclasses.field(default_factory=dict)  # per client, simulated
  # Per client, training time: measured on its host, and as the simulated clock charges it.
  compute: dict[int, float] = dataclasses.field(default_factory=dict)
  sim_compute: dict[int, float] = dataclasses.field(default_factory=dict)
  local_steps: dict[int, int] = dataclasses.field(default_factory=dict)
  # Norms of the round's model-sized quantities, summed as squares over its fragments.
  squares: dict[str, float] = dataclasses.field(
      default_factory=lambda: {key: 0.0 for key in _SQUARED})
  module_squares: dict[str, float] = dataclasses.field(default_factory=dict)
  # Per client and synchronisation; losses and gradient norms are averaged over the round's
  # segments (of equal length), model norms combined over its fragments.
  per_client: dict[str, dict[int, list[float | None]]] = dataclasses.field(
      default_factory=lambda: {key: {} for key in _PER_CLIENT})

  def moved(self, client: int, download: int, upload: int, uncompressed: int,
            sync: Sync) -> None:
    """Bytes to and from `client` in this synchronisation, as encoded and as float32."""
    self.download[client] = self.download.get(client, 0) + download
    if upload:
      self.upload[client] = self.upload.get(client, 0) + upload
    self.uncompressed += uncompressed
    sync.bytes += download + upload

  def arrived(self, client: int, sim_time_s: float, local_steps: int,
              compute_s: float | None = None, sim_compute_s: float | None = None) -> None:
    """A client's update arrived: its simulated round trip and, where known (not inside a secure
    sum), its training time, measured and simulated."""
    self.sim_times[client] = self.sim_times.get(client, 0.0) + sim_time_s
    self.local_steps[client] = self.local_steps.get(client, 0) + local_steps
    if compute_s is not None:
      self.compute[client] = self.compute.get(client, 0.0) + compute_s
      self.sim_compute[client] = self.sim_compute.get(client, 0.0) + sim_compute_s

  def fail(self, client: int, attempt: int, fragment: int, fragments: int, reason: str) -> None:
    key = client if not attempt else f'{client}@{attempt}'
    self.failed[key if fragments == 1 else f'{key}#{fragment}'] = reason

  def client_values(self, client: int, **values: float | None) -> None:
    """One synchronisation's per-client numbers (keys of `_PER_CLIENT`)."""
    for key, value in values.items():
      self.per_client[key].setdefault(client, []).append(value)

  def ended(self, sync: Sync, attempt: int) -> None:
    """A synchronisation is over (aggregated or skipped) after `attempt` retries."""
    self.retries = max(self.retries, attempt)
    self.num_aggregated = min(self.num_aggregated, sync.average.count)
    self.peak_sync_bytes = max(self.peak_sync_bytes, sync.bytes)

  def robust(self, trimmed: dict[int, tuple[int, int]], clipped: dict[int, float]) -> None:
    """What a synchronisation's robust rule (`robust`) did to each client: (values dropped,
    values) and the scale of each clipped delta."""
    robust_lib.combine(self.trimmed, trimmed)
    for k, scale in clipped.items():
      self.clipped[k] = min(scale, self.clipped.get(k, 1.0))

  def add_squares(self, **norms: float) -> None:
    for key, value in norms.items():
      self.squares[key] += float(value) ** 2  # float(): waits for the step, which is timed

  def train_loss(self) -> float | None:
    """The mean of the aggregated clients' losses (a secure sum counts as its clients)."""
    losses = [_mean(v) for v in self.per_client['client_train_loss'].values()]
    losses += [loss for loss, count in self.secure_losses for _ in range(count)]
    return sum(losses) / len(losses) if losses else None

  def stats(self, outer_momentum_norm: float, dp_clipping: bool = False,
            secagg: bool = False, aggregation: str = 'mean',
            quorum: bool = False) -> FederatedStats:
    sent = sum(self.download.values()) + sum(self.upload.values())
    per_client = {key: {k: (_norm if key in _MODEL_NORMS else _mean)(v)
                        for k, v in sorted(by_client.items())}
                  for key, by_client in self.per_client.items()}
    synced = {k: math.sqrt(v) for k, v in self.squares.items()} if self.synced else {}
    return FederatedStats(
        clients=sorted(self.sampled), num_aggregated=int(self.num_aggregated),
        retries=self.retries, skipped=self.skipped, failed_clients=self.failed,
        client_download_bytes=dict(self.download), client_upload_bytes=dict(self.upload),
        peak_sync_bytes=self.peak_sync_bytes,
        compression_ratio=self.uncompressed / sent if sent else None,
        sim_round_time_s=self.sim_s + self.server_s, server_time_s=self.server_s,
        client_sim_time_s=dict(sorted(self.sim_times.items())),
        client_compute_s=dict(sorted(self.compute.items())),
        client_sim_compute_s=dict(sorted(self.sim_compute.items())),
        client_local_steps=dict(sorted(self.local_steps.items())),
        outer_momentum_norm=outer_momentum_norm,
        absent_clients=sorted(self.absent) if self.absent else None,
        unavailable_clients=dict(sorted(self.unavailable.items())) or None,
        refused_nodes=dict(sorted(self.refused.items())) or None,
        dp_clipped_clients=self.dp_clipped if dp_clipping else None,
        secagg_clipped_values=self.secagg_clipped if secagg else None,
        pseudo_grad_norm_per_module=({k: math.sqrt(v) for k, v in self.module_squares.items()}
                                     if self.module_squares else None),
        robust_trimmed_values=({k: dropped / values for k, (dropped, values) in
                                sorted(self.trimmed.items()) if dropped}
                               if aggregation in robust_lib.COORDINATE_WISE else None),
        robust_clipped_clients=(dict(sorted(self.clipped.items()))
                                if aggregation == 'norm_clipped' else None),
        late_clients=dict(sorted(self.late.items())) if quorum else None,
        stale_clients=dict(sorted(self.stale.items())) if quorum else None,
        **per_client, **synced)


def _mean(values: list[float | None]) -> float | None:
  return None if None in values else sum(values) / len(values)


def _norm(values: list[float]) -> float:
  """The norm of a tree from the norms of its parts (one part: itself, exactly)."""
  return math.sqrt(sum(v * v for v in values))
