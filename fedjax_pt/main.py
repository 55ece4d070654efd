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
import logging as std_logging
import os
import pathlib
import re
import signal
import sys
import threading

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from fedjax_pt import errors
from fedjax_pt import plan
from fedjax_pt import train

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent / 'configs' / 'tiny.py'
_HELP_FLAGS = ('--help', '-h', '--helpshort', '--helpfull', '-?')


def _fail(message: str, code: int = errors.EXIT_BAD_INPUT) -> None:
  print(f'fedjax_pt: error: {" ".join(str(message).split())}', file=sys.stderr, flush=True)
  # The line above is the report. What background threads (orbax's writers, after a failed save)
  # print while the interpreter shuts down would only bury it.
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, sys.stderr.fileno())
  if _joined_other_processes():
    # Not through atexit's jax.distributed.shutdown: its barrier would wait for processes that
    # may be blocked in a collective this one will never join (up to mesh.heartbeat_timeout_s).
    # They stop when they see this one gone (fedjax_pt/distributed.py). The files are closed.
    sys.stdout.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def _joined_other_processes() -> bool:
  jax = sys.modules.get('jax')
  return jax is not None and jax.distributed.is_initialized()


def _unknown_key(error: Exception) -> None:
  overrides = [a.split('=')[0] for a in sys.argv[1:] if a.startswith('--config.')]
  hint = re.search(r'Did you mean "([^"]+)"', str(error))
  _fail(f'unknown config key among {", ".join(overrides)}' +
        (f' (did you mean "{hint.group(1)}"?)' if hint else ''))


def _define_config_flag():
  # config_flags reads the --config.KEY overrides from sys.argv right here, at definition time:
  # an override naming no key of the (locked) default config fails now, before absl's parser runs.
  try:
    return config_flags.DEFINE_config_file(
        'config', str(_DEFAULT_CONFIG), 'Path to a config file (configs/*.py).', lock_config=True)
  except (AttributeError, KeyError) as e:
    _unknown_key(e)


_CONFIG = _define_config_flag()
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output directory (metrics.jsonl, config.json). Default: '
    'runs/<config name>-<timestamp>.')


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with every flag or config error reduced to one line that names the culprit."""
  if any(a in _HELP_FLAGS for a in argv[1:]):
    print(__doc__)
    app.usage(shorthelp=True, writeto_stdout=True)
    sys.exit(0)
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])
  except (AttributeError, KeyError) as e:  # an override of a key that a --config= file lacks
    _unknown_key(e)
  except Exception as e:  # pylint: disable=broad-except
    # A missing config file fails here when --config.* overrides follow it, with a long message.
    named = [a.split('=', 1)[1].split(':')[0] for a in argv[1:] if a.startswith('--config=')]
    if named and not os.path.isfile(named[-1]):
      _fail(f'--config={named[-1]}: no such config file')
    _fail(f'bad flags: {e}')
  config_file = _config_file()
  if not os.path.isfile(config_file):
    _fail(f'--config={config_file}: no such config file')
  try:
    _CONFIG.value  # pylint: disable=pointless-statement
  except (AttributeError, KeyError) as e:
    _unknown_key(e)
  except Exception as e:  # pylint: disable=broad-except
    _fail(f'--config={config_file} does not load: {e}')
  return rest


def _config_file() -> str:
  # `--config=configs/tiny.py:test` names the file and an argument of its get_config.
  return config_flags.get_config_filename(flags.FLAGS['config']).split(':')[0]


def _default_workdir(config_path: str) -> str:
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  return os.path.join('runs', f'{pathlib.Path(config_path).stem}-{stamp}')


def _quiet(record) -> bool:
  """Drops orbax's INFO lines about every step of every save, its tracebacks of a failed
  background save (the run stops on it with one line of its own), and JAX's INFO line that it
  found no TPU (on every machine without one); keeps every other warning and error."""
  if '/orbax/' in record.pathname:
    return record.levelno >= std_logging.WARNING and not record.exc_info
  if record.name == 'asyncio' and 'never retrieved' in str(record.msg):
    return False  # the same failed save, reported again as the interpreter exits
  return record.levelno >= std_logging.WARNING or 'Unable to initialize backend' not in str(
      record.msg)


def _quiet_unraisable(hook):
  """After a failed save, orbax's remaining writers call back into an event loop that is gone;
  Python reports each as an unraisable 'Event loop is closed'. The run reports the save itself."""

  def quieted(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and
            'Event loop is closed' in str(unraisable.exc_value)):
      hook(unraisable)

  return quieted


def _raise_interrupt(signum, frame):
  del signum, frame
  errors.STOP_REQUESTED.set()  # in case the KeyboardInterrupt lands where it is swallowed
  raise KeyboardInterrupt  # SIGTERM (a scheduler, a sweep) stops the run like Ctrl-C


def main(argv):
  logging.get_absl_handler().addFilter(_quiet)
  sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
  threading.excepthook = _quiet_unraisable(threading.excepthook)
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  if config.dry_run:
    try:
      print(plan.describe(config))
    except (ValueError, OSError, ImportError) as e:
      _fail(e)
    return
  if config.mesh.num_processes != 1 and not _WORKDIR.value:
    # Every process must write to one directory, which a timestamped default would not be.
    _fail(f'mesh.num_processes={config.mesh.num_processes} needs --workdir: the same directory '
          '(on a file system that every host sees) for every process')
  workdir = _WORKDIR.value or _default_workdir(_config_file())
  logging.info('workdir: %s', workdir)
  errors.STOP_REQUESTED.clear()
  signal.signal(signal.SIGTERM, _raise_interrupt)
  signal.signal(signal.SIGINT, _raise_interrupt)
  try:
    result = train.run(config, workdir)
  except errors.WorkdirRefused as e:
    _fail(e, errors.EXIT_WORKDIR_REFUSED)
  except errors.WorkdirBusy as e:
    _fail(e, errors.EXIT_WORKDIR_BUSY)
  except errors.TrainingFailed as e:
    _fail(e, errors.EXIT_TRAINING_FAILED)
  except errors.Interrupted as e:
    _fail(e, errors.EXIT_INTERRUPTED)
  except (MemoryError, jax.errors.JaxRuntimeError) as e:
    if errors.out_of_memory(e) is None:
      raise
    _fail(errors.out_of_memory(e), errors.EXIT_TRAINING_FAILED)
  except (ValueError, OSError, ImportError) as e:
    # Bad input or an unusable workdir (not a directory, not writable, disk full): one line that
    # names the culprit, no traceback.
    _fail(e)
  if not result.rounds:  # a process other than 0 of a resumed run that had nothing left to do
    print(f'done: results in {workdir}')
    return
  last = result.last_round
  print(f'done: {last.round} rounds, val_ppl {last.val_ppl:.2f}, results in {workdir}')


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
