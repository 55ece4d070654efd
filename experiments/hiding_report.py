r"""Table and figure of the slow-link / slow-partner study (experiments/hiding.yaml), over seeds.

  python experiments/hiding_report.py --root=runs/hiding --out=experiments/results

Writes OUT/hiding.csv and OUT/hiding.md: per kind of round (the run name less its seed), mean ±
std over seeds of the final validation perplexity, its gap to the synchronous run of the same
seed, the simulated wall time and round, the compute utilisation (`fedjax_pt.utilization`, on
the simulated clock) and the simulated time to reach the synchronous run's final perplexity + 2%
(the same seed's); and OUT/hiding.png (perplexity against simulated time, mean with a min-max
band).
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Mapping, Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import matplotlib  # pylint: disable=wrong-import-position

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from experiments import heterogeneous_report  # pylint: disable=wrong-import-position
from experiments import sweep_report  # pylint: disable=wrong-import-position
from fedjax_pt import plot  # pylint: disable=wrong-import-position
from fedjax_pt import summaries

REFERENCE = 'sync'
TOLERANCE = 0.02  # the target: the synchronous run's final perplexity + 2%


def time_to(run: plot.Run, target: float) -> float | None:
  """Simulated seconds until the validation perplexity first reaches `target` (linear between
  evaluations; None: never)."""
  times, ppls = heterogeneous_report._evaluated(run)  # pylint: disable=protected-access
  for i, ppl in enumerate(ppls):
    if ppl <= target:
      if i == 0:
        return float(times[0])
      return float(np.interp(target, [ppls[i], ppls[i - 1]], [times[i], times[i - 1]]))
  return None


def _spread(values) -> tuple[float | None, float | None]:
  kept = [v for v in values if summaries.finite(v)]
  if not kept:
    return None, None
  return statistics.mean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0


def rows(kinds: Mapping[str, list[plot.Run]]) -> list[dict[str, Any]]:
  seed = lambda run: run.config['seed']
  reference = {seed(r): r.rounds[-1].val_ppl for r in kinds.get(REFERENCE, [])}
  out = []
  for name, runs in kinds.items():
    trained = [r for run in runs for r in run.rounds if r.round > 0]
    paired = [run.rounds[-1].val_ppl / reference[seed(run)] - 1 for run in runs
              if seed(run) in reference]
    reached = [time_to(run, reference[seed(run)] * (1 + TOLERANCE)) for run in runs
               if seed(run) in reference]
    row = {'rounds': name, 'seeds': len(runs)}
    for key, values in (
        ('final_val_ppl', [run.rounds[-1].val_ppl for run in runs]),
        ('vs_sync', paired),
        ('sim_wall_s', [run.rounds[-1].sim_wall_time_s for run in runs]),
        ('sim_round_s', [r.sim_round_time_s for r in trained]),
        ('utilization', [summaries.summarize(run.rounds).sim_compute_utilization
                         for run in runs]),
        ('time_to_target_s', reached),
        ('aggregated_per_round', [r.num_aggregated for r in trained])):
      row[key], row[key + '_std'] = _spread(values)
    row['vs_sync_per_seed'] = ' '.join(f'{v:+.1%}' for v in paired)
    row['reached_target'] = f'{sum(t is not None for t in reached)}/{len(reached)}'
    out.append(row)
  return out


def write_tables(table: Sequence[Mapping[str, Any]], out: str) -> tuple[str, str]:
  fmt = sweep_report.fmt

  def pm(r, key, spec):
    if not summaries.finite(r[key]):
      return 'never'
    return f"{fmt(r[key], spec)} ± {fmt(r[key + '_std'], spec.lstrip('+'))}"

  lines = ['| rounds | seeds | final val ppl | vs `sync`, paired (per seed) | compute utilisation '
           '(simulated) | simulated wall time | per round | to `sync`\'s final ppl + 2% (seeds '
           'that got there) | updates averaged per round |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in table:
    gap = (f"{pm(r, 'vs_sync', '+.1%')} ({r['vs_sync_per_seed']})"
           if r['rounds'] != REFERENCE else '(reference)')
    lines.append(
        f"| `{r['rounds']}` | {r['seeds']} | {pm(r, 'final_val_ppl', '.2f')} | {gap} | "
        f"{pm(r, 'utilization', '.1%')} | {pm(r, 'sim_wall_s', '.0f')} s | "
        f"{pm(r, 'sim_round_s', '.1f')} s | {pm(r, 'time_to_target_s', '.0f')} s "
        f"({r['reached_target']}) | {pm(r, 'aggregated_per_round', '.1f')} |".replace(
            'never s', 'never'))
  return sweep_report.write_tables(table, list(table[0]), '\n'.join(lines), out, 'hiding')


def figure(kinds: Mapping[str, list[plot.Run]], path: str) -> str:
  fig, ax = plt.subplots(figsize=(8, 5))
  for i, (name, runs) in enumerate(kinds.items()):
    curves = [heterogeneous_report._evaluated(run) for run in runs]  # pylint: disable=protected-access
    rounds = min(len(t) for t, _ in curves)
    times = np.mean([t[:rounds] for t, _ in curves], axis=0)
    ppls = np.array([p[:rounds] for _, p in curves])
    ax.plot(times, ppls.mean(axis=0), 'o-', ms=3, color=f'C{i}',
            label=f'{name} ({len(runs)} seeds)')
    ax.fill_between(times, ppls.min(axis=0), ppls.max(axis=0), color=f'C{i}', alpha=0.15)
  ax.set_title('8 clients, one 4x slower, one on 0.2 Mbit/s: perplexity on the simulated clock',
               fontsize=10)
  plot.perplexity_axis(ax, 'simulated wall time (s)')
  ax.legend(fontsize=8)
  return plot.save(fig, path, dpi=150)


def main(argv: Sequence[str] | None = None) -> int:
  def write(kinds, root, out):
    del root
    return [*write_tables(rows(kinds), out), figure(kinds, os.path.join(out, 'hiding.png'))]

  return sweep_report.report_cli(argv, __doc__, 'hiding', heterogeneous_report.by_fleet, write)


if __name__ == '__main__':
  sys.exit(main())
