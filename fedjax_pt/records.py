"""The records of a run: typed round and step records, their writers and readers, run summaries.

`metrics.jsonl` holds one JSON object per line, a round record (`"kind": "round"`) or a step record
(`"kind": "step"`); README.md lists every key. This module is the only place that knows how a
record is laid out on disk: the run writes `RoundRecord`/`StepRecord` objects, and plots, sweeps,
reports and notebooks read them back with `read_records` and condense them with `summarize`.

Strict JSON has no NaN or infinity: a value that is not a finite number is written as the string
"nan", "inf" or "-inf" (a diverged loss must not look like a missing one), and `null` means "not
measured" (a round that was not evaluated, a key that does not apply).
"""

from collections.abc import Iterable, Sequence
import dataclasses
import json
import math
import os
import re
import statistics
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
  round_time_s: float | None = None  # measured here (the simulation trains clients in turn)
  tokens_per_s: float | None = None
  # Simulated time (fedjax_pt/federated/sim_clock.py): clients train at the same time on their own
  # hardware and links (fl.profiles); centralized: the learner's measured training time.
  sim_round_time_s: float | None = None
  sim_wall_time_s: float | None = None  # cumulative
  # Federated rounds.
  clients: list[int] | None = None
  num_aggregated: int | None = None
  skipped: bool | None = None
  retries: int | None = None
  failed_clients: dict[Any, str] | None = None
  absent_clients: list[int] | None = None  # did not show up (profile availability)
  server_time_s: float | None = None  # measured: decoding, averaging, the outer step
  client_sim_time_s: dict[int, float] | None = None  # simulated, of the clients that replied
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
  pseudo_grad_norm_per_module: dict[str, float] | None = None
  # fl.dp: the (epsilon, delta)-DP guarantee of the model after this round (fedjax_pt/federated/privacy.py),
  # and how many client deltas the server clipped this round (noise at the server).
  dp_epsilon: float | None = None
  dp_delta: float | None = None
  dp_clipped_clients: int | None = None
  secagg_clipped_values: int | None = None  # fl.secagg: delta values clipped to the range
  # Centralized rounds: means over the round's steps.
  grad_norm: float | None = None
  update_norm: float | None = None
  # log.per_layer_norms=True.
  global_norm_per_module: dict[str, float] | None = None


# Keys read off this machine's clock (simulated times include the compute and server time
# measured here, unless fl.profiles give throughputs): they differ between identical runs, and
# between a resumed run and an uninterrupted one; every other key is reproducible.
CLOCK_KEYS = ('round_time_s', 'tokens_per_s', 'sim_round_time_s', 'sim_wall_time_s',
              'server_time_s', 'client_sim_time_s')

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
  """Flattens nested dicts of numbers into (tag, value) pairs: client_val_ppl/3."""
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


# --- summaries -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunSummary:
  """What a run's round records add up to; a value the run has not logged is None."""
  rounds: int | None
  tokens: int | None
  final_val_ppl: float | None  # at the last evaluated round
  best_val_ppl: float | None
  best_round: int | None
  bytes_sent: int | None
  bytes_received: int | None
  train_time_s: float | None  # sum of the rounds' times (this and earlier sessions)
  ddp_equivalent_bytes: int | None = None  # what data-parallel training would have sent

  @property
  def bytes_communicated(self) -> int | None:
    if self.bytes_sent is None and self.bytes_received is None:
      return None
    return (self.bytes_sent or 0) + (self.bytes_received or 0)


def finite(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def summarize(rounds: Sequence[RoundRecord]) -> RunSummary:
  evaluated = [r for r in rounds if finite(r.val_ppl)]
  best = min(evaluated, key=lambda r: r.val_ppl) if evaluated else None
  last = rounds[-1] if rounds else None
  times = [r.round_time_s for r in rounds if finite(r.round_time_s)]
  return RunSummary(
      rounds=last.round if last else None,
      tokens=last.tokens if last else None,
      final_val_ppl=evaluated[-1].val_ppl if evaluated else None,
      best_val_ppl=best.val_ppl if best else None,
      best_round=best.round if best else None,
      bytes_sent=last.bytes_sent if last else None,
      bytes_received=last.bytes_received if last else None,
      train_time_s=sum(times) if times else None,
      ddp_equivalent_bytes=last.ddp_equivalent_bytes if last else None)


def curve(rounds: Iterable[RoundRecord], x: str = 'round', y: str = 'val_ppl',
          scale: float = 1.0, initial: bool = False) -> list[tuple[float, float]]:
  """(x, y) of every round where y was logged and finite; x is multiplied by `scale` (e.g. the
  local steps per round, to put runs of different tau on one axis). Round 0, the untrained model
  that runs of one seed share, only with `initial` (a comparison would find a tie there)."""
  return [(getattr(r, x) * scale, getattr(r, y)) for r in rounds
          if finite(getattr(r, y)) and (initial or r.round > 0)]


@dataclasses.dataclass(frozen=True)
class Crossing:
  """How curve A lies against curve B at the x values both have (lower is better)."""
  xs: tuple[float, ...]
  below: tuple[bool, ...]  # A < B at each of xs
  last_gap: float | None  # A / B - 1 at the last common x

  def describe(self, unit: str = '') -> str:
    """In words, with x values named as `unit` ('step ' gives 'from step 50')."""
    if not self.xs:
      return 'no common evaluation'
    xs, below = self.xs, self.below
    fmt = lambda v: f'{unit}{v:g}'
    if all(below):
      return f'below at every evaluation (from {fmt(xs[0])}; last {self.last_gap:+.1%})'
    if not any(below):
      return f'above at every evaluation, up to {fmt(xs[-1])} (last {self.last_gap:+.1%})'
    if below[-1]:
      i = max(j for j, b in enumerate(below) if not b)
      return f'crosses below between {fmt(xs[i])} and {fmt(xs[i + 1])} and stays below'
    i = max(j for j, b in enumerate(below) if b)
    at = ', '.join(fmt(x) for x, b in zip(xs, below) if b)
    return f'below at {at} only, above from {fmt(xs[i + 1])} on (last {self.last_gap:+.1%})'


def crossing(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]]) -> Crossing:
  """Where curve `a` is below curve `b` (both lists of (x, y), e.g. from `curve`)."""
  ya, yb = dict(a), dict(b)
  xs = tuple(sorted(set(ya) & set(yb)))
  if not xs:
    return Crossing((), (), None)
  return Crossing(xs, tuple(ya[x] < yb[x] for x in xs), ya[xs[-1]] / yb[xs[-1]] - 1)


# --- over seeds ----------------------------------------------------------------------------------

SEED_PART = re.compile(r'(^|,)seed=\d+(?=,|$)')


def without_seed(name: str) -> str:
  """A run's name with its `seed=N` part removed: the runs of one cell share it."""
  stripped = SEED_PART.sub('', name)
  return stripped.lstrip(',') or 'base'


def seed_of(name: str) -> int | None:
  match = re.search(r'(?:^|,)seed=(\d+)(?:,|$)', name)
  return int(match.group(1)) if match else None


@dataclasses.dataclass(frozen=True)
class Spread:
  """Finite values of several seeds: mean, sample standard deviation (0 for one), min, max."""
  mean: float
  std: float
  min: float
  max: float
  n: int

  def describe(self, spec: str = '.2f') -> str:
    """'12.59 ± 0.58 (12.11–13.71)'; one seed: the value alone."""
    if self.n == 1:
      return format(self.mean, spec)
    return (f'{self.mean:{spec}} ± {self.std:{spec}} '
            f'({self.min:{spec}}–{self.max:{spec}})')


def spread(values: Iterable[Any]) -> Spread | None:
  """The Spread of the finite values (None when there is none)."""
  kept = [float(v) for v in values if finite(v)]
  if not kept:
    return None
  return Spread(statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0,
                min(kept), max(kept), len(kept))


@dataclasses.dataclass(frozen=True)
class SeedCrossing:
  """How curve A lies against curve B over seeds, each seed's A against the same seed's B.
  `below` at an x only when A < B for every seed there: a crossing that one seed contradicts is
  noise, not a finding."""
  xs: tuple[float, ...]
  below: tuple[bool, ...]  # A < B for every seed at each of xs
  seeds: int
  last_gaps: tuple[float, ...]  # A / B - 1 of each seed at the last common x

  def describe(self, unit: str = '') -> str:
    if not self.xs:
      return 'no common evaluation'
    fmt = lambda v: f'{unit}{v:g}'
    gaps = spread(self.last_gaps)
    last = f'last {gaps.mean:+.1%} ± {gaps.std:.1%}' if gaps.n > 1 else f'last {gaps.mean:+.1%}'
    every = f'for all {self.seeds} seeds' if self.seeds > 1 else 'for its seed'
    xs, below = self.xs, self.below
    if all(below):
      return f'below {every} at every evaluation (from {fmt(xs[0])}; {last})'
    if not any(below):
      return f'not below {every} at any evaluation, up to {fmt(xs[-1])} ({last})'
    if below[-1]:
      i = max(j for j, b in enumerate(below) if not b)
      return f'below {every} from {fmt(xs[i + 1])} on ({last})'
    at = ', '.join(fmt(x) for x, b in zip(xs, below) if b)
    return f'below {every} at {at} only ({last})'


def crossing_over_seeds(pairs: Sequence[tuple[Sequence[tuple[float, float]],
                                              Sequence[tuple[float, float]]]]) -> SeedCrossing:
  """Where curve A is below curve B for every seed; `pairs` holds (A, B) curves of each seed."""
  crossings = [crossing(a, b) for a, b in pairs]
  if not crossings or any(not c.xs for c in crossings):
    return SeedCrossing((), (), len(crossings), ())
  xs = sorted(set.intersection(*(set(c.xs) for c in crossings)))
  if not xs:
    return SeedCrossing((), (), len(crossings), ())
  below = tuple(all(dict(zip(c.xs, c.below))[x] for c in crossings) for x in xs)
  gaps = tuple(dict(a)[xs[-1]] / dict(b)[xs[-1]] - 1 for a, b in pairs)
  return SeedCrossing(tuple(xs), below, len(crossings), gaps)
