"""What every fedjax_pt command shares: the one-line-error contract, the --config flag and quiet
logs.

A command that cannot do what it was asked ends with one line on stderr that names the culprit,
`<program>: error: <what>`, and an exit code of `fedjax_pt.errors` (2 for bad input); never a
traceback. Config files are ml_collections files (`configs/*.py`) with `--config.KEY=VALUE`
overrides, as `python -m fedjax_pt.main` takes them.
"""

from collections.abc import Sequence
import datetime
import logging as std_logging
import os
import pathlib
import re
import signal
import sys
import threading
from typing import NoReturn

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from fedjax_pt import errors

_HELP_FLAGS = ('--help', '-h', '--helpshort', '--helpfull', '-?')


def fail(message, code: int = errors.EXIT_BAD_INPUT, program: str = 'fedjax_pt') -> NoReturn:
  """Prints `<program>: error: <message>` on one line and exits with `code`."""
  print(f'{program}: error: {" ".join(str(message).split())}', file=sys.stderr, flush=True)
  # The line above is the report. What background threads (orbax's writers, after a failed save)
  # print while the interpreter shuts down would only bury it.
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, sys.stderr.fileno())
  jax = sys.modules.get('jax')
  if jax is not None and jax.distributed.is_initialized():
    # Not through atexit's jax.distributed.shutdown: its barrier would wait for processes that
    # may be blocked in a collective this one will never join (up to mesh.heartbeat_timeout_s).
    # They stop when they see this one gone (fedjax_pt/distributed.py). The files are closed.
    sys.stdout.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def _overrides(argv: Sequence[str]) -> list[str]:
  return [a.split('=')[0] for a in argv if a.startswith('--config.')]


def _unknown_key(error: Exception, program: str) -> NoReturn:
  """Names the override whose key does not exist (ml_collections names only its last part)."""
  overrides = _overrides(sys.argv[1:])
  text = str(error).replace("\\'", "'")  # the KeyError's message, quoted once more
  culprits = [o for o in overrides
              if any(f"'{part}'" in text for part in o[len('--config.'):].split('.'))]
  hint = re.search(r'Did you mean "([^"]+)"', str(error))
  if len(culprits) == 1:
    parts = culprits[0].split('.')
    suggestion = ''
    if hint:
      wrong = next(i for i, part in enumerate(parts) if f"'{part}'" in text)
      parts[wrong] = hint.group(1)
      suggestion = f' (did you mean {".".join(parts)}?)'
    fail(f'unknown config key {culprits[0]}{suggestion}', program=program)
  fail(f'unknown config key among {", ".join(overrides)}' +
       (f' (did you mean "{hint.group(1)}"?)' if hint else ''), program=program)


def define_config(default: str, program: str = 'fedjax_pt'):
  """The --config flag (a config file, `path[:variant]`, and its --config.KEY=VALUE overrides).

  config_flags reads the overrides from sys.argv right here: one naming no key of the (locked)
  default config fails now, before absl's parser runs."""
  try:
    return config_flags.DEFINE_config_file(
        'config', default, 'Path to a config file (configs/*.py).', lock_config=True)
  except (AttributeError, KeyError) as e:
    _unknown_key(e, program)


def config_file(config_flag) -> str:
  """The --config file without its variant (`configs/tiny.py:test` -> `configs/tiny.py`)."""
  return config_flags.get_config_filename(flags.FLAGS[config_flag.name]).split(':')[0]


def default_workdir(config_path: str) -> str:
  """Where a run writes when no --workdir is given: runs/<config name>-<timestamp>."""
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  return os.path.join('runs', f'{pathlib.Path(config_path.split(":")[0]).stem}-{stamp}')


def parse(argv: list[str], config_flag, program: str = 'fedjax_pt',
          usage: str | None = None) -> list[str]:
  """absl's parser (as `app.run`'s flags_parser), with every flag or config error reduced to one
  line; --help prints `usage` (the command's docstring) and the flags. Returns the arguments
  that are not flags: a command refuses them itself."""
  if usage is not None and any(a in _HELP_FLAGS for a in argv[1:]):
    print(usage)
    app.usage(shorthelp=True, writeto_stdout=True)
    sys.exit(0)
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0], program=program)
  except (AttributeError, KeyError) as e:  # an override of a key that a --config= file lacks
    _unknown_key(e, program)
  except Exception as e:  # pylint: disable=broad-except
    # A missing config file fails here when --config.* overrides follow it, with a long message.
    named = [a.split('=', 1)[1].split(':')[0] for a in argv[1:] if a.startswith('--config=')]
    if named and not os.path.isfile(named[-1]):
      fail(f'--config={named[-1]}: no such config file', program=program)
    fail(f'bad flags: {e}', program=program)
  path = config_file(config_flag)
  if not os.path.isfile(path):
    fail(f'--config={path}: no such config file', program=program)
  try:
    config_flag.value  # pylint: disable=pointless-statement
  except (AttributeError, KeyError) as e:
    _unknown_key(e, program)
  except Exception as e:  # pylint: disable=broad-except
    fail(f'--config={path} does not load: {e}', program=program)
  return rest


def load_config(path: str, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """The config of `--config=path` with `overrides` ('--config.KEY=VALUE'), read without touching
  the process's flags (a server reads a run's config from its run config). Raises ValueError
  naming the culprit."""
  bad = [a for a in overrides if not a.startswith('--config.')]
  if bad:
    raise ValueError(f'{bad[0]!r} is not a --config.KEY=VALUE override')
  if not os.path.isfile(path.split(':')[0]):
    raise ValueError(f'config={path}: no such config file (relative paths start at '
                     f'{os.getcwd()})')
  argv = ['fedjax_pt', f'--config={path}', *overrides]
  values = flags.FlagValues()
  try:
    config_flags.DEFINE_config_file('config', None, 'config file', flag_values=values,
                                    lock_config=True, sys_argv=argv)
    values(argv)
    return values.config
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'config={path} {" ".join(overrides)}: {" ".join(str(e).split())}') from None


def interrupt_once(program: str = 'fedjax_pt') -> None:
  """SIGINT and SIGTERM (a scheduler's, a sweep's) stop the command as Ctrl-C does, by raising
  KeyboardInterrupt once. A second signal arrives while it stops (saving its checkpoint, stopping
  its processes): raised again, it would cut that short with a traceback, so it is noted in one
  line and the stop goes on."""

  def noted(signum, frame):
    del frame
    print(f'{program}: {signal.Signals(signum).name} received while stopping; the stop goes on',
          file=sys.stderr, flush=True)

  def first(signum, frame):
    del signum, frame
    errors.STOP_REQUESTED.set()  # in case the KeyboardInterrupt lands where it is swallowed
    for signum in (signal.SIGINT, signal.SIGTERM):
      signal.signal(signum, noted)
    raise KeyboardInterrupt

  errors.STOP_REQUESTED.clear()
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, first)


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


def quiet_logs() -> None:
  """Keeps a command's log to what its user reads: see `_quiet` and `_quiet_unraisable`."""
  logging.get_absl_handler().addFilter(_quiet)
  sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
  threading.excepthook = _quiet_unraisable(threading.excepthook)
