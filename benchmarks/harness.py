"""What the benchmarks share: the model and mesh of a config, timing, and the device's own peaks.

Every figure is measured on the device the benchmark runs on, in the same process: the peak
matmul rate and the copy bandwidth that the MFU and the aggregation bound are ratios against.
"""

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_pt import build as build_lib
from fedjax_pt import local_training
from fedjax_pt import model as model_lib
from fedjax_pt import optimizers
from fedjax_pt import sharding


@dataclasses.dataclass
class Setup:
  config: ml_collections.ConfigDict
  model_cfg: model_lib.ModelConfig
  opt_cfg: optimizers.OptConfig
  layout: sharding.Layout
  trainer: local_training.Trainer
  params: Any


def build(config: ml_collections.ConfigDict) -> Setup:
  """The model, mesh and sharded trainer of `config` (the run's own assembly, `fedjax_pt.build`),
  on every local device; no data is read."""
  model_cfg = build_lib.model_config(config)
  opt_cfg = optimizers.OptConfig.from_config(config.opt)
  # Benchmarks time one group of mesh.clients clients, whatever fl.clients_per_round says.
  mesh = sharding.MeshConfig.from_config(
      config.mesh, mode='federated', batch_size=config.data.batch_size,
      micro_batch_size=config.data.micro_batch_size, clients_per_round=config.mesh.clients)
  model = build_lib.build_model(model_cfg, opt_cfg, mesh, config.data.micro_batch_size)
  return Setup(config, model_cfg, opt_cfg, model.layout, model.trainer, model.params)


def synthetic_batch(setup: Setup) -> np.ndarray:
  """Random tokens of a step's shape, [(P,) B, L+1]: the model's speed does not depend on them."""
  data = setup.config.data
  shape = (data.batch_size, data.seq_len + 1)
  if setup.trainer.parallel > 1:
    shape = (setup.trainer.parallel, *shape)
  return np.random.default_rng(0).integers(0, setup.model_cfg.vocab_size, shape, dtype=np.int32)


def best_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
  """Fastest of `repeats` timed calls (after `warmup` untimed ones), waiting for the device."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def step_window(setup: Setup, steps: int) -> tuple[Callable[[], float], Any]:
  """A timed window: a callable that runs `steps` chained local steps and returns seconds per
  step (the step compiled and run twice first); and the compiled step, for its memory analysis."""
  batch = synthetic_batch(setup)
  state = setup.trainer.init(setup.params, 0)
  compiled = setup.trainer.train_step.lower(state, batch).compile()
  for _ in range(2):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)

  def window() -> float:
    nonlocal state
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - start) / steps

  return window, compiled


def interleaved_windows(windows: dict[str, Callable[[], float]],
                        repeats: int) -> dict[str, list[float]]:
  """Each window's seconds per step, `repeats` times, the windows taking turns (A, B, A, B, ...)
  so that a neighbour's load on a shared machine slows all of them alike."""
  times = {name: [] for name in windows}
  for _ in range(repeats):
    for name, window in windows.items():
      times[name].append(window())
  return times


def time_train_steps(setup: Setup, steps: int, windows: int = 3) -> tuple[float, Any]:
  """Seconds per local step: the best of `windows` runs of `steps` chained steps, so that a
  neighbour's burst on a shared machine does not count; and the compiled step."""
  window, compiled = step_window(setup, steps)
  return min(window() for _ in range(windows)), compiled


def peak_matmul_flops(size: int, dtype: Any, repeats: int = 10) -> float:
  """FLOP/s of one device on a size^3 matmul in `dtype`: the peak that MFU is a fraction of."""
  device = jax.devices()[0]
  keys = jax.random.split(jax.random.key(1))
  a, b = (jax.device_put(jax.random.normal(k, (size, size), dtype), device) for k in keys)
  matmul = jax.jit(jnp.matmul)
  return 2 * size ** 3 / best_time(lambda: matmul(a, b), repeats)


def copy_bandwidth(num_bytes: int, repeats: int = 10) -> float:
  """Bytes/s of one device copying a large array (each byte read once and written once)."""
  x = jax.device_put(jnp.ones(num_bytes // 4, jnp.float32), jax.devices()[0])
  copy = jax.jit(lambda v: v + 0.0)
  return 2 * num_bytes / best_time(lambda: copy(x), repeats)


def device_line() -> str:
  devices = jax.devices()
  line = (f'{len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), '
          f'jax {jax.__version__}')
  if jax.default_backend() == 'cpu' and len(devices) > 1:
    # --xla_force_host_platform_device_count: these share the host's cores and memory.
    line += ('; note: fake CPU devices share one host, so per-device peaks, MFU and bandwidth '
             'bounds are not meaningful (the run checks that the sharded path works)')
  return line


def memory_lines(compiled) -> list[str]:
  """Per-device memory: the allocator's peak where the backend reports one (GPU), and XLA's
  static analysis of the train step everywhere."""
  lines = []
  for device in jax.local_devices():
    stats = device.memory_stats()
    if stats and 'peak_bytes_in_use' in stats:
      lines.append(f'device {device.id}: peak {stats["peak_bytes_in_use"] / 2**30:.2f} GiB of '
                   f'{stats.get("bytes_limit", 0) / 2**30:.2f} GiB in use')
  if not lines:
    lines.append(f'{jax.default_backend()} backend reports no allocator statistics '
                 '(device.memory_stats() is None)')
  analysis = compiled.memory_analysis()
  if analysis is not None:
    gib = lambda n: f'{n / 2**30:.3f} GiB'
    lines.append(f'train step, per device (XLA): arguments {gib(analysis.argument_size_in_bytes)}, '
                 f'outputs {gib(analysis.output_size_in_bytes)} (aliased with donated arguments: '
                 f'{gib(analysis.alias_size_in_bytes)}), temporaries '
                 f'{gib(analysis.temp_size_in_bytes)}')
  return lines


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
