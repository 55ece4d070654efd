"""docs/deployment.md's "Across machines" walkthrough, replayed as written on 127.0.0.1.

The test reads the section's fenced code blocks in order (bash, nginx, toml, bash, ...) and runs
them with `bash -c`, changing only what the tables below name: the host, the ports, the paths of
the credentials, data and tokenizer, and the recipe (the tiny one, two organisations, one round).
So an edit of the walkthrough that breaks it breaks this test. The scaffolding that a real
operator does by hand is the test's own: `flower-superlink`, nginx and `flower-supernode` run in
the background, nginx runs the doc's server block inside a minimal main config (`daemon off;`,
its files in the test's directory), and every Flower process gets its own FLWR_HOME, with
telemetry off. Every process is stopped by PID at the end, whatever happened (`processes.py`).
"""

import gzip
import json
import pathlib
import re
import shlex
import shutil
import socket
import subprocess
import textwrap
import time

import pytest

from fedjax_pt import distributed
from fedjax_pt import records
from fedjax_pt.deploy.local import processes
from fedjax_pt.deploy.local import proxy

REPO = pathlib.Path(__file__).resolve().parents[1]
DOC = REPO / 'docs' / 'deployment.md'
BLOCKS = ['bash', 'nginx', 'toml', 'bash', 'bash', 'bash', 'bash',  # steps 1, 1, 1, 2, 3, 4, 5
          'ini', 'ini']  # Services: the SuperLink's and a SuperNode's systemd units


def _substitutions(tmp: pathlib.Path, fleet: int, link: int) -> dict[str, str]:
  """What differs between the doc's machines and this one (every key must occur in the doc)."""
  return {
      'server.example.org': '127.0.0.1',
      '9092': str(fleet),  # the public port (nginx)
      '9093': str(link),  # the SuperLink's, on 127.0.0.1
      '/absolute/path/to/certs': str(tmp / 'certs'),
      '/abs/certs': str(tmp / 'certs'),
      '/data/server/*.jsonl.gz': str(tmp / 'data' / 'server' / '*.jsonl.gz'),
      '/models/gpt-neox-20b/tokenizer.json': 'bytes',
      'configs/125m.py': 'configs/tiny.py:test',
      '--config.fl.num_clients=3 --config.fl.clients_per_round=3':
          '--config.fl.num_clients=2 --config.fl.clients_per_round=2 --config.fl.rounds=1',
  }


def _per_org(tmp: pathlib.Path, k: int) -> dict[str, str]:
  """Steps 2-4 are each organisation's: org0 becomes org<k>, the data and state its own."""
  return {
      'org0': f'org{k}',
      'client-0': f'client-{k}',
      'partition-id=0': f'partition-id={k}',
      '/var/lib/fedjax_pt': str(tmp / f'org{k}' / 'state'),
      # (after 'org0' -> 'org<k>')
      f'/data/org{k}/*.jsonl.gz': str(tmp / 'data' / f'org{k}' / '*.jsonl.gz'),
  }


def _replace(text: str, table: dict[str, str]) -> str:
  for old, new in table.items():
    text = text.replace(old, new)
  return text


def _blocks() -> list[tuple[str, str]]:
  section = DOC.read_text().split('\n### Across machines\n', 1)[1]
  section = section.split('\n**Faults.**', 1)[0]
  return [(lang, textwrap.dedent(body)) for lang, body in
          re.findall(r'^ *```(\w+)\n(.*?)^ *```\n', section, re.M | re.S)]


def _commands(script: str) -> list[str]:
  """A bash block's commands: lines joined at a trailing backslash (as bash joins them)."""
  return [c for c in script.replace('\\\n', '').splitlines() if c.strip()]


def _corpus(directory: pathlib.Path, seed: int, documents: int = 300) -> None:
  """Plain-text documents as gzipped JSON Lines, enough for the tiny recipe's batches."""
  directory.mkdir(parents=True)
  words = 'the federated model trains on text of each organisation and on its own'.split()
  lines = []
  for i in range(documents):
    n = 20 + (i * 7 + seed) % 40
    lines.append(json.dumps({'text': ' '.join(words[(i + j * seed) % len(words)]
                                              for j in range(n))}) + '\n')
  with gzip.open(directory / 'part-0.jsonl.gz', 'wt') as f:
    f.writelines(lines)


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout_s: float = 60) -> None:
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    assert proc.poll() is None, f'{what} exited with code {proc.returncode}'
    with socket.socket() as s:
      if s.connect_ex(('127.0.0.1', port)) == 0:
        return
    time.sleep(0.2)
  pytest.fail(f'{what} is not listening on 127.0.0.1:{port} after {timeout_s}s')


def _nginx_conf(directory: pathlib.Path, server_block: str) -> pathlib.Path:
  """The doc's server block (an http-level upstream and server) in a minimal main config."""
  tmp = directory / 'tmp'
  tmp.mkdir(parents=True)
  temp_paths = ''.join(f'  {kind}_temp_path {tmp / kind};\n'
                       for kind in ('client_body', 'proxy', 'fastcgi', 'uwsgi', 'scgi'))
  path = directory / 'nginx.conf'
  path.write_text(
      f'daemon off;\nworker_processes 1;\npid {directory / "nginx.pid"};\n'
      f'error_log stderr notice;\nenv {processes.TAG_VAR};\nenv FLWR_HOME;\n'
      f'events {{ worker_connections 256; }}\nhttp {{\n  access_log /dev/stderr;\n{temp_paths}'
      + textwrap.indent(server_block, '  ') + '}\n')
  return path


def test_the_across_machines_walkthrough_runs_as_written(tmp_path, tmp_path_factory):
  try:
    nginx = proxy.nginx()
  except proxy.ProxyError as e:
    pytest.skip(str(e))
  blocks = _blocks()
  assert [lang for lang, _ in blocks] == BLOCKS, 'the walkthrough\'s code blocks changed'
  fleet, link = distributed.free_port(), distributed.free_port()
  table = _substitutions(tmp_path, fleet, link)
  text = ''.join(body for _, body in blocks)
  assert not [old for old in table if old not in text], 'a substitution no longer applies'
  blocks = [(lang, _replace(body, table)) for lang, body in blocks]
  per_org_text = ''.join(body for _, body in blocks[3:6])
  assert all(old in per_org_text for old in list(_per_org(tmp_path, 1))[:4])
  # The clone: the doc's commands run in one, with `fedjax_pt/` and `configs/` in it.
  for name in ('fedjax_pt', 'configs'):
    (tmp_path / name).symlink_to(REPO / name)
  for name in ('server', 'org0', 'org1'):
    _corpus(tmp_path / 'data' / name, seed=len(name) + (name == 'org1'))
  cache = tmp_path_factory.getbasetemp().parent / 'deploy-jax-cache'  # deploy_local_test's
  cache.mkdir(exist_ok=True)
  procs = processes.Processes(tmp_path / 'logs', {
      'JAX_COMPILATION_CACHE_DIR': str(cache), 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
      'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '-1', 'COLUMNS': '200'})
  cli_home = tmp_path / 'home' / 'cli'  # `~/.flwr` of the server operator

  def run(command: str, home: str = 'cli', timeout_s: float = 120) -> str:
    result = subprocess.run(['bash', '-c', command], cwd=tmp_path, env=procs.env(
        tmp_path / 'home' / home), capture_output=True, text=True, timeout=timeout_s,
                            stdin=subprocess.DEVNULL, check=False)
    out = result.stdout + result.stderr
    with open(procs.logs / 'commands.log', 'a') as log:
      log.write(f'$ {command}\n{out}\n')
    assert result.returncode == 0, f'{command}\nexited {result.returncode}:\n{out[-3000:]}'
    return out

  def background(name: str, command: str, home: str | None = None) -> subprocess.Popen:
    return procs.start(name, ['bash', '-c', f'exec {command}'], tmp_path / 'home' /
                       (home or name), cwd=tmp_path)

  try:
    # Step 1: credentials and the SuperLink; nginx with the server block; the CLI's connection.
    certs_cmd, superlink_cmd = _commands(blocks[0][1])
    run(certs_cmd)
    superlink = background('superlink', superlink_cmd)
    _wait_port(link, superlink, 'flower-superlink')
    conf = _nginx_conf(tmp_path / 'nginx', blocks[1][1])
    front = procs.start('nginx', [nginx, '-p', str(conf.parent), '-e', 'stderr', '-c',
                                  str(conf)], tmp_path / 'home' / 'nginx')
    _wait_port(fleet, front, 'nginx')
    cli_home.mkdir(parents=True, exist_ok=True)
    (cli_home / 'config.toml').write_text(blocks[2][1])
    deadline = time.monotonic() + 60
    while subprocess.run([str(processes.BIN / 'flwr'), 'list'], env=procs.env(cli_home),
                         cwd=tmp_path, capture_output=True, timeout=60).returncode:
      assert time.monotonic() < deadline, 'the Control API does not answer'  # after the port
      time.sleep(0.5)
    # Steps 2-4, per organisation. On one host, each SuperNode's own Runtime API needs a port
    # of its own (Flower's default is 9094 on 127.0.0.1): the one addition to the doc's command.
    nodes = []
    for k in range(2):
      org = _per_org(tmp_path, k)
      for c in _commands(blocks[3][1]):
        run(_replace(c, org), home=f'org{k}')
      for c in _commands(blocks[4][1]):
        run(_replace(c, org))
      (node_cmd,) = _commands(blocks[5][1])
      nodes.append(background(f'org{k}', _replace(node_cmd, org) +
                              f' --port {distributed.free_port()}'))
    deadline = time.monotonic() + 120
    while True:  # what an operator checks with `flwr supernode list`
      out = run('flwr supernode list fedjax --format json')
      nodes_json = json.loads(out[out.index('{'):]).get('nodes', [])
      if sum(n.get('status') == 'online' for n in nodes_json) == 2:
        break
      assert all(p.poll() is None for p in nodes), 'a SuperNode exited; see logs/'
      assert time.monotonic() < deadline, f'SuperNodes not online after 120s: {nodes_json}'
      time.sleep(1)
    # Step 5: the run, its status, its log.
    run_cmd, list_cmd, log_cmd = _commands(blocks[6][1])
    out = run(run_cmd, timeout_s=480)
    run_id = re.search(r'started run (\d+)', out)
    assert run_id, out[-3000:]
    listed = run(list_cmd.replace('RUN_ID', run_id[1]))
    assert 'finished:completed' in listed, listed
    logged = run(log_cmd.replace('RUN_ID', run_id[1]))
    assert 'round 1/1 | val_loss' in logged and 'done: 1 rounds' in logged, logged[-2000:]
  finally:
    procs.stop_all()
  assert not procs.tagged_pids()
  rounds = records.read_records(str(tmp_path / 'runs' / 'fed125m')).rounds
  assert [r.round for r in rounds] == [0, 1]
  assert rounds[1].num_aggregated == 2


def test_the_substitutions_are_the_only_changes():
  """The tables change no command beyond recognition: every command of the walkthrough keeps
  its program name (a doc that renamed one would not be replayed silently as another)."""
  names = [c.split()[0] for lang, body in _blocks() if lang == 'bash'
           for c in _commands(body)]
  assert names == ['python', 'flower-superlink', 'python', 'flwr', 'flower-supernode', 'flwr',
                   'flwr', 'flwr']


def test_the_systemd_units_verify_and_run_the_walkthroughs_commands(tmp_path):
  """`systemd-analyze verify` accepts the units (syntax, Restart=, executables), and each unit
  starts the walkthrough's command: the SuperLink's of step 1, the SuperNode's of step 4."""
  analyze = shutil.which('systemd-analyze')
  if not analyze:
    pytest.skip('systemd-analyze is not installed')
  blocks = _blocks()
  assert [lang for lang, _ in blocks] == BLOCKS, 'the walkthrough\'s code blocks changed'
  step1, step4 = _commands(blocks[0][1])[1], _commands(blocks[5][1])[0]
  for name, unit, command in (('fedjax-superlink', blocks[7][1], step1),
                              ('fedjax-supernode', blocks[8][1], step4)):
    start = _commands(unit.replace('\\\n', ' '))  # systemd joins with a space
    (exec_start,) = [line.split('=', 1)[1] for line in start if line.startswith('ExecStart=')]
    program, *args = shlex.split(exec_start)
    assert program == f'/srv/fedjax_pt/.venv/bin/{shlex.split(command)[0]}', name
    assert [a.replace(' ', '') for a in args] == [
        a.replace(' ', '') for a in shlex.split(command)[1:]], name  # node config: its spaces
    assert 'Restart=on-failure' in start and 'FLWR_TELEMETRY_ENABLED=0' in unit, name
    path = tmp_path / f'{name}.service'
    path.write_text(unit.replace('/srv/fedjax_pt/.venv/bin', str(processes.BIN))
                    .replace('/srv/fedjax_pt', str(REPO)))
    result = subprocess.run([analyze, 'verify', str(path)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
