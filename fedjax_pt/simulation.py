"""The in-process clients: every "organisation" is a data iterator over its shard on this host.

`SimulatedClients` implements the round object's client interface (`federation.Clients`): client k
trains `fl.local_steps` AdamW steps from the global model on its own batches and reports its
encoded delta, `mesh.clients` clients at a time in one compiled program. It also simulates what
goes wrong in a real federation (`fl.fault.*`: crashes and diverged models, seeded).
`CentralizedClient` is the baseline's single learner over the union of the clients' data.
"""

from collections.abc import Iterator, Sequence
import dataclasses
import itertools
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pt import local_training
from fedjax_pt.federated import compression
from fedjax_pt import distributed
from fedjax_pt.federated import faults
from fedjax_pt.federated import fragments
from fedjax_pt.federated import privacy
from fedjax_pt import records
from fedjax_pt.federated import sampling
from fedjax_pt.federated.algorithm import ClientReport
from fedjax_pt.run_spec import RunSpec


def _step_records(result: local_training.ClientResult, round_idx: int, client: int,
                  steps_per_round: int, start: int) -> list[records.StepRecord]:
  # Numbered by fl.local_steps, as the lr schedule counts: whatever a client's own step count.
  return [records.StepRecord(round=round_idx, client=client,
                             step=(round_idx - 1) * steps_per_round + start + m['local_step'],
                             **{**m, 'local_step': start + m['local_step']})
          for m in result.step_metrics]


def _report(result: local_training.ClientResult, round_idx: int, client: int, steps_per_round: int,
            start: int = 0, **fields) -> ClientReport:
  return ClientReport(
      client=client, num_tokens=result.num_tokens,
      mean_loss=result.mean_loss, last_loss=result.last_loss,
      mean_grad_norm=result.mean_grad_norm, mean_update_norm=result.mean_update_norm,
      steps=_step_records(result, round_idx, client, steps_per_round, start), **fields)


@dataclasses.dataclass
class _Broadcast:
  """What the server sends in one synchronisation, as the clients decode it."""
  received: Any  # the global model as a client holds it: decode(encode(theta, download codec))
  full_bytes: int  # the whole model, to a client that holds none
  fragment_bytes: int  # the fragment synchronised last, to a client that holds a model
  uncompressed_full: int
  uncompressed_fragment: int


class SimulatedClients:
  """Clients 0..fl.num_clients-1 of one host; they keep their data position (and, with
  fl.reset_optimizer=False, their Adam state) across rounds.

  A client receives the global model encoded with `fl.compression.download` and sends its delta
  encoded with `fl.compression.upload` (`fedjax_pt.federated.compression`), keeping the residual with error
  feedback. With streaming fragments or mixing (`fedjax_pt.federated.fragments`) it also keeps its own model
  between synchronisations, and merges each fragment the server sends back into it.
  """

  def __init__(self, spec: RunSpec, trainer: local_training.Trainer, data, progress):
    self._spec, self._trainer, self._progress = spec, trainer, progress
    # Each client's batch and local steps per round (`fl.profiles`; the same for all without).
    self._plans = [spec.client_plan(k) for k in range(spec.fl.num_clients)]
    self.iterators = [data.client_iterator(k, self._plans[k].batch_size)
                      for k in range(spec.fl.num_clients)]
    self._num_examples = [data.client_num_tokens(k) for k in range(spec.fl.num_clients)]
    # A client keeps its Adam moments when its round ended with finite parameters; the server's
    # verdict on a late report is not known to it, as on a real node.
    self.kept: dict[int, Any] = {}
    # Its own model (fl.fragments > 1 or fl.fragment_mixing > 0) and the residual of its
    # messages (fl.compression.error_feedback), while they are finite.
    self.carried: dict[str, dict[int, Any]] = {'model': {}, 'residual': {}}
    self._segment_opt: dict[int, Any] = {}  # Adam states between the segments of a round
    self._merged: dict[int, tuple[int, int]] = {}  # (round, segment start) a client last merged
    self._assignment = None
    self._download = None  # compression.Codec of the broadcast
    self._upload = []  # compression.Codec of each fragment's deltas

  def train(self, params, round_idx: int, client_ids: Sequence[int], attempt: int,
            segment: fragments.Segment) -> Iterator[ClientReport]:
    if self._assignment is None:
      fl = self._spec.fl
      comp = fl.compression
      self._assignment = fragments.partition(params, fl.fragments)
      self._download = compression.Codec(comp.download, comp.block_size, params)
      self._upload = [compression.Codec(comp.upload, comp.block_size, self._fragment(params, f))
                      for f in range(fl.fragments)]
    if attempt:  # a retry trains more clients than the round's share of the progress bar
      self._progress.add_total(sum(self._steps(k, segment) for k in client_ids))
    broadcast = self._broadcast(params, segment)
    for group in sampling.client_groups(client_ids, self._trainer.parallel):
      self._progress.describe(f'round {round_idx}/{self._spec.fl.rounds} client '
                              f'{",".join(map(str, group))}')
      yield from self._train_group(broadcast, round_idx, group, attempt, segment)

  def _steps(self, k: int, segment: fragments.Segment) -> int:
    """Client k's local steps in this segment: its own per round, unless streaming fragments
    split the round (their clients all do the same work: `RunSpec.check_profiles`)."""
    return self._plans[k].local_steps if self._spec.fl.fragments == 1 else segment.steps

  def _fragment(self, tree, fragment: int):
    return (tree if self._spec.fl.fragments == 1 else
            fragments.select(tree, self._assignment, fragment))

  def _broadcast(self, params, segment: fragments.Segment) -> _Broadcast:
    payload = self._download.encode(params)
    # The fragment synchronised at the end of the previous segment (of this or the last round).
    previous = (segment.fragment - 1) % self._spec.fl.fragments
    part = self._fragment(payload, previous)
    return _Broadcast(self._download.decode(payload), compression.payload_bytes(payload),
                      compression.payload_bytes(part), compression.raw_bytes(payload),
                      compression.raw_bytes(part))

  def _start(self, k: int, broadcast: _Broadcast, round_idx: int,
             segment: fragments.Segment) -> tuple[Any, int, int]:
    """The model client k trains from, and the bytes (wire, float32) it received for it."""
    fl = self._spec.fl
    models = self.carried['model']
    if not fl.keeps_client_models or k not in models:
      return broadcast.received, broadcast.full_bytes, broadcast.uncompressed_full
    if self._merged.get(k) == (round_idx, segment.start):
      return models[k], 0, 0  # a retry: it has received this synchronisation's fragment already
    previous = (segment.fragment - 1) % fl.fragments
    merged = fragments.mix(self._fragment(models[k], previous),
                           self._fragment(broadcast.received, previous), fl.fragment_mixing)
    models[k] = fragments.replace(models[k], merged, self._assignment, previous)
    self._merged[k] = (round_idx, segment.start)
    return models[k], broadcast.fragment_bytes, broadcast.uncompressed_fragment

  def _opt_state(self, k: int | None, segment: fragments.Segment):
    if k is None:
      return None
    if not self._spec.fl.reset_optimizer:
      return self.kept.get(k)
    return self._segment_opt.get(k) if segment.start else None

  def _train_group(self, broadcast: _Broadcast, round_idx: int, group: list[int], attempt: int,
                   segment: fragments.Segment) -> list[ClientReport]:
    spec = self._spec
    fl = spec.fl
    fault = {k: faults.injected_fault(spec.faults, spec.seed, round_idx, k, attempt,
                                      segment.fragment if fl.fragments > 1 else 0)
             for k in group}
    starts = {k: self._start(k, broadcast, round_idx, segment) for k in group}
    received = {k: dict(download_bytes=starts[k][1], uncompressed_bytes=starts[k][2])
                for k in group}
    reports = {}
    for k in group:
      if fault[k] == 'fail':
        self._progress.advance(self._steps(k, segment))  # its share of the round, done at once
        e = faults.InjectedFailure('injected failure (fl.fault.failure_prob)')
        logging.warning('round %d: client %d raised %s: %s; left out of the average', round_idx,
                        k, type(e).__name__, e)
        reports[k] = ClientReport(client=k, update=None, failure=f'raised {type(e).__name__}: {e}',
                                  injected=True, **received[k])
    if len(reports) == len(group):
      return [reports[k] for k in group]
    # A crashed client of a parallel group, or an empty slot of a short group, trains on zeros and
    # is dropped: every real client's data stream stays where it would be alone.
    # The clients of a parallel group do the same work (`RunSpec.check_profiles`).
    plan = self._plans[group[0]]
    steps = self._steps(group[0], segment)
    idle = itertools.repeat(np.zeros((plan.batch_size, spec.data.seq_len + 1), np.int32))
    slots = group + [None] * (self._trainer.parallel - len(group))
    batches = [self.iterators[k] if k is not None and k not in reports else idle for k in slots]
    opt_states = [self._opt_state(k, segment) for k in slots]
    # The clients of a parallel group all start from the global model (a client with a model of
    # its own trains alone: mesh.clients = 1).
    start_params = starts[group[0]][0]
    training = sum(1 for k in group if k not in reports)
    start = time.perf_counter()
    try:
      results = self._trainer.train(
          start_params, (round_idx - 1) * fl.local_steps + segment.start, batches, opt_states,
          steps, spec.log_every_steps, lambda _: self._progress.advance(training))
    except Exception as e:  # pylint: disable=broad-except
      if jax.process_count() > 1:
        raise  # one process of several cannot leave the others waiting in a collective
      logging.warning('round %d: clients %s raised %s: %s; left out of the average', round_idx,
                      group, type(e).__name__, e)
      return [reports.get(k) or ClientReport(client=k, update=None,
                                             failure=f'raised {type(e).__name__}: {e}',
                                             **received[k])
              for k in group]
    # fl.round_timeout_s and the round deadline read this clock: every process decides on one.
    elapsed = distributed.agree(time.perf_counter() - start)
    for k, result in zip(slots, results):
      if k is None or k in reports:
        continue
      if fault[k] == 'nan':
        result.state = result.state.replace(params=faults.poisoned(result.state.params))
      finite = bool(faults.all_finite(result.state.params))
      update, upload_uncompressed = self._message(k, result.state.params, finite, broadcast,
                                                  segment, round_idx, attempt)
      self._progress.loss(result.last_loss)
      reports[k] = _report(
          result, round_idx, k, fl.local_steps, segment.start, update=update,
          num_examples=self._num_examples[k], injected=fault[k] == 'nan', elapsed_s=elapsed,
          compute_s=elapsed, local_steps=steps,
          download_bytes=received[k]['download_bytes'],
          upload_bytes=compression.payload_bytes(update),
          uncompressed_bytes=received[k]['uncompressed_bytes'] + upload_uncompressed)
      self._keep(k, result.state, finite)
    return [reports[k] for k in group]

  def _privatize(self, k: int, round_idx: int, attempt: int) -> dict[str, Any]:
    """With fl.dp.noise_at='clients': client k's clipping and its share of the noise."""
    spec = self._spec
    noise = privacy.client_noise(spec.fl.dp, spec.fl.clients_per_round)
    if noise is None:
      return {}
    return dict(privatize=noise, key=privacy.noise_key(spec.seed, round_idx, k, attempt))

  def _message(self, k: int, params, finite: bool, broadcast: _Broadcast,
               segment: fragments.Segment, round_idx: int, attempt: int) -> tuple[Any, int]:
    """Client k's encoded delta of the segment's fragment (updating its residual), and the delta's
    size as float32."""
    comp = self._spec.fl.compression
    residuals = self.carried['residual']
    whole = None
    if comp.error_feedback:
      whole = residuals[k] if k in residuals else jax.tree.map(jnp.zeros_like, params)
    update, residual = self._upload[segment.fragment].compress_delta(
        self._fragment(params, segment.fragment),
        self._fragment(broadcast.received, segment.fragment),
        None if whole is None else self._fragment(whole, segment.fragment),
        **self._privatize(k, round_idx, attempt))
    if comp.error_feedback:
      if finite:
        residuals[k] = (residual if self._spec.fl.fragments == 1 else
                        fragments.replace(whole, residual, self._assignment, segment.fragment))
      else:  # a diverged client starts afresh, as after a restart
        residuals.pop(k, None)
    return update, compression.raw_bytes(update)

  def _keep(self, k: int, state: local_training.LocalState, finite: bool) -> None:
    """What client k keeps after training: its Adam state and, with streaming fragments or
    mixing, its model; a diverged client keeps neither and starts again from the global model."""
    fl = self._spec.fl
    if not fl.reset_optimizer:
      if finite:
        self.kept[k] = state.opt_state
    elif fl.fragments > 1:
      if finite:
        self._segment_opt[k] = state.opt_state
      else:
        self._segment_opt.pop(k, None)
    if fl.keeps_client_models:
      if finite:
        self.carried['model'][k] = state.params
      else:
        self.carried['model'].pop(k, None)

  def unavailable(self) -> frozenset[int]:
    return frozenset()  # every simulated client is always there

  def iterator_states(self) -> list[dict[str, Any]]:
    return [it.get_state() for it in self.iterators]

  def restore(self, iterator_states: Sequence[dict[str, Any]], kept: dict[int, Any],
              carried: dict[str, dict[int, Any]] | None = None) -> None:
    for it, state in zip(self.iterators, iterator_states):
      it.set_state(state)
    self.kept = dict(kept)
    self.carried = {name: dict((carried or {}).get(name, {})) for name in self.carried}


class CentralizedClient:
  """The centralized baseline's learner: `fl.local_steps` steps per round on the union of the
  clients' training data (or one client's alone, with data.only_client)."""

  def __init__(self, spec: RunSpec, trainer: local_training.Trainer, data, progress):
    self._spec, self._trainer, self._progress = spec, trainer, progress
    self.iterators = [data.centralized_iterator()]
    self.kept: dict[int, Any] = {}
    self.carried: dict[str, dict[int, Any]] = {}

  def train(self, state: local_training.LocalState,
            round_idx: int) -> tuple[local_training.LocalState, ClientReport]:
    fl = self._spec.fl
    self._progress.describe(f'round {round_idx}/{fl.rounds} centralized')
    start = time.perf_counter()
    result = local_training.client_update(self._trainer.train_step, state,
                                      self._trainer.global_batches(self.iterators[0]),
                                      fl.local_steps, self._spec.log_every_steps,
                                      lambda _: self._progress.advance())
    self._progress.loss(result.last_loss)
    # One learner on this host: its simulated time is its measured time.
    return result.state, _report(result, round_idx, -1, fl.local_steps, update=None,
                                 compute_s=time.perf_counter() - start,
                                 local_steps=fl.local_steps)

  def iterator_states(self) -> list[dict[str, Any]]:
    return [self.iterators[0].get_state()]

  def restore(self, iterator_states: Sequence[dict[str, Any]], kept: dict[int, Any],
              carried: dict[str, dict[int, Any]] | None = None) -> None:
    del kept, carried
    self.iterators[0].set_state(iterator_states[0])
