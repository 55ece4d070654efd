"""How much memory a run needs per device, at least, estimated in a second before anything is
allocated.

Exact parts: float32 master parameters, their gradients and Adam's two moments (sharded as the
`mesh.rules` say), and the server's arrays (global model, outer optimizer state, the running sum of
client models, kept client Adam states). Counted part: activations kept for the backward pass, per
token and layer for this decoder (pre-LN block without biases, GELU MLP, the attention
probabilities of the XLA implementation), plus the logits; `model.remat` keeps fewer of them.
XLA's temporaries come on top: it is a lower bound. On the CPU, XLA's compiled peak of the local
step measured 1.9-3x the count (tests/memory_test.py keeps it within 1-4x), so a run refused here
could never have fitted, and one that passes may still need up to a few times more.
"""

import dataclasses
import math
import os

import flax.linen as nn
import jax
import numpy as np

from fedjax_pt import model as model_lib
from fedjax_pt.run_spec import RunSpec

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Bytes per device."""
  params: int
  gradients: int
  optimizer: int
  activations: int
  server: int
  devices: int  # devices the run uses (a CPU's fake devices share one host's memory)

  @property
  def total(self) -> int:
    return self.params + self.gradients + self.optimizer + self.activations + self.server

  def breakdown(self) -> str:
    gib = lambda n: f'{n / GIB:.2f} GiB'
    return (f'parameters {gib(self.params)} + gradients {gib(self.gradients)} + Adam '
            f'{gib(self.optimizer)} + activations {gib(self.activations)} + server '
            f'{gib(self.server)}')


def _ways(axes, rules, mesh_sizes: dict[str, int]) -> int:
  names = nn.logical_to_mesh_axes(tuple(axes), rules)
  ways = 1
  for entry in names:
    for axis in (entry if isinstance(entry, tuple) else (entry,) if entry else ()):
      ways *= mesh_sizes[axis]
  return ways


def _activation_elements_per_token(cfg: model_lib.ModelConfig, seq_len: int) -> float:
  """Elements saved for the backward pass, per token, for the whole model."""
  d, f = cfg.d_model, cfg.mlp_ratio * cfg.d_model
  # Per block: both LayerNorms' inputs and outputs (4D), q, k, v (3D), the attention output (D),
  # the MLP's up projection and GELU output (2F), and the attention probabilities (N x L).
  full_block = 8 * d + 2 * f + cfg.num_heads * seq_len
  if cfg.remat == 'full':
    per_block = d  # only each block's input; one block is recomputed at a time
  elif cfg.remat == 'dots':
    per_block = 5 * d + f  # the matmul outputs (qkv, attention output, up projection)
  else:
    per_block = full_block
  recompute = full_block if cfg.remat != 'none' else 0
  return cfg.num_layers * per_block + recompute


def estimate(spec: RunSpec, cfg: model_lib.ModelConfig) -> Estimate:
  """Bytes per device of a run of `spec` with model `cfg` (no array is allocated)."""
  mesh = spec.mesh
  sizes = {'clients': mesh.clients, 'data': mesh.data, 'fsdp': mesh.fsdp}
  shapes = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  axes = model_lib.logical_axes(cfg)
  per_device = jax.tree.map(
      lambda shape, spec_: math.prod(shape.shape) / _ways(spec_, mesh.rules, sizes), shapes, axes,
      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  param_bytes = int(4 * sum(jax.tree.leaves(per_device)))
  compute_bytes = np.dtype(cfg.compute_dtype).itemsize
  batch_per_device = (spec.data.micro_batch_size or spec.data.batch_size) / (mesh.data * mesh.fsdp)
  tokens = batch_per_device * spec.data.seq_len
  activations = tokens * _activation_elements_per_token(cfg, spec.data.seq_len) * compute_bytes
  activations += tokens * cfg.vocab_size * 4 * 2  # float32 logits and their gradient
  server = 0
  if spec.mode == 'federated':
    fl = spec.fl
    outer_moments = {'nesterov': 1, 'sgd': 1, 'adam': 2}[fl.outer_optimizer] if (
        fl.outer_momentum or fl.outer_optimizer == 'adam') else 0
    server = param_bytes * (2 + outer_moments)  # global model, running sum, outer moments
    if not fl.reset_optimizer:
      server += 2 * param_bytes * fl.num_clients  # every client's kept Adam state
  return Estimate(params=param_bytes, gradients=param_bytes, optimizer=2 * param_bytes,
                  activations=int(activations), server=server, devices=mesh.num_devices)


def available_bytes(device: jax.Device) -> tuple[int | None, str]:
  """Memory one device can use, and where that number comes from."""
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit']), f'{device.device_kind} memory limit'
  if device.platform == 'cpu':
    with open('/proc/meminfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024, 'MemAvailable of this host'
    pages = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    return int(pages), 'available physical memory of this host'
  return None, f'{device.platform} reports no memory limit'


def check_fits(est: Estimate, device: jax.Device | None = None) -> None:
  """Raises ValueError, in one line, when the run cannot fit: before data or compilation."""
  device = device or jax.devices()[0]
  have, source = available_bytes(device)
  if have is None:
    return
  # Fake CPU devices (--xla_force_host_platform_device_count) all live in one host's memory.
  need = est.total * (est.devices if device.platform == 'cpu' else 1)
  if need > have:
    where = (f'{est.total / GIB:.1f} GiB on each of {est.devices} devices sharing this host'
             if device.platform == 'cpu' and est.devices > 1 else 'per device')
    raise ValueError(
        f'this run needs at least {need / GIB:.1f} GiB of memory ({where}: {est.breakdown()}) '
        f'but {device.platform} has {have / GIB:.1f} GiB ({source}); lower data.batch_size, set '
        'data.micro_batch_size or model.remat, use more devices, or set mesh.memory_check=False')
