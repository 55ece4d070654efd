r"""The paper's runs on paper: federated (float32 or int8 uploads) against DDP over the same links.

  python experiments/plan_paper.py [--mfu=0.4] [--latency_ms=10] [--gpu=h100]

For configs/125m.py, 350m.py and 1p3b.py as they stand (tau = 500, K = 8 clients, the paper's batch
and schedule), with every client 8 GPUs (FSDP) at the given MFU and its link at 100 Mbit/s, 1 Gbit/s
and 10 Gbit/s, prints a markdown table of the predicted wall time and bytes of a whole run
(`fedjax_pt.planning.wallclock`, the time model of `python -m fedjax_pt.plan`), how many times fewer
bytes federated training sends than DDP (Photon reports 64-512x) and DDP's wall time over federated
training's. Downloads stay float32. Nothing is compiled or allocated: a few seconds.
"""

import argparse
import dataclasses
import importlib
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from fedjax_pt.planning import devices  # pylint: disable=wrong-import-position
from fedjax_pt.planning import planner as plan  # pylint: disable=wrong-import-position
from fedjax_pt.planning import wallclock  # pylint: disable=wrong-import-position

CONFIGS = ('125m', '350m', '1p3b')
BANDWIDTHS_MBPS = (100, 1_000, 10_000)
GPUS_PER_CLIENT = 8


def _num(x: float) -> str:
  """Three significant digits, without exponents."""
  return f'{x:,.0f}' if x >= 100 else f'{x:.1f}' if x >= 10 else f'{x:.3g}'


def _hours(seconds: float) -> str:
  return f'{_num(seconds / 3600)} h'


def _tb(n: float) -> str:
  return f'{_num(n / 1e12)} TB'


def rows(gpu: str, mfu: float, latency_ms: float) -> list[list[str]]:
  accelerator = devices.accelerator(gpu)
  out = []
  for name in CONFIGS:
    config = importlib.import_module(f'fedjax_pt.configs.{name}').get_config()
    spec, model_cfg = plan.one_client_spec(config)
    base = plan.workload(spec, model_cfg)
    int8 = dataclasses.replace(base, upload_bytes=plan.payload_bytes(
        model_cfg, 'int8', spec.fl.compression.block_size))
    for mbps in BANDWIDTHS_MBPS:
      hardware = wallclock.Hardware(peak_flops=accelerator.peak_flops,
                                    devices_per_client=GPUS_PER_CLIENT, mfu=mfu,
                                    bandwidth_bps=mbps * 1e6, latency_s=latency_ms / 1e3)
      fed, fed8 = wallclock.predict(base, hardware), wallclock.predict(int8, hardware)
      even = fed.break_even_bps
      out.append([
          name, f'{mbps / 1000:g} Gbit/s', _hours(fed.federated_run_s),
          _hours(fed8.federated_run_s), _hours(fed.ddp_run_s), _tb(fed.federated_bytes),
          _tb(fed8.federated_bytes), _tb(fed.ddp_bytes), f'{fed.communication_ratio:.0f}x',
          f'{fed8.communication_ratio:.0f}x', f'{_num(fed.ddp_run_s / fed.federated_run_s)}x',
          f'{_num(fed8.ddp_run_s / fed8.federated_run_s)}x',
          f'{even / 1e9:.3g} Gbit/s' if even else 'none'])
  return out


HEADER = ['config', 'link', 'fed. time', 'fed. int8 time', 'DDP time', 'fed. bytes',
          'fed. int8 bytes', 'DDP bytes', 'DDP/fed. bytes', 'DDP/fed. int8 bytes',
          'DDP/fed. time', 'DDP/fed. int8 time', 'break-even (fed.)']


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n', 1)[0])
  parser.add_argument('--gpu', default='h100', choices=devices.NAMES)
  parser.add_argument('--mfu', type=float, default=0.4)
  parser.add_argument('--latency_ms', type=float, default=10.0)
  args = parser.parse_args()
  try:
    plan.check_flags(args.gpu, GPUS_PER_CLIENT, args.mfu, 1.0, args.latency_ms)
  except ValueError as e:
    parser.error(str(e))
  print(f'{GPUS_PER_CLIENT} x {devices.accelerator(args.gpu).describe()} per client, MFU '
        f'{args.mfu:g}, {args.latency_ms:g} ms a message; K, tau, rounds, batch from each config\n')
  print('| ' + ' | '.join(HEADER) + ' |')
  print('|' + '---|' * len(HEADER))
  for row in rows(args.gpu, args.mfu, args.latency_ms):
    print('| ' + ' | '.join(row) + ' |')


if __name__ == '__main__':
  main()
