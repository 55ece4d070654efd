r"""Table and figure of the communication study (experiments/compression.yaml) from its sweep root.

  python experiments/compression_report.py --root=runs/compression --out=experiments/results

Writes OUT/compression.csv and OUT/compression.md (every run: codecs, error feedback, fragments,
final validation perplexity and its cost against the uncompressed run, bytes both ways, the
compression against the uncompressed run, the peak bytes of one synchronisation, how many times
fewer bytes than data-parallel training, wall time) and OUT/compression.png (validation
perplexity against cumulative bytes communicated, and at the end of the runs).
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
from fedjax_pt.federated import communication  # pylint: disable=wrong-import-position
from fedjax_pt import plot  # pylint: disable=wrong-import-position
from fedjax_pt import summaries

BASELINE = 'none'


def load(root: str, spec_path: str) -> dict[str, plot.Run]:
  """{run name: run} of every study run that has logged a round, in the spec's order."""
  return dict(sweep_report.logged_runs(root, spec_path))


def _bytes(run: plot.Run) -> int:
  last = run.rounds[-1]
  return (last.bytes_sent or 0) + (last.bytes_received or 0)


def rows(runs: Mapping[str, plot.Run], root: str) -> list[dict[str, Any]]:
  baseline = runs.get(BASELINE)
  out = []
  for name, run in runs.items():
    summary = sweep_report.summarize(sweep_spec.Run(name, '', {}, {}), os.path.join(root, name))
    fl, last = run.config['fl'], run.rounds[-1]
    comp = fl['compression']
    total = _bytes(run)
    final = summary['final_val_ppl']
    out.append({
        'run': name,
        'upload': comp['upload'],
        'download': comp['download'],
        'error_feedback': comp['error_feedback'],
        'fragments': fl['fragments'],
        'rounds': f"{summary['rounds']}/{summary['rounds_total']}",
        'final_val_ppl': final,
        'vs_none': (final / summaries.summarize(baseline.rounds).final_val_ppl - 1)
                   if baseline and final else None,
        'best_val_ppl': summary['best_val_ppl'],
        'MB_sent': (last.bytes_sent or 0) / 1e6,
        'MB_received': (last.bytes_received or 0) / 1e6,
        'MB_total': total / 1e6,
        'less_than_none': _bytes(baseline) / total if baseline and total else None,
        'peak_sync_MB': max((r.peak_sync_bytes or 0) for r in run.rounds[1:] or run.rounds) / 1e6,
        'less_than_ddp': communication.ddp_ratio(last.ddp_equivalent_bytes, total),
        'wall_s': summary['wall_s'],
        'status': summary['status'],
    })
  return out


def write_tables(table: Sequence[Mapping[str, Any]], out: str) -> tuple[str, str]:
  lines = ['| run | up / down | error feedback | fragments | final val ppl | vs none | MB total '
           '(sent + received) | fewer bytes than none | peak MB per sync | fewer bytes than DDP '
           '| wall time |',
           '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in table:
    lines.append(
        f"| `{r['run']}` | {r['upload']} / {r['download']} | "
        f"{'yes' if r['error_feedback'] else 'no'} | {r['fragments']} | "
        f"{sweep_report.fmt(r['final_val_ppl'], '.2f')} | "
        f"{sweep_report.fmt(r['vs_none'], '+.1%')} | "
        f"{sweep_report.fmt(r['MB_total'], '.1f')} ({sweep_report.fmt(r['MB_sent'], '.1f')} + "
        f"{sweep_report.fmt(r['MB_received'], '.1f')}) | "
        f"{sweep_report.fmt(r['less_than_none'], '.2f')}× | "
        f"{sweep_report.fmt(r['peak_sync_MB'], '.2f')} | "
        f"{sweep_report.fmt(r['less_than_ddp'], '.0f')}× | "
        f"{sweep_report.fmt(r['wall_s'] and r['wall_s'] / 60, '.1f')} min |")
  return sweep_report.write_tables(table, list(table[0]), '\n'.join(lines), out, 'compression')


def figure(runs: Mapping[str, plot.Run], path: str) -> str:
  fig, axes = plt.subplots(1, 2, figsize=(14, 5))
  for i, (name, run) in enumerate(runs.items()):
    comp = run.config['fl']['compression']
    style = '--' if comp['error_feedback'] else '-'
    marker = 's' if run.config['fl']['fragments'] > 1 else 'o'
    xy = [((r.bytes_sent or 0) + (r.bytes_received or 0), r.val_ppl) for r in run.rounds
          if r.val_ppl is not None]
    axes[0].plot([x / 1e6 for x, _ in xy], [y for _, y in xy], style, marker=marker, ms=3,
                 color=f'C{i}', label=name)
    axes[1].plot(xy[-1][0] / 1e6, xy[-1][1], marker, color=f'C{i}', ms=8, label=name)
    axes[1].annotate(name, (xy[-1][0] / 1e6, xy[-1][1]), fontsize=7, xytext=(4, 3),
                     textcoords='offset points')
  axes[0].set_title('validation perplexity as the bytes add up (8 clients, τ = 50, 8 rounds)')
  axes[1].set_title('at the end of the runs')
  for ax in axes:
    plot.perplexity_axis(ax, 'MB communicated (sent + received, cumulative)', log_x=True)
  axes[0].legend(fontsize=7)
  return plot.save(fig, path, dpi=150)


def main(argv: Sequence[str] | None = None) -> int:
  def write(runs, root, out):
    return [*write_tables(rows(runs, root), out),
            figure(runs, os.path.join(out, 'compression.png'))]

  return sweep_report.report_cli(argv, __doc__, 'compression', load, write)


if __name__ == '__main__':
  sys.exit(main())
