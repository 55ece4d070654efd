"""Starting Flower's processes and stopping every one of them, whatever happens.

Flower does not clean up after itself: the SuperLink's SuperExec runs in a session of its own,
`flwr stop` leaves ClientApps running, and a child notices a dead parent only by polling
`os.kill(parent, 0)`, which an unreaped zombie parent defeats. So every process started here gets
a session (a process group to signal) and an environment tag that all its descendants inherit;
killing one reaps it at once, and `stop_all` SIGTERMs every group, then SIGKILLs whatever still
carries the tag (found in /proc/*/environ). Only processes started by this object are touched.
"""

import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time
import uuid

TAG_VAR = 'FEDJAX_PT_DEPLOY_TAG'
SUPEREXEC_POLL_VAR, SUPEREXEC_POLL_S = 'FLWR_SUPEREXEC_TASK_POLL_INTERVAL', '0.2'
BIN = pathlib.Path(sys.executable).parent  # flower-superlink, flwr, ... of this environment


def flower_env(home: pathlib.Path, tag: str, extra: dict[str, str] | None = None
               ) -> dict[str, str]:
  """The environment of a Flower process: private FLWR_HOME, no telemetry, this venv first."""
  home.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ)
  env.update({
      TAG_VAR: tag,
      'FLWR_HOME': str(home),  # its own: nodes sharing one would race on installing the app
      'FLWR_TELEMETRY_ENABLED': '0',
      'FLWR_DISABLE_UPDATE_CHECK': '1',
      'PYTHONUNBUFFERED': '1',
      # SuperLink and SuperNode start flower-superexec and flwr-*app by bare name.
      'PATH': f'{BIN}{os.pathsep}{env.get("PATH", "")}',
  })
  # The SuperExec asks its SuperNode for a new task every second by default: up to 1 s of a
  # node's fixed cost per round for one local HTTP request (docs/deployment.md, "A node's fixed
  # cost per round").
  env.setdefault(SUPEREXEC_POLL_VAR, SUPEREXEC_POLL_S)
  env.update(extra or {})
  return env


class Processes:
  """The processes of one federation; their output goes to `logs`/<name>.log."""

  def __init__(self, logs: pathlib.Path, extra_env: dict[str, str] | None = None):
    self.logs = logs
    self.tag = uuid.uuid4().hex
    self.extra_env = dict(extra_env or {})
    self.procs: dict[str, subprocess.Popen] = {}
    logs.mkdir(parents=True, exist_ok=True)

  def env(self, home: pathlib.Path) -> dict[str, str]:
    return flower_env(home, self.tag, self.extra_env)

  def start(self, name: str, cmd: list[str], home: pathlib.Path, **popen) -> subprocess.Popen:
    """Starts `cmd` in a session of its own, its output appended to logs/<name>.log."""
    with open(self.logs / f'{name}.log', 'ab') as log:
      log.write(f'$ {shlex.join(cmd)}\n'.encode())
      log.flush()
      popen.setdefault('stdout', log)
      popen.setdefault('stderr', subprocess.STDOUT)
      proc = subprocess.Popen(cmd, env=self.env(home), stdin=subprocess.DEVNULL,
                              start_new_session=True, **popen)
    self.procs[name] = proc
    return proc

  def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
    """Signals one process and reaps it, so that its children see it gone."""
    proc = self.procs[name]
    try:
      os.kill(proc.pid, sig)
    except ProcessLookupError:
      pass
    try:
      proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
      pass

  def reap(self) -> None:
    """Collects processes that ended on their own (a zombie parent keeps its children alive)."""
    for proc in self.procs.values():
      proc.poll()

  def tagged_pids(self) -> list[int]:
    """Live processes (not zombies) that carry this object's tag."""
    needle = f'{TAG_VAR}={self.tag}'.encode()
    pids = []
    for entry in pathlib.Path('/proc').iterdir():
      if not entry.name.isdigit() or int(entry.name) == os.getpid():
        continue
      try:
        if needle not in (entry / 'environ').read_bytes().split(b'\0'):
          continue
        if (entry / 'stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z':
          pids.append(int(entry.name))
      except OSError:
        pass  # gone meanwhile, or not ours to read
    return pids

  def stop_all(self, grace_s: float = 5.0) -> list[int]:
    """SIGTERM to every group, then SIGKILL to anything tagged; returns the PIDs SIGKILLed."""
    for proc in self.procs.values():
      if proc.poll() is None:
        try:
          os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
          pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and (
        any(p.poll() is None for p in self.procs.values()) or self.tagged_pids()):
      time.sleep(0.1)
    stragglers = self.tagged_pids()
    for pid in stragglers:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    for proc in self.procs.values():
      try:
        proc.wait(timeout=5)
      except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 5
    while self.tagged_pids() and time.monotonic() < deadline:
      time.sleep(0.1)
    return stragglers
