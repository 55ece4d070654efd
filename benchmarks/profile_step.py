r"""Where a local step's time goes: a jax.profiler trace of the train step, op by op.

  python -m benchmarks.profile_step [--config=configs/tiny.py] [--config.KEY=VALUE ...] \
      [--steps=5] [--top=25] [--trace_dir=DIR]

Traces `--steps` steps of the compiled train step, matches every traced op with its instruction in
the optimized HLO, and prints the time per step by part of the model (from the op's JAX name:
forward or backward, attention, MLP, LayerNorm, loss, optimizer, ...) and by kind of op (matmul,
elementwise loop fusion, copy/transpose, library reduction), then the top ops with their shapes.
On CPU the op times are those of the thread that ran each op; XLA:CPU runs Eigen matmuls (the
`dot.N` ops) asynchronously, so their trace events cover the launch only and the sum of op times
can fall short of the step. With PyTorch installed (never required), the same step in eager
PyTorch is profiled too (`--notorch` skips it): its top ops by self CPU time.
"""

import collections
import glob
import importlib.util
import re
import tempfile
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from benchmarks import harness

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Config file.',
                                          lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 5, 'Local steps traced.')
_TOP = flags.DEFINE_integer('top', 25, 'Ops listed one by one.')
_TRACE_DIR = flags.DEFINE_string('trace_dir', '', 'Where to keep the trace (TensorBoard / '
                                 'Perfetto); default: a temporary directory.')
_TORCH = flags.DEFINE_bool('torch', True, 'Also profile the step in PyTorch when installed.')

# (part of the model, pattern of the op's JAX name); the first match wins.
_PARTS = (
    ('attention projections', r'attn/(wqkv|out_proj)/'),
    ('attention (scores, softmax, values)', r'attn/'),
    ('MLP matmuls', r'mlp/(up_proj|down_proj)/'),
    ('GELU', r'mlp/'),
    ('LayerNorm', r'norm'),
    ('tied output projection', r'attend'),
    ('embeddings', r'wte|wpe|_take'),
    ('residual adds', r'Decoder\)?/(block_\d+/)?add'),
    ('loss', r'jvp\(|transpose\('),
)


def _instructions(hlo_text: str) -> dict[str, tuple[str, str, str]]:
  """Entry-computation instruction name -> (shape, opcode, JAX op name)."""
  entry = hlo_text[hlo_text.index('\nENTRY'):]
  found = {}
  for line in entry.splitlines():
    match = re.match(r'\s*(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\(', line)
    if match:
      op_name = re.search(r'op_name="([^"]*)"', line)
      found[match.group(1)] = (match.group(2), match.group(3), op_name.group(1) if op_name else '')
  return found


def _part(op_name: str) -> str:
  if 'jvp(' not in op_name and 'transpose(' not in op_name:
    return 'optimizer (clipping, AdamW, norms)'
  direction = 'backward' if 'transpose(' in op_name else 'forward'
  for part, pattern in _PARTS:
    if re.search(pattern, op_name):
      return f'{direction} {part}'
  return f'{direction} other'


def _kind(name: str, opcode: str, hlo_text: str) -> str:
  if opcode == 'dot' or (opcode == 'fusion' and _fusion_has_dot(name, hlo_text)):
    return 'matmul'
  if 'copy' in name or 'transpose' in name:
    return 'copy / transpose'
  if 'ynn_fusion' in name:
    return 'library (YNNPACK) reduction'
  return 'elementwise / reduction (XLA loop fusion)' if opcode == 'fusion' else opcode


def _fusion_has_dot(name: str, hlo_text: str) -> bool:
  call = re.search(r'\n\s*(?:ROOT )?%' + re.escape(name) + r' = [^\n]*calls=%([\w.]+)', hlo_text)
  if not call:
    return False
  body = re.search(r'\n%' + re.escape(call.group(1)) + r' [^\n]*\{\n(.*?)\n\}', hlo_text, re.S)
  return bool(body and re.search(r' dot\(', body.group(1)))


def _op_times(trace_dir: str, names) -> collections.Counter:
  """Total traced milliseconds of each HLO instruction in `names`."""
  path = glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True)[0]
  totals = collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in names:
          totals[event.name] += event.duration_ns / 1e6
  return totals


def _print_table(title: str, totals: collections.Counter, step_ms: float):
  print(title)
  for key, ms in totals.most_common():
    print(f'  {ms:9.2f} ms  {100 * ms / step_ms:5.1f}%  {key}')


def main(argv):
  del argv
  setup = harness.build(_CONFIG.value)
  window, compiled = harness.step_window(setup, _STEPS.value)
  step_ms = min(window() for _ in range(3)) * 1e3
  hlo_text = compiled.as_text()
  instructions = _instructions(hlo_text)
  trace_dir = _TRACE_DIR.value or tempfile.mkdtemp(prefix='fedjax_pt_trace_')
  with jax.profiler.trace(trace_dir):
    window()
  totals = _op_times(trace_dir, instructions)
  per_step = collections.Counter({k: v / _STEPS.value for k, v in totals.items()})

  print(f'device: {harness.device_line()}')
  print(f'local step: {step_ms:.2f} ms (best of 3 windows of {_STEPS.value}); traced ops sum to '
        f'{sum(per_step.values()):.2f} ms per step; trace in {trace_dir}')
  by_part, by_kind = collections.Counter(), collections.Counter()
  for name, ms in per_step.items():
    _, opcode, op_name = instructions[name]
    by_part[_part(op_name)] += ms
    by_kind[_kind(name, opcode, hlo_text)] += ms
  _print_table('by part of the model (ms per step, % of the step):', by_part, step_ms)
  _print_table('by kind of op:', by_kind, step_ms)
  print(f'top {_TOP.value} ops:')
  for name, ms in per_step.most_common(_TOP.value):
    shape, _, op_name = instructions[name]
    op_name = re.sub(r'^jit\([^)]*\)/', '', op_name)
    print(f'  {ms:8.2f} ms  {name:28s} {shape:30s} {op_name}')

  if _TORCH.value and importlib.util.find_spec('torch') is not None:
    _profile_torch(setup)


def _profile_torch(setup: harness.Setup):
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  why_not = torch_reference.unsupported(setup.model_cfg)
  if why_not:
    print(f'PyTorch: skipped, {why_not}')
    return
  step = torch_reference.make_step(setup.model_cfg, setup.opt_cfg, harness.synthetic_batch(setup))
  window = torch_reference.step_window(step, _STEPS.value)
  step_ms = min(window() for _ in range(3)) * 1e3
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
    start = time.perf_counter()
    window()
  traced_ms = (time.perf_counter() - start) * 1e3 / _STEPS.value
  print(f'PyTorch ({torch_reference.version_line()}): local step {step_ms:.2f} ms '
        f'({traced_ms:.2f} ms while profiled); top {_TOP.value} ops by self CPU time per step:')
  events = sorted(profile.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
  for event in events[:_TOP.value]:
    print(f'  {event.self_cpu_time_total / 1e3 / _STEPS.value:8.2f} ms  {event.key} '
          f'(x{event.count // _STEPS.value})')


if __name__ == '__main__':
  app.run(main)
