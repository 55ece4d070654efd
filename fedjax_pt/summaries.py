"""What the records of runs add up to: a run's summary, its curves and where two curves cross,
over one seed or several (`records` reads them; plots, sweeps, reports and notebooks use these).
"""

from collections.abc import Iterable, Sequence
import dataclasses
import math
import re
import statistics
from typing import Any

from fedjax_pt import utilization
from fedjax_pt.records import RoundRecord


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
  final_extra_val_ppl: dict[str, float] | None = None  # eval.extra_files, last evaluated round
  # The clients' training time / their wall time (fedjax_pt/utilization.py): on the simulated
  # clock, and measured (a deployment).
  sim_compute_utilization: float | None = None
  compute_utilization: float | None = None

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
      ddp_equivalent_bytes=last.ddp_equivalent_bytes if last else None,
      final_extra_val_ppl=next((r.extra_val_ppl for r in reversed(rounds) if r.extra_val_ppl),
                               None),
      sim_compute_utilization=utilization.of_run(rounds, measured=False),
      compute_utilization=utilization.of_run(rounds, measured=True))


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
