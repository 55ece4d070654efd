"""The round as one object, in the style of fedjax's `FederatedAlgorithm(init, apply)`.

    algorithm = FederatedAlgorithm(fl, faults, seed)
    state = algorithm.init(params)
    state, result = algorithm.apply(state, round_idx, clients)

`clients` is anything with `train(params, round_idx, client_ids, attempt, segment)` that yields
one `ClientReport` per client: the in-process simulation (`fedjax_pt.simulation`), or nodes of a
real federation. Everything between "the server holds θ" and "the server holds the next θ" happens
in `apply`, each step in the module named after it: which clients train (`sampling`), which parts
of the model are synchronised when (`fragments`), how the clients' deltas travel (`compression`:
the server decodes them here), which updates are left out (`faults`), how the rest are weighted
and averaged (`aggregation`; with `fl.dp` clipped and noised, `privacy`; with `fl.secagg` they
arrive already summed, as one `SecureSum`) and the outer optimizer step (`server`). Clients may differ
(`profiles`: local work, links, availability); every round is also timed as if they trained at
the same time on their own hardware (`sim_clock`). The centralized baseline
is a `CentralizedAlgorithm` with the same `init`/`apply`, so the run has one loop for both modes.
"""

from collections.abc import Collection, Iterator, Sequence
import dataclasses
import math
import time
from typing import Any, Protocol

from absl import logging
import flax.struct
import jax

from fedjax_pt.federated import aggregation
from fedjax_pt import local_training
from fedjax_pt.federated import compression
from fedjax_pt.federated import faults as faults_lib
from fedjax_pt.federated import fragments as fragments_lib
from fedjax_pt import metrics
from fedjax_pt import optimizers
from fedjax_pt.federated import privacy
from fedjax_pt.federated import profiles as profiles_lib
from fedjax_pt import records
from fedjax_pt.federated import sampling
from fedjax_pt.federated import server as server_lib
from fedjax_pt.federated import sim_clock


@dataclasses.dataclass
class ClientReport:
  """What the server learns from one client in one synchronisation (a round, or with streaming
  fragments one segment of it).

  `update` is the client's message as the server received it: its delta theta_k - theta (of the
  segment's fragment), encoded by `fedjax_pt.federated.compression`; None when nothing arrived (the client
  crashed or never answered). `failure` is the client's own error, if it reported one.
  """
  client: int
  update: Any | None
  num_tokens: int = 0  # tokens the client trained on
  num_examples: int = 0  # the size of its training set, in tokens
  mean_loss: float | None = None
  last_loss: float | None = None
  mean_grad_norm: float | None = None
  mean_update_norm: float | None = None
  steps: list[records.StepRecord] = dataclasses.field(default_factory=list)
  failure: str | None = None
  injected: bool = False  # the failure was injected on purpose (fl.fault.*)
  lost: bool = False  # nothing came back (node gone, crashed or late): a fault, not a bug
  elapsed_s: float = 0.0  # from sending the model to receiving the report
  compute_s: float | None = None  # of that, training (None: unknown, all of it)
  local_steps: int = 0  # local steps the client trained
  download_bytes: int = 0  # server -> client, as encoded on the wire
  upload_bytes: int = 0  # client -> server, as encoded on the wire
  uncompressed_bytes: int = 0  # the same messages, both ways, as plain float32 arrays


@dataclasses.dataclass
class SecureSum:
  """What the server learns from a secure aggregation (`fl.secagg`): the uniform mean of the
  deltas of `clients`, never one of them, plus what each client says in the clear (its tokens,
  local steps and the bytes it moved; no loss, no norm: only their mean loss).

  `update` is the mean as a payload (codec 'none') of the parameters' shapes."""
  clients: list[int]
  update: Any
  num_tokens: int = 0
  local_steps: dict[int, int] = dataclasses.field(default_factory=dict)
  download_bytes: dict[int, int] = dataclasses.field(default_factory=dict)
  upload_bytes: dict[int, int] = dataclasses.field(default_factory=dict)
  uncompressed_bytes: int = 0
  elapsed_s: float = 0.0
  clipped_values: int = 0  # delta values outside ±fl.secagg.clip_range, all clients
  mean_loss: float | None = None  # the clients' mean training loss, summed securely too


class Clients(Protocol):
  """The clients of a federation, as the round object sees them."""

  def train(self, params: Any, round_idx: int, client_ids: Sequence[int], attempt: int,
            segment: fragments_lib.Segment) -> Iterator[ClientReport | SecureSum]:
    """Each client trains `segment.steps` local steps and reports its delta of
    `segment.fragment`; reports may arrive in any order. `params` is the server's model. With
    secure aggregation, the clients whose deltas were summed come as one `SecureSum`."""

  def unavailable(self) -> Collection[int]:
    """Clients known to be unreachable now (no node connected): not sampled."""


@dataclasses.dataclass
class RoundResult:
  """What a round did, before evaluation: the run adds totals, validation and timing."""
  tokens: int
  bytes_sent: int = 0
  bytes_received: int = 0
  train_loss: float | None = None
  steps: list[records.StepRecord] = dataclasses.field(default_factory=list)
  stats: dict[str, Any] = dataclasses.field(default_factory=dict)  # mode-specific RoundRecord keys
  aggregated: bool = True  # the global model moved (False: the round was skipped)
  synchronisations: int = 0  # that moved the model: with fl.dp, the mechanisms released


class FederatedRunState(flax.struct.PyTreeNode):
  """The arrays of a federated run between rounds: what its checkpoints hold."""
  params: Any  # the global model θ
  opt_state: Any  # the outer optimizer's state (one per fragment with fl.fragments > 1)
  # What simulated clients keep across rounds: Adam states by client id ('3'); with
  # fl.compression.error_feedback their residuals ('residual_3'); with streaming fragments or
  # mixing their own models ('model_3'). One dict, so that a run without the later two has the
  # structure of older checkpoints.
  kept: dict[str, Any]


CARRIED = ('model', 'residual')  # what clients may carry besides Adam states, by name


class FederatedAlgorithm:
  """Per synchronisation: sample -> clients train -> verdicts -> weighted mean of the decoded
  deltas -> outer step, retried when too few clients are usable. A round is one synchronisation
  of the whole model, or with `fl.fragments = F` F of them, one per fragment
  (`fedjax_pt.federated.fragments`).

  A retry keeps the updates already received and tops the synchronisation up: it draws afresh,
  among the clients whose update it does not have yet, as many as `fl.clients_per_round` still
  lacks. No client is ever averaged twice in a synchronisation.
  """

  def __init__(self, fl: server_lib.FLConfig, fault_cfg: faults_lib.FaultConfig, seed: int,
               param_shardings: Any = None, per_layer_norms: bool = False):
    self.fl, self.faults, self.seed = fl, fault_cfg, seed
    self.tx = optimizers.outer_optimizer(fl.outer_optimizer, fl.outer_lr, fl.outer_momentum,
                                         fl.outer_b2, fl.outer_lr_warmup_rounds,
                                         fl.outer_momentum_warmup_rounds)
    self.schedule = fragments_lib.schedule(fl.local_steps, fl.fragments)
    self._param_shardings = param_shardings
    self._per_layer_norms = per_layer_norms
    # With fl.dp.noise_at='server' the server clips each delta it decodes.
    self._clip_at_server = fl.dp.enabled and fl.dp.noise_at == 'server'
    if fl.dp.enabled:
      logging.info('fl.dp: clip %g, noise multiplier %g, noise at the %s; epsilon at delta=%g '
                   '(%s accountant) after every round in the records', fl.dp.clip_norm,
                   fl.dp.noise_multiplier, fl.dp.noise_at, fl.dp.delta, fl.dp.accountant)
    self._assignment = None
    self._server_updates = None
    self._decoders = None

  def init(self, params) -> server_lib.ServerState:
    fl = self.fl
    self._assignment = fragments_lib.partition(params, fl.fragments)
    if fl.fragments > 1:
      logging.info('fl.fragments=%d: %s parameters per fragment', fl.fragments,
                   fragments_lib.fragment_sizes(params, self._assignment, fl.fragments))
    state = server_lib.init_server_state(params, self.tx, self._param_shardings,
                                         self._assignment, fl.fragments)
    if self._server_updates is None:
      like = state if self._param_shardings is not None else None
      fragment_ids = [None] if fl.fragments == 1 else range(fl.fragments)
      self._server_updates = [server_lib.make_server_update(self.tx, like, self._assignment, f)
                              for f in fragment_ids]
      # The server decodes a delta straight into the parameters' layout, where the average and
      # the outer step expect it.
      self._decoders = [compression.Codec(fl.compression.upload, fl.compression.block_size,
                                          self._fragment(params, f)).decode
                        for f in range(fl.fragments)]
    return state

  def _fragment(self, tree, fragment: int):
    return tree if self.fl.fragments == 1 else fragments_lib.select(tree, self._assignment,
                                                                      fragment)

  def apply(self, state: server_lib.ServerState, round_idx: int,
            clients: Clients) -> tuple[server_lib.ServerState, RoundResult]:
    tally = _Tally(absent=profiles_lib.absent(self.fl.profiles, self.seed, round_idx))
    for segment in self.schedule:
      state = self._synchronise(state, round_idx, segment, clients, tally)
    stats = tally.stats(self._clip_at_server, self.fl.secagg.enabled)
    stats['outer_momentum_norm'] = metrics.outer_momentum_norm(state.opt_state)
    losses = [_mean(v) for v in tally.per_client['client_train_loss'].values()]
    losses += [loss for loss, count in tally.secure_losses for _ in range(count)]
    return state, RoundResult(
        tokens=tally.tokens, bytes_sent=sum(tally.download.values()),
        bytes_received=sum(tally.upload.values()),
        train_loss=sum(losses) / len(losses) if losses else None, steps=tally.steps,
        stats=stats, aggregated=bool(tally.synced), synchronisations=tally.synced)

  def _synchronise(self, state: server_lib.ServerState, round_idx: int,
                   segment: fragments_lib.Segment, clients: Clients,
                   tally: '_Tally') -> server_lib.ServerState:
    """One segment: the clients train and send their deltas of the segment's fragment, which the
    server averages and steps on."""
    fl, policy = self.fl, self.faults
    sync = _Sync()
    for attempt in range(policy.max_round_retries + 1):
      ids = sampling.sample_clients(
          fl.num_clients, fl.clients_per_round - sync.average.count, self.seed, round_idx,
          attempt, exclude=sync.aggregated | set(clients.unavailable()) | tally.absent)
      tally.sampled.update(ids)
      sync.sampled.update(ids)
      raised = []  # the failures of clients that crashed on their own, sending nothing
      for report in clients.train(state.params, round_idx, ids, attempt, segment):
        if isinstance(report, SecureSum):
          raised.append(None)
          self._absorb_sum(round_idx, report, attempt, sync, tally)
          continue
        if report.update is None and report.failure and not (report.injected or report.lost):
          raised.append(report.failure)
        else:
          raised.append(None)
        absorb_start = time.perf_counter()
        self._absorb(state, round_idx, report, attempt, segment.fragment, sync, tally)
        tally.server_s += time.perf_counter() - absorb_start
      tally.sim_s += sim_clock.wait_s(sync.arrivals, sync.late, policy.round_deadline_s)
      sync.arrivals, sync.late = [], False
      if raised and all(raised):
        # Every client raised on its own: a bug or a broken setup, not a fault to tolerate (an
        # unreachable or late node is one).
        raise RuntimeError(f'round {round_idx}: every client failed: {raised[0]}')
      if sync.average.count >= policy.min_clients or policy.on_too_few_clients == 'skip' or (
          attempt == policy.max_round_retries):
        break
      logging.warning('round %d: %d of %d clients usable (< fl.min_clients=%d); retry %d',
                      round_idx, sync.average.count, len(sync.sampled), policy.min_clients,
                      attempt + 1)
    tally.retries = max(tally.retries, attempt)
    tally.num_aggregated = min(tally.num_aggregated, sync.average.count)
    tally.peak_sync_bytes = max(tally.peak_sync_bytes, sync.bytes)
    if sync.average.count < policy.min_clients:
      tally.skipped = True
      logging.warning('round %d: %s skipped: %d usable clients < fl.min_clients=%d; the global '
                      'model is unchanged', round_idx, self._what(segment),
                      sync.average.count, policy.min_clients)
      return state
    update_start = time.perf_counter()
    mean_delta = sync.average.result()
    noise_std = privacy.server_noise_std(fl.dp, fl.clients_per_round, sync.average.count)
    if noise_std:  # on the sum of the clipped deltas: std / n on their mean
      mean_delta = privacy.add_noise(
          mean_delta, noise_std / sync.average.count,
          privacy.noise_key(self.seed, round_idx, -1, segment.fragment))
    fragment = self._fragment(state.params, segment.fragment)
    tally.squares['mean_client_norm'] += float(metrics.l2_norm(
        jax.tree.map(lambda p, d: p + d, fragment, mean_delta))) ** 2
    if self._per_layer_norms:
      for name, norm in metrics.per_module_norms(
          aggregation.pseudo_gradient_of_deltas(mean_delta)).items():
        tally.module_squares[name] = tally.module_squares.get(name, 0.0) + norm ** 2
    update = self._server_updates[segment.fragment if self.fl.fragments > 1 else 0]
    state, outer = update(state, mean_delta)
    for key, value in outer.items():
      tally.squares[key] += float(value) ** 2  # float(): waits for the step, which is timed
    tally.server_s += time.perf_counter() - update_start
    tally.synced += 1
    return state

  def _what(self, segment: fragments_lib.Segment) -> str:
    return 'round' if self.fl.fragments == 1 else f'sync of fragment {segment.fragment}'

  def _absorb(self, state, round_idx: int, report: ClientReport, attempt: int, fragment: int,
              sync: '_Sync', tally: '_Tally') -> None:
    """Counts a report and, if the server accepts it, adds its decoded delta to the average."""
    k = report.client
    tally.steps += report.steps
    tally.tokens += report.num_tokens
    tally.download[k] = tally.download.get(k, 0) + report.download_bytes
    tally.uncompressed += report.uncompressed_bytes
    sync.bytes += report.download_bytes
    if report.update is not None:
      tally.upload[k] = tally.upload.get(k, 0) + report.upload_bytes
      sync.bytes += report.upload_bytes
    delta = None if report.update is None else self._decoders[fragment](report.update)
    if delta is not None and self._clip_at_server:
      delta, norm = privacy.clip(delta, self.fl.dp.clip_norm)
      tally.dp_clipped += int(float(norm) > self.fl.dp.clip_norm)
    sim_time = sim_clock.client_time_s(
        self.fl.profile(k), report.download_bytes,
        report.upload_bytes if report.update is not None else 0, report.num_tokens,
        report.elapsed_s if report.compute_s is None else report.compute_s)
    failure = report.failure or faults_lib.verdict(delta, report.elapsed_s, self.faults, sim_time)
    if delta is not None:  # it arrived (in time or not): the server knows when
      tally.sim_times[k] = tally.sim_times.get(k, 0.0) + sim_time
      tally.local_steps[k] = tally.local_steps.get(k, 0) + report.local_steps
      if failure and failure.startswith('late: simulated'):
        sync.late = True
      else:
        sync.arrivals.append(sim_time)
    if failure:
      if not report.failure:
        logging.warning('round %d: client %d %s; left out of the average', round_idx, k, failure)
      key = k if not attempt else f'{k}@{attempt}'
      tally.failed[key if self.fl.fragments == 1 else f'{key}#{fragment}'] = failure
      return
    sync.average.add(delta, aggregation.client_weight(
        self.fl.weighting, report.num_tokens, report.num_examples))
    sync.aggregated.add(k)
    per_client = tally.per_client
    for key, value in (('client_train_loss', report.mean_loss),
                       ('client_grad_norm', report.mean_grad_norm),
                       ('client_update_norm', report.mean_update_norm)):
      per_client[key].setdefault(k, []).append(value)
    model = jax.tree.map(lambda p, d: p + d, self._fragment(state.params, fragment), delta)
    per_client['client_norm'].setdefault(k, []).append(float(metrics.l2_norm(model)))
    per_client['client_delta_norm'].setdefault(k, []).append(float(metrics.l2_norm(delta)))

  def _absorb_sum(self, round_idx: int, report: SecureSum, attempt: int, sync: '_Sync',
                  tally: '_Tally') -> None:
    """Counts a secure aggregate and, if it is finite and in time, adds it to the average with
    the weight of the clients it sums (one diverged client spoils the sum: it cannot be told
    apart)."""
    tally.tokens += report.num_tokens
    tally.uncompressed += report.uncompressed_bytes
    tally.secagg_clipped += report.clipped_values
    for k in report.download_bytes:  # every client in the protocol, diverged ones too
      tally.download[k] = tally.download.get(k, 0) + report.download_bytes[k]
      tally.upload[k] = tally.upload.get(k, 0) + report.upload_bytes.get(k, 0)
      tally.local_steps[k] = tally.local_steps.get(k, 0) + report.local_steps.get(k, 0)
      tally.sim_times[k] = tally.sim_times.get(k, 0.0) + report.elapsed_s
    sync.bytes += sum(report.download_bytes.values()) + sum(report.upload_bytes.values())
    mean = self._decoders[0](report.update)
    failure = faults_lib.verdict(mean, report.elapsed_s, self.faults)
    if failure:
      logging.warning('round %d: the secure sum of clients %s has %s; left out', round_idx,
                      report.clients, failure)
      for k in report.clients:
        tally.failed[k if not attempt else f'{k}@{attempt}'] = f'secure sum: {failure}'
      return
    sync.arrivals.append(report.elapsed_s)
    # Equal clients: the mean of the sum, weighted as its clients together.
    sync.average.add(mean, float(len(report.clients)), count=len(report.clients))
    sync.aggregated.update(report.clients)
    if report.mean_loss is not None:
      tally.secure_losses.append((report.mean_loss, len(report.clients)))

  def run_state(self, state: server_lib.ServerState, kept: dict[int, Any],
                carried: dict[str, dict[int, Any]] | None = None) -> FederatedRunState:
    """The checkpoint's arrays: the server's state, and what the simulated clients keep."""
    flat = {str(k): v for k, v in kept.items()}
    for name, by_client in (carried or {}).items():
      flat.update({f'{name}_{k}': v for k, v in by_client.items()})
    return FederatedRunState(state.params, state.opt_state, flat)

  def from_run_state(self, run_state: FederatedRunState, round_idx: int
                     ) -> tuple[server_lib.ServerState, dict[int, Any], dict[str, dict[int, Any]]]:
    state = server_lib.ServerState(params=run_state.params, opt_state=run_state.opt_state,
                                   round=round_idx)
    kept, carried = {}, {name: {} for name in CARRIED}
    for key, value in run_state.kept.items():
      name, _, k = key.rpartition('_')
      (carried[name] if name else kept)[int(k)] = value
    return state, kept, carried


def _mean(values: list[float | None]) -> float | None:
  return None if None in values else sum(values) / len(values)


def _norm(values: list[float]) -> float:
  """The norm of a tree from the norms of its parts (one part: itself, exactly)."""
  return math.sqrt(sum(v * v for v in values))


@dataclasses.dataclass
class _Sync:
  """What the server has of one synchronisation so far."""
  average: aggregation.RunningAverage = dataclasses.field(
      default_factory=aggregation.RunningAverage)
  sampled: set[int] = dataclasses.field(default_factory=set)
  aggregated: set[int] = dataclasses.field(default_factory=set)
  bytes: int = 0  # both ways, all clients
  arrivals: list[float] = dataclasses.field(default_factory=list)  # this attempt, in sim time
  late: bool = False  # this attempt waited for a client until fl.round_deadline_s


@dataclasses.dataclass
class _Tally:
  """What the server has seen of a round so far (over its synchronisations)."""
  absent: frozenset[int] = frozenset()  # clients that did not show up (profile availability)
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
  secure_losses: list[tuple[float, int]] = dataclasses.field(default_factory=list)  # (mean, n)
  sim_s: float = 0.0  # simulated time the server waited for clients (`sim_clock`)
  server_s: float = 0.0  # measured time of the server's own work
  sim_times: dict[int, float] = dataclasses.field(default_factory=dict)  # per client, simulated
  local_steps: dict[int, int] = dataclasses.field(default_factory=dict)
  # Norms of the round's model-sized quantities, summed as squares over its fragments.
  squares: dict[str, float] = dataclasses.field(default_factory=lambda: {
      key: 0.0 for key in ('mean_client_norm', 'pseudo_grad_norm', 'outer_update_norm')})
  module_squares: dict[str, float] = dataclasses.field(default_factory=dict)
  # Per client and synchronisation; losses and gradient norms are averaged over the round's
  # segments (of equal length), model norms combined over its fragments.
  per_client: dict[str, dict[int, list[float]]] = dataclasses.field(default_factory=lambda: {
      key: {} for key in ('client_train_loss', 'client_grad_norm', 'client_update_norm',
                          'client_norm', 'client_delta_norm')})

  def stats(self, dp_clipping: bool = False, secagg: bool = False) -> dict[str, Any]:
    sent = sum(self.download.values()) + sum(self.upload.values())
    stats = dict(clients=sorted(self.sampled), num_aggregated=int(self.num_aggregated),
                 retries=self.retries, failed_clients=self.failed,
                 client_download_bytes=dict(self.download), client_upload_bytes=dict(self.upload),
                 skipped=self.skipped, peak_sync_bytes=self.peak_sync_bytes,
                 compression_ratio=self.uncompressed / sent if sent else None,
                 sim_round_time_s=self.sim_s + self.server_s, server_time_s=self.server_s,
                 client_sim_time_s=dict(sorted(self.sim_times.items())),
                 client_local_steps=dict(sorted(self.local_steps.items())))
    if self.absent:
      stats['absent_clients'] = sorted(self.absent)
    if dp_clipping:
      stats['dp_clipped_clients'] = self.dp_clipped
    if secagg:
      stats['secagg_clipped_values'] = self.secagg_clipped
    for key, by_client in self.per_client.items():
      combine = _norm if key in ('client_norm', 'client_delta_norm') else _mean
      stats[key] = {k: combine(v) for k, v in sorted(by_client.items())}
    if self.synced:
      stats.update({k: math.sqrt(v) for k, v in self.squares.items()})
    if self.module_squares:
      stats['pseudo_grad_norm_per_module'] = {k: math.sqrt(v)
                                              for k, v in self.module_squares.items()}
    return stats


class CentralizedClient(Protocol):
  def train(self, state: local_training.LocalState,
            round_idx: int) -> tuple[local_training.LocalState, ClientReport]:
    """`fl.local_steps` steps from `state` on the union of the clients' data."""


class CentralizedAlgorithm:
  """The baseline: the same local recipe on the union of the clients' data, one "round" per
  `fl.local_steps` steps, the optimizer state carried across rounds."""

  def __init__(self, trainer: local_training.Trainer):
    self._trainer = trainer

  def init(self, params) -> local_training.LocalState:
    return self._trainer.init(params, 0)

  def apply(self, state: local_training.LocalState, round_idx: int,
            clients: CentralizedClient) -> tuple[local_training.LocalState, RoundResult]:
    state, report = clients.train(state, round_idx)
    return state, RoundResult(
        tokens=report.num_tokens, train_loss=report.mean_loss, steps=report.steps,
        stats={'grad_norm': report.mean_grad_norm, 'update_norm': report.mean_update_norm,
               'sim_round_time_s': report.compute_s})

  def run_state(self, state: local_training.LocalState, kept: dict[int, Any],
                carried: dict[str, dict[int, Any]] | None = None) -> local_training.LocalState:
    del kept, carried  # no clients
    return state

  def from_run_state(self, run_state: local_training.LocalState, round_idx: int
                     ) -> tuple[local_training.LocalState, dict[int, Any], dict[str, dict[int, Any]]]:
    del round_idx
    return run_state, {}, {}
