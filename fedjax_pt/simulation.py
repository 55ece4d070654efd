"""The in-process clients: every "organisation" is a data iterator over its shard on this host.

`SimulatedClients` implements the round object's client interface (`federation.Clients`): client k
trains `fl.local_steps` AdamW steps from the global model on its own batches and reports its
model, `mesh.clients` clients at a time in one compiled program. It also simulates what goes wrong
in a real federation (`fl.fault.*`: crashes and diverged models, seeded). `CentralizedClient` is
the baseline's single learner over the union of the clients' data.
"""

from collections.abc import Iterator, Sequence
import itertools
import time
from typing import Any

from absl import logging
import numpy as np

from fedjax_pt import client as client_lib
from fedjax_pt import faults
from fedjax_pt import metrics
from fedjax_pt import records
from fedjax_pt import sampling
from fedjax_pt.federation import ClientReport
from fedjax_pt.run_spec import RunSpec


def _step_records(result: client_lib.ClientResult, round_idx: int, client: int,
                  local_steps: int) -> list[records.StepRecord]:
  return [records.StepRecord(round=round_idx, client=client,
                             step=(round_idx - 1) * local_steps + m['local_step'], **m)
          for m in result.step_metrics]


def _report(result: client_lib.ClientResult, round_idx: int, client: int, local_steps: int,
            **fields) -> ClientReport:
  return ClientReport(
      client=client, params=result.state.params, num_tokens=result.num_tokens,
      mean_loss=result.mean_loss, last_loss=result.last_loss,
      mean_grad_norm=result.mean_grad_norm, mean_update_norm=result.mean_update_norm,
      steps=_step_records(result, round_idx, client, local_steps), **fields)


class SimulatedClients:
  """Clients 0..fl.num_clients-1 of one host; they keep their data position (and, with
  fl.reset_optimizer=False, their Adam state) across rounds."""

  def __init__(self, spec: RunSpec, trainer: client_lib.Trainer, data, progress):
    self._spec, self._trainer, self._progress = spec, trainer, progress
    self.iterators = [data.client_iterator(k) for k in range(spec.fl.num_clients)]
    self._num_examples = [data.client_num_tokens(k) for k in range(spec.fl.num_clients)]
    # A client keeps its Adam moments when its round ended with finite parameters; the server's
    # verdict on a late report is not known to it, as on a real node.
    self.kept: dict[int, Any] = {}

  def train(self, params, round_idx: int, client_ids: Sequence[int],
            attempt: int) -> Iterator[ClientReport]:
    model_bytes = metrics.tree_bytes(params)
    for group in sampling.client_groups(client_ids, self._trainer.parallel):
      self._progress.describe(f'round {round_idx}/{self._spec.fl.rounds} client '
                              f'{",".join(map(str, group))}')
      for report in self._train_group(params, round_idx, group, attempt):
        report.download_bytes = model_bytes
        report.upload_bytes = model_bytes if report.params is not None else 0
        yield report

  def _train_group(self, params, round_idx: int, group: list[int],
                   attempt: int) -> list[ClientReport]:
    spec = self._spec
    fault = {k: faults.injected_fault(spec.faults, spec.seed, round_idx, k, attempt)
             for k in group}
    reports = {}
    for k in group:
      if fault[k] == 'fail':
        e = faults.InjectedFailure('injected failure (fl.fault.failure_prob)')
        logging.warning('round %d: client %d raised %s: %s; left out of the average', round_idx,
                        k, type(e).__name__, e)
        reports[k] = ClientReport(client=k, params=None, failure=f'raised {type(e).__name__}: {e}',
                                  injected=True)
    if len(reports) == len(group):
      return [reports[k] for k in group]
    # A crashed client of a parallel group, or an empty slot of a short group, trains on zeros and
    # is dropped: every real client's data stream stays where it would be alone.
    idle = itertools.repeat(np.zeros((spec.data.batch_size, spec.data.seq_len + 1), np.int32))
    slots = group + [None] * (self._trainer.parallel - len(group))
    batches = [self.iterators[k] if k is not None and k not in reports else idle for k in slots]
    opt_states = [None if spec.fl.reset_optimizer or k is None else self.kept.get(k)
                  for k in slots]
    start = time.perf_counter()
    try:
      results = self._trainer.train(params, (round_idx - 1) * spec.fl.local_steps, batches,
                                    opt_states, spec.fl.local_steps, spec.log_every_steps,
                                    self._progress.advance)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('round %d: clients %s raised %s: %s; left out of the average', round_idx,
                      group, type(e).__name__, e)
      return [reports.get(k) or ClientReport(client=k, params=None,
                                             failure=f'raised {type(e).__name__}: {e}')
              for k in group]
    elapsed = time.perf_counter() - start
    for k, result in zip(slots, results):
      if k is None or k in reports:
        continue
      if fault[k] == 'nan':
        result.state = result.state.replace(params=faults.poisoned(result.state.params))
      if not spec.fl.reset_optimizer and bool(faults.all_finite(result.state.params)):
        self.kept[k] = result.state.opt_state
      self._progress.loss(result.last_loss)
      reports[k] = _report(result, round_idx, k, spec.fl.local_steps,
                           num_examples=self._num_examples[k], injected=fault[k] == 'nan',
                           elapsed_s=elapsed)
    return [reports[k] for k in group]

  def unavailable(self) -> frozenset[int]:
    return frozenset()  # every simulated client is always there

  def iterator_states(self) -> list[dict[str, Any]]:
    return [it.get_state() for it in self.iterators]

  def restore(self, iterator_states: Sequence[dict[str, Any]], kept: dict[int, Any]) -> None:
    for it, state in zip(self.iterators, iterator_states):
      it.set_state(state)
    self.kept = dict(kept)


class CentralizedClient:
  """The centralized baseline's learner: `fl.local_steps` steps per round on the union of the
  clients' training data (or one client's alone, with data.only_client)."""

  def __init__(self, spec: RunSpec, trainer: client_lib.Trainer, data, progress):
    self._spec, self._trainer, self._progress = spec, trainer, progress
    self.iterators = [data.centralized_iterator()]
    self.kept: dict[int, Any] = {}

  def train(self, state: client_lib.LocalState,
            round_idx: int) -> tuple[client_lib.LocalState, ClientReport]:
    fl = self._spec.fl
    self._progress.describe(f'round {round_idx}/{fl.rounds} centralized')
    result = client_lib.client_update(self._trainer.train_step, state, self.iterators[0],
                                      fl.local_steps, self._spec.log_every_steps,
                                      self._progress.advance)
    self._progress.loss(result.last_loss)
    return result.state, _report(result, round_idx, -1, fl.local_steps)

  def iterator_states(self) -> list[dict[str, Any]]:
    return [self.iterators[0].get_state()]

  def restore(self, iterator_states: Sequence[dict[str, Any]], kept: dict[int, Any]) -> None:
    del kept
    self.iterators[0].set_state(iterator_states[0])
