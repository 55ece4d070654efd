r"""Federated (or centralized) pre-training from one command.

  python -m fedjax_pt.main --config=configs/tiny.py --workdir=runs/tiny \
      [--config.fl.outer_lr=0.7 ...]

With no flags it trains the tiny config on the built-in offline corpus, on CPU, in a few minutes.
`--config.dry_run=True` prints the model's size, FLOPs per token and memory estimate, and exits.
Exit codes (fedjax_pt/errors.py): 0 done, 2 bad input, 3 workdir holds another experiment,
4 training failed (diverged, out of memory, or no round aggregated), 5 workdir in use,
130 interrupted.
"""

import pathlib

from absl import app
from absl import flags
from absl import logging

from fedjax_pt import cli
from fedjax_pt import errors
from fedjax_pt import train
from fedjax_pt.planning import planner

_CONFIG = cli.define_config(str(pathlib.Path(__file__).resolve().parent / 'configs' / 'tiny.py'))
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output directory (metrics.jsonl, config.json). Default: '
    'runs/<config name>-<timestamp>.')


def _parse_flags(argv: list[str]) -> list[str]:
  return cli.parse(argv, _CONFIG, usage=__doc__)


def main(argv):
  cli.quiet_logs()
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  if config.dry_run:
    try:
      print(planner.describe(config))
    except (ValueError, OSError, ImportError) as e:
      cli.fail(e)
    return
  if config.mesh.num_processes != 1 and not _WORKDIR.value:
    # Every process must write to one directory, which a timestamped default would not be.
    cli.fail(f'mesh.num_processes={config.mesh.num_processes} needs --workdir: the same '
             'directory (on a file system that every host sees) for every process')
  workdir = _WORKDIR.value or cli.default_workdir(cli.config_file(_CONFIG))
  logging.info('workdir: %s', workdir)
  cli.interrupt_once()
  try:
    result = train.run(config, workdir)
  except Exception as e:  # pylint: disable=broad-except
    code = errors.exit_code(e)
    if code is None:
      raise
    cli.fail(errors.out_of_memory(e) or e, code)
  if not result.rounds:  # a process other than 0 of a resumed run that had nothing left to do
    print(f'done: results in {workdir}')
    return
  last = result.last_round
  print(f'done: {last.round} rounds, val_ppl {last.val_ppl:.2f}, results in {workdir}')


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
