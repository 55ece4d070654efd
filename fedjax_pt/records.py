"""The records of a run: typed round and step records, their writers and readers.

`metrics.jsonl` holds one JSON object per line, a round record (`"kind": "round"`) or a step record
(`"kind": "step"`); docs/outputs.md lists every key. This module is the only place that knows how a
record is laid out on disk: the run writes `RoundRecord`/`StepRecord` objects, and plots, sweeps,
reports and notebooks read them back with `read_records` (and condense them with `summaries`).

Strict JSON has no NaN or infinity: a value that is not a finite number is written as the string
"nan", "inf" or "-inf" (a diverged loss must not look like a missing one), and `null` means "not
measured" (a round that was not evaluated, a key that does not apply).
"""

from collections.abc import Sequence
import dataclasses
import json
import math
import os
from typing import Any

from absl import logging
import jax
import numpy as np

# Keys a round record always carries, as null when they have no value (not evaluated this round,
# no client trained); every other key of a RoundRecord is written only when it has a value.
_ALWAYS_WRITTEN = ('val_loss', 'val_ppl', 'train_loss', 'train_ppl')


@dataclasses.dataclass
class StepRecord:
  """A client's local step (every `log.every_steps`); client -1 is the centralized run."""
  round: int
  client: int
  step: int  # global local step: (round - 1) * local_steps + local_step
  local_step: int
  loss: float
  grad_norm: float
  update_norm: float
  lr: float


@dataclasses.dataclass
class RoundRecord:
  """The state of the run after a round: the server model's quality and what the round cost.

  Client-keyed dicts ({client: value}) have int keys in memory and string keys in JSON.
  """
  round: int
  tokens: int  # cumulative, all clients
  bytes_sent: int | None = None  # cumulative, server -> clients
  bytes_received: int | None = None  # cumulative, clients -> server
  val_loss: float | None = None
  val_ppl: float | None = None
  train_loss: float | None = None
  train_ppl: float | None = None
  global_norm: float | None = None
  lr: float | None = None
  # Measured here (the simulation trains clients in turn), from the end of the previous round's
  # record: that round's checkpoint (its blocking part), the clients, the server, the evaluation.
  round_time_s: float | None = None
  tokens_per_s: float | None = None
  # Simulated time (fedjax_pt/federated/sim_clock.py): clients train at the same time on their own
  # hardware and links (fl.profiles); centralized: the learner's measured training and evaluation.
  sim_round_time_s: float | None = None
  sim_wall_time_s: float | None = None  # cumulative
  # Federated rounds.
  clients: list[int] | None = None
  num_aggregated: int | None = None
  skipped: bool | None = None
  retries: int | None = None
  failed_clients: dict[Any, str] | None = None
  absent_clients: list[int] | None = None  # did not show up (profile availability)
  # A deployment: clients no node was online for (client -> why), and nodes refused a seat
  # (node id -> why: a key other than the seat's, or a name that is no seat).
  unavailable_clients: dict[int, str] | None = None
  refused_nodes: dict[int, str] | None = None
  # Measured: decoding, averaging, the outer step, evaluating the new model, and the blocking part
  # of the previous round's checkpoint.
  server_time_s: float | None = None
  client_sim_time_s: dict[int, float] | None = None  # simulated, of the clients that replied
  # Training time of the clients whose update arrived (not known inside a secure sum): measured
  # on their own hosts (the simulation's: here, one after another), and as the simulated clock
  # charges it (their fl.profiles throughput, else as measured).
  client_compute_s: dict[int, float] | None = None
  client_sim_compute_s: dict[int, float] | None = None
  # Compute utilisation (fedjax_pt/utilization.py): a client's training time / the round's wall
  # time, and the clients' mean. On the simulated clock (sim_round_time_s), and measured
  # (round_time_s) where the clients train on their own hosts, in parallel: a deployment.
  sim_compute_utilization: float | None = None
  client_sim_compute_utilization: dict[int, float] | None = None
  compute_utilization: float | None = None
  client_compute_utilization: dict[int, float] | None = None
  client_local_steps: dict[int, int] | None = None
  client_train_loss: dict[int, float] | None = None
  client_grad_norm: dict[int, float] | None = None
  client_update_norm: dict[int, float] | None = None
  client_norm: dict[int, float] | None = None
  client_delta_norm: dict[int, float] | None = None
  client_download_bytes: dict[int, int] | None = None
  client_upload_bytes: dict[int, int] | None = None
  compression_ratio: float | None = None  # this round: float32 size of its messages / wire size
  peak_sync_bytes: int | None = None  # most bytes (both ways, all clients) of one sync this round
  ddp_equivalent_bytes: int | None = None  # cumulative: data-parallel ring all-reduce, same tokens
  pseudo_grad_norm: float | None = None
  outer_update_norm: float | None = None
  outer_momentum_norm: float | None = None
  mean_client_norm: float | None = None
  client_val_loss: dict[int, float] | None = None
  client_val_ppl: dict[int, float] | None = None
  # eval.extra_files: the server model on each extra held-out file, {name: value}.
  extra_val_loss: dict[str, float] | None = None
  extra_val_ppl: dict[str, float] | None = None
  pseudo_grad_norm_per_module: dict[str, float] | None = None
  # fl.dp: the (epsilon, delta)-DP guarantee of the model after this round
  # (fedjax_pt/federated/privacy.py), and how many client deltas the server clipped this round
  # (noise at the server).
  dp_epsilon: float | None = None
  dp_delta: float | None = None
  dp_clipped_clients: int | None = None
  secagg_clipped_values: int | None = None  # fl.secagg: delta values clipped to the range
  # fl.aggregation (fedjax_pt/federated/robust.py): trimmed_mean / median: {client: fraction of
  # its delta's values the rule dropped} (clients with none dropped left out); norm_clipped:
  # {client: the scale its delta was multiplied by}, clipped clients only ({}: none clipped).
  robust_trimmed_values: dict[int, float] | None = None
  robust_clipped_clients: dict[int, float] | None = None
  # fl.quorum (fedjax_pt/federated/quorum.py): clients whose update missed this round's close
  # ({client: its simulated arrival, s from the round's start}), kept for a later round; and late
  # updates of earlier rounds averaged in this one ({client: staleness in rounds}).
  late_clients: dict[int, float] | None = None
  stale_clients: dict[int, int] | None = None
  # Centralized rounds: means over the round's steps.
  grad_norm: float | None = None
  update_norm: float | None = None
  # log.per_layer_norms=True.
  global_norm_per_module: dict[str, float] | None = None


def first_step(round_idx: int, local_steps: int, start: int = 0) -> int:
  """The run's step index of local step `start` of round `round_idx` (rounds count from 1, each
  `fl.local_steps` long): what the lr schedule reads and `StepRecord.step` says, whatever a
  client's own number of steps."""
  return (round_idx - 1) * local_steps + start


def step_records(logged: Sequence[dict[str, float]], round_idx: int, client: int,
                 local_steps: int, start: int = 0) -> list[StepRecord]:
  """A client's logged local steps ({'local_step': t, 'loss': ...}, t counted from `start`, where
  a streaming segment begins) as records of round `round_idx`."""
  return [StepRecord(round=round_idx, client=client,
                     step=first_step(round_idx, local_steps, start) + int(m['local_step']),
                     **{**m, 'local_step': start + int(m['local_step'])})
          for m in logged]


# Keys read off this machine's clock (simulated times include the compute and server time
# measured here, unless fl.profiles give throughputs): they differ between identical runs, and
# between a resumed run and an uninterrupted one; every other key is reproducible.
CLOCK_KEYS = ('round_time_s', 'tokens_per_s', 'sim_round_time_s', 'sim_wall_time_s',
              'server_time_s', 'client_sim_time_s', 'client_compute_s', 'client_sim_compute_s',
              'sim_compute_utilization', 'client_sim_compute_utilization', 'compute_utilization',
              'client_compute_utilization')

_ROUND_FIELDS = {f.name for f in dataclasses.fields(RoundRecord)}
_STEP_FIELDS = {f.name for f in dataclasses.fields(StepRecord)}


def to_json(record: RoundRecord | StepRecord) -> dict[str, Any]:
  """The JSON object of a record (strict JSON: NaN/Inf are written as null)."""
  kind = 'round' if isinstance(record, RoundRecord) else 'step'
  out = {'kind': kind}
  for field in dataclasses.fields(record):
    value = getattr(record, field.name)
    if value is None and kind == 'round' and field.name not in _ALWAYS_WRITTEN:
      continue
    out[field.name] = _jsonable(value)
  return out


def from_json(obj: dict[str, Any]) -> RoundRecord | StepRecord | None:
  """The record of a JSON object; keys of other versions are ignored, unknown kinds give None."""
  if obj.get('kind') == 'round':
    return RoundRecord(**{k: _from_jsonable(v) for k, v in obj.items() if k in _ROUND_FIELDS})
  if obj.get('kind') == 'step':
    return StepRecord(**{k: _from_jsonable(v) for k, v in obj.items() if k in _STEP_FIELDS})
  return None


def _jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    return _jsonable(np.asarray(value).tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return _NON_FINITE[str(value)]  # 'nan', 'inf', '-inf': every line stays strict JSON
  return value


_NON_FINITE = {'nan': 'nan', 'inf': 'inf', '-inf': '-inf'}


def _from_jsonable(value: Any) -> Any:
  if isinstance(value, str) and value in _NON_FINITE:
    return float(value)
  if isinstance(value, dict):
    return {k: _from_jsonable(v) for k, v in value.items()}
  return value


def _scalars(obj: dict[str, Any], prefix: str = ''):
  """Flattens nested dicts of numbers into (tag, value) pairs: client_val_ppl/3,
  extra_val_ppl/acme."""
  for key, value in obj.items():
    tag = f'{prefix}{key}'
    if isinstance(value, dict):
      yield from _scalars(value, f'{tag}/')
    elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
      if math.isfinite(value):  # TensorBoard draws no NaN; metrics.jsonl keeps it
        yield tag, float(value)


class RecordWriter:
  """Appends records to `metrics.jsonl` and, optionally, to TensorBoard event files.

  The JSON line is flushed at every record, so a crash never leaves a half-written line and a live
  run can be tailed or plotted. TensorBoard has two runs: `tensorboard/` (round records, step =
  round) and `tensorboard/steps/` (step records under `step/`, one curve per client, step = global
  local step). A resumed run passes the records it keeps (`previous`: metrics.jsonl cut back to
  its checkpoint): TensorBoard then drops every event an earlier session logged, and gets the
  kept records again from metrics.jsonl, so it holds exactly what the file holds even when the
  earlier session was killed before its writer thread had put all of a round's events on disk.
  """

  def __init__(self, workdir: str, tensorboard: bool = True, previous: 'Records | None' = None):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._file = open(self.path, 'a', encoding='utf-8')
    self._rounds_tb = self._steps_tb = None
    if tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      directory = os.path.join(workdir, 'tensorboard')
      purge = 0 if previous is not None else None  # a SessionLog START at step 0 drops them all
      self._rounds_tb = tensorboardX.SummaryWriter(directory, purge_step=purge, flush_secs=30)
      self._steps_tb = tensorboardX.SummaryWriter(os.path.join(directory, 'steps'),
                                                  purge_step=purge, flush_secs=30)
      for record in (previous.rounds + previous.steps) if previous is not None else ():
        self._to_tensorboard(record, to_json(record))

  def write(self, record: RoundRecord | StepRecord) -> None:
    obj = to_json(record)
    try:
      self._file.write(json.dumps(obj) + '\n')
      self._file.flush()
    except OSError as e:  # a full disk: say which file, not just the errno
      raise OSError(e.errno, f'{self.path} could not be written ({e.strerror})') from e
    self._to_tensorboard(record, obj)

  def _to_tensorboard(self, record: RoundRecord | StepRecord, obj: dict[str, Any]) -> None:
    if self._rounds_tb is None:
      return
    if isinstance(record, RoundRecord):
      skip = {'round', 'kind', 'clients'}
      for tag, value in _scalars({k: v for k, v in obj.items() if k not in skip}):
        self._rounds_tb.add_scalar(tag, value, record.round)
    else:
      for tag, value in _scalars({key: getattr(record, key) for key in
                                  ('loss', 'grad_norm', 'update_norm', 'lr')}):
        self._steps_tb.add_scalar(f'step/{tag}/client_{record.client}', value, record.step)

  def tell(self) -> int:
    """Bytes of metrics.jsonl written so far: where a resumed run cuts the file back to."""
    return self._file.tell()

  def close(self) -> None:
    self._file.close()
    for tb in (self._rounds_tb, self._steps_tb):
      if tb is not None:
        tb.close()


class NullWriter:
  """The writer of a process other than 0 in a multi-process run: process 0 writes the records."""

  def write(self, record: RoundRecord | StepRecord) -> None:
    del record

  def tell(self) -> int:
    return 0  # what the checkpoint's meta says is process 0's (orbax writes its JSON)

  def close(self) -> None:
    pass


@dataclasses.dataclass
class Records:
  rounds: list[RoundRecord]
  steps: list[StepRecord]


def read_records(path: str) -> Records:
  """The records of a metrics.jsonl (or of the one in a workdir); a torn last line (a run killed
  mid-write) is skipped and logged."""
  if os.path.isdir(path):
    path = os.path.join(path, 'metrics.jsonl')
  rounds, steps = [], []
  with open(path, encoding='utf-8') as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = from_json(json.loads(line))
      except (json.JSONDecodeError, TypeError, AttributeError):
        logging.warning('%s:%d is not a valid record; skipped', path, i)
        continue
      if isinstance(record, RoundRecord):
        rounds.append(record)
      elif isinstance(record, StepRecord):
        steps.append(record)
  return Records(rounds, steps)
