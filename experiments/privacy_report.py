r"""Table and figure of the privacy study (experiments/privacy.yaml) from its sweep root.

  python experiments/privacy_report.py --root=runs/privacy --out=experiments/results

Writes OUT/privacy.csv and OUT/privacy.md (every run: clients and clients per round, sampling
rate, noise multiplier, the noise's std on the mean delta, epsilon at delta after the last round,
final validation perplexity and its cost against the same fleet without DP, wall time) and
OUT/privacy.png (final validation perplexity against epsilon, one line per fleet, the fleets'
runs without DP as horizontal lines).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import matplotlib  # pylint: disable=wrong-import-position

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import matplotlib.ticker  # pylint: disable=wrong-import-position

from experiments import sweep_report  # pylint: disable=wrong-import-position
from experiments import sweep_spec  # pylint: disable=wrong-import-position
from fedjax_pt import plot  # pylint: disable=wrong-import-position

DIVERGED = 1e4  # a final val_ppl above this is reported as the model destroyed


def load(root: str, spec_path: str) -> dict[str, plot.Run]:
  """{run name: run} of every study run that has logged a round, in the spec's order."""
  return dict(sweep_report.logged_runs(root, spec_path))


def _fleet(run: plot.Run) -> tuple[int, int]:
  fl = run.config['fl']
  return fl['num_clients'], fl['clients_per_round']


def _vs_no_dp(row) -> str:
  """The change against the run without DP, or a dash where the model was destroyed."""
  if row['final_val_ppl'] and row['final_val_ppl'] > DIVERGED:
    return '—'
  return sweep_report.fmt(row['vs_no_dp'], '+.1%')


def _final_ppl(run: plot.Run) -> float | None:
  """The last evaluated perplexity even when it is not finite (`summaries.summarize` reports the
  last finite one): noise can destroy a model, and the table must say so, not show a round before.
  """
  evaluated = [r.val_ppl for r in run.rounds if r.val_ppl is not None]
  return evaluated[-1] if evaluated else None


def rows(runs: Mapping[str, plot.Run], root: str) -> list[dict[str, Any]]:
  baselines = {_fleet(run): _final_ppl(run) for run in runs.values()
               if not run.config['fl']['dp']['enabled']}
  out = []
  for name, run in runs.items():
    summary = sweep_report.summarize(sweep_spec.Run(name, '', {}, {}), os.path.join(root, name))
    fl, last = run.config['fl'], run.rounds[-1]
    dp = fl['dp']
    clients, per_round = _fleet(run)
    final, baseline = _final_ppl(run), baselines.get(_fleet(run))
    sigma = dp['noise_multiplier'] if dp['enabled'] else None
    out.append({
        'run': name,
        'clients': clients,
        'clients_per_round': per_round,
        'sampling_rate': per_round / clients,
        'dp': dp['enabled'],
        'clip_norm': dp['clip_norm'] if dp['enabled'] else None,
        'noise_multiplier': sigma,
        'noise_std_on_mean': sigma * dp['clip_norm'] / per_round if sigma is not None else None,
        'epsilon': last.dp_epsilon,
        'delta': last.dp_delta,
        'final_val_ppl': final,
        'vs_no_dp': final / baseline - 1 if final and baseline else None,
        'rounds': f"{summary['rounds']}/{summary['rounds_total']}",
        'wall_s': summary['wall_s'],
        'status': summary['status'],
    })
  return out


def _ppl(value: float | None) -> str:
  if value is None:
    return 'n/a'
  return f'destroyed ({value:.1e})' if value > DIVERGED else f'{value:.2f}'


def _epsilon(row: Mapping[str, Any]) -> str:
  if not row['dp']:
    return 'no DP'
  eps = row['epsilon']
  return '∞ (no noise)' if eps is None or math.isinf(eps) else f'{eps:.3g}'


def write_tables(table: Sequence[Mapping[str, Any]], out: str) -> tuple[str, str]:
  lines = ['| run | clients (per round) | q | σ | noise std on the mean delta | ε at δ=1e-5 '
           '| final val ppl | vs no DP | wall time |',
           '|---|---|---:|---:|---:|---:|---:|---:|---:|']
  for r in table:
    lines.append(
        f"| `{r['run']}` | {r['clients']} ({r['clients_per_round']}) | "
        f"{r['sampling_rate']:.2g} | {sweep_report.fmt(r['noise_multiplier'], 'g')} | "
        f"{sweep_report.fmt(r['noise_std_on_mean'], '.3g')} | {_epsilon(r)} | "
        f"{_ppl(r['final_val_ppl'])} | "
        f"{_vs_no_dp(r)} | "
        f"{sweep_report.fmt(r['wall_s'] and r['wall_s'] / 60, '.1f')} min |")
  return sweep_report.write_tables(table, list(table[0]), '\n'.join(lines), out, 'privacy')


def figure(runs: Mapping[str, plot.Run], table: Sequence[Mapping[str, Any]], path: str) -> str:
  fig, ax = plt.subplots(figsize=(8, 5))
  fleets = sorted({(r['clients'], r['clients_per_round']) for r in table})
  for i, fleet in enumerate(fleets):
    rows_ = [r for r in table if (r['clients'], r['clients_per_round']) == fleet]
    label = f'{fleet[0]} clients, {fleet[1]} per round'
    points = sorted((r['epsilon'], min(r['final_val_ppl'], DIVERGED)) for r in rows_
                    if r['dp'] and r['epsilon'] is not None and math.isfinite(r['epsilon']))
    # Points, not a line: the runs lie decades of epsilon apart and nothing between was measured.
    ax.plot([e for e, _ in points], [p for _, p in points], 'o', ms=6, color=f'C{i}', label=label)
    for r in rows_:
      if not r['dp']:
        ax.axhline(r['final_val_ppl'], color=f'C{i}', ls='--', lw=1, label=f'{label}, no DP')
  ax.set_xscale('log')
  ax.axvspan(1, 8, color='0.9', zorder=0, label='ε from 1 to 8')
  ax.set_title(f'client-level DP-FedAvg, d_model 64 on C4, one seed (ppl capped at {DIVERGED:.0e})')
  plot.perplexity_axis(ax, 'ε at δ = 1e-5 after 8 rounds')
  ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.legend(fontsize=7)
  del runs
  return plot.save(fig, path, dpi=150)


def main(argv: Sequence[str] | None = None) -> int:
  def write(runs, root, out):
    table = rows(runs, root)
    return [*write_tables(table, out), figure(runs, table, os.path.join(out, 'privacy.png'))]

  return sweep_report.report_cli(argv, __doc__, 'privacy', load, write)


if __name__ == '__main__':
  sys.exit(main())
