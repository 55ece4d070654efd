r"""Local-step throughput and MFU of a config's train step on this machine's devices.

  python -m benchmarks.mfu [--config=configs/tiny.py] [--config.KEY=VALUE ...] [--steps=10]

MFU = model FLOPs per second (6 N + attention per token, `model.flops_per_token`; recomputation by
remat is not counted) / the peak of the devices used, where a device's peak is measured in this run
by a large matmul in the model's compute dtype. On a GPU, e.g. an H100:

  python -m benchmarks.mfu --config=configs/125m.py --config.model.attention=cudnn \
      --config.data.batch_size=32 --matmul_size=8192

Prints the device, the mesh, tokens/s, MFU and per-device memory.
"""

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from benchmarks import harness
from fedjax_pt import model as model_lib

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Config file.',
                                          lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 10, 'Local steps per timed window (best of 3).')
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

  step_s, compiled = harness.time_train_steps(setup, _STEPS.value)
  tokens = setup.trainer.parallel * data.batch_size * data.seq_len
  tokens_per_s = tokens / step_s
  model_flops = tokens_per_s * model_lib.flops_per_token(cfg, data.seq_len)
  mfu = model_flops / (peak * setup.layout.cfg.num_devices)
  print(f'local step: {step_s * 1e3:.1f} ms, {tokens_per_s:,.0f} tokens/s '
        f'({setup.trainer.parallel} client(s) x {data.batch_size} x {data.seq_len} tokens)')
  print(f'model: {model_flops / 1e12:.3f} TFLOP/s -> MFU {100 * mfu:.1f}%')
  for line in harness.memory_lines(compiled):
    print(f'memory: {line}')


if __name__ == '__main__':
  app.run(main)
