"""The in-process clients: every "organisation" is a data iterator over its shard on this host.

`SimulatedClients` implements the round object's client interface (`federated.algorithm.Clients`):
client k receives the server's broadcast, trains its local steps on its own batches and reports
its encoded delta, `mesh.clients` clients at a time in one compiled program. What each client
does around its training is `federated.client_round`, the code a Flower node runs too; it also
simulates what goes wrong in a real federation (`fl.fault.*`: crashes and diverged models, seeded).
"""

from collections.abc import Iterator, Sequence
import itertools
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from fedjax_pt import distributed
from fedjax_pt import local_training
from fedjax_pt.federated import client_round
from fedjax_pt.federated import fragments
from fedjax_pt.federated import sampling
from fedjax_pt.federated.messages import Broadcast, ClientReport
from fedjax_pt.run_spec import RunSpec

class SimulatedClients:
  """Clients 0..fl.num_clients-1 of one host. Each keeps its data position and its
  `ClientMemory` (Adam state with fl.reset_optimizer=False, error-feedback residual, its own
  model with streaming fragments or mixing) across rounds, in `state()` at a round boundary."""

  trains_in_parallel = False  # one after another, on this host

  def __init__(self, spec: RunSpec, trainer: local_training.Trainer, data, progress):
    self._spec, self._trainer, self._progress = spec, trainer, progress
    # Each client's batch and local steps per round (`fl.profiles`; the same for all without).
    self._plans = [spec.client_plan(k) for k in range(spec.fl.num_clients)]
    self.iterators = [data.client_iterator(k, self._plans[k].batch_size)
                      for k in range(spec.fl.num_clients)]
    self._num_examples = [data.client_num_tokens(k) for k in range(spec.fl.num_clients)]
    self._rule = client_round.ClientRule(spec.fl, spec.faults, spec.seed, trainer.param_shapes())
    self.memory: dict[int, client_round.ClientMemory] = {}
    self._received: tuple[Broadcast, dict[int | None, Any]] | None = None

  def train(self, broadcast: Broadcast, round_idx: int, client_ids: Sequence[int], attempt: int,
            segment: fragments.Segment) -> Iterator[ClientReport]:
    if attempt:  # a retry trains more clients than the round's share of the progress bar
      self._progress.add_total(sum(self._steps(k, segment) for k in client_ids))
    for group in sampling.client_groups(client_ids, self._trainer.parallel):
      self._progress.describe(f'round {round_idx}/{self._spec.fl.rounds} client '
                              f'{",".join(map(str, group))}')
      yield from self._train_group(broadcast, round_idx, group, attempt, segment)

  def _steps(self, k: int, segment: fragments.Segment) -> int:
    return self._rule.local_steps(self._plans[k].local_steps, segment)

  def _decoded(self, broadcast: Broadcast, fragment: int | None) -> Any:
    """What a client holds after receiving `fragment` (None: all) of `broadcast`: the same for
    every client, so decoded once."""
    if self._received is None or self._received[0].payload is not broadcast.payload:
      self._received = (broadcast, {})
    decoded = self._received[1]
    if fragment not in decoded:
      payload = broadcast.payload if fragment is None else fragments.select(
          broadcast.payload, broadcast.assignment, fragment)
      decoded[fragment] = self._rule.decode(payload, fragment)
    return decoded[fragment]

  def _train_group(self, broadcast: Broadcast, round_idx: int, group: list[int], attempt: int,
                   segment: fragments.Segment) -> list[ClientReport]:
    rule, spec = self._rule, self._spec
    reports, starts, memories, fault = {}, {}, {}, {}
    for k in group:
      fault[k] = rule.fault(k, round_idx, attempt, segment)
      if fault[k] == 'fail':
        self._progress.advance(self._steps(k, segment))  # its share of the round, done at once
        reports[k] = rule.crashed(k, self._num_examples[k])
        logging.warning('round %d: client %d %s; left out of the average', round_idx, k,
                        reports[k].failure)
        continue
      fragment = broadcast.fragment_for(k)
      try:
        starts[k], memories[k] = rule.receive(self.memory.get(k, client_round.ClientMemory()),
                                              self._decoded(broadcast, fragment), fragment,
                                              round_idx, segment)
      except client_round.NoModel as e:
        reports[k] = rule.no_model(k, self._num_examples[k], e)
    if len(reports) == len(group):
      return [reports[k] for k in group]
    # A crashed client of a parallel group, or an empty slot of a short group, trains on zeros and
    # is dropped: every real client's data stream stays where it would be alone.
    # The clients of a parallel group do the same work (`RunSpec.check_profiles`) from the same
    # model (a client with a model of its own trains alone: mesh.clients = 1).
    plan = self._plans[group[0]]
    steps = self._steps(group[0], segment)
    idle = itertools.repeat(np.zeros((plan.batch_size, spec.data.seq_len + 1), np.int32))
    slots = group + [None] * (self._trainer.parallel - len(group))
    batches = [self.iterators[k] if k in starts else idle for k in slots]
    opt_states = [rule.opt_state(memories[k], segment) if k in starts else None for k in slots]
    training = len(starts)
    start = time.perf_counter()
    try:
      results = self._trainer.train(
          starts[next(iter(starts))].params, rule.first_step(round_idx, segment), batches,
          opt_states, steps, spec.log_every_steps, lambda _: self._progress.advance(training))
    except Exception as e:  # pylint: disable=broad-except
      if jax.process_count() > 1:
        raise  # one process of several cannot leave the others waiting in a collective
      failure = f'raised {type(e).__name__}: {e}'
      logging.warning('round %d: clients %s %s; left out of the average', round_idx, group,
                      failure)
      return [reports.get(k) or rule.crashed(k, self._num_examples[k], failure) for k in group]
    # fl.round_timeout_s and the round deadline read this clock: every process decides on one.
    elapsed = distributed.agree(time.perf_counter() - start)
    for k, result in zip(slots, results):
      if k not in starts:
        continue
      _, self.memory[k], reports[k] = rule.finish(
          k, memories[k], starts[k], result, fault[k], segment, round_idx, attempt, steps,
          self._num_examples[k])
      reports[k].elapsed_s = reports[k].compute_s = elapsed
      self._progress.loss(result.last_loss)
    return [reports[k] for k in group]

  def unavailable(self) -> frozenset[int]:
    return frozenset()  # every simulated client is always there

  def refused(self) -> dict[int, str]:
    return {}  # no node claims a simulated client's seat

  # --- what the clients keep, in the run's checkpoints --------------------------------------------

  def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
    arrays = {str(k): {name: getattr(m, name) for name in m.parts()}
              for k, m in sorted(self.memory.items()) if m.parts()}
    meta = {'iterators': [it.get_state() for it in self.iterators],
            'memory': {k: {'parts': list(parts), 'merged': self.memory[int(k)].merged}
                       for k, parts in arrays.items()}}
    return arrays, meta

  def abstract(self, meta: dict[str, Any]) -> dict[str, Any]:
    shapes = {'opt_state': self._trainer.opt_state_shapes()}
    params = self._trainer.param_shapes()
    return {k: {name: shapes.get(name, params) for name in entry['parts']}
            for k, entry in meta.get('memory', {}).items()}

  def restore(self, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
    for it, state in zip(self.iterators, meta['iterators']):
      it.set_state(state)
    merged = {k: entry.get('merged') for k, entry in meta.get('memory', {}).items()}
    self.memory = {int(k): client_round.ClientMemory(
        **parts, merged=tuple(merged[k]) if merged.get(k) else None)
                   for k, parts in arrays.items()}
