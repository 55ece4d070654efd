r"""Table and figure of the heterogeneous-clients study (experiments/heterogeneous.yaml).

  python experiments/heterogeneous_report.py --root=runs/heterogeneous --out=experiments/results

Writes OUT/heterogeneous.csv and OUT/heterogeneous.md (per fleet, mean ± std over seeds: final
validation perplexity, its perplexity when the equal fleet finishes, the simulated wall time of
the run and of a round, the local steps and clients per round) and OUT/heterogeneous.png
(validation perplexity against simulated wall time, mean over seeds with a min-max band).
"""

from __future__ import annotations

import os
import re
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

from experiments import sweep_report  # pylint: disable=wrong-import-position
from experiments import sweep_runner  # pylint: disable=wrong-import-position
from fedjax_pt import plot  # pylint: disable=wrong-import-position

REFERENCE = 'equal'


def by_fleet(root: str, spec_path: str) -> dict[str, list[plot.Run]]:
  """{fleet: its runs, one per seed} of every run that has logged a round."""
  fleets: dict[str, list[plot.Run]] = {}
  for name, run in sweep_report.logged_runs(root, spec_path):
    fleets.setdefault(re.sub(r',seed=\d+$', '', name), []).append(run)
  return fleets


def _evaluated(run: plot.Run) -> tuple[np.ndarray, np.ndarray]:
  points = [(r.sim_wall_time_s, r.val_ppl) for r in run.rounds if r.val_ppl is not None]
  return np.array([t for t, _ in points]), np.array([p for _, p in points])


def ppl_at(run: plot.Run, sim_s: float) -> float | None:
  """Validation perplexity at simulated time `sim_s`, linear between evaluations (None after the
  run's end)."""
  times, ppls = _evaluated(run)
  return None if sim_s > times[-1] + 1e-9 else float(np.interp(sim_s, times, ppls))


def _stats(values: Sequence[float | None]) -> tuple[float | None, float | None]:
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def rows(fleets: Mapping[str, list[plot.Run]]) -> list[dict[str, Any]]:
  # Equal simulated time: when the first run of any fleet ended.
  end = min(run.rounds[-1].sim_wall_time_s for runs in fleets.values() for run in runs)
  reference = {_seed(run): run.rounds[-1].val_ppl for run in fleets.get(REFERENCE, [])}
  out = []
  for name, runs in fleets.items():
    trained = [[r for r in run.rounds if r.round > 0] for run in runs]
    final = _stats([run.rounds[-1].val_ppl for run in runs])
    at_end = _stats([ppl_at(run, end) for run in runs])
    # Paired with the reference fleet's run of the same seed (same data split and batches).
    paired = [run.rounds[-1].val_ppl / reference[_seed(run)] - 1 for run in runs
              if _seed(run) in reference]
    out.append({
        'fleet': name,
        'seeds': len(runs),
        'rounds': min(len(t) for t in trained),
        'final_val_ppl': final[0], 'final_val_ppl_std': final[1],
        'final_vs_reference_per_seed': paired,
        'val_ppl_at_equal_time': at_end[0], 'val_ppl_at_equal_time_std': at_end[1],
        'sim_wall_s': statistics.mean(run.rounds[-1].sim_wall_time_s for run in runs),
        'sim_round_s': statistics.mean(r.sim_round_time_s for t in trained for r in t),
        'local_steps_per_round': statistics.mean(sum(r.client_local_steps.values())
                                                 for t in trained for r in t),
        'aggregated_per_round': statistics.mean(r.num_aggregated for t in trained for r in t),
        'wall_s': sum(sweep_runner.read_state(run.workdir).get('wall_s') or 0 for run in runs),
    })
  for row in out:
    row['equal_time_s'] = end
  return out


def _seed(run: plot.Run) -> int:
  return run.config['seed']


def write_tables(table: Sequence[Mapping[str, Any]], out: str) -> tuple[str, str]:
  end = table[0]['equal_time_s']
  fmt = sweep_report.fmt

  def pm(mean, std):
    return f'{fmt(mean, ".2f")} ± {fmt(std, ".2f")}'

  lines = [f'| fleet | final val ppl | final vs `{REFERENCE}`, per seed | val ppl at '
           f'{fmt(end, ".0f")} s | simulated wall time | per round | local steps per round (all '
           'clients) | clients averaged per round | seeds | CPU time |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in table:
    paired = ', '.join(f'{v:+.1%}' for v in r['final_vs_reference_per_seed'])
    lines.append(
        f"| `{r['fleet']}` | {pm(r['final_val_ppl'], r['final_val_ppl_std'])} | {paired} | "
        f"{pm(r['val_ppl_at_equal_time'], r['val_ppl_at_equal_time_std'])} | "
        f"{fmt(r['sim_wall_s'], '.0f')} s | {fmt(r['sim_round_s'], '.1f')} s | "
        f"{fmt(r['local_steps_per_round'], '.0f')} | {fmt(r['aggregated_per_round'], '.0f')} | "
        f"{r['seeds']} | {fmt(r['wall_s'] / 60, '.1f')} min |")
  return sweep_report.write_tables(table, list(table[0]), '\n'.join(lines), out, 'heterogeneous')


def figure(fleets: Mapping[str, list[plot.Run]], path: str) -> str:
  fig, ax = plt.subplots(figsize=(8, 5))
  for i, (name, runs) in enumerate(fleets.items()):
    curves = [_evaluated(run) for run in runs]
    rounds = min(len(t) for t, _ in curves)
    times = np.mean([t[:rounds] for t, _ in curves], axis=0)
    ppls = np.array([p[:rounds] for _, p in curves])
    ax.plot(times, ppls.mean(axis=0), 'o-', ms=3, color=f'C{i}',
            label=f'{name} ({len(runs)} seeds)')
    ax.fill_between(times, ppls.min(axis=0), ppls.max(axis=0), color=f'C{i}', alpha=0.15)
  ax.set_title('8 clients, 4x speed spread: validation perplexity on the simulated clock')
  plot.perplexity_axis(ax, 'simulated wall time (s)')
  ax.legend(fontsize=8)
  return plot.save(fig, path, dpi=150)


def main(argv: Sequence[str] | None = None) -> int:
  def write(fleets, root, out):
    del root  # the runs carry their workdirs
    return [*write_tables(rows(fleets), out),
            figure(fleets, os.path.join(out, 'heterogeneous.png'))]

  return sweep_report.report_cli(argv, __doc__, 'heterogeneous', by_fleet, write)


if __name__ == '__main__':
  sys.exit(main())
