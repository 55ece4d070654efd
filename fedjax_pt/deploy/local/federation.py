"""A SuperLink and SuperNodes on 127.0.0.1, started and stopped as one object (`LocalFederation`):
what `python -m fedjax_pt.deploy.local` runs, and what the deployment tests drive. With `links`
(`links.py`) node k runs in network namespace k behind its shaped link instead, and the SuperLink
listens on the links' side of this host.

With `secure` (the default) the SuperLink serves TLS with a throw-away CA and certificate and
accepts only SuperNodes whose public key was registered (`flwr supernode register`, through the
Control API, under the name client-<k>). Every Flower process gets a private FLWR_HOME, one
shared JAX compilation cache (Flower starts a ClientApp process per message), and is stopped by
`stop()` whatever happened (`processes.py`), which then removes the links. Everything lives under
one directory: logs/, certs/, keys/, home/<process>/, run-config.toml.

With `proxy` (and `secure`) the SuperLink listens on 127.0.0.1 only, where the `flwr` CLI reaches
it, and the nodes come in through nginx on the public address, which forwards the Fleet API only
(`proxy.py`): a partner cannot reach the Control API at all.
"""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import threading
import time

from fedjax_pt import distributed
from fedjax_pt.deploy import certs
from fedjax_pt.deploy.local import links as links_lib
from fedjax_pt.deploy.local import processes
from fedjax_pt.deploy.local import proxy as proxy_lib

APP_DIR = pathlib.Path(__file__).resolve().parents[1] / 'app'
CONNECTION = 'fedjax-local'
_BIN = processes.BIN


def _wait_port(host: str, port: int, proc: subprocess.Popen, log: pathlib.Path,
               timeout_s: float, what: str = 'the SuperLink') -> None:
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f'{what} exited with code {proc.returncode}; see {log}')
    with socket.socket() as s:
      if s.connect_ex((host, port)) == 0:
        return
    time.sleep(0.1)
  raise TimeoutError(f'{what} is not listening on {host}:{port} after {timeout_s:g}s')


def toml_value(value) -> str:
  # A JSON string is a TOML basic string; numbers are written the same in both.
  return json.dumps(value)


class LocalFederation:
  """A SuperLink on 127.0.0.1 and the SuperNodes added to it, all stopped by `stop()`; with
  `links` (not started: `start_superlink` makes them), the k-th node added is behind link k.
  With `proxy`, nodes reach it through nginx (the Fleet API only) and the CLI at 127.0.0.1."""

  def __init__(self, directory: pathlib.Path, secure: bool = True,
               links: links_lib.Links | None = None, proxy: bool = False):
    if proxy and not secure:
      raise ValueError('the proxy serves TLS with the SuperLink\'s certificate: it needs secure')
    self.directory = directory.resolve()
    self.secure = secure
    self.proxy = proxy
    self.links = links
    self.links_left: list[str] = []  # what `stop` could not remove
    env = {}
    if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
      # One on-disk compilation cache for the server and every node: a ClientApp process per
      # message would otherwise compile the train step every round.
      env = {'JAX_COMPILATION_CACHE_DIR': str(self.directory / 'jax-cache'),
             'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
             'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '-1'}
    # Several processes may share one accelerator here: none may grab most of its memory.
    env['XLA_PYTHON_CLIENT_PREALLOCATE'] = os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE',
                                                          'false')
    # A SuperExec looks for work every second by default: a second of every round, per node.
    env['FLWR_SUPEREXEC_TASK_POLL_INTERVAL'] = os.environ.get(
        'FLWR_SUPEREXEC_TASK_POLL_INTERVAL', '0.1')
    self.procs = processes.Processes(self.directory / 'logs', env)
    self.tls = None
    self.host = '127.0.0.1'
    self.port = None  # where the nodes connect: the SuperLink's, or the proxy's
    self.control = None  # host:port of the SuperLink, where the CLI connects
    self._node_cmds: dict[str, list[str]] = {}
    self.node_ids: dict[str, int] = {}  # of the registered nodes

  # --- the SuperLink and the CLI -----------------------------------------------------------------

  def start_superlink(self, timeout_s: float = 90) -> None:
    """Makes the links (LinkError if it cannot), the credentials, and starts the SuperLink (and
    the proxy: ProxyError without nginx)."""
    if self.proxy:
      proxy_lib.nginx()  # ProxyError before anything is made
    also = ()
    if self.links is not None:
      self.links.start()
      self.host, also = self.links.server_address, tuple(self.links.host_addresses)
    if self.secure:
      self.tls = certs.make_tls(self.directory / 'certs', also=also)
    self.port = distributed.free_port()
    bind = ('127.0.0.1', distributed.free_port()) if self.proxy else (self.host, self.port)
    self.control = f'{bind[0]}:{bind[1]}'
    cmd = [str(_BIN / 'flower-superlink'), '--host', bind[0], '--port', str(bind[1]),
           # fedjax_pt's own install provides the app's dependencies: nothing is fetched at run
           # time (Flower would otherwise `uv sync` them for every run).
           '--disable-runtime-dependency-installation']
    if self.secure:
      cmd += ['--ssl-ca-certfile', str(self.tls.ca), '--ssl-certfile', str(self.tls.cert),
              '--ssl-keyfile', str(self.tls.key), '--enable-supernode-auth']
    else:
      cmd += ['--insecure']
    proc = self.procs.start('superlink', cmd, self.directory / 'home' / 'superlink')
    _wait_port(*bind, proc, self.procs.logs / 'superlink.log', timeout_s)
    if self.proxy:
      proc = self.procs.start('proxy', proxy_lib.command(
          self.directory / 'proxy', f'{self.host}:{self.port}', self.control, self.tls),
                              self.directory / 'home' / 'proxy')
      _wait_port(self.host, self.port, proc, self.procs.logs / 'proxy.log', timeout_s,
                 what='the proxy (nginx)')
    home = self.directory / 'home' / 'cli'
    home.mkdir(parents=True, exist_ok=True)
    trust = (f'root-certificates = {toml_value(str(self.tls.ca))}' if self.secure else
             'insecure = true')
    (home / 'config.toml').write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{self.control}"\n{trust}\n')
    deadline = time.monotonic() + timeout_s
    while True:  # the port opens before the Control API answers
      try:
        self.cli_json('list')
        return
      except RuntimeError:
        if time.monotonic() > deadline:
          raise
        time.sleep(0.5)

  def cli(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(_BIN / 'flwr'), *args], env=self.procs.env(
        self.directory / 'home' / 'cli'), capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL, check=False)

  def cli_json(self, *args: str) -> dict:
    result = self.cli(*args, '--format', 'json')
    try:
      return json.loads(result.stdout[result.stdout.index('{'):])
    except ValueError:
      raise RuntimeError(f'flwr {" ".join(args)} failed (exit {result.returncode}): '
                         f'{(result.stdout + result.stderr).strip()[-500:]}') from None

  # --- SuperNodes ---------------------------------------------------------------------------------

  def add_node(self, name: str, node_config: str, *, register: bool = True,
               tls: bool | None = None, auth: bool | None = None,
               max_wait_s: float | None = None, register_as: str = '') -> subprocess.Popen:
    """Starts SuperNode `name` with `node_config` (see `node.py`). With node authentication
    (`auth`, default: the SuperLink's) it gets a key pair, whose public key is registered under
    `register_as` or `name` (client-<k> tells the server which client it is) unless `register`
    is False.

    `tls=False`, `auth=False` or `register=False` on a secure SuperLink make a node that the
    SuperLink must refuse; `max_wait_s` bounds its retries (a node retries forever otherwise).
    With links, it runs in the namespace of the link after the last node's."""
    tls = self.secure if tls is None else tls
    auth = self.secure if auth is None else auth
    where = []
    if self.links is not None:
      if len(self._node_cmds) >= len(self.links.links):
        raise RuntimeError(f'{len(self.links.links)} links for {len(self._node_cmds) + 1} nodes')
      # Its own port space: the port of its ClientApps' API is free there.
      where = self.links.exec_prefix(len(self._node_cmds))
    cmd = [*where, str(_BIN / 'flower-supernode'), '--superlink', f'{self.host}:{self.port}',
           '--host', '127.0.0.1', '--port', str(distributed.free_port()),
           '--node-config', node_config]
    cmd += ['--root-certificates', str(self.tls.ca)] if tls else ['--insecure']
    if auth:
      private, public = certs.make_node_key(self.directory / 'keys', name)
      if register:
        answer = self.cli_json('supernode', 'register', str(public), CONNECTION, '--name',
                               register_as or name)
        if not answer.get('success'):
          raise RuntimeError(f'registering {name} failed: {answer}')
        self.node_ids[name] = int(answer['node-id'])
      cmd += ['--auth-supernode-private-key', str(private)]
    if max_wait_s is not None:
      cmd += ['--max-wait-time', str(max_wait_s)]
    self._node_cmds[name] = cmd
    return self.procs.start(name, cmd, self.directory / 'home' / name)

  def restart_node(self, name: str) -> subprocess.Popen:
    """Starts SuperNode `name` again, with its key and node config (after it died)."""
    self.procs.reap()
    if self.procs.procs[name].poll() is None:
      raise RuntimeError(f'{name} is still running')
    return self.procs.start(name, self._node_cmds[name], self.directory / 'home' / name)

  def online_nodes(self) -> list[dict]:
    nodes = self.cli_json('supernode', 'list', CONNECTION).get('nodes', [])
    return [n for n in nodes if n.get('status') == 'online']

  def wait_online(self, count: int, timeout_s: float = 120, at_most: bool = False) -> None:
    """Until `count` SuperNodes (or with `at_most`, no more than `count`) are online."""
    deadline = time.monotonic() + timeout_s
    while (len(self.online_nodes()) > count) if at_most else (len(self.online_nodes()) < count):
      self.procs.reap()
      if time.monotonic() > deadline:
        raise TimeoutError(f'{"more" if at_most else "fewer"} than {count} SuperNodes online '
                           f'after {timeout_s:g}s; see {self.procs.logs}')
      time.sleep(0.5)

  # --- a run -------------------------------------------------------------------------------------

  def run(self, run_config: dict, on_line=None, timeout_s: float = 0) -> tuple[str, str | None]:
    """Submits the app with `run_config`, streams its log to logs/run.log (and `on_line`), and
    returns (Flower's final status, the run's one-line error if it printed one)."""
    path = self.directory / 'run-config.toml'
    path.write_text(''.join(f'{k} = {toml_value(v)}\n' for k, v in run_config.items()))
    runner = self.procs.start(
        'flwr-run', [str(_BIN / 'flwr'), 'run', str(APP_DIR), CONNECTION, '--stream',
                     '--run-config', str(path)],
        self.directory / 'home' / 'cli', stdout=subprocess.PIPE, text=True)
    done = threading.Event()
    started = time.monotonic()

    def watch():
      # A process that died must not linger as a zombie: its children would not notice (see
      # processes.py). And the run has a time limit, if one was given.
      while not done.wait(1.0):
        self.procs.reap()
        if timeout_s and time.monotonic() - started > timeout_s:
          self.procs.kill('flwr-run', signal.SIGTERM)
          return

    threading.Thread(target=watch, daemon=True).start()  # daemon: Ctrl-C must not wait for it
    run_id, error = None, None
    try:
      with open(self.procs.logs / 'run.log', 'a', encoding='utf-8') as log:
        for line in runner.stdout:
          log.write(line)
          log.flush()
          if run_id is None and (found := re.search(r'started run (\d+)', line)):
            run_id = found[1]
          if (found := re.search(r'fedjax_pt: error: (.*)', line)):
            error = found[1].strip()
          if on_line is not None:
            on_line(line)
      runner.wait()
    finally:
      done.set()
    if run_id is None:
      raise RuntimeError('flwr run started no run; see ' + str(self.procs.logs / 'run.log'))
    runs = self.cli_json('list', '--run-id', run_id).get('runs') or [{}]
    status = runs[0].get('status') or ('unknown: the SuperLink did not answer (see '
                                       f'{self.procs.logs / "superlink.log"})')
    if timeout_s and time.monotonic() - started > timeout_s:
      status = f'stopped after the {timeout_s:g}s time limit ({status})'
    return status, error

  def stop(self) -> list[int]:
    """Stops every process (returns the PIDs that needed SIGKILL), then removes the links
    (`links_left` says what could not be)."""
    stragglers = self.procs.stop_all()
    if self.links is not None:
      self.links_left = self.links.stop()
    return stragglers
