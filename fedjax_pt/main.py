r"""Federated (or centralized) pre-training from one command.

  python -m fedjax_pt.main --config=configs/tiny.py --workdir=runs/tiny \
      [--config.fl.outer_lr=0.7 ...]

With no flags it trains the tiny config on the built-in offline corpus, on CPU, in a few minutes.
"""

import datetime
import os
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fedjax_pt import train

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'tiny.py'

_CONFIG = config_flags.DEFINE_config_file(
    'config', str(_DEFAULT_CONFIG), 'Path to a config file (configs/*.py).', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output directory (metrics.jsonl, config.json). Default: '
    'runs/<config name>-<timestamp>.')


def _default_workdir(config_path: str) -> str:
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  return os.path.join('runs', f'{pathlib.Path(config_path).stem}-{stamp}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  workdir = _WORKDIR.value or _default_workdir(config_flags.get_config_filename(flags.FLAGS['config']))
  logging.info('workdir: %s', workdir)
  try:
    result = train.run(_CONFIG.value, workdir)
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
    # Bad input: one line naming the culprit, no traceback.
    print(f'fedjax_pt: error: {e}', file=sys.stderr)
    sys.exit(2)
  last = result.last_round
  print(f"done: {last['round']} rounds, val_ppl {last['val_ppl']:.2f}, results in {workdir}")


if __name__ == '__main__':
  app.run(main)
