"""The round as one object, in the style of fedjax's `FederatedAlgorithm(init, apply)`.

    algorithm = FederatedAlgorithm(fl, faults, seed)
    state = algorithm.init(params)
    state, result = algorithm.apply(state, round_idx, clients)

`clients` is anything that implements `Clients`: the in-process simulation
(`fedjax_pt.simulation`) or the nodes of a Flower federation (`fedjax_pt.deploy.fleet`); both run
the client's side of a synchronisation with `client_round`. Everything between "the server holds
θ" and "the server holds the next θ" happens in `apply`, each step in the module named after it:
which clients train (`sampling`), which parts of the model are synchronised when (`fragments`),
what the server sends (`messages.Broadcast`, encoded once with `compression`) and how it decodes
the deltas, which updates are left out (`faults`), how the rest are weighted and averaged
(`aggregation`, or with a robust `fl.aggregation` trimmed, medianed or norm-clipped, `robust`;
with `fl.dp` clipped and noised, `privacy`; with `fl.secagg` they arrive already
summed, as one `SecureSum`) and the outer optimizer step (`server`). Clients may differ
(`profiles`); every round is also timed as if they trained at the same time on their own hardware
(`sim_clock`). What the server counts along the way is `tally`.
"""

from collections.abc import Collection, Iterator, Mapping, Sequence
import dataclasses
import time
from typing import Any, Protocol

from absl import logging
import jax

from fedjax_pt import errors
from fedjax_pt import metrics
from fedjax_pt import optimizers
from fedjax_pt.federated import aggregation
from fedjax_pt.federated import compression
from fedjax_pt.federated import faults as faults_lib
from fedjax_pt.federated import fragments as fragments_lib
from fedjax_pt.federated import privacy
from fedjax_pt.federated import profiles as profiles_lib
from fedjax_pt.federated import quorum as quorum_lib
from fedjax_pt.federated import robust
from fedjax_pt.federated import sampling
from fedjax_pt.federated import server as server_lib
from fedjax_pt.federated import sim_clock
from fedjax_pt.federated.config import FLConfig
from fedjax_pt.federated.messages import Broadcast, ClientReport, SecureSum
from fedjax_pt.federated.tally import RoundResult, Sync, Tally


class Clients(Protocol):
  """The clients of a federation, as the round object sees them. They own their state: what
  they keep between rounds is in the run's checkpoints as `state()`."""

  # True where each client trains on its own host, at the same time as the others (a deployment):
  # then the measured round time makes a compute utilisation (`fedjax_pt.utilization`).
  trains_in_parallel: bool

  def train(self, broadcast: Broadcast, round_idx: int, client_ids: Sequence[int], attempt: int,
            segment: fragments_lib.Segment) -> Iterator[ClientReport | SecureSum]:
    """Each client receives its part of `broadcast`, trains `segment.steps` local steps and
    reports its delta of `segment.fragment`; reports may arrive in any order. With secure
    aggregation, the clients whose deltas were summed come as one `SecureSum`."""

  def unavailable(self) -> Collection[int] | Mapping[int, str]:
    """Clients known to be unreachable now (no node connected): not sampled. A mapping says
    why, for the round's record."""

  def refused(self) -> Mapping[int, str]:
    """Nodes refused a seat (node id -> why), for the round's record."""

  def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
    """What they keep between rounds, at a round boundary: (arrays, JSON)."""

  def abstract(self, meta: dict[str, Any]) -> dict[str, Any]:
    """The arrays of a `state()` whose JSON is `meta`, as shapes, dtypes and shardings."""

  def restore(self, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
    """Continue from a `state()`."""


class FederatedAlgorithm:
  """Per synchronisation: sample -> broadcast -> clients train -> verdicts -> weighted mean of
  the decoded deltas -> outer step, retried when too few clients are usable. A round is one
  synchronisation of the whole model, or with `fl.fragments = F` F of them, one per fragment
  (`fedjax_pt.federated.fragments`).

  A retry keeps the updates already received and tops the synchronisation up: it draws afresh,
  among the clients whose update it does not have yet, as many as `fl.clients_per_round` still
  lacks. No client is ever averaged twice in a synchronisation.
  """

  def __init__(self, fl: FLConfig, fault_cfg: faults_lib.FaultConfig, seed: int,
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
    if (fl.overlap or fl.quorum) and fault_cfg.round_deadline_s:
      what = 'fl.overlap=True' if fl.overlap else f'fl.quorum={fl.quorum}'
      raise ValueError(f'{what} with fl.round_deadline_s={fault_cfg.round_deadline_s} is not '
                       'built yet: the round ends at its own time')
    self._pipeline = sim_clock.OverlapPipeline()  # fl.overlap's simulated clock
    self._assignment = None
    self._server_updates = None
    self._encode = None
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
      comp = fl.compression
      self._encode = compression.Codec(comp.download, comp.block_size, params).encode
      # The server decodes a delta straight into the parameters' layout, where the average and
      # the outer step expect it.
      self._decoders = [compression.Codec(comp.upload, comp.block_size,
                                          self._fragment(params, f), comp.topk).decode
                        for f in range(fl.fragments)]
    return state

  # --- the run's checkpoints ----------------------------------------------------------------------

  def state_arrays(self, state: server_lib.ServerState) -> tuple[dict[str, Any], dict[str, Any]]:
    """The server's part of a checkpoint: (arrays, JSON). Late updates in flight (fl.quorum)
    are arrays under 'pending', by client."""
    arrays = {'params': state.params, 'opt_state': state.opt_state}
    if state.pending:
      arrays['pending'] = {str(u.client): u.delta for u in state.pending}
    return arrays, {'holders': sorted(state.holders),
                    'pending': [u.meta() for u in state.pending]}

  def abstract_pending(self, state: server_lib.ServerState,
                       meta: dict[str, Any]) -> dict[str, Any]:
    """The 'pending' arrays of a checkpoint whose server JSON is `meta`, shaped like the
    parameters (`state` from `init`); {} when it has none."""
    pending = meta.get('pending') or []
    return {'pending': {str(m['client']): state.params for m in pending}} if pending else {}

  def restore(self, state: server_lib.ServerState, arrays: dict[str, Any], meta: dict[str, Any],
              round_idx: int) -> server_lib.ServerState:
    """`state` (of `init`) continued from a checkpoint of round `round_idx`."""
    pending = tuple(quorum_lib.LateUpdate(arrays['pending'][str(m['client'])], **m)
                    for m in meta.get('pending') or ())
    return state.replace(params=arrays['params'], opt_state=arrays['opt_state'], round=round_idx,
                         holders=frozenset(meta.get('holders', ())), pending=pending)

  # --- a round ------------------------------------------------------------------------------------

  def _fragment(self, tree, fragment: int):
    return tree if self.fl.fragments == 1 else fragments_lib.select(tree, self._assignment,
                                                                      fragment)

  def apply(self, state: server_lib.ServerState, round_idx: int,
            clients: Clients) -> tuple[server_lib.ServerState, RoundResult]:
    tally = Tally(absent=profiles_lib.absent(self.fl.profiles, self.seed, round_idx))
    for segment in self.schedule:
      state = self._synchronise(state, round_idx, segment, clients, tally)
    stats = tally.stats(metrics.outer_momentum_norm(state.opt_state), self._clip_at_server,
                        self.fl.secagg.enabled, self.fl.aggregation, bool(self.fl.quorum))
    return state, RoundResult(
        tokens=tally.tokens, stats=stats, bytes_sent=sum(tally.download.values()),
        bytes_received=sum(tally.upload.values()), train_loss=tally.train_loss(),
        steps=tally.steps, aggregated=bool(tally.synced), synchronisations=tally.synced)

  def _broadcast(self, state: server_lib.ServerState,
                 segment: fragments_lib.Segment) -> Broadcast:
    """The server's model as it goes out for `segment`: the clients that hold a model of their
    own get the fragment synchronised at the end of the previous segment (of this round or the
    last)."""
    fragment = None
    if self.fl.merges_fragments:
      fragment = (segment.fragment - 1) % self.fl.fragments
    return Broadcast(self._encode(state.params), fragment, state.holders, self._assignment)

  def _synchronise(self, state: server_lib.ServerState, round_idx: int,
                   segment: fragments_lib.Segment, clients: Clients,
                   tally: Tally) -> server_lib.ServerState:
    """One segment: the clients train and send their deltas of the segment's fragment, which the
    server averages and steps on."""
    fl, policy = self.fl, self.faults
    sync = Sync(index=(round_idx - 1) * len(self.schedule) + self.schedule.index(segment))
    server_before = tally.server_s
    if fl.aggregation != 'mean':
      sync.average = robust.make(fl.aggregation, fl.aggregation_trim, fl.aggregation_clip)
    broadcast = self._broadcast(state, segment)
    holders = set(state.holders)
    in_flight = {u.client for u in state.pending}  # fl.quorum: busy until merged
    waited = 0.0  # simulated seconds this synchronisation waited for its clients
    for attempt in range(policy.max_round_retries + 1):
      # A client that said it lost its model is sent the whole model when it is drawn again.
      broadcast = dataclasses.replace(broadcast, holders=frozenset(holders))
      gone = clients.unavailable()
      tally.unavailable.update(gone if isinstance(gone, Mapping) else
                               dict.fromkeys(gone, 'unavailable'))
      tally.refused.update(clients.refused())
      ids = sampling.sample_clients(
          fl.num_clients, fl.clients_per_round - sync.average.count, self.seed, round_idx,
          attempt, exclude=sync.aggregated | set(gone) | tally.absent | in_flight)
      tally.sampled.update(ids)
      sync.sampled.update(ids)
      raised = []  # the failures of clients that crashed on their own, sending nothing
      for report in clients.train(broadcast, round_idx, ids, attempt, segment):
        if isinstance(report, SecureSum):
          raised.append(None)
          self._absorb_sum(round_idx, report, attempt, sync, tally)
          continue
        if report.update is None and report.failure and not (report.injected or report.lost):
          raised.append(report.failure)
        else:
          raised.append(None)
        if report.holds_model is not None:
          (holders.add if report.holds_model else holders.discard)(report.client)
        absorb_start = time.perf_counter()
        self._absorb(state, broadcast, round_idx, report, attempt, segment.fragment, sync, tally)
        tally.server_s += time.perf_counter() - absorb_start
      if fl.quorum and not attempt:
        wait = self._close(state, round_idx, sync, tally)
      else:
        wait = sim_clock.wait_s(sync.arrivals, sync.late, policy.round_deadline_s)
      tally.sim_s += wait
      waited += wait
      sync.arrivals, sync.late = [], False
      if raised and all(raised):
        # Every client raised on its own: a bug or a broken setup, not a fault to tolerate (an
        # unreachable or late node is one).
        raise errors.TrainingFailed(f'round {round_idx}: every client failed: {raised[0]}')
      if sync.average.count >= policy.min_clients or policy.on_too_few_clients == 'skip' or (
          attempt == policy.max_round_retries):
        break
      logging.warning('round %d: %d of %d clients usable (< fl.min_clients=%d); retry %d',
                      round_idx, sync.average.count, len(sync.sampled), policy.min_clients,
                      attempt + 1)
    tally.ended(sync, attempt)
    state = state.replace(holders=frozenset(holders))
    if fl.quorum:
      state = state.replace(pending=quorum_lib.carried(sync.still_late, waited))
    state = self._step(state, round_idx, segment, sync, tally)
    self._pipeline.sync_ended(sync.index, waited + tally.server_s - server_before)
    return state

  def _step(self, state: server_lib.ServerState, round_idx: int, segment: fragments_lib.Segment,
            sync: Sync, tally: Tally) -> server_lib.ServerState:
    """The outer step on the synchronisation's average, or none when too few were usable."""
    fl, policy = self.fl, self.faults
    if sync.average.count < policy.min_clients:
      tally.skipped = True
      logging.warning('round %d: %s skipped: %d usable clients < fl.min_clients=%d; the global '
                      'model is unchanged', round_idx, self._what(segment),
                      sync.average.count, policy.min_clients)
      return state
    update_start = time.perf_counter()
    mean_delta = sync.average.result()
    if fl.aggregation != 'mean':
      tally.robust(sync.average.trimmed, sync.average.clipped)
    noise_std = privacy.server_noise_std(fl.dp, fl.clients_per_round, sync.average.count)
    if noise_std:  # on the sum of the clipped deltas: std / n on their mean
      mean_delta = privacy.add_noise(
          mean_delta, noise_std / sync.average.count,
          privacy.noise_key(self.seed, round_idx, -1, segment.fragment))
    fragment = self._fragment(state.params, segment.fragment)
    tally.add_squares(mean_client_norm=metrics.l2_norm(
        jax.tree.map(lambda p, d: p + d, fragment, mean_delta)))
    if self._per_layer_norms:
      for name, norm in metrics.per_module_norms(
          aggregation.pseudo_gradient_of_deltas(mean_delta)).items():
        tally.module_squares[name] = tally.module_squares.get(name, 0.0) + norm ** 2
    update = self._server_updates[segment.fragment if self.fl.fragments > 1 else 0]
    state, outer = update(state, mean_delta)
    tally.add_squares(**outer)
    tally.server_s += time.perf_counter() - update_start
    tally.synced += 1
    return state

  def _what(self, segment: fragments_lib.Segment) -> str:
    return 'round' if self.fl.fragments == 1 else f'sync of fragment {segment.fragment}'

  def _absorb(self, state, broadcast: Broadcast, round_idx: int, report: ClientReport,
              attempt: int, fragment: int, sync: Sync, tally: Tally) -> None:
    """Counts a report and, if the server accepts it, adds its decoded delta to the average."""
    k = report.client
    tally.steps += report.steps
    tally.tokens += report.num_tokens
    download, raw_download = broadcast.bytes_for(k) if report.received else (0, 0)
    upload = raw_upload = 0
    if report.update is not None:
      upload = compression.payload_bytes(report.update)
      raw_upload = compression.raw_bytes(report.update)
    tally.moved(k, download, upload, raw_download + raw_upload, sync)
    delta = None if report.update is None else self._decoders[fragment](report.update)
    if delta is not None and self._clip_at_server:
      delta, norm = privacy.clip(delta, self.fl.dp.clip_norm)
      tally.dp_clipped += int(float(norm) > self.fl.dp.clip_norm)
    measured = report.elapsed_s if report.compute_s is None else report.compute_s
    profile, clock = self.fl.profile(k), self.fl.clock
    compute = sim_clock.compute_s(profile, report.num_tokens, measured)
    sim_time = sim_clock.client_time_s(profile, download, upload, report.num_tokens, measured,
                                       clock)
    if self.fl.overlap and delta is not None:
      p = profile or profiles_lib.ClientProfile()
      received = sim_clock.one_way_s(download, p.downlink_mbps, p.latency_ms / 1e3, clock)
      ready = self._pipeline.ready_s(k, sync.index, received) if not attempt else received
      sim_time = sim_clock.overlapped_client_time_s(ready, profile, upload, compute, clock)
      if not report.failure:
        self._pipeline.trained(k, ready + compute, received)
    failure = report.failure or faults_lib.verdict(delta, report.elapsed_s, self.faults, sim_time)
    if delta is not None:  # it arrived (in time or not): the server knows when
      tally.arrived(k, sim_time, report.local_steps, measured, compute)
      if failure and failure.startswith('late: simulated'):
        sync.late = True
      else:
        sync.arrivals.append(sim_time)
    if failure:
      if not report.failure:
        logging.warning('round %d: client %d %s; left out of the average', round_idx, k, failure)
      tally.fail(k, attempt, fragment, self.fl.fragments, failure)
      return
    training = report.training
    weight = aggregation.client_weight(self.fl.weighting, report.num_tokens, report.num_examples)
    if self.fl.quorum and not attempt:  # averaged or kept when the synchronisation closes
      sync.candidates.append(quorum_lib.Candidate(k, delta, weight, sim_time, round_idx))
    else:
      sync.average.add(delta, weight, client=k)
      sync.aggregated.add(k)
    model = jax.tree.map(lambda p, d: p + d, self._fragment(state.params, fragment), delta)
    tally.client_values(
        k, client_train_loss=training.mean_loss, client_grad_norm=training.mean_grad_norm,
        client_update_norm=training.mean_update_norm,
        client_norm=float(metrics.l2_norm(model)), client_delta_norm=float(metrics.l2_norm(delta)))

  def _close(self, state, round_idx: int, sync: Sync, tally: Tally) -> float:
    """fl.quorum: averages the candidates in by the close, keeps the others in flight
    (`quorum`); returns the simulated seconds the synchronisation waited."""
    fl = self.fl
    candidates = sync.candidates + quorum_lib.pending_candidates(state.pending)
    now, sync.still_late, close = quorum_lib.split(candidates, fl.quorum, fl.grace_s)
    for c in now:
      staleness = round_idx - c.born
      sync.average.add(c.delta, quorum_lib.staleness_weight(c.weight, staleness,
                                                            fl.staleness_exponent),
                       client=c.client)
      sync.aggregated.add(c.client)
      if staleness:
        tally.stale[c.client] = staleness
    tally.late.update({c.client: c.arrival_s for c in sync.still_late if c.born == round_idx})
    return close

  def _absorb_sum(self, round_idx: int, report: SecureSum, attempt: int, sync: Sync,
                  tally: Tally) -> None:
    """Counts a secure aggregate and, if it is finite and in time, adds it to the average with
    the weight of the clients it sums (one diverged client spoils the sum: it cannot be told
    apart)."""
    tally.tokens += report.num_tokens
    tally.secagg_clipped += report.clipped_values
    tally.uncompressed += report.uncompressed_bytes
    for k in report.download_bytes:  # every client in the protocol, diverged ones too
      tally.moved(k, report.download_bytes[k], report.upload_bytes.get(k, 0), 0, sync)
      tally.arrived(k, report.elapsed_s, report.local_steps.get(k, 0))
    mean = self._decoders[0](report.update)
    failure = faults_lib.verdict(mean, report.elapsed_s, self.faults)
    if failure:
      logging.warning('round %d: the secure sum of clients %s has %s; left out', round_idx,
                      report.clients, failure)
      for k in report.clients:
        tally.fail(k, attempt, 0, 1, f'secure sum: {failure}')
      return
    sync.arrivals.append(report.elapsed_s)
    # Equal clients: the mean of the sum, weighted as its clients together.
    sync.average.add(mean, float(len(report.clients)), count=len(report.clients))
    sync.aggregated.update(report.clients)
    if report.mean_loss is not None:
      tally.secure_losses.append((report.mean_loss, len(report.clients)))
