r"""Tables and figure of the frontier-algorithms study (experiments/algorithms.yaml), over seeds.

  python experiments/algorithms_report.py --root=runs/algorithms --out=experiments/results

Writes OUT/algorithms.csv and OUT/algorithms.md: for each cell (the run name less its seed), the
final validation perplexity as mean ± std (min–max) over seeds, and its gap to a reference cell
paired by seed (the same initial model, data order and held-out documents) with a 95% t interval:
  - Muon vs AdamW inside the clients (each `muon_*` cell against its `adamw_*` twin) and each
    against its own 1-worker baseline;
  - bytes at equal quality (each `comm` cell against `scratch,adamw_tau50`, float32 both ways),
    with the bytes put on the network and how many times fewer than data-parallel training;
  - robust aggregation (each poison x rule cell against the clean run with the plain mean).
OUT/algorithms.png: the curves of Muon and AdamW, perplexity against bytes, and the robustness grid.
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
from matplotlib import ticker  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from scipy import stats  # pylint: disable=wrong-import-position

from experiments import diloco_report  # pylint: disable=wrong-import-position
from experiments import sweep_report  # pylint: disable=wrong-import-position
from experiments import sweep_runner  # pylint: disable=wrong-import-position
from fedjax_pt import plot  # pylint: disable=wrong-import-position
from fedjax_pt import summaries
from fedjax_pt.federated import communication

COMM_REFERENCE = 'scratch,adamw_tau50'
ROBUST_REFERENCE = 'robust,clean,mean'
POISONS = ('clean', 'scale', 'sign_flip', 'noise', 'stale')
RULES = ('mean', 'trimmed_mean', 'median', 'norm_clipped')
_GAP = ('gap', 'gap_std', 'gap_lo', 'gap_hi', 'gap_seeds', 'gap_below')
COLUMNS = ('cell', 'group', 'seeds', 'final_val_ppl', 'final_val_ppl_std', 'final_val_ppl_min',
           'final_val_ppl_max', 'final_per_seed', 'reference', *_GAP,
           *('vs_1worker_' + k for k in _GAP), 'MB_sent', 'MB_received', 'less_than_ddp',
           'uploads_less_than_ddp', 'wall_s')


def load(root: str, spec_path: str) -> dict[str, list[plot.Run]]:
  """{cell: its runs, one per seed} of every run that has logged a round, in the spec's order."""
  cells: dict[str, list[plot.Run]] = {}
  for name, run in sweep_report.logged_runs(root, spec_path):
    cells.setdefault(summaries.without_seed(name), []).append(run)
  return cells


def reference_of(cell: str) -> str | None:
  """The cell that `cell` is compared with, seed by seed (None: none)."""
  group, *rest = cell.split(',')
  if group in ('warm', 'scratch') and rest[0].startswith('muon_'):
    return f"{group},adamw_{rest[0].removeprefix('muon_')}"
  if group == 'comm':
    return COMM_REFERENCE
  if group == 'robust' and cell != ROBUST_REFERENCE:
    return ROBUST_REFERENCE
  return None


def baseline_of(cell: str) -> str | None:
  """A federated Muon or AdamW cell's 1-worker baseline of the same optimizer."""
  group, *rest = cell.split(',')
  if group in ('warm', 'scratch') and 'tau' in rest[0]:
    return f"{group},{rest[0].split('_')[0]}_1worker"
  return None


def _final(run: plot.Run) -> float | None:
  done = run.rounds and run.rounds[-1].round >= run.config['fl']['rounds']
  return run.rounds[-1].val_ppl if done else None


def paired_gap(runs: Sequence[plot.Run], reference: Sequence[plot.Run]) -> dict[str, Any]:
  """final / reference final - 1 for every seed both finished: mean, std, the 95% t interval of
  the mean, and how many seeds lie below the reference."""
  ref = {r.config['seed']: _final(r) for r in reference}
  gaps = [_final(r) / ref[r.config['seed']] - 1 for r in runs
          if summaries.finite(_final(r)) and summaries.finite(ref.get(r.config['seed']))]
  if not gaps:
    return {}
  mean = float(np.mean(gaps))
  std = float(np.std(gaps, ddof=1)) if len(gaps) > 1 else 0.0
  half = (float(stats.t.ppf(0.975, len(gaps) - 1)) * std / math.sqrt(len(gaps))
          if len(gaps) > 1 else math.nan)
  return {'gap': mean, 'gap_std': std, 'gap_lo': mean - half, 'gap_hi': mean + half,
          'gap_seeds': len(gaps), 'gap_below': sum(g < 0 for g in gaps)}


def describe_gap(row: Mapping[str, Any], prefix: str = '') -> str:
  if not summaries.finite(row.get(prefix + 'gap')):
    return ''
  interval = (f" [{row[prefix + 'gap_lo']:+.1%}, {row[prefix + 'gap_hi']:+.1%}]"
              if summaries.finite(row[prefix + 'gap_lo']) else '')  # one seed: none
  return (f"{row[prefix + 'gap']:+.1%} ± {row[prefix + 'gap_std']:.1%}{interval} "
          f"({row[prefix + 'gap_below']}/{row[prefix + 'gap_seeds']} below)")


def rows(cells: Mapping[str, list[plot.Run]]) -> list[dict[str, Any]]:
  out = []
  for cell, runs in cells.items():
    finals = [_final(r) for r in runs]
    final = summaries.spread(finals)
    last = [r.rounds[-1] for r in runs if summaries.finite(_final(r))]
    row = {'cell': cell, 'group': cell.split(',')[0],
           'seeds': f'{sum(summaries.finite(f) for f in finals)}/{len(runs)}',
           'final_val_ppl': final.mean if final else None,
           'final_val_ppl_std': final.std if final else None,
           'final_val_ppl_min': final.min if final else None,
           'final_val_ppl_max': final.max if final else None,
           'final_per_seed': ' '.join(f'{_final(r):.2f}' for r in
                                      sorted(runs, key=lambda r: r.config['seed'])
                                      if summaries.finite(_final(r))),
           'reference': reference_of(cell) or ''}
    if reference_of(cell) in cells:
      row.update(paired_gap(runs, cells[reference_of(cell)]))
    if baseline_of(cell) in cells:
      row.update({'vs_1worker_' + k: v
                  for k, v in paired_gap(runs, cells[baseline_of(cell)]).items()})
    if last and runs[0].federated:
      sent = float(np.mean([r.bytes_sent or 0 for r in last]))
      received = float(np.mean([r.bytes_received or 0 for r in last]))
      ddp = float(np.mean([r.ddp_equivalent_bytes or 0 for r in last]))
      row.update({'MB_sent': sent / 1e6, 'MB_received': received / 1e6,
                  'less_than_ddp': communication.ddp_ratio(ddp, sent + received),
                  'uploads_less_than_ddp': communication.ddp_ratio(ddp, received)})
    row['wall_s'] = diloco_report._mean(  # pylint: disable=protected-access
        sweep_runner.read_state(r.workdir).get('wall_s') for r in runs)
    out.append(row)
  return out


def markdown(table: Sequence[Mapping[str, Any]]) -> str:
  fmt, by_cell = sweep_report.fmt, {r['cell']: r for r in table}

  def final(r):
    spread = summaries.Spread(r['final_val_ppl'], r['final_val_ppl_std'], r['final_val_ppl_min'],
                              r['final_val_ppl_max'], int(r['seeds'].split('/')[0]))
    return spread.describe() if summaries.finite(r['final_val_ppl']) else ''

  lines = ['Gaps are paired by seed: mean ± std [95% t interval] (seeds below the reference).']
  for group, title in (('warm', 'Muon vs AdamW from the pre-trained checkpoint (800 more steps)'),
                       ('scratch', 'Muon vs AdamW from scratch (400 steps)')):
    lines += ['', f'### {title}', '', '| run | seeds | final val ppl | per seed | Muon vs AdamW '
              '| vs its 1-worker baseline | wall time |', '|---|---|---|---|---|---|---|']
    lines += [f"| `{r['cell'].split(',')[1]}` | {r['seeds']} | {final(r)} | {r['final_per_seed']} "
              f"| {describe_gap(r)} | {describe_gap(r, 'vs_1worker_')} | "
              f"{diloco_report._minutes(r['wall_s'])} |"  # pylint: disable=protected-access
              for r in table if r['group'] == group]
  lines += ['', '### Bytes at equal quality (from scratch, τ = 50, 8 rounds)', '',
            '| run | seeds | final val ppl | vs float32 (`scratch,adamw_tau50`) '
            '| MB sent + received | fewer bytes than DDP | client uploads: fewer than DDP |',
            '|---|---|---|---|---|---|---|']
  for r in [by_cell.get(COMM_REFERENCE)] + [r for r in table if r['group'] == 'comm']:
    if r:
      lines.append(f"| `{r['cell']}` | {r['seeds']} | {final(r)} | {describe_gap(r)} | "
                   f"{fmt(r.get('MB_sent'), '.2f')} + {fmt(r.get('MB_received'), '.2f')} | "
                   f"{fmt(r.get('less_than_ddp'), '.0f')}× | "
                   f"{fmt(r.get('uploads_less_than_ddp'), '.0f')}× |")
  lines += ['', '### Robust aggregation: 1 of 8 clients poisoned (τ = 25, 8 rounds)', '',
            'Final validation perplexity, and its gap to the clean run with the plain mean.', '',
            '| poison | ' + ' | '.join(f'`{rule}`' for rule in RULES) + ' |',
            '|---|' + '---|' * len(RULES)]
  def grid_cell(c):
    if not c or not summaries.finite(c['final_val_ppl']):
      return ''
    return f"{final(c)}<br>{'(reference)' if c['cell'] == ROBUST_REFERENCE else describe_gap(c)}"

  for poison in POISONS:
    lines.append(f'| {poison} | ' + ' | '.join(
        grid_cell(by_cell.get(f'robust,{poison},{rule}')) for rule in RULES) + ' |')
  return '\n'.join(lines)


def figure(cells: Mapping[str, list[plot.Run]], table: Sequence[Mapping[str, Any]],
           path: str) -> str:
  fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
  colors = {'adamw': 'C0', 'muon': 'C3'}
  for cell, runs in cells.items():
    group, *rest = cell.split(',')
    if group == 'warm':
      optimizer, kind = rest[0].split('_')
      style = {'1worker': 's--', 'tau50': 'o-', 'tau200': 'v:'}[kind]
      diloco_report._band(axes[0], runs, style, colors[optimizer],  # pylint: disable=protected-access
                          f'{optimizer}, {kind}')
  # An axis without data (a study still running) cannot be log-scaled.
  if axes[0].has_data():
    plot.perplexity_axis(axes[0], 'local steps per client after the warm start')
    axes[0].yaxis.set_minor_locator(ticker.LogLocator(subs=(1.2, 1.5, 2, 3, 5, 7)))
    axes[0].yaxis.set_minor_formatter(ticker.FormatStrFormatter('%g'))
  axes[0].set_title('Muon vs AdamW inside the clients (warm start)', fontsize=10)
  if axes[0].has_data():
    axes[0].legend(fontsize=7)
  for r in table:
    if (r['group'] == 'comm' or r['cell'] == COMM_REFERENCE) and summaries.finite(
        r['final_val_ppl']):
      mb = (r.get('MB_sent') or 0) + (r.get('MB_received') or 0)
      axes[1].errorbar(mb, r['final_val_ppl'], yerr=[[r['final_val_ppl'] - r['final_val_ppl_min']],
                                                     [r['final_val_ppl_max'] - r['final_val_ppl']]],
                       fmt='o', capsize=3)
      axes[1].annotate(r['cell'].split(',')[1], (mb, r['final_val_ppl']), fontsize=7,
                       xytext=(4, 3), textcoords='offset points')
  if axes[1].has_data():
    plot.perplexity_axis(axes[1], 'MB sent + received by the server, whole run', log_x=True)
    axes[1].xaxis.set_major_formatter(ticker.FormatStrFormatter('%g'))
    axes[1].xaxis.set_minor_formatter(ticker.NullFormatter())
  axes[1].set_title('final perplexity against bytes (mean, min–max over seeds)', fontsize=10)
  width = 0.8 / len(RULES)
  for j, rule in enumerate(RULES):
    values = [next((r for r in table if r['cell'] == f'robust,{p},{rule}'), None) for p in POISONS]
    xs = np.arange(len(POISONS)) + (j - (len(RULES) - 1) / 2) * width
    axes[2].bar(xs, [v['final_val_ppl'] if v and summaries.finite(v['final_val_ppl']) else np.nan
                     for v in values], width, label=rule)
  axes[2].set_xticks(np.arange(len(POISONS)), POISONS)
  if np.isfinite([p.get_height() for p in axes[2].patches]).any():
    axes[2].set_yscale('log')  # a poisoned mean can be orders of magnitude off
    axes[2].yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
    axes[2].yaxis.set_major_formatter(ticker.FormatStrFormatter('%g'))
    axes[2].yaxis.set_minor_formatter(ticker.NullFormatter())
  axes[2].set_ylabel('final validation perplexity (mean over seeds)')
  axes[2].set_title('1 of 8 clients poisoned: aggregation rules', fontsize=10)
  axes[2].legend(fontsize=7)
  return plot.save(fig, path, dpi=150)


def main(argv: Sequence[str] | None = None) -> int:
  def write(cells, root, out):
    del root
    table = rows(cells)
    paths = sweep_report.write_tables(table, COLUMNS, markdown(table), out, 'algorithms')
    return [*paths, figure(cells, table, os.path.join(out, 'algorithms.png'))]

  return sweep_report.report_cli(argv, __doc__, 'algorithms', load, write)


if __name__ == '__main__':
  sys.exit(main())
