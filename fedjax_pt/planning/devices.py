"""What one accelerator offers the wall-clock planner: peak compute, memory, memory bandwidth.

The GPUs' figures are their datasheets' (assumed: a run reaches a fraction of them, the MFU the
planner is told); the CPU's are measured on this host when asked for.
"""

import dataclasses
import os
import time

import jax
import jax.numpy as jnp

from fedjax_pt.planning import memory


@dataclasses.dataclass(frozen=True)
class Accelerator:
  name: str
  peak_flops: float  # one device's dense bf16 FLOP/s (float32 for the measured CPU)
  memory_bytes: int
  memory_bandwidth: float | None  # bytes/s of its HBM (None: not known)
  measured: bool  # True: timed on this host; False: from the datasheet

  def describe(self) -> str:
    bandwidth = (f', {self.memory_bandwidth / 1e12:.2f} TB/s memory bandwidth'
                 if self.memory_bandwidth else '')
    how = ('measured: a 2048^3 float32 matmul timed now, MemAvailable of this host'
           if self.measured else 'assumed: datasheet')
    return (f'{self.name}, {self.peak_flops / 1e12:.3g} TFLOP/s peak, '
            f'{memory.format_bytes(self.memory_bytes)}{bandwidth} [{how}]')


_GIB = memory.GIB
# SXM parts; dense (no sparsity) bf16 tensor-core peaks.
_DATASHEETS = {
    'h100': Accelerator('NVIDIA H100 SXM', 989e12, 80 * _GIB, 3.35e12, False),
    'h200': Accelerator('NVIDIA H200 SXM', 989e12, 141 * _GIB, 4.8e12, False),
    'a100': Accelerator('NVIDIA A100 SXM 80GB', 312e12, 80 * _GIB, 2.04e12, False),
    'l4': Accelerator('NVIDIA L4', 121e12, 24 * _GIB, 0.3e12, False),
}
NAMES = (*_DATASHEETS, 'cpu')


def accelerator(name: str, shares: int = 1) -> Accelerator:
  """The named accelerator: a datasheet, or this host's CPU measured now ('cpu'), split into
  `shares` devices (the fake devices of --xla_force_host_platform_device_count share it; a GPU is
  its own device whatever `shares` says)."""
  if name == 'cpu':
    return measure_cpu(shares)
  if name not in _DATASHEETS:
    raise ValueError(f'--gpu must be one of {", ".join(NAMES)}, got {name!r}')
  return _DATASHEETS[name]


def measure_cpu(shares: int = 1, size: int = 2048, repeats: int = 5) -> Accelerator:
  """1/`shares` of this host's CPU: the best of `repeats` timed size^3 float32 matmuls (on all
  its cores), and its free memory."""
  cpu = jax.devices('cpu')[0]
  a = jax.device_put(jnp.ones((size, size), jnp.float32), cpu)
  matmul = jax.jit(jnp.matmul)
  matmul(a, a).block_until_ready()  # compile outside the timing
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  have, _ = memory.available_bytes(cpu)
  name = f'this host\'s CPU ({os.cpu_count()} cores)'
  return Accelerator(name if shares == 1 else f'1/{shares} of {name}',
                     2 * size ** 3 / best / shares, have // shares, None, True)
