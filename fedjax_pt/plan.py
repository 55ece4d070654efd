r"""What a config would train, whether it fits, and how long it would take: on paper, in seconds.

  python -m fedjax_pt.plan --config=configs/1p3b.py [--config.KEY=VALUE ...] \
      [--gpu=h100] [--gpus_per_client=8] [--mfu=0.4 | --tokens_per_s=N] [--bandwidth_mbps=1000] \
      [--latency_ms=10] [--config.fl.clock.round_trip_s=S --config.fl.clock.transport_mbps=R]

Nothing is trained or allocated: shapes come from `jax.eval_shape`, and XLA compiles the real local
train step on abstract arrays for its memory analysis, on `--gpus_per_client` CPU devices (the CLI
sets --xla_force_host_platform_device_count before JAX starts). Every printed line says whether
its numbers are computed, measured or assumed. The compute time of a step assumes --mfu unless
--tokens_per_s gives a client's measured throughput (e.g. `tokens_per_s` of a run's metrics.jsonl
on the same hardware); `fl.clock` (what `python -m benchmarks.deploy_clock --calibrate` measured
for Flower) adds the transport's own cost to every federated round, as the simulated clock does.
`python -m fedjax_pt.main ... --config.dry_run=True` prints `describe(config)`, the short part
that needs no compilation.
"""

import os
import pathlib
import sys

if __name__ == '__main__':
  # Before JAX starts: the XLA analysis shards one client over as many CPU devices as it has GPUs.
  def _gpus_per_client(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
      if arg.startswith('--gpus_per_client='):
        return arg.split('=', 1)[1]
      if arg == '--gpus_per_client' and i + 1 < len(argv):
        return argv[i + 1]
    return '8'

  _COUNT = _gpus_per_client(sys.argv)
  # XLA makes the devices when JAX first uses them, after the flags are checked (too many would
  # hang there).
  if _COUNT.isdigit() and int(_COUNT) > 0:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={_COUNT}').strip()
  os.environ['JAX_PLATFORMS'] = 'cpu'  # the planner compiles for CPU devices whatever the host has
  # XLA reports constants it folds slowly at ERROR level (about 30 lines of HLO for configs/1p3b.py)
  # while it compiles for the analysis; a failed compilation still raises, in one line.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

# pylint: disable=wrong-import-position
from absl import app
from absl import flags

from fedjax_pt import cli
from fedjax_pt.planning import devices as devices_lib
from fedjax_pt.planning import planner
from fedjax_pt.planning import wallclock

_CONFIG = cli.define_config(str(pathlib.Path(__file__).resolve().parent / 'configs' / '1p3b.py'))
_GPU = flags.DEFINE_string('gpu', 'h100', f'Accelerator of every client: '
                           f'{", ".join(devices_lib.NAMES)} (cpu: this host, measured).')
_GPUS = flags.DEFINE_integer('gpus_per_client', 8, 'Accelerators per client (FSDP over them).')
_MFU = flags.DEFINE_float('mfu', 0.4, 'Model FLOPs utilisation assumed, in (0, 1].')
_TOKENS_PER_S = flags.DEFINE_float('tokens_per_s', 0.0, "A client's measured training tokens/s "
                                   '(all its accelerators): replaces --mfu (0: use --mfu).')
_BANDWIDTH = flags.DEFINE_float('bandwidth_mbps', 1000.0,
                                'Link speed of every client, each way, in Mbit/s.')
_LATENCY = flags.DEFINE_float('latency_ms', 10.0, 'Latency of one message, in ms.')


def _parse(argv: list[str]) -> list[str]:
  rest = cli.parse(argv, _CONFIG, usage=__doc__)
  if len(rest) > 1:
    cli.fail(f'unexpected arguments: {" ".join(rest[1:])}')
  try:
    planner.check_flags(_GPU.value, _GPUS.value, _MFU.value, _BANDWIDTH.value, _LATENCY.value,
                        _TOKENS_PER_S.value)
  except ValueError as e:
    cli.fail(e)
  return rest


def main(argv) -> None:
  del argv
  try:
    accelerator = devices_lib.accelerator(_GPU.value, shares=_GPUS.value)
    hardware = wallclock.Hardware(
        peak_flops=accelerator.peak_flops, devices_per_client=_GPUS.value, mfu=_MFU.value,
        bandwidth_bps=_BANDWIDTH.value * 1e6, latency_s=_LATENCY.value / 1e3,
        tokens_per_s=_TOKENS_PER_S.value or None)
    print(planner.full_plan(_CONFIG.value, accelerator, hardware))
  except (ValueError, OSError, ImportError) as e:
    cli.fail(e)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse)
