"""The round as one object, in the style of fedjax's `FederatedAlgorithm(init, apply)`.

    algorithm = FederatedAlgorithm(fl, faults, seed)
    state = algorithm.init(params)
    state, result = algorithm.apply(state, round_idx, clients)

`clients` is anything with `train(params, round_idx, client_ids, attempt)` that yields one
`ClientReport` per client: the in-process simulation (`fedjax_pt.simulation`), or nodes of a real
federation. Everything between "the server holds θ" and "the server holds the next θ" happens in
`apply`, each step in the module named after it: which clients train (`sampling`), which updates
are left out (`faults`), how the rest are weighted and averaged (`aggregation`) and the outer
optimizer step (`server`). The centralized baseline is a `CentralizedAlgorithm` with the same
`init`/`apply`, so the run has one loop for both modes.
"""

from collections.abc import Collection, Iterator, Sequence
import dataclasses
from typing import Any, Protocol

from absl import logging
import flax.struct

from fedjax_pt import aggregation
from fedjax_pt import client as client_lib
from fedjax_pt import faults as faults_lib
from fedjax_pt import metrics
from fedjax_pt import optimizers
from fedjax_pt import records
from fedjax_pt import sampling
from fedjax_pt import server as server_lib


@dataclasses.dataclass
class ClientReport:
  """What the server learns from one client in one round.

  `params` is θ_k as the server received it (None when nothing arrived: the client crashed or
  never answered); `failure` is the client's own error, if it reported one.
  """
  client: int
  params: Any | None
  num_tokens: int = 0  # tokens the client trained on this round
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
  download_bytes: int = 0  # server -> client
  upload_bytes: int = 0  # client -> server


class Clients(Protocol):
  """The clients of a federation, as the round object sees them."""

  def train(self, params: Any, round_idx: int, client_ids: Sequence[int],
            attempt: int) -> Iterator[ClientReport]:
    """Each client trains from `params` and reports; reports may arrive in any order."""

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


class FederatedRunState(flax.struct.PyTreeNode):
  """The arrays of a federated run between rounds: what its checkpoints hold."""
  params: Any  # the global model θ
  opt_state: Any  # the outer optimizer's state
  kept: dict[str, Any]  # simulated clients' Adam states kept across rounds, by client id


class FederatedAlgorithm:
  """Sample -> clients train -> verdicts -> weighted mean -> outer step, retried when too few
  clients are usable.

  A retry keeps the updates already received and tops the round up: it draws afresh, among the
  clients whose update the round does not have yet, as many as `fl.clients_per_round` still
  lacks. No client is ever averaged twice in a round.
  """

  def __init__(self, fl: server_lib.FLConfig, fault_cfg: faults_lib.FaultConfig, seed: int,
               param_shardings: Any = None, per_layer_norms: bool = False):
    self.fl, self.faults, self.seed = fl, fault_cfg, seed
    self.tx = optimizers.outer_optimizer(fl.outer_optimizer, fl.outer_lr, fl.outer_momentum,
                                         fl.outer_b2)
    self._param_shardings = param_shardings
    self._per_layer_norms = per_layer_norms
    self._server_update = None

  def init(self, params) -> server_lib.ServerState:
    state = server_lib.init_server_state(params, self.tx, self._param_shardings)
    if self._server_update is None:
      self._server_update = server_lib.make_server_update(
          self.tx, like=state if self._param_shardings is not None else None)
    return state

  def apply(self, state: server_lib.ServerState, round_idx: int,
            clients: Clients) -> tuple[server_lib.ServerState, RoundResult]:
    fl, policy = self.fl, self.faults
    tally = _Tally()
    for attempt in range(policy.max_round_retries + 1):
      ids = sampling.sample_clients(fl.num_clients, fl.clients_per_round - tally.average.count,
                                    self.seed, round_idx, attempt,
                                    exclude=tally.aggregated | set(clients.unavailable()))
      tally.sampled.update(ids)
      raised = []  # the failures of clients that crashed on their own, sending nothing
      for report in clients.train(state.params, round_idx, ids, attempt):
        if report.params is None and report.failure and not (report.injected or report.lost):
          raised.append(report.failure)
        else:
          raised.append(None)
        self._absorb(state, round_idx, report, attempt, tally)
      if raised and all(raised):
        # Every client raised on its own: a bug or a broken setup, not a fault to tolerate (an
        # unreachable or late node is one).
        raise RuntimeError(f'round {round_idx}: every client failed: {raised[0]}')
      if tally.average.count >= policy.min_clients or policy.on_too_few_clients == 'skip' or (
          attempt == policy.max_round_retries):
        break
      logging.warning('round %d: %d of %d clients usable (< fl.min_clients=%d); retry %d',
                      round_idx, tally.average.count, len(tally.sampled), policy.min_clients,
                      attempt + 1)
    enough = tally.average.count >= policy.min_clients
    stats = dict(tally.stats(attempt), skipped=not enough)
    if enough:
      mean_params = tally.average.result()
      if self._per_layer_norms:
        stats['pseudo_grad_norm_per_module'] = metrics.per_module_norms(
            aggregation.pseudo_gradient(state.params, mean_params))
      state, outer = self._server_update(state, mean_params)
      stats.update({k: float(v) for k, v in outer.items()},
                   mean_client_norm=float(metrics.l2_norm(mean_params)))
    else:
      logging.warning('round %d skipped: %d usable clients < fl.min_clients=%d; the global model '
                      'is unchanged', round_idx, tally.average.count, policy.min_clients)
    stats['outer_momentum_norm'] = metrics.outer_momentum_norm(state.opt_state)
    losses = list(tally.per_client['client_train_loss'].values())
    return state, RoundResult(
        tokens=tally.tokens, bytes_sent=sum(tally.download.values()),
        bytes_received=sum(tally.upload.values()),
        train_loss=sum(losses) / len(losses) if losses else None, steps=tally.steps,
        stats=stats, aggregated=enough)

  def _absorb(self, state, round_idx: int, report: ClientReport, attempt: int,
              tally: '_Tally') -> None:
    """Counts a report and, if the server accepts it, adds it to the round's average."""
    k = report.client
    tally.steps += report.steps
    tally.tokens += report.num_tokens
    tally.download[k] = tally.download.get(k, 0) + report.download_bytes
    if report.params is not None:
      tally.upload[k] = tally.upload.get(k, 0) + report.upload_bytes
    failure = report.failure or faults_lib.verdict(report.params, report.elapsed_s, self.faults)
    if failure:
      if not report.failure:
        logging.warning('round %d: client %d %s; left out of the average', round_idx, k, failure)
      tally.failed[k if not attempt else f'{k}@{attempt}'] = failure
      return
    tally.average.add(report.params, aggregation.client_weight(
        self.fl.weighting, report.num_tokens, report.num_examples))
    tally.aggregated.add(k)
    per_client = tally.per_client
    per_client['client_train_loss'][k] = report.mean_loss
    per_client['client_grad_norm'][k] = report.mean_grad_norm
    per_client['client_update_norm'][k] = report.mean_update_norm
    per_client['client_norm'][k] = float(metrics.l2_norm(report.params))
    per_client['client_delta_norm'][k] = float(metrics.distance(state.params, report.params))

  def run_state(self, state: server_lib.ServerState, kept: dict[int, Any]) -> FederatedRunState:
    return FederatedRunState(state.params, state.opt_state, {str(k): v for k, v in kept.items()})

  def from_run_state(self, run_state: FederatedRunState,
                     round_idx: int) -> tuple[server_lib.ServerState, dict[int, Any]]:
    state = server_lib.ServerState(params=run_state.params, opt_state=run_state.opt_state,
                                   round=round_idx)
    return state, {int(k): v for k, v in run_state.kept.items()}


@dataclasses.dataclass
class _Tally:
  """What the server has seen of a round so far."""
  average: aggregation.RunningAverage = dataclasses.field(
      default_factory=aggregation.RunningAverage)
  sampled: set[int] = dataclasses.field(default_factory=set)
  aggregated: set[int] = dataclasses.field(default_factory=set)
  failed: dict[Any, str] = dataclasses.field(default_factory=dict)
  tokens: int = 0
  download: dict[int, int] = dataclasses.field(default_factory=dict)
  upload: dict[int, int] = dataclasses.field(default_factory=dict)
  steps: list[records.StepRecord] = dataclasses.field(default_factory=list)
  per_client: dict[str, dict[int, float]] = dataclasses.field(default_factory=lambda: {
      key: {} for key in ('client_train_loss', 'client_grad_norm', 'client_update_norm',
                          'client_norm', 'client_delta_norm')})

  def stats(self, attempt: int) -> dict[str, Any]:
    return dict(clients=sorted(self.sampled), num_aggregated=self.average.count, retries=attempt,
                failed_clients=self.failed, client_download_bytes=dict(self.download),
                client_upload_bytes=dict(self.upload),
                **{k: dict(sorted(v.items())) for k, v in self.per_client.items()})


class CentralizedClient(Protocol):
  def train(self, state: client_lib.LocalState,
            round_idx: int) -> tuple[client_lib.LocalState, ClientReport]:
    """`fl.local_steps` steps from `state` on the union of the clients' data."""


class CentralizedAlgorithm:
  """The baseline: the same local recipe on the union of the clients' data, one "round" per
  `fl.local_steps` steps, the optimizer state carried across rounds."""

  def __init__(self, trainer: client_lib.Trainer):
    self._trainer = trainer

  def init(self, params) -> client_lib.LocalState:
    return self._trainer.init(params, 0)

  def apply(self, state: client_lib.LocalState, round_idx: int,
            clients: CentralizedClient) -> tuple[client_lib.LocalState, RoundResult]:
    state, report = clients.train(state, round_idx)
    return state, RoundResult(
        tokens=report.num_tokens, train_loss=report.mean_loss, steps=report.steps,
        stats={'grad_norm': report.mean_grad_norm, 'update_norm': report.mean_update_norm})

  def run_state(self, state: client_lib.LocalState, kept: dict[int, Any]) -> client_lib.LocalState:
    del kept  # no clients
    return state

  def from_run_state(self, run_state: client_lib.LocalState,
                     round_idx: int) -> tuple[client_lib.LocalState, dict[int, Any]]:
    del round_idx
    return run_state, {}
