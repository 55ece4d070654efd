r"""Federated (or centralized) pre-training from one command.

  python -m fedjax_pt.main --config=configs/tiny.py --workdir=runs/tiny \
      [--config.fl.outer_lr=0.7 ...]

With no flags it trains the tiny config on the built-in offline corpus, on CPU, in a few minutes.
"""

import datetime
import logging as std_logging
import os
import pathlib
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fedjax_pt import errors
from fedjax_pt import train

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'tiny.py'



def _fail(message: str, code: int = errors.EXIT_BAD_INPUT) -> None:
  print(f'fedjax_pt: error: {message}', file=sys.stderr)
  sys.exit(code)


def _define_config_flag():
  # config_flags reads the --config.KEY overrides from sys.argv right here, at definition time:
  # an override naming no key of the (locked) config fails now, before absl's parser runs.
  try:
    return config_flags.DEFINE_config_file(
        'config', str(_DEFAULT_CONFIG), 'Path to a config file (configs/*.py).', lock_config=True)
  except (AttributeError, KeyError) as e:
    overrides = [a.split('=')[0] for a in sys.argv[1:] if a.startswith('--config.')]
    hint = re.search(r'Did you mean "([^"]+)"', str(e))
    _fail(f'unknown config key among {", ".join(overrides)}' +
          (f' (did you mean "{hint.group(1)}"?)' if hint else ''))


_CONFIG = _define_config_flag()
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output directory (metrics.jsonl, config.json). Default: '
    'runs/<config name>-<timestamp>.')


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with every flag or config error reduced to one line that names the culprit."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])
  except Exception as e:  # pylint: disable=broad-except
    _fail(f'bad flags: {" ".join(str(e).split())}')
  config_file = _config_file()
  if not os.path.isfile(config_file):
    _fail(f'--config={config_file}: no such config file')
  try:
    _CONFIG.value  # pylint: disable=pointless-statement
  except Exception as e:  # pylint: disable=broad-except
    _fail(f'--config={config_file} does not load: {" ".join(str(e).split())}')
  return rest


def _config_file() -> str:
  # `--config=configs/tiny.py:test` names the file and an argument of its get_config.
  return config_flags.get_config_filename(flags.FLAGS['config']).split(':')[0]


def _default_workdir(config_path: str) -> str:
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  return os.path.join('runs', f'{pathlib.Path(config_path).stem}-{stamp}')


def _quiet_orbax(record) -> bool:
  # orbax logs every step of every save at INFO; keep its warnings, drop the chatter.
  return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  logging.get_absl_handler().addFilter(_quiet_orbax)
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  workdir = _WORKDIR.value or _default_workdir(_config_file())
  logging.info('workdir: %s', workdir)
  try:
    result = train.run(_CONFIG.value, workdir)
  except errors.WorkdirRefused as e:
    _fail(' '.join(str(e).split()), errors.EXIT_WORKDIR_REFUSED)
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
    # Bad input: one line naming the culprit, no traceback.
    _fail(' '.join(str(e).split()))
  last = result.last_round
  print(f'done: {last.round} rounds, val_ppl {last.val_ppl:.2f}, results in {workdir}')


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
