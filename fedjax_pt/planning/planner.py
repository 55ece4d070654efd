"""What a config would train, whether it fits, and how long it would take: on paper, in seconds.

Nothing is trained or allocated: shapes come from `jax.eval_shape`, and XLA compiles the real local
train step on abstract arrays for its memory analysis (`memory.xla_analysis`). Every line of
`full_plan` says whether its numbers are computed, measured or assumed. `describe` is the short
part that needs no compilation (`python -m fedjax_pt.main ... --config.dry_run=True`); the
command is `python -m fedjax_pt.plan`.
"""

from collections.abc import Sequence
import dataclasses
import functools
import math

import jax
import ml_collections

from fedjax_pt import build
from fedjax_pt import model as model_lib
from fedjax_pt.federated import compression
from fedjax_pt.federated import topk as topk_lib
from fedjax_pt.planning import devices as devices_lib
from fedjax_pt.planning import memory
from fedjax_pt.planning import wallclock
from fedjax_pt.run_spec import RunSpec

GIB = memory.GIB
MAX_DEVICES = 1024  # per client: XLA:CPU makes this many devices for the analysis


def payload_bytes(model_cfg: model_lib.ModelConfig, codec: str, block_size: int,
                  topk: topk_lib.TopK = topk_lib.TopK()) -> int:
  """Wire size of one message of the whole model under `codec`, from shapes alone."""
  shapes = model_lib.param_shapes(model_cfg)
  encode = functools.partial(compression.encode, codec=codec, block_size=block_size, topk=topk)
  return compression.payload_bytes(jax.eval_shape(encode, shapes))


def workload(spec: RunSpec, model_cfg: model_lib.ModelConfig) -> wallclock.Workload:
  """What a federated run of `spec` computes and sends (float32 gradients for DDP, as the run
  records count them)."""
  c = spec.fl.compression
  return wallclock.Workload(
      tokens_per_step=spec.data.batch_size * spec.data.seq_len,
      flops_per_token=model_lib.flops_per_token(model_cfg, spec.data.seq_len),
      local_steps=spec.fl.local_steps, clients=spec.fl.clients_per_round, rounds=spec.fl.rounds,
      upload_bytes=payload_bytes(model_cfg, c.upload, c.block_size, c.topk),
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


_gib = memory.format_bytes


def _duration(seconds: float) -> str:
  if seconds >= 3600:
    return f'{seconds / 3600:.2f} h'
  return f'{seconds / 60:.1f} min' if seconds >= 60 else f'{seconds:.3g} s'


def _bytes(n: float) -> str:
  for unit, size in (('PB', 1e15), ('TB', 1e12), ('GB', 1e9), ('MB', 1e6)):
    if n >= size:
      return f'{n / size:.3g} {unit}'
  return f'{n:.0f} B'


def full_plan(config: ml_collections.ConfigDict, accelerator: devices_lib.Accelerator,
              hardware: wallclock.Hardware,
              devices: Sequence[jax.Device] | None = None) -> str:
  """The planner's report for one client of `hardware.devices_per_client` accelerators, XLA's
  analysis compiled over `devices` (default: JAX's, which must hold the client's mesh)."""
  spec, model_cfg = one_client_spec(config)
  if spec.mesh.num_devices != hardware.devices_per_client:
    raise ValueError(f'mesh.data x mesh.fsdp = {spec.mesh.data} x {spec.mesh.fsdp} devices per '
                     f'client, but --gpus_per_client={hardware.devices_per_client}')
  platform = 'cpu' if accelerator.measured else 'gpu'
  est = memory.estimate(spec, model_cfg, platform)
  # cuDNN's attention compiles only for an NVIDIA GPU: XLA:CPU cannot analyse that step.
  xla = (None if model_cfg.attention == 'cudnn' and jax.default_backend() != 'gpu' else
         memory.xla_analysis(spec, model_cfg, devices))
  w = workload(spec, model_cfg)
  hardware = dataclasses.replace(hardware, clock=spec.fl.clock)
  p = wallclock.predict(w, hardware)
  fl, mesh, c = spec.fl, spec.mesh, spec.fl.compression
  k = fl.clients_per_round
  extrapolated = (f', at 1 and 2 layers and extrapolated per layer to {model_cfg.num_layers} '
                  '(the blocks are identical)' if xla and xla.compiled_layers == (1, 2) else '')
  lines = [
      f'model: {model_lib.param_count(model_cfg):,} parameters, d_model {model_cfg.d_model}, '
      f'{model_cfg.num_layers} layers, {model_cfg.num_heads} heads, vocab {model_cfg.vocab_size}, '
      f'seq {spec.data.seq_len}, {model_cfg.dtype}, remat {model_cfg.remat}, attention '
      f'{model_cfg.attention} [computed: jax.eval_shape of the config\'s model]',
      f'training FLOPs per token: {w.flops_per_token:.3g} (model.flops_per_token: 6 N + '
      'attention, remat\'s recomputation not counted) [computed]',
      f'client: {hardware.devices_per_client} x {accelerator.describe()}',
      f'client mesh: data {mesh.data} x fsdp {mesh.fsdp}; a step takes {spec.data.batch_size} x '
      f'{spec.data.seq_len} tokens in micro-batches of '
      f'{spec.data.micro_batch_size or spec.data.batch_size} sequences [config]',
      (f'memory per device, XLA: {_gib(xla.total)} = arguments {_gib(xla.argument)} + outputs '
       f'{_gib(xla.output)} + temporaries {_gib(xla.temp)} - outputs aliased to donated '
       f'arguments {_gib(xla.alias)} [measured: memory_analysis() of the local train step '
       f'compiled on abstract arrays for {mesh.num_devices} CPU device(s), in '
       f'{xla.compile_s:.1f} s{extrapolated}]' if xla else
       'memory per device, XLA: not analysed: model.attention=cudnn compiles only for an NVIDIA '
       'GPU (plan with --config.model.attention=xla for XLA:CPU\'s figure of the XLA path)'),
      '  note: XLA:CPU is not a GPU: it keeps bfloat16 activations in float32, runs the CPU\'s '
      'blocked attention, fuses differently and does not turn model.remat into a saving',
      f'memory per device, formula for the {platform.upper()} path: {_gib(est.local)} = '
      f'{est.breakdown(server=False)} [computed: memory.estimate]; the server\'s arrays add '
      f'{_gib(est.server)} where it runs',
  ]
  have = accelerator.memory_bytes
  if est.local * (1 - memory.FIT_TOLERANCE) > have:
    fits = f'no, even at 80% of the formula; {_fits_with(spec, model_cfg, have, platform)}'
  elif est.local > have:
    fits = 'not by the formula, though within its 20% error band'
  else:
    fits = 'yes, by the formula'
  lines += [
      f'fits {accelerator.name} ({_gib(have)}): {fits}',
      _compute_line(w, hardware, accelerator, p),
      f'links: {hardware.bandwidth_bps / 1e6:g} Mbit/s each way for every client, '
      f'{hardware.latency_s * 1e3:g} ms a message, the server\'s link carrying all K at once; '
      'communication does not overlap compute, except DDP\'s all-reduce during the backward '
      'pass (2/3 of a step) [assumed]',
      _transport_line(hardware.clock),
      f'federated, K = {k} clients, tau = {fl.local_steps}, {fl.rounds} rounds: '
      f'{_bytes(w.download_bytes)} down ({c.download}) + {_bytes(w.upload_bytes)} up '
      f'({c.upload}) per client a round [computed: compression.payload_bytes of abstract shapes]',
      f'  round {_duration(p.federated_round_s)} (communication {_duration(p.federated_comm_s)}),'
      f' run {_duration(p.federated_run_s)}, {_bytes(p.federated_bytes)} sent [computed]',
      *([f'  fl.overlap: a round {_duration(p.overlapped_round_s)} in steady state, max(compute, '
         f'(compute + communication) / 2), run {_duration(p.rounds * p.overlapped_round_s)}; '
         'the comparisons below are for synchronous rounds [computed: the simulated clock\'s '
         'pipeline]'] if fl.overlap else []),
      f'DDP, {k} workers like the clients, the same tokens: ring all-reduce of the float32 '
      f'gradient at every step, 2(K-1)/K x {_bytes(w.gradient_bytes)} = '
      f'{_bytes(2 * (k - 1) / k * w.gradient_bytes)} per worker, {_duration(p.ddp_comm_s)} '
      '[computed]',
      f'  step {_duration(p.ddp_step_s)}, {fl.local_steps} steps (a round\'s tokens) '
      f'{_duration(p.ddp_round_s)}, run {_duration(p.ddp_run_s)}, {_bytes(p.ddp_bytes)} sent '
      '[computed]',
  ]
  ratio = p.communication_ratio
  lines.append(f'federated vs DDP: {f"{ratio:.0f}x" if ratio else "no"} less communication, '
               f'DDP takes {p.ddp_run_s / p.federated_run_s:.3g}x the wall time [computed]')
  if p.break_even_bps is None:
    lines.append(f'break-even bandwidth: none, {wallclock.faster_at_every_bandwidth(w, hardware)} '
                 'is faster per token at every link speed [computed]')
  else:
    lines.append(f'break-even bandwidth: {p.break_even_bps / 1e9:.3g} Gbit/s; below it federated '
                 'training takes less time per token, above it DDP [computed]')
  return '\n'.join(lines)


def _compute_line(w: wallclock.Workload, hardware: wallclock.Hardware,
                  accelerator: devices_lib.Accelerator, p: wallclock.Prediction) -> str:
  if hardware.tokens_per_s:
    return (f'compute: {w.tokens_per_step:,} tokens / {hardware.tokens_per_s:,.6g} tokens/s = '
            f'{_duration(p.step_compute_s)} per local step [measured: --tokens_per_s; that is '
            f'MFU {wallclock.implied_mfu(w, hardware):.3g} of {hardware.devices_per_client} x '
            f'{accelerator.peak_flops / 1e12:.3g} TFLOP/s at {w.flops_per_token:.3g} FLOPs a '
            'token]')
  return (f'compute: {w.tokens_per_step:,} tokens x {w.flops_per_token:.3g} FLOPs / '
          f'({hardware.devices_per_client} x {accelerator.peak_flops / 1e12:.3g} TFLOP/s x MFU '
          f'{hardware.mfu:g}) = {_duration(p.step_compute_s)} per local step [computed; MFU '
          f'{hardware.mfu:g} assumed: give a measured --tokens_per_s to replace it]')


def _transport_line(clock) -> str:
  if not (clock.round_trip_s or clock.transport_mbps):
    return ('transport: ideal, nothing beyond the links (fl.clock at 0; a Flower deployment adds '
            'a fixed time a round trip and its own rate: python -m benchmarks.deploy_clock '
            '--calibrate measures them) [assumed]')
  rate = (f'moves the bytes at {clock.transport_mbps:g} Mbit/s besides the link' if
          clock.transport_mbps else 'moves the bytes at no cost of its own')
  return (f'transport: {clock.round_trip_s:g} s a round trip, and {rate}, in every federated '
          'round [config: fl.clock, as measured on some machine]')


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
           'training FLOPs per token: '
           f'{model_lib.flops_per_token(model_cfg, spec.data.seq_len):.3g}',
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


def check_flags(gpu: str, gpus_per_client: int, mfu: float, bandwidth_mbps: float,
                latency_ms: float, tokens_per_s: float = 0.0) -> None:
  """Raises ValueError naming the first flag out of its range."""
  if not (math.isfinite(tokens_per_s) and tokens_per_s >= 0):
    raise ValueError(f'--tokens_per_s must be a finite number >= 0 (0: from --mfu), got '
                     f'{tokens_per_s:g}')
  if gpu not in devices_lib.NAMES:
    raise ValueError(f'--gpu must be one of {", ".join(devices_lib.NAMES)}, got {gpu!r}')
  if not 0 < gpus_per_client <= MAX_DEVICES:
    raise ValueError(f'--gpus_per_client must be in [1, {MAX_DEVICES}] (XLA compiles the step on '
                     f'as many CPU devices), got {gpus_per_client}')
  for name, value in (('mfu', mfu), ('bandwidth_mbps', bandwidth_mbps),
                      ('latency_ms', latency_ms)):
    if not math.isfinite(value):
      raise ValueError(f'--{name} must be a finite number, got {value:g}')
  if not 0 < mfu <= 1:
    raise ValueError(f'--mfu must be in (0, 1], got {mfu:g}')
  if not bandwidth_mbps > 0:
    raise ValueError(f'--bandwidth_mbps must be positive, got {bandwidth_mbps:g}')
  if not latency_ms >= 0:
    raise ValueError(f'--latency_ms must be >= 0, got {latency_ms:g}')
