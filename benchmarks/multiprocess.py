r"""One client on one process with N devices vs on P processes (jax.distributed) with N/P each.

  python -m benchmarks.multiprocess [--layouts=1x8,2x4,1x2,2x1] [--rounds=3] [--config=...]
      [--overrides=mesh.data=8,mesh.fsdp=1]

Runs the same config once per layout, PxD = P processes (`fedjax_pt.launch_local`) of D CPU devices
each (`--xla_force_host_platform_device_count`), and reports, from metrics.jsonl, the mean
`round_time_s` of the rounds after the first (which compiles), the time per local step, and the
final val_loss (the layouts compute the same run: tests/multiprocess_test.py). On CPU the fake
devices of all processes share this machine's cores, so the ratio measures what crossing processes
costs (gloo's TCP collectives instead of in-process ones, two Python drivers), not a speed-up.
"""

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_LAYOUTS = flags.DEFINE_list('layouts', ['1x8', '2x4', '1x2', '2x1'], 'PxD layouts to run.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Rounds per run; the first is left out.')
_CONFIG = flags.DEFINE_string('config', 'configs/tiny.py', 'Config file.')
_OVERRIDES = flags.DEFINE_list('overrides', [], 'Config overrides, e.g. mesh.data=8,mesh.fsdp=1.')
_WORKDIR = flags.DEFINE_string('workdir', '', 'Where the runs go (default: a temporary dir).')

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(layout: str, workdir: str) -> dict[str, float]:
  processes, devices = map(int, layout.split('x'))
  args = [f'--config={_CONFIG.value}', f'--workdir={workdir}',
          f'--config.fl.rounds={_ROUNDS.value}',
          '--config.ckpt.every_rounds=0', '--config.log.progress=False',
          '--config.log.tensorboard=False', *(f'--config.{o}' for o in _OVERRIDES.value)]
  env = dict(os.environ)
  if processes == 1:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
    cmd = [sys.executable, '-m', 'fedjax_pt.main', *args]
  else:
    cmd = [sys.executable, '-m', 'fedjax_pt.launch_local', f'--processes={processes}',
           f'--devices_per_process={devices}', '--', *args]
  start = time.perf_counter()
  subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
  wall = time.perf_counter() - start
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    rounds = [r for r in map(json.loads, f) if 'val_loss' in r and r['round'] > 0]
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    config = json.load(f)
  steps = config['fl']['clients_per_round'] * config['fl']['local_steps']
  later = [r['round_time_s'] for r in rounds[1:]]
  return {'round_s': statistics.mean(later), 'step_ms': 1e3 * statistics.mean(later) / steps,
          'first_round_s': rounds[0]['round_time_s'], 'wall_s': wall,
          'val_loss': rounds[-1]['val_loss']}


def main(argv):
  del argv
  base = _WORKDIR.value or tempfile.mkdtemp(prefix='multiprocess-')
  results = {}
  for layout in _LAYOUTS.value:
    results[layout] = _run(layout, os.path.join(base, layout))
    print(f'{layout}: {results[layout]}', flush=True)
  print(f'\n{_CONFIG.value} {" ".join(_OVERRIDES.value)}, {_ROUNDS.value} rounds, on '
        f'{os.cpu_count()} CPU cores\n')
  print('| layout (processes x devices) | round (s) | local step (ms) | first round (s) | '
        'whole run (s) | final val_loss |')
  print('|---|---|---|---|---|---|')
  for layout, r in results.items():
    print(f'| {layout} | {r["round_s"]:.2f} | {r["step_ms"]:.1f} | {r["first_round_s"]:.1f} | '
          f'{r["wall_s"]:.1f} | {r["val_loss"]:.6f} |')


if __name__ == '__main__':
  app.run(main)
