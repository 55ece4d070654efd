r"""Federated (or centralized) pre-training from one command.

  python -m fedjax_pt.main --config=configs/tiny.py --workdir=runs/tiny \
      [--config.fl.outer_lr=0.7 ...]

With no flags it trains the tiny config on the built-in offline corpus, on CPU, in a few minutes.
`--config.dry_run=True` prints the model's size, FLOPs per token and memory estimate, and exits.
Exit codes (fedjax_pt/errors.py): 0 done, 2 bad input, 3 workdir holds another experiment,
4 training failed (diverged, out of memory, or no round aggregated), 5 workdir in use,
130 interrupted.
"""

import datetime
import os
import pathlib
import signal

from absl import app
from absl import flags
from absl import logging
import jax

from fedjax_pt import cli
from fedjax_pt import errors
from fedjax_pt import train
from fedjax_pt.planning import planner

_CONFIG = cli.define_config(str(pathlib.Path(__file__).resolve().parent / 'configs' / 'tiny.py'))
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output directory (metrics.jsonl, config.json). Default: '
    'runs/<config name>-<timestamp>.')
# What a failed run raises, and the exit code each gets (bad input is ValueError, OSError, ...).
_FAILURES = ((errors.WorkdirRefused, errors.EXIT_WORKDIR_REFUSED),
             (errors.WorkdirBusy, errors.EXIT_WORKDIR_BUSY),
             (errors.TrainingFailed, errors.EXIT_TRAINING_FAILED),
             (errors.Interrupted, errors.EXIT_INTERRUPTED))


def _raise_interrupt(signum, frame):
  del signum, frame
  errors.STOP_REQUESTED.set()  # in case the KeyboardInterrupt lands where it is swallowed
  raise KeyboardInterrupt  # SIGTERM (a scheduler, a sweep) stops the run like Ctrl-C


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
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  workdir = _WORKDIR.value or os.path.join(
      'runs', f'{pathlib.Path(cli.config_file(_CONFIG)).stem}-{stamp}')
  logging.info('workdir: %s', workdir)
  errors.STOP_REQUESTED.clear()
  signal.signal(signal.SIGTERM, _raise_interrupt)
  signal.signal(signal.SIGINT, _raise_interrupt)
  try:
    result = train.run(config, workdir)
  except tuple(kind for kind, _ in _FAILURES) as e:
    cli.fail(e, next(code for kind, code in _FAILURES if isinstance(e, kind)))
  except (MemoryError, jax.errors.JaxRuntimeError) as e:
    if errors.out_of_memory(e) is None:
      raise
    cli.fail(errors.out_of_memory(e), errors.EXIT_TRAINING_FAILED)
  except (ValueError, OSError, ImportError) as e:
    # Bad input or an unusable workdir (not a directory, not writable, disk full): one line that
    # names the culprit, no traceback.
    cli.fail(e)
  if not result.rounds:  # a process other than 0 of a resumed run that had nothing left to do
    print(f'done: results in {workdir}')
    return
  last = result.last_round
  print(f'done: {last.round} rounds, val_ppl {last.val_ppl:.2f}, results in {workdir}')


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
