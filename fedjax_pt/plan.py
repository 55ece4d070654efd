r"""What a config would train, whether it fits, and how long it would take: on paper, in seconds.

  python -m fedjax_pt.plan --config=configs/1p3b.py [--config.KEY=VALUE ...] \
      [--gpu=h100] [--gpus_per_client=8] [--mfu=0.4] [--bandwidth_mbps=1000] [--latency_ms=10]

Nothing is trained or allocated: shapes come from `jax.eval_shape`, and XLA compiles the real local
train step on abstract arrays for its memory analysis, on `--gpus_per_client` CPU devices (the CLI
sets --xla_force_host_platform_device_count before JAX starts). Every printed line says whether
its numbers are computed, measured or assumed. `python -m fedjax_pt.main ... --config.dry_run=True`
prints `describe(config)`, the short part that needs no compilation.
"""

import os
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
  if _COUNT.isdigit() and int(_COUNT) > 0:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={_COUNT}').strip()
  os.environ['JAX_PLATFORMS'] = 'cpu'  # the planner compiles for CPU devices whatever the host has

# pylint: disable=wrong-import-position
import concurrent.futures
import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from fedjax_pt import build
from fedjax_pt import client as client_lib
from fedjax_pt import compression
from fedjax_pt import devices as devices_lib
from fedjax_pt import memory
from fedjax_pt import model as model_lib
from fedjax_pt import sharding
from fedjax_pt import wallclock
from fedjax_pt.run_spec import RunSpec

GIB = memory.GIB
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
  step = client_lib.make_train_step(model_cfg, spec.opt, spec.data.micro_batch_size, layout)
  shapes = model_lib.param_shapes(model_cfg)
  state = jax.eval_shape(lambda p: client_lib.init_local_state(p, spec.opt, 0), shapes)
  batch = jax.ShapeDtypeStruct((spec.data.batch_size, spec.data.seq_len + 1), np.int32)
  return step.lower(state, batch)


def _analysis(lowered) -> np.ndarray:
  a = lowered.compile(_COMPILER_OPTIONS).memory_analysis()
  return np.array([a.argument_size_in_bytes, a.output_size_in_bytes, a.alias_size_in_bytes,
                   a.temp_size_in_bytes], np.int64)


def xla_memory(spec: RunSpec, model_cfg: model_lib.ModelConfig,
               devices: Sequence[jax.Device] | None = None) -> XlaMemory:
  """XLA's compiled memory analysis of the local step on `spec.mesh` over `devices` (default:
  JAX's), lowered on abstract arrays: nothing is allocated.

  A model of more than 2 layers is compiled with 1 and 2 and extrapolated: its blocks are
  identical, so every figure grows by the same amount per block (to the byte for arguments and
  outputs; temporaries matched full compiles of configs/75m.py, 125m.py, 350m.py and 1p3b.py to
  within 0.01%), and compiling 24 unrolled blocks took 30-40 s against 10-15 s for both."""
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


def payload_bytes(model_cfg: model_lib.ModelConfig, codec: str, block_size: int) -> int:
  """Wire size of one message of the whole model under `codec`, from shapes alone."""
  shapes = model_lib.param_shapes(model_cfg)
  encode = functools.partial(compression.encode, codec=codec, block_size=block_size)
  return compression.payload_bytes(jax.eval_shape(encode, shapes))


def workload(spec: RunSpec, model_cfg: model_lib.ModelConfig) -> wallclock.Workload:
  """What a federated run of `spec` computes and sends (float32 gradients for DDP, as the run
  records count them)."""
  c = spec.fl.compression
  return wallclock.Workload(
      tokens_per_step=spec.data.batch_size * spec.data.seq_len,
      flops_per_token=model_lib.flops_per_token(model_cfg, spec.data.seq_len),
      local_steps=spec.fl.local_steps, clients=spec.fl.clients_per_round, rounds=spec.fl.rounds,
      upload_bytes=payload_bytes(model_cfg, c.upload, c.block_size),
      download_bytes=payload_bytes(model_cfg, c.download, c.block_size),
      gradient_bytes=4 * model_lib.param_count(model_cfg))


def one_client_spec(config: ml_collections.ConfigDict) -> tuple[RunSpec, model_lib.ModelConfig]:
  """The typed config of one client's mesh (mesh.clients = 1), with a placeholder for an unset
  data.path: planning reads no data."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.mesh.clients = 1
    if config.data.source != 'builtin' and not config.data.path:
      config.data.path = '<data.path>'
  return RunSpec.from_config(config), build.model_config(config)


def _fits_with(spec: RunSpec, model_cfg: model_lib.ModelConfig, have: int,
               platform: str) -> str:
  """The largest data.micro_batch_size with which the estimate fits `have` bytes, as advice."""
  ways = spec.mesh.data * spec.mesh.fsdp
  for micro in range(spec.data.batch_size - ways, 0, -ways):
    if spec.data.batch_size % micro:
      continue
    smaller = dataclasses.replace(spec, data=dataclasses.replace(spec.data, micro_batch_size=micro))
    if memory.estimate(smaller, model_cfg, platform).local <= have:
      return f'fits with --config.data.micro_batch_size={micro} by the formula'
  return 'no micro-batch size fits by the formula: add devices or set model.remat'


def _gib(n: float) -> str:
  return f'{n / GIB:.2f} GiB'


def _duration(seconds: float) -> str:
  if seconds >= 3600:
    return f'{seconds / 3600:.2f} h'
  return f'{seconds / 60:.1f} min' if seconds >= 60 else f'{seconds:.3g} s'


def _bytes(n: float) -> str:
  for unit, size in (('TB', 1e12), ('GB', 1e9), ('MB', 1e6)):
    if n >= size:
      return f'{n / size:.3g} {unit}'
  return f'{n:.0f} B'


def full_plan(config: ml_collections.ConfigDict, accelerator: devices_lib.Accelerator,
              hardware: wallclock.Hardware,
              devices: Sequence[jax.Device] | None = None) -> str:
  """The planner's report for one client of `hardware.devices_per_client` accelerators, with
  the XLA analysis on `devices` (default: JAX's; the mesh must find its devices there)."""
  spec, model_cfg = one_client_spec(config)
  if spec.mesh.num_devices != hardware.devices_per_client:
    raise ValueError(f'mesh.data x mesh.fsdp = {spec.mesh.data} x {spec.mesh.fsdp} devices per '
                     f'client, but --gpus_per_client={hardware.devices_per_client}')
  platform = 'cpu' if accelerator.measured else 'gpu'
  est = memory.estimate(spec, model_cfg, platform)
  xla = xla_memory(spec, model_cfg, devices)
  w = workload(spec, model_cfg)
  p = wallclock.predict(w, hardware)
  fl, mesh = spec.fl, spec.mesh
  lines = [
      f'model: {model_lib.param_count(model_cfg):,} parameters, d_model {model_cfg.d_model}, '
      f'{model_cfg.num_layers} layers, {model_cfg.num_heads} heads, vocab {model_cfg.vocab_size}, '
      f'seq {spec.data.seq_len}, {model_cfg.dtype}, remat {model_cfg.remat}, attention '
      f'{model_cfg.attention} [computed from the config, jax.eval_shape]',
      f'training FLOPs per token: {w.flops_per_token:.3g} (model.flops_per_token: 6 N + '
      f'attention, no remat recompute) [computed]',
      f'one client: {hardware.devices_per_client} x {accelerator.describe()}',
      f'mesh per client: data {mesh.data} x fsdp {mesh.fsdp}; batch {spec.data.batch_size} x '
      f'{spec.data.seq_len} tokens a step, micro-batch '
      f'{spec.data.micro_batch_size or spec.data.batch_size} [config]',
      f'memory per device, XLA: {_gib(xla.total)} = arguments {_gib(xla.argument)} + outputs '
      f'{_gib(xla.output)} + temporaries {_gib(xla.temp)} - outputs aliased to donated '
      f'arguments {_gib(xla.alias)} [measured: the local train step compiled for '
      f'{mesh.num_devices} CPU device(s) in {xla.compile_s:.1f} s' +
      (f', at 1 and 2 layers, extrapolated per layer to {model_cfg.num_layers} (identical '
       'blocks)]' if xla.compiled_layers == (1, 2) else ']'),
      '  note: XLA:CPU is not a GPU: it keeps bfloat16 activations in float32, runs the CPU\'s '
      'blocked attention, fuses differently and does not honour model.remat, so its figure is '
      'the CPU\'s',
      f'memory per device, formula ({platform} attention path): {_gib(est.local)} = '
      f'{est.breakdown(server=False)} [computed: memory.estimate]; the server\'s arrays add '
      f'{_gib(est.server)} where the server runs',
  ]
  have = accelerator.memory_bytes
  if est.local * (1 - memory.FIT_TOLERANCE) > have:
    fits = f'no, even at 80% of the formula; {_fits_with(spec, model_cfg, have, platform)}'
  elif est.local > have:
    fits = 'not by the formula, though within its 20% error band'
  else:
    fits = 'yes, by the formula'
  lines.append(f'fits {accelerator.name} ({_gib(accelerator.memory_bytes)}): {fits}')
  c = fl.compression
  lines += [
      f'compute: {w.tokens_per_step:,} tokens x {w.flops_per_token:.3g} FLOPs / '
      f'({hardware.devices_per_client} x {accelerator.peak_flops / 1e12:.3g} TFLOP/s x MFU '
      f'{hardware.mfu:g}) = {p.step_compute_s:.3g} s per local step [computed; MFU assumed]',
      f'links: {hardware.bandwidth_bps / 1e6:g} Mbit/s each way per client, '
      f'{hardware.latency_s * 1e3:g} ms per message; the server\'s link carries all K clients '
      'at once; no overlap of compute and communication, except DDP\'s all-reduce during the '
      'backward pass [assumed]',
      f'federated, K = {fl.clients_per_round} clients, tau = {fl.local_steps}, '
      f'{fl.rounds} rounds: down {_bytes(w.download_bytes)} ({c.download}) + up '
      f'{_bytes(w.upload_bytes)} ({c.upload}) per client per round '
      f'[computed: compression.payload_bytes on abstract shapes]',
      f'  round {_duration(p.federated_round_s)} (communication '
      f'{_duration(p.federated_comm_s)}), run {_duration(p.federated_run_s)}, '
      f'{_bytes(p.federated_bytes)} sent in all [computed]',
      f'DDP, K = {fl.clients_per_round} workers of {hardware.devices_per_client} devices, the '
      f'same tokens: ring all-reduce of the float32 gradient, 2(K-1)/K x '
      f'{_bytes(w.gradient_bytes)} = {_bytes(2 * (w.clients - 1) / w.clients * w.gradient_bytes)} '
      f'per worker per step, {_duration(p.ddp_comm_s)} [computed]',
      f'  step {_duration(p.ddp_step_s)}, {fl.local_steps} steps (a round\'s tokens) '
      f'{_duration(p.ddp_round_s)}, run {_duration(p.ddp_run_s)}, {_bytes(p.ddp_bytes)} sent in '
      'all [computed]',
  ]
  ratio = p.communication_ratio
  lines.append(
      f'federated vs DDP: {ratio:.0f}x less communication, ' if ratio else 'federated vs DDP: ')
  lines[-1] += (f'{p.ddp_run_s / p.federated_run_s:.2f}x the speed (DDP time / federated time) '
                '[computed]')
  if p.break_even_bps is None:
    lines.append('break-even bandwidth: none (one of the two is faster at every link speed) '
                 '[computed]')
  else:
    lines.append(f'break-even bandwidth: {p.break_even_bps / 1e6:,.0f} Mbit/s: below it '
                 'federated training is faster per token, above it DDP [computed]')
  return '\n'.join(lines)


def describe(config: ml_collections.ConfigDict) -> str:
  """What `config` would train, and whether it fits this host's devices, without compiling:
  `--config.dry_run=True`. (`python -m fedjax_pt.plan` adds XLA's figure and the wall time.)"""
  unset_path = config.data.source != 'builtin' and not config.data.path
  if unset_path:  # the plan reads no data: describe the paper configs before the data exists
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.data.path = '<data.path>'
  spec = RunSpec.from_config(config)
  model_cfg = build.model_config(config)
  est = memory.estimate(spec, model_cfg)
  have, source = memory.available_bytes(jax.devices()[0])
  lines = [f'model: {model_lib.param_count(model_cfg):,} parameters, d_model {model_cfg.d_model}, '
           f'{model_cfg.num_layers} layers, {model_cfg.num_heads} heads, vocab '
           f'{model_cfg.vocab_size}, seq {spec.data.seq_len}, {model_cfg.dtype}',
           f'training FLOPs per token: {model_lib.flops_per_token(model_cfg, spec.data.seq_len):.3g}',
           f'mesh: clients {spec.mesh.clients} x data {spec.mesh.data} x fsdp {spec.mesh.fsdp} of '
           f'{jax.device_count()} {jax.devices()[0].platform} device(s)',
           f'memory per device, estimate: {est.total / GIB:.2f} GiB ({est.breakdown()}), at '
           f'least {memory.lower_bound(est) / GIB:.2f} GiB',
           'device memory: ' + (f'{have / GIB:.1f} GiB ({source})' if have else source)]
  if unset_path:
    lines.append(f'data: {config.data.source}, data.path is not set (training needs it)')
  try:
    memory.check_fits(est)
    lines.append('fits: yes, by this estimate')
  except ValueError as e:
    lines.append('fits: no; ' + str(e).rsplit('; ', 1)[1])
  lines.append('wall time and XLA\'s figure: python -m fedjax_pt.plan --config=...')
  return '\n'.join(lines)


def _main() -> None:
  """The CLI: flags, one-line errors (exit 2), the plan on stdout."""
  from absl import app  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  from fedjax_pt import errors  # pylint: disable=import-outside-toplevel

  def fail(message) -> None:
    print(f'fedjax_pt: error: {" ".join(str(message).split())}', file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_BAD_INPUT)

  try:
    config_flag = config_flags.DEFINE_config_file(
        'config', 'configs/1p3b.py', 'Path to a config file (configs/*.py).', lock_config=True)
  except (AttributeError, KeyError) as e:
    fail(f'unknown config key: {e}')
  gpu = flags.DEFINE_string('gpu', 'h100', f'Accelerator of every client: '
                            f'{", ".join(devices_lib.NAMES)} (cpu: this host, measured).')
  gpus = flags.DEFINE_integer('gpus_per_client', 8, 'Accelerators per client (FSDP over them).')
  mfu = flags.DEFINE_float('mfu', 0.4, 'Model FLOPs utilisation assumed, in (0, 1].')
  bandwidth = flags.DEFINE_float('bandwidth_mbps', 1000.0,
                                 'Link speed of every client, each way, in Mbit/s.')
  latency = flags.DEFINE_float('latency_ms', 10.0, 'Latency of one message, in ms.')

  def parse(argv: list[str]) -> list[str]:
    try:
      rest = flags.FLAGS(argv)
      config_flag.value  # pylint: disable=pointless-statement
    except flags.Error as e:
      fail(str(e).splitlines()[0])
    except (AttributeError, KeyError) as e:
      fail(f'unknown config key: {e}')
    except Exception as e:  # pylint: disable=broad-except
      fail(f'--config does not load: {e}')
    if len(rest) > 1:
      fail(f'unexpected arguments: {" ".join(rest[1:])}')
    if gpus.value <= 0:
      fail(f'--gpus_per_client must be positive, got {gpus.value}')
    if not 0 < mfu.value <= 1:
      fail(f'--mfu must be in (0, 1], got {mfu.value:g}')
    if not bandwidth.value > 0:
      fail(f'--bandwidth_mbps must be positive, got {bandwidth.value:g}')
    if not latency.value >= 0:
      fail(f'--latency_ms must be >= 0, got {latency.value:g}')
    return rest

  def main(argv):
    del argv
    try:
      accelerator = devices_lib.accelerator(gpu.value)
      hardware = wallclock.Hardware(
          peak_flops=accelerator.peak_flops, devices_per_client=gpus.value, mfu=mfu.value,
          bandwidth_bps=bandwidth.value * 1e6, latency_s=latency.value / 1e3)
      print(full_plan(config_flag.value, accelerator, hardware))
    except (ValueError, OSError, ImportError) as e:
      fail(e)

  app.run(main, flags_parser=parse)


if __name__ == '__main__':
  _main()
