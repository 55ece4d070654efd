r"""Tables and figure of the DiLoCo-protocol study (experiments/diloco.yaml), over seeds.

  python experiments/diloco_report.py --root=runs/diloco --out=experiments/results

Writes OUT/diloco.csv and OUT/diloco.md: for each cell (a group, model size and variant), the final
validation perplexity as mean ± std (min–max) over its seeds, its gap to the cell's reference run
of the same seed (paired: the same initial model and held-out documents), and where its curve lies
below the reference's *for every seed*; the from-scratch runs also at rounds 1 and 2 (Nesterov's
early overshoot). OUT/diloco.png: validation perplexity against local steps, mean over seeds with a
min–max band.
"""

from __future__ import annotations

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

from experiments import sweep_report  # pylint: disable=wrong-import-position
from experiments import sweep_runner  # pylint: disable=wrong-import-position
from fedjax_pt import plot  # pylint: disable=wrong-import-position
from fedjax_pt import summaries

# Each group's reference: the run every other cell of the group is compared with, seed by seed.
REFERENCE = {'warm': 'baseline', 'noniid': 'baseline', 'scratch': 'fedavg'}
ORDER = ('baseline', 'central_8x', 'centralized', 'solo', 'nesterov_tau50', 'nesterov_tau200',
         'fedavg_tau50', 'fedavg_tau200', 'nesterov', 'nesterov_lr_warmup',
         'nesterov_momentum_warmup', 'fedavg')

Cell = tuple[str, int, str]  # (group, d_model, variant)


def load(root: str, spec_path: str) -> dict[Cell, list[plot.Run]]:
  """{(group, d_model, variant): its runs, one per seed} of every run that has logged a round."""
  cells: dict[Cell, list[plot.Run]] = {}
  for name, run in sweep_report.logged_runs(root, spec_path):
    parts = summaries.without_seed(name).split(',')
    group = parts[0] if parts[0] in ('pretrain', 'noniid', 'scratch') else 'warm'
    variant = 'pretrain' if group == 'pretrain' else parts[-1]
    cells.setdefault((group, run.config['model']['d_model'], variant), []).append(run)
  return cells


def steps_of(run: plot.Run, initial: bool = False) -> list[tuple[float, float]]:
  """(local steps per client since the run started, val_ppl) of every evaluated round; round 0
  (the starting model, which the runs of one seed share) only with `initial`."""
  return summaries.curve(run.rounds, scale=run.config['fl']['local_steps'], initial=initial)


def _finished(run: plot.Run) -> bool:
  return bool(run.rounds) and run.rounds[-1].round >= run.config['fl']['rounds']


def _seed(run: plot.Run) -> int:
  return run.config['seed']


def _at_round(run: plot.Run, round_idx: int) -> float | None:
  return next((r.val_ppl for r in run.rounds if r.round == round_idx), None)


def rows(cells: Mapping[Cell, list[plot.Run]]) -> list[dict[str, Any]]:
  out = []
  for (group, d, variant), runs in sorted(
      cells.items(), key=lambda kv: (('pretrain', 'warm', 'noniid', 'scratch').index(kv[0][0]),
                                     kv[0][1], ORDER.index(kv[0][2]) if kv[0][2] in ORDER else 99)):
    done = [r for r in runs if _finished(r)]
    final = summaries.spread(r.rounds[-1].val_ppl for r in done)
    reference = {_seed(r): r for r in cells.get((group, d, REFERENCE.get(group, '')), [])
                 if _finished(r)}
    paired = [r for r in done if _seed(r) in reference and variant != REFERENCE.get(group)]
    gaps = summaries.spread(r.rounds[-1].val_ppl / reference[_seed(r)].rounds[-1].val_ppl - 1
                          for r in paired)
    cross = summaries.crossing_over_seeds(
        [(steps_of(r), steps_of(reference[_seed(r)])) for r in paired])
    fl = done[0].config['fl'] if done else runs[0].config['fl']
    federated = runs[0].federated
    out.append({
        'group': group, 'd_model': d, 'variant': variant,
        'tau': fl['local_steps'] if federated else '',
        'seeds': f'{len(done)}/{len(runs)}',
        'final_val_ppl': final.mean if final else None,
        'final_val_ppl_std': final.std if final else None,
        'final_val_ppl_min': final.min if final else None,
        'final_val_ppl_max': final.max if final else None,
        'final_per_seed': ' '.join(f'{r.rounds[-1].val_ppl:.2f}' for r in
                                   sorted(done, key=_seed)),
        'vs_reference': gaps.mean if gaps else None,
        'vs_reference_std': gaps.std if gaps else None,
        'below_reference_seeds': sum(g < 0 for g in
                                     (r.rounds[-1].val_ppl / reference[_seed(r)].rounds[-1].val_ppl
                                      - 1 for r in paired)) if paired else None,
        'reference': REFERENCE.get(group, '') if paired else '',
        'curve_vs_reference': cross.describe('step ') if paired else '',
        'round1_val_ppl': _mean(_at_round(r, 1) for r in done) if group == 'scratch' else None,
        'round2_val_ppl': _mean(_at_round(r, 2) for r in done) if group == 'scratch' else None,
        'wall_s': _mean(sweep_runner.read_state(r.workdir).get('wall_s') for r in done),
    })
  return out


def _mean(values) -> float | None:
  kept = [v for v in values if summaries.finite(v)]
  return sum(kept) / len(kept) if kept else None


def markdown(table: Sequence[Mapping[str, Any]]) -> str:
  fmt = sweep_report.fmt
  lines = []
  for group, title in (('pretrain', 'Pre-training (centrally, batch 8, 400 steps)'),
                       ('warm', 'From the pre-trained checkpoint, 800 more steps (IID shards)'),
                       ('noniid', 'Non-IID shards (Dirichlet 0.5 over the URL TLD), d_model 64'),
                       ('scratch', 'From scratch, 400 steps, τ = 50')):
    part = [r for r in table if r['group'] == group]
    if not part:
      continue
    scratch = group == 'scratch'
    lines += ['', f'### {title}', '',
              '| d_model | run | τ | seeds | final val ppl: mean ± std (min–max) | per seed | '
              'vs reference, paired: mean ± std (seeds below) | curve vs reference |' +
              (' round 1 | round 2 |' if scratch else '') + ' wall time per run |',
              '|---|---|---|---|---|---|---|---|' + ('---|---|' if scratch else '') + '---|']
    for r in part:
      final = summaries.Spread(r['final_val_ppl'], r['final_val_ppl_std'], r['final_val_ppl_min'],
                             r['final_val_ppl_max'], int(r['seeds'].split('/')[0])
                             ) if summaries.finite(r['final_val_ppl']) else None
      gap = ''
      if summaries.finite(r['vs_reference']):
        gap = (f"{r['vs_reference']:+.1%} ± {r['vs_reference_std']:.1%} "
               f"({r['below_reference_seeds']}/{r['seeds'].split('/')[0]} below)")
      versus = (f"`{r['reference']}`: {r['curve_vs_reference']}" if r['reference'] else
                '(reference)' if r['variant'] == REFERENCE.get(group) else '')
      lines.append(
          f"| {r['d_model']} | `{r['variant']}` | {r['tau']} | {r['seeds']} | "
          f"{final.describe() if final else ''} | {r['final_per_seed']} | {gap} | {versus} |" +
          (f" {fmt(r['round1_val_ppl'], '.2f')} | {fmt(r['round2_val_ppl'], '.2f')} |"
           if scratch else '') +
          f" {_minutes(r['wall_s'])} |")
  return '\n'.join(lines).strip()


def _minutes(seconds: Any) -> str:
  return f'{seconds / 60:.1f} min' if summaries.finite(seconds) else ''


def _band(ax, runs: Sequence[plot.Run], style: str, color: str, label: str) -> None:
  """Mean over seeds at the steps every seed evaluated, with a min–max band."""
  curves = [dict(steps_of(r, initial=True)) for r in runs if _finished(r)]
  if not curves:
    return
  xs = sorted(set.intersection(*(set(c) for c in curves)))
  ys = np.array([[c[x] for x in xs] for c in curves])
  ax.plot(xs, ys.mean(axis=0), style, color=color, ms=3, lw=1.5,
          label=f'{label} ({len(curves)} seeds)')
  ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=color, alpha=0.15, lw=0)


STYLES = {'baseline': ('s--', 'k', 'baseline: centrally, batch 8'),
          'central_8x': ('s-', 'C7', 'centrally, batch 64 (8x)'),
          'nesterov_tau50': ('o-', 'C0', '8 clients, Nesterov, τ=50'),
          'nesterov_tau200': ('v-', 'C9', '8 clients, Nesterov, τ=200'),
          'fedavg_tau50': ('^-', 'C3', '8 clients, FedAvg, τ=50'),
          'fedavg_tau200': ('<-', 'C1', '8 clients, FedAvg, τ=200'),
          'nesterov': ('o-', 'C0', 'Nesterov 0.7/0.9'),
          'nesterov_lr_warmup': ('o--', 'C4', 'Nesterov, outer lr warmup 4 rounds'),
          'nesterov_momentum_warmup': ('o:', 'C5', 'Nesterov, momentum warmup 4 rounds'),
          'fedavg': ('^-', 'C3', 'FedAvg'),
          'centralized': ('s-', 'C7', 'centrally, batch 64'),
          'solo': ('d:', 'C2', 'client 0 alone, batch 8')}


def figure(cells: Mapping[Cell, list[plot.Run]], path: str) -> str:
  panels = [('warm', 64, 'd_model 64, from the pre-trained checkpoint'),
            ('warm', 128, 'd_model 128, from the pre-trained checkpoint'),
            ('noniid', 64, 'd_model 64, non-IID shards'),
            ('scratch', 64, 'd_model 64, from scratch')]
  panels = [p for p in panels if any(c[:2] == p[:2] for c in cells)]
  fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4.6),
                           squeeze=False)
  for ax, (group, d, title) in zip(axes[0], panels):
    for variant, (style, color, label) in STYLES.items():
      if (group, d, variant) in cells:
        _band(ax, cells[(group, d, variant)], style, color, label)
    plot.perplexity_axis(ax, 'local steps per client' + (' after the warm start'
                                                         if group != 'scratch' else ''))
    # The curves lie mostly between 10 and 20, where a log axis labels nothing by default.
    ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(1.2, 1.5, 2, 3, 5, 7)))
    ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter('%g'))
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  return plot.save(fig, path, dpi=150)


def main(argv: Sequence[str] | None = None) -> int:
  def write(cells, root, out):
    del root
    table = rows(cells)
    paths = sweep_report.write_tables(table, list(table[0]), markdown(table), out, 'diloco')
    return [*paths, figure(cells, os.path.join(out, 'diloco.png'))]

  return sweep_report.report_cli(argv, __doc__, 'diloco', load, write)


if __name__ == '__main__':
  sys.exit(main())
