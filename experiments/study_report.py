r"""Tables and figure of the small-scale study (experiments/study.yaml) from its sweep root.

  python experiments/study_report.py --root=runs/study --out=experiments/results

Writes OUT/study.csv and OUT/study.md (every run: final and best validation perplexity, gap to the
centralized baseline of the same size, tokens, bytes communicated, time; then where the federated
curve crosses the solo client's and the centralized curves) and OUT/study.png (validation
perplexity against local steps, i.e. a client's wall-clock, for the three comparisons).
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

from experiments import sweep_report  # pylint: disable=wrong-import-position
from experiments import sweep_spec  # pylint: disable=wrong-import-position
from fedjax_pt import model as model_lib  # pylint: disable=wrong-import-position
from fedjax_pt import plot  # pylint: disable=wrong-import-position
from fedjax_pt import summaries

SIZES = (32, 64, 128)
VARIANTS = ('nesterov', 'centralized', 'solo', 'fedavg', 'tau10', 'tau200', 'kept_opt')


def load(root: str, spec_path: str) -> dict[tuple[int, str], plot.Run]:
  """{(d_model, variant): run} of every study run that has logged a round."""
  return {(run.config['model']['d_model'], name.split(',')[-1]): run
          for name, run in sweep_report.logged_runs(root, spec_path)}


def steps_of(run: plot.Run) -> list[tuple[int, float]]:
  """(local steps per client, val_ppl) of every evaluated round."""
  return summaries.curve(run.rounds, scale=run.config['fl']['local_steps'])


def crossing(fed: plot.Run, other: plot.Run) -> str:
  """Where the federated curve is below `other`'s, at the steps both evaluated."""
  return summaries.crossing(steps_of(fed), steps_of(other)).describe('step ')


def params_of(run: plot.Run) -> int | None:
  try:
    return model_lib.param_count(model_lib.ModelConfig(**run.config['model']))
  except (TypeError, ValueError, KeyError):  # a config.json of another version
    return None


def relative_gap(run: plot.Run, other: plot.Run | None) -> float | None:
  """run's val_ppl over other's, minus 1, at run's last evaluated step (if other evaluated it)."""
  if other is None or other is run:
    return None
  mine, theirs = steps_of(run), dict(steps_of(other))
  if not mine or mine[-1][0] not in theirs:
    return None
  return mine[-1][1] / theirs[mine[-1][0]] - 1


def rows(runs: Mapping[tuple[int, str], plot.Run], root: str) -> list[dict[str, Any]]:
  out = []
  for (d, variant), run in sorted(runs.items(), key=lambda kv: (kv[0][0],
                                                                 VARIANTS.index(kv[0][1]))):
    summary = sweep_report.summarize(sweep_spec.Run(os.path.basename(run.workdir), '', {}, {}),
                                     os.path.join(root, os.path.basename(run.workdir)))
    fl = run.config['fl']
    federated = run.config['mode'] == 'federated'
    sent = (summary['bytes_sent'] or 0) + (summary['bytes_received'] or 0)
    out.append({
        'run': os.path.basename(run.workdir),
        'd_model': d,
        'params': params_of(run),
        'variant': variant,
        'tau': fl['local_steps'] if federated else '',
        'rounds': f"{summary['rounds']}/{summary['rounds_total']}",
        'local_steps': (summary['rounds'] or 0) * fl['local_steps'],
        'tokens': summary['tokens'],
        'final_val_ppl': summary['final_val_ppl'],
        'best_val_ppl': summary['best_val_ppl'],
        'vs_centralized': relative_gap(run, runs.get((d, 'centralized'))),
        'vs_solo': relative_gap(run, runs.get((d, 'solo'))),
        'comm_MB': sent / 1e6 if federated else None,
        # A data-parallel run of the same clients would exchange the model (or its gradient)
        # every local step: tau times as often.
        'comm_MB_if_synced_every_step': sent * fl['local_steps'] / 1e6 if federated else None,
        'wall_s': summary['wall_s'],
        'status': summary['status'],
    })
  return out


def crossings(runs: Mapping[tuple[int, str], plot.Run]) -> list[dict[str, str]]:
  out = []
  for (d, variant), run in sorted(runs.items(), key=lambda kv: (kv[0][0],
                                                                 VARIANTS.index(kv[0][1]))):
    if run.config['mode'] != 'federated':
      continue
    for other in ('solo', 'centralized'):
      if (d, other) in runs:
        out.append({'federated run': os.path.basename(run.workdir),
                    'against': os.path.basename(runs[(d, other)].workdir),
                    'federated curve': crossing(run, runs[(d, other)])})
  return out


def write_tables(table: Sequence[Mapping[str, Any]], cross: Sequence[Mapping[str, str]],
                 out: str) -> tuple[str, str]:
  lines = ['| run | params | τ | rounds | tokens | final val ppl | best val ppl | vs centralized '
           '| vs solo | MB communicated | MB if synced every step | wall time |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in table:
    lines.append(
        f"| `{r['run']}` | {sweep_report.fmt(r['params'] and r['params'] / 1e3, '.0f')}k | "
        f"{r['tau']} | "
        f"{r['rounds']} | "
        f"{sweep_report.fmt(r['tokens'] and r['tokens'] / 1e6, '.2f')}M | "
        f"{sweep_report.fmt(r['final_val_ppl'], '.2f')} | "
        f"{sweep_report.fmt(r['best_val_ppl'], '.2f')} | "
        f"{sweep_report.fmt(r['vs_centralized'], '+.1%')} | "
        f"{sweep_report.fmt(r['vs_solo'], '+.1%')} | "
        f"{sweep_report.fmt(r['comm_MB'], '.1f')} | "
        f"{sweep_report.fmt(r['comm_MB_if_synced_every_step'], ',.0f')} | "
        f"{sweep_report.fmt(r['wall_s'] and r['wall_s'] / 60, '.1f')} min |")
  lines += ['', '| federated run | against | federated curve |', '|---|---|---|']
  lines += [f"| `{c['federated run']}` | `{c['against']}` | {c['federated curve']} |"
            for c in cross]
  return sweep_report.write_tables(table, list(table[0]), '\n'.join(lines), out, 'study')


def figure(runs: Mapping[tuple[int, str], plot.Run], path: str) -> str:
  fig, axes = plt.subplots(1, 3, figsize=(17, 5))
  styles = {'nesterov': ('o-', 'C0'), 'fedavg': ('^-', 'C3'), 'centralized': ('s--', 'k'),
            'solo': ('d:', 'C2'), 'tau10': ('.-', 'C1'), 'tau200': ('v-', 'C4'),
            'kept_opt': ('x-', 'C5')}
  labels = {'nesterov': 'federated, Nesterov 0.7/0.9, τ=50', 'fedavg': 'FedAvg (lr 1, μ 0), τ=50',
            'centralized': 'centralized, batch 8×8 (equal tokens)',
            'solo': 'client 0 alone on its shard', 'tau10': 'Nesterov, τ=10',
            'tau200': 'Nesterov, τ=200', 'kept_opt': 'Nesterov, τ=50, Adam state kept'}

  def draw(ax, d, variant, style=None, color=None, label=None):
    run = runs.get((d, variant))
    if run is None:
      return
    xy = steps_of(run)
    ax.plot([x for x, _ in xy], [y for _, y in xy], style or styles[variant][0],
            color=color or styles[variant][1], label=label or labels[variant], lw=1.5, ms=4)

  for variant in ('nesterov', 'fedavg', 'centralized', 'solo'):
    draw(axes[0], 64, variant)
  axes[0].set_title('d_model 64: federated vs baselines')
  for variant in ('nesterov', 'tau10', 'tau200', 'kept_opt', 'centralized'):
    draw(axes[1], 64, variant)
  axes[1].set_title('d_model 64: local steps τ and optimizer reset')
  for i, d in enumerate(SIZES):
    for variant, style in (('nesterov', 'o-'), ('centralized', 's--'), ('solo', 'd:')):
      draw(axes[2], d, variant, style, f'C{i}', f'd_model {d}: {variant}')
  axes[2].set_title('model sizes: federated (o), centralized (s), solo (d)')
  for ax in axes:
    plot.perplexity_axis(ax, 'local steps per client (= rounds × τ)')
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  return plot.save(fig, path, dpi=150)


def main(argv: Sequence[str] | None = None) -> int:
  def write(runs, root, out):
    return [*write_tables(rows(runs, root), crossings(runs), out),
            figure(runs, os.path.join(out, 'study.png'))]

  return sweep_report.report_cli(argv, __doc__, 'study', load, write)


if __name__ == '__main__':
  sys.exit(main())
