r"""N processes of one run on this machine, joined by jax.distributed: for tests and laptops.

  python -m fedjax_pt.launch_local --processes=2 --devices_per_process=4 -- \
      --config=configs/tiny.py --workdir=runs/tiny-2x4 [--config.* ...]

starts `python -m fedjax_pt.main <args>` N times with mesh.num_processes=N, mesh.process_id=i and
a coordinator on a free port of 127.0.0.1; on CPU, `--devices_per_process` fake devices each
(`--xla_force_host_platform_device_count`), or on a multi-GPU machine `--gpus_per_process` GPUs
each. Process 0 prints to this terminal; process i > 0 logs
to <workdir>/logs/process_<i>.log and its other output goes to <workdir>/logs/process_<i>.out. When
one process fails or dies the others are stopped, and the launcher exits with its code. On
several hosts, run `python -m fedjax_pt.main` on each yourself (docs/scaling.md): this
launcher is the same command, N times, on one host.
"""

import os
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags

from fedjax_pt import cli
from fedjax_pt import errors
from fedjax_pt.distributed import free_port

_PROCESSES = flags.DEFINE_integer('processes', 2, 'Number of processes.', lower_bound=1)
_DEVICES = flags.DEFINE_integer(
    'devices_per_process', 0, 'CPU devices per process (--xla_force_host_platform_device_count); '
    '0 leaves XLA_FLAGS as it is.', lower_bound=0)
_GPUS = flags.DEFINE_integer(
    'gpus_per_process', 0, 'GPUs per process on a multi-GPU machine: process i sees GPUs '
    'i*k .. i*k+k-1 (CUDA_VISIBLE_DEVICES); 0 leaves it as it is.', lower_bound=0)
_GRACE_S = flags.DEFINE_float('grace_s', 15.0, 'Seconds the other processes get to stop cleanly '
                              'after one fails, before they are killed.')

_POLL_S = 0.2


def _workdir(args: list[str]) -> tuple[str, list[str]]:
  """The run's workdir (main's default when none is given: the same one for every process)."""
  for arg in args:
    if arg.startswith('--workdir='):
      return arg.split('=', 1)[1], args
  config = next((a.split('=', 1)[1] for a in args if a.startswith('--config=')), 'tiny.py')
  workdir = cli.default_workdir(config)
  return workdir, [*args, f'--workdir={workdir}']


def _die_with_parent() -> None:
  """In each child, before it starts: SIGTERM (a clean stop) when the launcher dies, even by
  SIGKILL, so no process of the run is left behind."""
  if sys.platform.startswith('linux'):
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def process_env(i: int, devices_per_process: int = 0, gpus_per_process: int = 0,
                base: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of process i: its CPU device count, or its own GPUs."""
  env = dict(os.environ if base is None else base, PYTHONUNBUFFERED='1')
  if devices_per_process:
    kept = [f for f in env.get('XLA_FLAGS', '').split()
            if not f.startswith('--xla_force_host_platform_device_count')]
    env['XLA_FLAGS'] = ' '.join(
        [*kept, f'--xla_force_host_platform_device_count={devices_per_process}'])
  if gpus_per_process:
    env['CUDA_VISIBLE_DEVICES'] = ','.join(
        str(g) for g in range(i * gpus_per_process, (i + 1) * gpus_per_process))
  return env


def start(args: list[str], processes: int, devices_per_process: int = 0,
          primary_output: str | None = None, gpus_per_process: int = 0
          ) -> tuple[list[subprocess.Popen], str]:
  """Starts the processes; returns them and the workdir. Process 0 prints to this terminal, or
  to the file `primary_output`."""
  workdir, args = _workdir(args)
  logs = os.path.join(workdir, 'logs')
  os.makedirs(logs, exist_ok=True)
  coordinator = f'127.0.0.1:{free_port()}'
  procs = []
  for i in range(processes):
    env = process_env(i, devices_per_process, gpus_per_process)
    cmd = [sys.executable, '-m', 'fedjax_pt.main', *args,
           f'--config.mesh.num_processes={processes}', f'--config.mesh.process_id={i}',
           f'--config.mesh.coordinator={coordinator}']
    path = os.path.join(logs, f'process_{i}.out') if i else primary_output
    output = open(path, 'ab') if path else None  # pylint: disable=consider-using-with
    procs.append(subprocess.Popen(cmd, env=env, stdout=output, stderr=output,
                                  preexec_fn=_die_with_parent))
    if output is not None:
      output.close()
  return procs, workdir


def _describe(i: int, proc: subprocess.Popen) -> str:
  code = proc.returncode
  how = (f'was killed by {signal.Signals(-code).name}' if code < 0 else f'exited with code {code}')
  return f'process {i} (pid {proc.pid}) {how}'


def stop(procs: list[subprocess.Popen], grace_s: float, sig: int | None = signal.SIGTERM) -> None:
  """Signals every running process (unless `sig` is None: they have been), then kills those still
  running after `grace_s`."""
  for proc in procs:
    if sig is not None and proc.poll() is None:
      proc.send_signal(sig)
  deadline = time.monotonic() + grace_s
  for proc in procs:
    try:
      proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def supervise(procs: list[subprocess.Popen], workdir: str, grace_s: float) -> int:
  """Waits for the processes; when one fails, stops the others. Returns the run's exit code."""
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i = failed[0]
        running = [p for p in procs if p.poll() is None]
        if running:
          print(f'fedjax_pt.launch_local: {_describe(i, procs[i])}; stopping the other '
                f'{len(running)} (logs: {workdir}/logs)', file=sys.stderr, flush=True)
          stop(procs, grace_s)
        code = procs[i].returncode
        return code if code > 0 else 128 - code
      if all(c == 0 for c in codes):
        return 0
      time.sleep(_POLL_S)
  except KeyboardInterrupt:  # Ctrl-C reached every process of the terminal's group too
    stop(procs, grace_s, sig=None)
    return errors.EXIT_INTERRUPTED


_STARTED: list[subprocess.Popen] = []


def _terminate(signum, frame):
  """SIGTERM to the launcher (a scheduler, a sweep) stops the run as Ctrl-C does."""
  del frame
  for proc in _STARTED:
    if proc.poll() is None:
      proc.send_signal(signum)
  raise KeyboardInterrupt


def main(argv: list[str]) -> None:
  args = argv[1:]
  if args and args[0] == '--':
    args = args[1:]
  if any(a.startswith('--config.mesh.num_processes') or a.startswith('--config.mesh.process_id')
         or a.startswith('--config.mesh.coordinator') for a in args):
    cli.fail('it sets mesh.num_processes, mesh.process_id and mesh.coordinator itself; remove '
             'them from the arguments', program='fedjax_pt.launch_local')
  signal.signal(signal.SIGTERM, _terminate)
  try:
    procs, workdir = start(args, _PROCESSES.value, _DEVICES.value, gpus_per_process=_GPUS.value)
    _STARTED.extend(procs)
  except OSError as e:  # the workdir's logs/ cannot be made: under a file, not writable
    cli.fail(f'{e.filename}: {e.strerror}', program='fedjax_pt.launch_local')
  sys.exit(supervise(procs, workdir, _GRACE_S.value))


if __name__ == '__main__':
  app.run(main)
