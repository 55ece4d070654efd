r"""Local-step throughput and MFU of a config's train step on this machine's devices.

  python -m benchmarks.mfu [--config=configs/tiny.py] [--config.KEY=VALUE ...] [--steps=10]

On one CPU device, when PyTorch is installed (it is never required), the same model and step in
eager PyTorch (`benchmarks/torch_reference.py`) are timed in the same run, windows of the two
taking turns, and the ratio of their throughputs is printed (`--notorch` skips it).

MFU = model FLOPs per second (6 N + attention per token, `model.flops_per_token`; recomputation by
remat is not counted) / the peak of the devices used, where a device's peak is measured in this run
by a large matmul in the model's compute dtype. On a GPU, e.g. an H100:

  python -m benchmarks.mfu --config=configs/125m.py --config.model.attention=cudnn \
      --config.data.batch_size=32 --matmul_size=8192

Prints the device, the mesh, tokens/s, MFU and per-device memory: best and median over the timed
windows.
"""

import importlib.util

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from benchmarks import harness
from fedjax_pt import model as model_lib

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Config file.',
                                          lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 10, 'Local steps per timed window.')
_WINDOWS = flags.DEFINE_integer('windows', 5, 'Timed windows (of each framework, taking turns).')
_TORCH = flags.DEFINE_bool('torch', True, 'Also time the step in PyTorch when it is installed '
                           '(one CPU device only).')
_MATMUL_SIZE = flags.DEFINE_integer('matmul_size', 0, 'Side of the peak-measuring matmul; 0: 8192 '
                                    'on accelerators, 2048 on CPU.')


def main(argv):
  del argv
  config = _CONFIG.value
  setup = harness.build(config)
  cfg, data = setup.model_cfg, config.data
  print(f'device: {harness.device_line()}')
  print(f'model: {model_lib.param_count(cfg):,} parameters, d_model {cfg.d_model}, '
        f'{cfg.num_layers} layers, seq {data.seq_len}, dtype {cfg.dtype}, remat {cfg.remat}, '
        f'attention {cfg.attention}; batch {data.batch_size} per client, micro-batch '
        f'{data.micro_batch_size or data.batch_size}')
  print(f'mesh: {dict(setup.layout.mesh.shape)} ({setup.layout.cfg.num_devices} devices)')

  size = _MATMUL_SIZE.value or (2048 if jax.default_backend() == 'cpu' else 8192)
  peak = harness.peak_matmul_flops(size, cfg.compute_dtype)
  print(f'peak: {peak / 1e12:.3f} TFLOP/s per device ({size}^3 matmul, {cfg.dtype})')

  window, compiled = harness.step_window(setup, _STEPS.value)
  windows = {'fedjax_pt': window}
  torch_window = _torch_window(setup)
  if torch_window is not None:
    windows['PyTorch'] = torch_window
  times = harness.interleaved_windows(windows, _WINDOWS.value)
  tokens = setup.trainer.parallel * data.batch_size * data.seq_len
  flops_per_token = model_lib.flops_per_token(cfg, data.seq_len)
  devices = setup.layout.cfg.num_devices
  for name, seconds in times.items():
    best, median = min(seconds), float(np.median(seconds))
    mfu = [tokens / s * flops_per_token / (peak * devices) for s in (best, median)]
    print(f'{name} local step: {best * 1e3:.1f} ms (median {median * 1e3:.1f}), '
          f'{tokens / best:,.0f} tokens/s ({setup.trainer.parallel} client(s) x '
          f'{data.batch_size} x {data.seq_len} tokens), MFU {100 * mfu[0]:.1f}% '
          f'(median {100 * mfu[1]:.1f}%)')
  if torch_window is not None:
    ratios = np.array(times['PyTorch']) / np.array(times['fedjax_pt'])
    print(f'fedjax_pt / PyTorch tokens/s: {min(times["PyTorch"]) / min(times["fedjax_pt"]):.2f}x '
          f'(best against best; window pairs {ratios.min():.2f}-{ratios.max():.2f}x)')
  for line in harness.memory_lines(compiled):
    print(f'memory: {line}')


def _torch_window(setup: harness.Setup):
  """A timed window of the same step in PyTorch, or None (with the reason printed)."""
  if not _TORCH.value:
    return None
  why_not = None
  if importlib.util.find_spec('torch') is None:
    why_not = 'torch is not installed'
  elif jax.default_backend() != 'cpu' or setup.layout.cfg.num_devices > 1:
    why_not = 'the comparison runs on one CPU device only'
  else:
    from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
    why_not = torch_reference.unsupported(setup.model_cfg)
  if why_not:
    print(f'PyTorch: skipped, {why_not}')
    return None
  step = torch_reference.make_step(setup.model_cfg, setup.opt_cfg, harness.synthetic_batch(setup))
  peak = torch_reference.peak_matmul_flops(_MATMUL_SIZE.value or 2048)
  print(f'PyTorch: {torch_reference.version_line()}; its peak {peak / 1e12:.3f} TFLOP/s '
        '(same matmul; MFU below is against the JAX peak for both)')
  return torch_reference.step_window(step, _STEPS.value)


if __name__ == '__main__':
  app.run(main)
