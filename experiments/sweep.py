r"""Sweeps over `--config.*` overrides: a grid of runs from a small spec, one workdir per run.

  python experiments/sweep.py experiments/study.yaml --root=runs/study [--parallel=2] [--nice=10]
      [--set data.path=/data/c4.jsonl ...] [--only=REGEX] [--dry-run] [--report-only]

The spec (`experiments/sweep_spec.py`: YAML, or Python defining `SPEC`) names a config file,
overrides shared by every run, and a grid; the runs are the product of the grid's axes. Each run's
workdir is ROOT/NAME, NAME made of its grid values (`d_model=64,local_steps=10,nesterov`), so a run
keeps its workdir across invocations. A finished run is skipped, an unfinished one resumed
(`experiments/sweep_runner.py` says when and how). Every invocation then writes ROOT/results.csv
and ROOT/results.md (`experiments/sweep_report.py`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from experiments import sweep_report  # pylint: disable=wrong-import-position
from experiments import sweep_runner  # pylint: disable=wrong-import-position
from experiments import sweep_spec  # pylint: disable=wrong-import-position


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('spec', help='sweep spec (.yaml/.yml, or .py defining SPEC)')
  parser.add_argument('--root', required=True, help='directory of the runs\' workdirs and results')
  parser.add_argument('--parallel', type=int, default=1, help='runs at a time (default 1)')
  parser.add_argument('--nice', type=int, default=0, help='run trainers under nice -n N')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='override KEY in every run (wins over the spec); repeatable')
  parser.add_argument('--only', default='', metavar='REGEX', help='only runs whose name matches')
  parser.add_argument('--resume', choices=('auto', 'rerun', 'restart'), default='auto',
                      help='unfinished runs: auto (same command; if the trainer refuses the '
                      'workdir, move it aside and restart), rerun (same command only) or restart '
                      '(move aside first)')
  parser.add_argument('--python', default=sys.executable, help='interpreter of the trainers')
  parser.add_argument('--module', default='fedjax_pt.main', help='trainer module (python -m)')
  parser.add_argument('--cwd', default=REPO, help='directory the trainers run in (the repo)')
  parser.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
  parser.add_argument('--report-only', action='store_true', help='only write the results tables')
  args = parser.parse_args(argv)
  try:
    runs = sweep_spec.expand(sweep_spec.load_spec(args.spec), sweep_spec.parse_set(args.set))
    if args.only:
      try:
        runs = [r for r in runs if re.search(args.only, r.name)]
      except re.error as e:
        raise sweep_spec.SpecError(f'--only={args.only!r} is not a regular expression: '
                                   f'{e}') from None
    if args.parallel < 1:
      raise sweep_spec.SpecError(f'--parallel must be >= 1, got {args.parallel}')
    if os.path.exists(args.root) and not os.path.isdir(args.root):
      raise sweep_spec.SpecError(f'--root={args.root} is a file, not a directory')
    if not args.report_only and args.module == 'fedjax_pt.main':  # another trainer: its own keys
      sweep_spec.check_configs(runs, args.cwd)
    runner = sweep_runner.Runner(args.root, python=args.python, module=args.module,
                                 cwd=args.cwd, nice=args.nice, resume=args.resume)
    if args.dry_run:
      for run in runs:
        print(f'{runner.status(run):10s} ' +
              ' '.join(_quote(c) for c in run.command(runner.workdir(run), args.python,
                                                       args.module)))
      return 0
    outcome = {} if args.report_only else sweep_runner.run_all(runs, runner, args.parallel)
  except sweep_spec.SpecError as e:
    print(f'sweep: error: {" ".join(str(e).split())}', file=sys.stderr)
    return 2
  rows = [sweep_report.summarize(run, runner.workdir(run),
                                 sweep_spec.requested_rounds(run, args.cwd)) for run in runs]
  paths = sweep_report.write_results(rows, args.root)
  with open(paths[1], encoding='utf-8') as f:
    print(f.read().rstrip())
  print(f'[sweep] results: {", ".join(paths)}')
  bad = sorted(name for name, s in outcome.items() if s != 'finished')
  if bad:
    print(f'[sweep] {len(bad)} run(s) not finished: {", ".join(bad)}', file=sys.stderr)
    return 130 if runner.stopping else 1
  return 0


def _quote(arg: str) -> str:
  return arg if re.fullmatch(r'[\w./=,+:@-]+', arg) else "'" + arg.replace("'", "'\\''") + "'"


if __name__ == '__main__':
  sys.exit(main())
