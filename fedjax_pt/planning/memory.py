"""How much memory a run needs per device, estimated in a second before anything is allocated.

Exact parts: float32 master parameters, their gradients and Adam's two moments (Muon's one momentum
for the matrices it orthogonalises), sharded as the `mesh.rules` say, and the server's arrays
(global model, outer optimizer state, the running sum of client models, with a robust
`fl.aggregation` all fl.clients_per_round deltas of a synchronisation, kept client optimizer
states). Counted part: what the backward pass keeps per token, by tensor width, with coefficients
read off XLA's compiled local step (XLA:CPU, float32, d_model 64-256, mlp_ratio 2-8, seq 64-512):
per block 12 residual-width and 4 MLP-width tensors (5 for the Llama family's SwiGLU: 0.96-1.00x
XLA's figure for configs/llama_tiny.py at d_model 128-256, seq 128-512) in the compute dtype and
the attention scores (`attention.scores_per_query` per query and head: on CPU the float32 scores
and their exponentials, elsewhere the softmax's float32 output, counted from
jax.nn.dot_product_attention's code; plus the probabilities when the compute dtype is narrower),
and 2.5 float32 copies of the logits (logits, softmax, gradient, partly overlapped). With FSDP a
device also holds one block's and the embeddings' gathered weights and their whole gradients.

For configs/tiny.py and its variants in float32 (FSDP over 1-8 devices, 4 layers, seq 512,
micro-batches) this is 1.01-1.05x XLA:CPU's compiled figure (tests/memory_test.py,
tests/plan_test.py). XLA:CPU keeps bfloat16 activations in float32 and does not turn
`model.remat` into a saving, so there it holds more than this count (0.74x and 0.56x), which
assumes both; no GPU has checked those two cases.

`xla_analysis` asks XLA instead: the local step compiled on abstract arrays (seconds, not
milliseconds). `check_fits` refuses a run only when even 80% of the estimate exceeds the memory:
the estimate's own error band, so a refused run could not have fitted.
"""

import concurrent.futures
import dataclasses
import math
import os
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np

from fedjax_pt import attention as attention_lib
from fedjax_pt import local_training
from fedjax_pt import model as model_lib
from fedjax_pt import optimizers
from fedjax_pt import sharding
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
  # What to change when it does not fit: the keys that drive its largest term, with their values.
  advice: str = 'lower data.batch_size, or set data.micro_batch_size or model.remat'

  @property
  def total(self) -> int:
    return self.local + self.server

  @property
  def local(self) -> int:
    """What local training holds, without the server's arrays."""
    return self.params + self.gradients + self.optimizer + self.activations

  def breakdown(self, server: bool = True) -> str:
    gib = format_bytes
    return (f'parameters {gib(self.params)} + gradients {gib(self.gradients)} + optimizer '
            f'{gib(self.optimizer)} + activations {gib(self.activations)}' +
            (f' + server {gib(self.server)}' if server else ''))


def format_bytes(n: float) -> str:
  """GiB, or MiB below one GiB."""
  return f'{n / GIB:.2f} GiB' if n >= GIB else f'{n / 2**20:.2f} MiB'


def _ways(axes, rules, mesh_sizes: dict[str, int]) -> int:
  names = nn.logical_to_mesh_axes(tuple(axes), rules)
  ways = 1
  for entry in names:
    for axis in (entry if isinstance(entry, tuple) else (entry,) if entry else ()):
      ways *= mesh_sizes[axis]
  return ways


# Coefficients of the counted part, in tensors per token (see the module docstring).
_RESIDUAL_TENSORS = 12  # per block, d_model wide
_MLP_TENSORS = 4  # per block, mlp_width wide (the MPT block's GELU MLP)
_SWIGLU_TENSORS = 5  # per block, mlp_width wide (the Llama family's gated MLP; measured as above)
_LOGIT_COPIES = 2.5  # float32, vocab wide
# The share of the estimate that is certain enough to refuse a run on: the estimate's error band.
FIT_TOLERANCE = 0.2


def _block_bytes_per_token(cfg: model_lib.ModelConfig, seq_len: int, platform: str) -> float:
  """Bytes one block keeps for its backward pass, per token, with no remat."""
  compute = np.dtype(cfg.compute_dtype).itemsize
  mlp_tensors = _SWIGLU_TENSORS if cfg.family == 'llama' else _MLP_TENSORS
  width = _RESIDUAL_TENSORS * cfg.d_model + mlp_tensors * cfg.mlp_width
  narrower = compute if compute < 4 else 0  # probabilities cast to the compute dtype
  # CPU's blocked attention (measured): the float32 scores and their exponentials. XLA's path
  # elsewhere (counted from jax.nn.dot_product_attention): the softmax's float32 output only.
  per_score = (8 if platform == 'cpu' else 4) + narrower
  scores = cfg.num_heads * attention_lib.scores_per_query(cfg, seq_len, platform) * per_score
  return width * compute + scores


def _activation_bytes_per_token(cfg: model_lib.ModelConfig, seq_len: int, platform: str) -> float:
  """Bytes per token for the whole model's backward pass."""
  full_block = _block_bytes_per_token(cfg, seq_len, platform)
  compute = np.dtype(cfg.compute_dtype).itemsize
  if cfg.remat == 'full':
    kept = cfg.d_model * compute  # only each block's input; one block is recomputed at a time
  elif cfg.remat == 'dots':
    # The matmul outputs without batch dimensions: qkv, attention projection, the MLP's
    # d_model-to-width ones (up, and SwiGLU's gate) and down.
    qkv = cfg.d_model + 2 * cfg.kv_heads * cfg.head_dim
    kept = (qkv + 2 * cfg.d_model + (model_lib.mlp_matrices(cfg) - 1) * cfg.mlp_width) * compute
  else:
    kept = full_block
  recompute = full_block if cfg.remat != 'none' else 0
  return cfg.num_layers * kept + recompute + _LOGIT_COPIES * cfg.vocab_size * 4


def estimate(spec: RunSpec, cfg: model_lib.ModelConfig, platform: str | None = None) -> Estimate:
  """Bytes per device of a run of `spec` with model `cfg` on `platform` (default: JAX's backend;
  it picks the attention path), with no array allocated."""
  platform = platform or jax.default_backend()
  mesh = spec.mesh
  sizes = {'clients': mesh.clients, 'data': mesh.data, 'fsdp': mesh.fsdp}
  shapes = model_lib.param_shapes(cfg)
  axes = model_lib.logical_axes(cfg)
  per_device = jax.tree.map(
      lambda shape, spec_: math.prod(shape.shape) / _ways(spec_, mesh.rules, sizes), shapes, axes,
      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  param_bytes = int(4 * sum(jax.tree.leaves(per_device)))
  # Adam keeps two moments per parameter, Muon one momentum per matrix it orthogonalises.
  opt_bytes = int(4 * sum(jax.tree.leaves(jax.tree.map(
      lambda n, copies: n * copies, per_device, optimizers.state_copies(spec.opt, shapes)))))
  # The largest batch any client trains (fl.profiles may give a client its own).
  batch = max([spec.data.batch_size] + [p.batch_size for p in spec.fl.profiles if p.batch_size])
  batch_per_device = (spec.data.micro_batch_size or batch) / (mesh.data * mesh.fsdp)
  tokens = batch_per_device * spec.data.seq_len
  activations = tokens * _activation_bytes_per_token(cfg, spec.data.seq_len, platform)
  if mesh.fsdp > 1:
    # XLA all-gathers a block's weights (and the embeddings) where they are used, in the compute
    # dtype, and holds their float32 gradients whole until the reduce-scatter.
    block = model_lib.block_matrix_params(cfg)
    embeddings = (cfg.vocab_size * (1 if cfg.tie_embeddings else 2) + cfg.max_seq_len) * cfg.d_model
    activations += (block + embeddings) * (np.dtype(cfg.compute_dtype).itemsize + 4)
  server = 0
  if spec.mode == 'federated':
    fl = spec.fl
    outer_moments = {'nesterov': 1, 'sgd': 1, 'adam': 2}[fl.outer_optimizer] if (
        fl.outer_momentum or fl.outer_optimizer == 'adam') else 0
    server = param_bytes * (2 + outer_moments)  # global model, running sum, outer moments
    if fl.aggregation != 'mean':  # a robust rule keeps every delta of a sync (`robust`)
      server += param_bytes * fl.clients_per_round
    if fl.quorum:  # every sampled update until the close, the late ones until merged (`quorum`)
      server += param_bytes * fl.clients_per_round
    # What the simulated clients keep (`client_round.ClientMemory`), every one of them.
    kept = (2 * fl.keeps_client_models + fl.compression.error_feedback)  # model, anchor; residual
    kept_opt = opt_bytes * (not fl.reset_optimizer)
    server += (kept * param_bytes + kept_opt) * fl.num_clients
  # Micro-batches add each one's gradient to a running sum: two gradients are live.
  gradients = param_bytes * (2 if spec.data.micro_batch_size else 1)
  model_state = param_bytes + gradients + opt_bytes
  logits = tokens * _LOGIT_COPIES * cfg.vocab_size * 4
  if activations >= max(model_state, server) and logits > activations / 2:
    advice = (f'the logits over model.vocab_size={cfg.vocab_size} need it: a smaller vocabulary, '
              f'or fewer tokens a step (data.batch_size={batch}, data.seq_len='
              f'{spec.data.seq_len}, data.micro_batch_size)')
  elif activations >= max(model_state, server):
    advice = (f'lower data.batch_size={batch} or data.seq_len={spec.data.seq_len}, or set '
              'data.micro_batch_size or model.remat')
  elif model_state >= server:
    advice = (f'the model\'s {model_lib.param_count(cfg):,} parameters and their gradients and '
              f'optimizer state need it (model.d_model={cfg.d_model}, model.num_layers='
              f'{cfg.num_layers}, model.vocab_size={cfg.vocab_size}): shard them over more '
              f'devices (mesh.fsdp={mesh.fsdp}) or choose a smaller model')
  else:
    advice = (f'the server and what its fl.num_clients={spec.fl.num_clients} simulated clients '
              'keep between rounds need it: fewer clients, fl.reset_optimizer=True, or '
              'more devices' + (f" (fl.aggregation={spec.fl.aggregation!r} keeps "
                                f"fl.clients_per_round={spec.fl.clients_per_round} deltas; "
                                "'mean' keeps one sum)" if spec.fl.aggregation != 'mean' else ''))
  return Estimate(params=param_bytes, gradients=gradients, optimizer=opt_bytes,
                  activations=int(activations), server=server, devices=mesh.num_devices,
                  advice=advice)


# Only LLVM's optimisation of the generated code: it halves XLA:CPU's compile time and leaves the
# buffer assignment, hence the memory analysis, unchanged (identical figures, measured).
_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


@dataclasses.dataclass(frozen=True)
class XlaMemory:
  """XLA's memory analysis of the compiled local train step, bytes per device."""
  argument: int
  output: int
  alias: int  # outputs written into donated arguments
  temp: int
  compiled_layers: tuple[int, ...]  # (1, 2): compiled at 1 and 2 layers and extrapolated
  compile_s: float

  @property
  def total(self) -> int:
    return self.argument + self.output + self.temp - self.alias


def _lower(spec: RunSpec, model_cfg: model_lib.ModelConfig, layout: sharding.Layout):
  step = local_training.make_train_step(model_cfg, spec.opt, spec.data.micro_batch_size, layout)
  shapes = model_lib.param_shapes(model_cfg)
  state = jax.eval_shape(lambda p: local_training.init_local_state(p, spec.opt, 0), shapes)
  batch = jax.ShapeDtypeStruct((spec.data.batch_size, spec.data.seq_len + 1), np.int32)
  return step.lower(state, batch)


def _analysis(lowered) -> np.ndarray:
  a = lowered.compile(_COMPILER_OPTIONS).memory_analysis()
  return np.array([a.argument_size_in_bytes, a.output_size_in_bytes, a.alias_size_in_bytes,
                   a.temp_size_in_bytes], np.int64)


def xla_analysis(spec: RunSpec, model_cfg: model_lib.ModelConfig,
                 devices: Sequence[jax.Device] | None = None) -> XlaMemory:
  """XLA's compiled memory analysis of the local step on `spec.mesh` over `devices` (default:
  JAX's), lowered on abstract arrays: nothing is allocated.

  A model of more than 2 layers is compiled with 1 and 2 and extrapolated: its blocks are
  identical, so every figure grows by the same amount per block: temporaries matched full
  compiles of configs/75m.py, 125m.py, 350m.py and 1p3b.py within 0.01% (configs/tiny.py at 3
  layers: 0.3%), and compiling 24 unrolled blocks took 30-40 s against 10-15 s for both."""
  layout = sharding.Layout.create(spec.mesh, devices)
  start = time.perf_counter()
  if model_cfg.num_layers <= 2:
    figures, layers = _analysis(_lower(spec, model_cfg, layout)), (model_cfg.num_layers,)
  else:
    lowered = [_lower(spec, dataclasses.replace(model_cfg, num_layers=n), layout) for n in (1, 2)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # XLA compiles without the GIL
      one, two = pool.map(_analysis, lowered)
    figures, layers = one + (model_cfg.num_layers - 1) * (two - one), (1, 2)
  return XlaMemory(*(int(x) for x in figures), compiled_layers=layers,
                   compile_s=time.perf_counter() - start)


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
  """Raises ValueError, in one line, when the run cannot fit: before data or compilation.

  It refuses only when the least the run can need, the estimate less its error band
  (`FIT_TOLERANCE`), exceeds the memory."""
  device = device or jax.local_devices()[0]  # another process's has no stats here
  have, source = available_bytes(device)
  if have is None:
    return
  least = lower_bound(est)
  # Fake CPU devices (--xla_force_host_platform_device_count) all live in one host's memory.
  need = least * (est.devices if device.platform == 'cpu' else 1)
  if need > have:
    where = (f'{least / GIB:.1f} GiB on each of {est.devices} devices sharing this host'
             if device.platform == 'cpu' and est.devices > 1 else 'per device')
    raise ValueError(
        f'this run needs at least {need / GIB:.1f} GiB of memory ({where}; estimate '
        f'{est.total / GIB:.1f} GiB: {est.breakdown()}) but {device.platform} has '
        f'{have / GIB:.1f} GiB ({source}); {est.advice}, or set mesh.memory_check=False')


def lower_bound(est: Estimate) -> int:
  """Bytes per device that the run needs at the least: the estimate less its error band."""
  return int(est.total * (1 - FIT_TOLERANCE))
