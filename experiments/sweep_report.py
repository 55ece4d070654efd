"""The results of a sweep: ROOT/results.csv (every column) and ROOT/results.md (a readable table).

One row per run, condensed from its round records by `fedjax_pt.summaries.summarize` (final and best
validation perplexity, tokens, bytes communicated, time); blank where a run has not logged it.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from experiments import sweep_runner
from experiments import sweep_spec
from experiments.sweep_spec import Run, format_value
from fedjax_pt import plot
from fedjax_pt import summaries
from fedjax_pt import reporting

COLUMNS = ('run', 'status', 'mode', 'rounds', 'rounds_total', 'tokens', 'final_val_ppl',
           'best_val_ppl', 'best_round', 'bytes_sent', 'bytes_received', 'train_time_s', 'wall_s',
           'overrides')


def summarize(run: Run, workdir: str, rounds_total: int | None = None) -> dict[str, Any]:
  """One row of the results table; `rounds_total` is what the run asks for (default: the fl.rounds
  of its config.json)."""
  config = sweep_runner.read_config(workdir)
  rounds_total = rounds_total if rounds_total is not None else sweep_runner.total_rounds(config)
  s = summaries.summarize(sweep_runner.read_rounds(workdir))
  return {
      'run': run.name,
      'status': sweep_runner.status(workdir, rounds_total),
      'mode': config.get('mode', run.overrides.get('mode')),
      'rounds': s.rounds,
      'rounds_total': rounds_total,
      'tokens': s.tokens,
      'final_val_ppl': s.final_val_ppl,
      'best_val_ppl': s.best_val_ppl,
      'best_round': s.best_round,
      'bytes_sent': s.bytes_sent,
      'bytes_received': s.bytes_received,
      'train_time_s': s.train_time_s,
      'wall_s': sweep_runner.read_state(workdir).get('wall_s'),
      'overrides': ' '.join(f'{k}={format_value(v)}' for k, v in run.varying.items()),
  }


SEED_COLUMNS = ('cell', 'seeds', 'runs',
                *(f'{key}_{stat}' for key in ('final_val_ppl', 'best_val_ppl')
                  for stat in ('mean', 'std', 'min', 'max')))


def write_results(rows: Sequence[Mapping[str, Any]], root: str) -> tuple[str, ...]:
  """ROOT/results.csv and ROOT/results.md; with runs that differ only in `seed`, also
  ROOT/results_seeds.csv, and results.md gets their mean ± std (min–max). Returns the paths."""
  cells = over_seeds(rows)
  markdown = markdown_table(rows)
  if cells:
    markdown += '\n\n## Over seeds\n\n' + seeds_markdown_table(cells)
  paths = write_tables(rows, COLUMNS, markdown, root, 'results')
  if cells:
    paths += write_tables(cells, SEED_COLUMNS, seeds_markdown_table(cells), root,
                          'results_seeds')
  return paths


def over_seeds(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """One row per cell (runs whose names differ only in `seed=N`), in the order of the runs:
  mean, std, min and max of the finished runs' final and best validation perplexity. Cells of a
  single run with no seed in its name are left out."""
  cells: dict[str, list[Mapping[str, Any]]] = {}
  for row in rows:
    if summaries.seed_of(row['run']) is not None:
      cells.setdefault(summaries.without_seed(row['run']), []).append(row)
  out = []
  for cell, members in cells.items():
    done = [r for r in members if r.get('status') == 'finished']
    row = {'cell': cell, 'seeds': f'{len(done)}/{len(members)}',
           'runs': ' '.join(r['run'] for r in done)}
    for key in ('final_val_ppl', 'best_val_ppl'):
      stats = summaries.spread(r.get(key) for r in done)
      for stat in ('mean', 'std', 'min', 'max'):
        row[f'{key}_{stat}'] = getattr(stats, stat) if stats else None
    out.append(row)
  return out


def seeds_markdown_table(cells: Sequence[Mapping[str, Any]]) -> str:
  lines = ['| cell | finished seeds | final val ppl: mean ± std (min–max) | best val ppl: mean ± '
           'std (min–max) |', '|---|---|---|---|']
  for c in cells:
    lines.append(f"| `{c['cell']}` | {c['seeds']} | {_spread(c, 'final_val_ppl')} | "
                 f"{_spread(c, 'best_val_ppl')} |")
  return '\n'.join(lines)


def _spread(cell: Mapping[str, Any], key: str) -> str:
  mean = cell.get(f'{key}_mean')
  if not summaries.finite(mean):
    return ''
  return summaries.Spread(mean, cell[f'{key}_std'], cell[f'{key}_min'], cell[f'{key}_max'],
                        int(cell['seeds'].split('/')[0])).describe()


def write_tables(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], markdown: str,
                 out: str, name: str) -> tuple[str, str]:
  """OUT/NAME.csv (`columns` of `rows`, None as empty) and OUT/NAME.md; returns their paths."""
  os.makedirs(out, exist_ok=True)
  csv_path, md_path = os.path.join(out, f'{name}.csv'), os.path.join(out, f'{name}.md')
  with open(csv_path, 'w', encoding='utf-8', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(columns))
    writer.writeheader()
    for row in rows:
      writer.writerow({k: '' if row.get(k) is None else row[k] for k in columns})
  with open(md_path, 'w', encoding='utf-8') as f:
    f.write(markdown + '\n')
  return csv_path, md_path


def logged_runs(root: str, spec_path: str) -> list[tuple[str, plot.Run]]:
  """(name, run) of every run of the spec that has logged a round under ROOT, in the spec's
  order."""
  found = []
  for spec_run in sweep_spec.expand(sweep_spec.load_spec(spec_path)):
    workdir = os.path.join(root, spec_run.name)
    if sweep_runner.read_rounds(workdir):
      found.append((spec_run.name, plot.load_run(workdir, label=spec_run.name)))
  return found


def fmt(value: Any, spec: str = '') -> str:
  """`value` formatted, or '' when it is missing or not finite."""
  return format(value, spec) if summaries.finite(value) else ''


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
  header = ['run', 'status', 'rounds', 'tokens', 'final val ppl', 'best val ppl (round)',
            'MB communicated', 'train time', 'wall time']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for r in rows:
    sent, received = r.get('bytes_sent'), r.get('bytes_received')
    comm = ((sent or 0) + (received or 0) if summaries.finite(sent) or summaries.finite(received)
            else None)
    rounds = '' if r.get('rounds') is None else f"{r['rounds']}/{r.get('rounds_total') or '?'}"
    best = '' if r.get('best_val_ppl') is None else f"{r['best_val_ppl']:.2f} ({r['best_round']})"
    cells = [f"`{r['run']}`", r.get('status') or '', rounds, _tokens(r.get('tokens')),
             fmt(r.get('final_val_ppl'), '.2f'), best, fmt(comm and comm / 1e6, '.1f'),
             _duration(r.get('train_time_s')), _duration(r.get('wall_s'))]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _tokens(n: Any) -> str:
  return reporting.format_tokens(n) if summaries.finite(n) else ''


def _duration(seconds: Any) -> str:
  if not summaries.finite(seconds):
    return ''
  return f'{seconds / 60:.1f} min' if seconds >= 120 else f'{seconds:.0f} s'


def report_cli(argv: Sequence[str] | None, doc: str, name: str,
               load: Callable[[str, str], Any],
               write: Callable[[Any, str, str], Sequence[str]]) -> int:
  """The command line of a study's report: --root (its sweep root), --spec (default
  experiments/NAME.yaml), --out (default experiments/results). `load(root, spec)` gives the runs
  (none: exit 2), `write(runs, root, out)` the paths it wrote, the markdown table second; prints
  that table and the paths."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  parser = argparse.ArgumentParser(description=doc.split('\n\n')[0])
  parser.add_argument('--root', required=True, help="the study's sweep root")
  parser.add_argument('--spec', default=os.path.join(repo, 'experiments', f'{name}.yaml'))
  parser.add_argument('--out', default=os.path.join(repo, 'experiments', 'results'))
  args = parser.parse_args(argv)
  runs = load(args.root, args.spec)
  if not runs:
    print(f'{name}_report: error: no run of {args.spec} under {args.root}', file=sys.stderr)
    return 2
  paths = write(runs, args.root, args.out)
  with open(paths[1], encoding='utf-8') as f:
    print(f.read())
  print('\n'.join(paths))
  return 0
