"""What a round adds to the run: its totals (tokens, bytes, simulated time, DP releases) and its
record, with what is derived from those totals: the privacy spent so far (epsilon, by
`federated.privacy`) and the bytes data-parallel training would have sent for the same tokens
(`federated.communication`).
"""

import dataclasses
import math
from typing import Any

from fedjax_pt import metrics
from fedjax_pt import records
from fedjax_pt.federated import communication
from fedjax_pt.federated import privacy
from fedjax_pt.federated.tally import RoundResult
from fedjax_pt.run_spec import RunSpec


@dataclasses.dataclass(frozen=True)
class Totals:
  """Cumulative counts of a run, carried across sessions in its checkpoints."""
  tokens: int = 0
  bytes_sent: int = 0
  bytes_received: int = 0
  sim_wall_time_s: float = 0.0  # simulated (`federated.sim_clock`)
  dp_releases: int = 0  # synchronisations that released a DP mechanism (fl.dp)


def divergence(record: records.RoundRecord, params_finite: bool) -> str | None:
  """Why the model of a round counts as destroyed, or None. Parameters that are not finite, and
  also finite ones so large that the norm overflows or the losses are not finite."""
  if not params_finite:
    return 'the global model is not finite'
  for key in ('global_norm', 'val_loss', 'train_loss'):
    value = getattr(record, key)
    if value is not None and not math.isfinite(value):
      return f'the global model\'s {key} is {value}'
  return None


def _dp(spec: RunSpec) -> bool:
  return spec.fl.dp.enabled and spec.mode == 'federated'


def with_server_work(result: RoundResult, seconds: float) -> RoundResult:
  """`result` with `seconds` more of the server's own work (measured: evaluating the new model,
  the blocking part of the previous round's checkpoint) in its simulated round time and, where
  it has one, its `server_time_s`: the clients wait for it in a deployment too."""
  changes = {'sim_round_time_s': result.stats.sim_round_time_s + seconds}
  if getattr(result.stats, 'server_time_s', None) is not None:
    changes['server_time_s'] = result.stats.server_time_s + seconds
  return dataclasses.replace(result, stats=dataclasses.replace(result.stats, **changes))


def add(totals: Totals, result: RoundResult, spec: RunSpec) -> Totals:
  """The totals after `result`."""
  return Totals(tokens=totals.tokens + result.tokens,
                bytes_sent=totals.bytes_sent + result.bytes_sent,
                bytes_received=totals.bytes_received + result.bytes_received,
                sim_wall_time_s=totals.sim_wall_time_s + (result.stats.sim_round_time_s or 0.0),
                dp_releases=totals.dp_releases + (result.synchronisations if _dp(spec) else 0))


def initial_record(params, evaluation: dict[str, Any]) -> records.RoundRecord:
  """Round 0: the initial model, before any training, so every curve starts at the same point."""
  return records.RoundRecord(round=0, tokens=0, bytes_sent=0, bytes_received=0,
                             sim_wall_time_s=0.0, global_norm=float(metrics.l2_norm(params)),
                             **evaluation)


def round_record(spec: RunSpec, round_idx: int, params, result: RoundResult, totals: Totals,
                 evaluation: dict[str, Any], lr: float) -> records.RoundRecord:
  """The record of a round: what it did, the totals so far, the server model's quality
  (`evaluation`: the evaluator's keys) and the local lr at its last step."""
  train_ppl = None if result.train_loss is None else metrics.perplexity(result.train_loss)
  record = records.RoundRecord(
      round=round_idx, tokens=totals.tokens, bytes_sent=totals.bytes_sent,
      bytes_received=totals.bytes_received, sim_wall_time_s=totals.sim_wall_time_s,
      train_loss=result.train_loss, train_ppl=train_ppl,
      global_norm=float(metrics.l2_norm(params)), lr=lr, **evaluation,
      **dataclasses.asdict(result.stats))
  if spec.mode == 'federated':
    record.ddp_equivalent_bytes = communication.ddp_equivalent_bytes(
        metrics.tree_bytes(params), spec.fl.clients_per_round,
        spec.data.batch_size * spec.data.seq_len, totals.tokens)
  if _dp(spec):
    dp = spec.fl.dp
    record.dp_epsilon = privacy.epsilon(dp.noise_multiplier,
                                        spec.fl.clients_per_round / spec.fl.num_clients,
                                        totals.dp_releases, dp.delta, dp.accountant)
    record.dp_delta = dp.delta
  if spec.per_layer_norms:
    record.global_norm_per_module = metrics.per_module_norms(params)
  return record
