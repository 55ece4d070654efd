"""The centralized baseline: the clients' local recipe on the union of their data (or one
client's alone, with data.only_client), one "round" every `fl.local_steps` steps, the optimizer
state carried across rounds. It has the round object's `init`/`apply`, so the run has one loop
for both modes, and its curves overlay the federated ones.
"""

import dataclasses
import time
from typing import Any

from fedjax_pt import local_training
from fedjax_pt import records
from fedjax_pt.federated.tally import RoundResult
from fedjax_pt.run_spec import RunSpec


@dataclasses.dataclass
class CentralizedStats:
  """A centralized round's record fields (see `records.RoundRecord`)."""
  grad_norm: float  # means over the round's steps
  update_norm: float
  sim_round_time_s: float  # one learner on this host: its simulated time is its measured time


class CentralizedLearner:
  """The baseline's one learner: `fl.local_steps` steps per round from its own state."""

  def __init__(self, spec: RunSpec, trainer: local_training.Trainer, data, progress):
    self._spec, self._trainer, self._progress = spec, trainer, progress
    self._iterator = data.centralized_iterator()

  def train(self, state: local_training.LocalState,
            round_idx: int) -> tuple[local_training.LocalState, RoundResult]:
    fl = self._spec.fl
    self._progress.describe(f'round {round_idx}/{fl.rounds} centralized')
    start = time.perf_counter()
    result = local_training.client_update(self._trainer.train_step, state,
                                          self._trainer.global_batches(self._iterator),
                                          fl.local_steps, self._spec.log_every_steps,
                                          lambda _: self._progress.advance())
    self._progress.loss(result.last_loss)
    summary = result.summary
    stats = CentralizedStats(grad_norm=summary.mean_grad_norm,
                             update_norm=summary.mean_update_norm,
                             sim_round_time_s=time.perf_counter() - start)
    return result.state, RoundResult(
        tokens=summary.num_tokens, stats=stats, train_loss=summary.mean_loss,
        steps=records.step_records(result.step_metrics, round_idx, -1, fl.local_steps))

  # --- what it keeps, in the run's checkpoints: its data position ---------------------------------

  def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
    return {}, {'iterators': [self._iterator.get_state()]}

  def abstract(self, meta: dict[str, Any]) -> dict[str, Any]:
    del meta
    return {}

  def restore(self, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
    del arrays
    self._iterator.set_state(meta['iterators'][0])


class CentralizedAlgorithm:
  """The baseline as a round object over its learner."""

  def __init__(self, trainer: local_training.Trainer):
    self._trainer = trainer

  def init(self, params) -> local_training.LocalState:
    return self._trainer.init(params, 0)

  def apply(self, state: local_training.LocalState, round_idx: int,
            learner: CentralizedLearner) -> tuple[local_training.LocalState, RoundResult]:
    return learner.train(state, round_idx)

  def state_arrays(self, state: local_training.LocalState
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    return {'params': state.params, 'opt_state': state.opt_state, 'step': state.step}, {}

  def abstract_pending(self, state: local_training.LocalState,
                       meta: dict[str, Any]) -> dict[str, Any]:
    del state, meta
    return {}  # no updates in flight: one learner

  def restore(self, state: local_training.LocalState, arrays: dict[str, Any],
              meta: dict[str, Any], round_idx: int) -> local_training.LocalState:
    del state, meta, round_idx
    return local_training.LocalState(arrays['params'], arrays['opt_state'], arrays['step'])
