"""The deployment across real Flower processes on 127.0.0.1: a SuperLink and SuperNodes with TLS
and node authentication, the ServerApp and a ClientApp process per message.

Every test binds 127.0.0.1 only, on free ports, bounds its time, and stops every process it
started, by PID, even when it fails (`LocalFederation.stop`, or the launcher's own clean-up and
a sweep of the processes whose FLWR_HOME lies in the test's directory).
"""

import http.client
import json
import math
import os
import pathlib
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading

import pytest

from fedjax_pt.configs import tiny
from fedjax_pt import records
from fedjax_pt import train
from fedjax_pt.deploy import certs
from fedjax_pt.deploy.local import federation as launcher
from fedjax_pt.deploy.local import processes
from fedjax_pt.deploy.local import proxy

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ['--config=configs/tiny.py:test', '--config.fl.num_clients=2',
        '--config.fl.clients_per_round=2']


@pytest.fixture(scope='module')
def jax_cache(tmp_path_factory):
  """One persistent compilation cache for every process of these tests, in every xdist worker
  (the base temp's parent is theirs in common; JAX writes cache entries atomically): a ClientApp
  process per message would otherwise compile the train step in every round of every test."""
  path = tmp_path_factory.getbasetemp().parent / 'deploy-jax-cache'
  path.mkdir(exist_ok=True)
  return str(path)


@pytest.fixture(scope='module')
def simulated(tmp_path_factory):
  config = tiny.get_config('test')
  config.fl.num_clients = config.fl.clients_per_round = 2
  return train.run(config, str(tmp_path_factory.mktemp('sim'))).rounds


def _column(rounds, key):
  return [records.to_json(r).get(key) for r in rounds]  # as written to metrics.jsonl


def _ours(directory: pathlib.Path) -> list[int]:
  """Live processes whose FLWR_HOME lies under `directory`: the ones a test started."""
  needle = f'FLWR_HOME={directory}'.encode()
  pids = []
  for entry in pathlib.Path('/proc').iterdir():
    try:
      if entry.name.isdigit() and any(v.startswith(needle) for v in
                                      (entry / 'environ').read_bytes().split(b'\0')):
        if (entry / 'stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z':
          pids.append(int(entry.name))
    except OSError:
      pass
  return pids


def _launch(workdir: pathlib.Path, *flags: str, jax_cache: str, timeout_s: float = 600):
  """`python -m fedjax_pt.deploy.local` as README shows it; stopped and swept on a timeout."""
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')
  proc = subprocess.Popen([sys.executable, '-m', 'fedjax_pt.deploy.local', '--nodes=2',
                           f'--workdir={workdir}', *TINY, *flags], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    out, _ = proc.communicate(timeout=timeout_s)
  except subprocess.TimeoutExpired:
    proc.send_signal(signal.SIGTERM)  # the launcher stops its federation on SIGTERM
    out, _ = proc.communicate(timeout=60)
    pytest.fail(f'the launcher ran over {timeout_s}s:\n{out[-3000:]}')
  finally:
    for pid in _ours(workdir):
      os.kill(pid, signal.SIGKILL)
  assert not _ours(workdir)
  return proc.returncode, out


# Round 1 already moves the global model down and both client models up; the inline run also
# checks that round 2 continues from the nodes' state as the simulation does.
@pytest.mark.parametrize('transport, rounds', [('inline', 2), ('shared', 1)])
def test_deployment_equals_the_simulation(transport, rounds, tmp_path, jax_cache, simulated):
  """Same seeds, data shards and step numbering, clients averaged in the same order, arrays
  carried bit for bit (float32, by either transport): the per-round losses are bit-identical on
  CPU, so the comparison is exact equality, not a tolerance."""
  code, out = _launch(tmp_path, f'--transport={transport}', f'--config.fl.rounds={rounds}',
                      jax_cache=jax_cache)
  assert code == 0, out[-4000:]
  deployed = records.read_records(str(tmp_path)).rounds
  assert len(deployed) == rounds + 1  # round 0 evaluates the initial model
  for key in ('round', 'val_loss', 'train_loss', 'tokens', 'client_train_loss',
              'pseudo_grad_norm', 'bytes_sent', 'bytes_received'):
    assert _column(deployed, key) == _column(simulated[:rounds + 1], key), key
  assert 'finished:completed' in out and 'Traceback' not in out
  # Each reply carries the age of the fresh flwr-clientapp process that made it.
  assert re.search(r'replied after .*; node: start \d+\.\d+s, build', out), out[-4000:]
  if transport == 'shared':
    assert not any((tmp_path / 'shared').iterdir())  # every model was deleted once read


def test_secure_aggregation_across_processes(tmp_path, jax_cache, simulated):
  """SecAgg+ between real SuperNodes, a ClientApp process per protocol message (its state kept
  by Flower between them): the run completes, the server received only masked integers (about
  twice the float32 bytes) and the model is the simulation's to within the quantisation
  (deploy_fleet_test checks the bound per value; here a broken sum, e.g. one node's delta or a
  wrong scale, would move val_loss by far more than 1e-4)."""
  code, out = _launch(tmp_path, '--config.fl.rounds=1', '--config.fl.secagg.enabled=True',
                      jax_cache=jax_cache)
  assert code == 0, out[-4000:]
  assert 'finished:completed' in out and 'Traceback' not in out
  deployed = records.read_records(str(tmp_path)).rounds
  assert deployed[1].num_aggregated == 2 and deployed[1].secagg_clipped_values == 0
  assert deployed[1].val_loss == pytest.approx(simulated[1].val_loss, rel=1e-4)
  assert 1.8 < deployed[1].bytes_received / simulated[1].bytes_received < 2.5
  log = (tmp_path / 'deploy' / 'logs' / 'run.log').read_text()
  assert 'secure sum of clients [0, 1]' in log and 'Secure aggregation completed' in log


def test_tls_and_node_authentication_refuse_strangers(tmp_path):
  federation = launcher.LocalFederation(tmp_path)
  try:
    federation.start_superlink()
    federation.add_node('client-0', 'partition-id=0')
    unregistered = federation.add_node('unregistered', 'partition-id=1', register=False,
                                       max_wait_s=5)
    plaintext = federation.add_node('plaintext', 'partition-id=1', tls=False, auth=False,
                                    max_wait_s=5)
    federation.wait_online(1, timeout_s=120)
    assert unregistered.wait(timeout=90) != 0 and plaintext.wait(timeout=90) != 0
    online = [int(n['node-id']) for n in federation.online_nodes()]
    assert online == [federation.node_ids['client-0']]
  finally:
    federation.stop()
  assert 'Failed to activate SuperNode' in (tmp_path / 'logs' / 'unregistered.log').read_text()
  assert 'Giving up reconnection' in (tmp_path / 'logs' / 'plaintext.log').read_text()
  assert not _ours(tmp_path)


def _kill_when_it_receives_round_1(federation, name: str, stop: threading.Event) -> None:
  """SIGKILLs SuperNode `name` as soon as its log shows round 1's train message arriving."""
  log = federation.procs.logs / f'{name}.log'
  while not stop.wait(0.1):
    text = log.read_text(errors='replace') if log.exists() else ''
    at = text.find('ROUND 1]')
    if at >= 0 and 'Receiving: train message' in text[at:]:
      federation.procs.kill(name)
      return


def test_a_killed_node_and_a_broken_node_are_faults_and_the_run_finishes(tmp_path, jax_cache,
                                                                         monkeypatch):
  """3 nodes, 3 rounds, fl.min_clients=1. Node 1's SuperNode is SIGKILLed in round 1 and started
  again once the server has given up on it; node 2's data path does not exist."""
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', jax_cache)
  workdir = tmp_path / 'run'
  federation = launcher.LocalFederation(workdir / 'deploy')
  stop = threading.Event()
  restarted = []

  def on_line(line: str) -> None:
    if 'client 1 (node' in line and 'unavailable' in line and not restarted:
      restarted.append(federation.restart_node('client-1'))

  try:
    federation.start_superlink()
    for i in range(3):
      bad = f" data.source='jsonl' data.path='{tmp_path}/no-such-dir/*.jsonl'" if i == 2 else ''
      federation.add_node(f'client-{i}', f"partition-id={i} num-partitions=3 "
                          f"state-dir='{workdir}/deploy/nodes/{i}'{bad}")
    federation.wait_online(3)
    killer = threading.Thread(target=_kill_when_it_receives_round_1,
                              args=(federation, 'client-1', stop), daemon=True)
    killer.start()
    status, error = federation.run({
        'config': str(REPO / 'configs' / 'tiny.py') + ':test', 'workdir': str(workdir),
        'overrides': '--config.fl.num_clients=3 --config.fl.clients_per_round=3 '
                     '--config.fl.rounds=3 --config.fl.min_clients=1'}, on_line=on_line,
                                   timeout_s=600)
  finally:
    stop.set()
    federation.stop()
  assert not _ours(workdir)
  assert status == 'finished:completed' and error is None
  rounds = records.read_records(str(workdir)).rounds
  assert [r.round for r in rounds] == [0, 1, 2, 3]
  rounds = rounds[1:]  # round 0 evaluates the initial model; no client trains in it
  first = {int(k): v for k, v in rounds[0].failed_clients.items()}
  assert first[1].startswith('unavailable') and '(node ' in first[1]
  assert all(r.failed_clients['2'].startswith('raised FileNotFoundError: data.path pattern')
             and '(node ' in r.failed_clients['2'] for r in rounds)
  # Node 1 came back and was sampled and averaged again.
  assert restarted and any(1 in r.clients and '1' not in r.failed_clients for r in rounds[1:])
  assert math.isfinite(rounds[-1].val_loss) and math.isfinite(rounds[-1].global_norm)
  log = (workdir / 'deploy' / 'logs' / 'run.log').read_text()
  assert 'client 2 (node' in log and 'no-such-dir' in log and 'Traceback' not in log


@pytest.mark.parametrize('flags, message', [
    (('--config.data.source=jsonl', '--config.data.path=/nonexistent/*.jsonl'),
     "data.path pattern '/nonexistent/*.jsonl' matches no file"),
    (("--node_config=data.path='/x.jsonl' oops",), "--node_config for node 0: 'oops' is not a "
                                                   'key=value pair'),
    (('--node_config=data.seq_len=64',), "node config key 'data.seq_len' is part of the recipe"),
    (('--transport=shared', '--config.fl.secagg.enabled=True'),
     "fl.secagg sends the masked deltas in Flower's messages"),
    (('--proxy', '--insecure'), '--proxy serves TLS: drop --insecure'),
])
def test_bad_data_or_node_config_is_refused_before_any_process_starts(tmp_path, flags, message):
  result = subprocess.run([sys.executable, '-m', 'fedjax_pt.deploy.local', '--nodes=3',
                           f'--workdir={tmp_path}', *TINY, *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith('fedjax_pt.deploy.local: error: ') and message in lines[-1], lines
  assert not (tmp_path / 'deploy').exists()  # no certificate, key or process was made


def test_a_hijacked_seat_a_moved_workdir_and_other_code_across_processes(tmp_path, jax_cache,
                                                                         simulated, monkeypatch):
  """Three sessions of one run on real processes. 1: round 1 with the two partners' nodes,
  which binds their seats to their keys. 2: the workdir is moved to another path, and a rogue
  key is registered under client-1's name (what any partner could do through the Control API);
  round 2 resumes: the rogue node gets nothing and the round records it, and the nodes continue
  from their snapshots, so the losses are the simulation's (a run key that depended on the path
  started them afresh). 3: the nodes come back on other fedjax_pt code: one line, no training."""
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', jax_cache)
  federation = launcher.LocalFederation(tmp_path / 'deploy')
  overrides = ' '.join(TINY[1:]) + ' --config.fl.rounds='

  def run(workdir, rounds):
    return federation.run({'config': str(REPO / 'configs' / 'tiny.py') + ':test',
                           'workdir': str(workdir), 'overrides': overrides + str(rounds)},
                          timeout_s=300)

  try:
    federation.start_superlink()
    for k in range(2):
      federation.add_node(f'client-{k}', f"partition-id={k} num-partitions=2 "
                          f"state-dir='{tmp_path}/nodes/{k}'")
    federation.wait_online(2)
    assert run(tmp_path / 'run', 1) == ('finished:completed', None)
    shutil.move(tmp_path / 'run', tmp_path / 'moved')
    federation.add_node('rogue', f"partition-id=1 num-partitions=2 state-dir='{tmp_path}/rogue'",
                        register_as='client-1')
    federation.wait_online(3)
    assert run(tmp_path / 'moved', 2) == ('finished:completed', None)
    patched = tmp_path / 'patched'
    shutil.copytree(REPO / 'fedjax_pt', patched / 'fedjax_pt',
                    ignore=shutil.ignore_patterns('__pycache__'))
    with open(patched / 'fedjax_pt' / 'train.py', 'a', encoding='utf-8') as f:
      f.write('# a partner patched this\n')
    federation.procs.extra_env['PYTHONPATH'] = str(patched)
    for name in ('client-0', 'client-1', 'rogue'):
      federation.procs.kill(name, signal.SIGTERM)  # a stopped SuperNode signs off at once
    federation.wait_online(0, at_most=True)
    for name in ('client-0', 'client-1'):
      federation.restart_node(name)
    federation.wait_online(2)
    status, error = run(tmp_path / 'moved', 3)
  finally:
    federation.stop()
  assert not _ours(tmp_path)
  deployed = records.read_records(str(tmp_path / 'moved')).rounds
  assert _column(deployed[:3], 'val_loss') == _column(simulated[:3], 'val_loss')
  rogue = federation.node_ids['rogue']
  assert list(deployed[2].refused_nodes) == [str(rogue)]
  keys = json.loads((tmp_path / 'moved' / 'federation.json').read_text())['seats']
  assert keys['client-1'] in deployed[2].refused_nodes[str(rogue)]
  log = (tmp_path / 'deploy' / 'logs' / 'run.log').read_text()
  assert f'node {rogue} refused: claims client-1 by its registered name client-1 with key' in log
  assert status == 'finished:failed' and error.startswith('round 3: every client failed: raised '
                                                          'ValueError: the server runs fedjax_pt ')
  assert 'install the same fedjax_pt on both' in error


def _partner_cli(home: pathlib.Path, address: str, ca: pathlib.Path, *args: str):
  """`flwr` as an organisation runs it: the SuperLink's public address and the CA it was given."""
  home.mkdir(parents=True, exist_ok=True)
  (home / 'config.toml').write_text(f'[superlink]\ndefault = "fed"\n\n[superlink.fed]\n'
                                    f'address = "{address}"\nroot-certificates = "{ca}"\n')
  return subprocess.run([str(processes.BIN / 'flwr'), *args], capture_output=True, text=True,
                        env=processes.flower_env(home, 'partner'), stdin=subprocess.DEVNULL,
                        timeout=60, check=False)


def test_behind_the_proxy_nodes_train_and_partners_reach_no_control_api(tmp_path, jax_cache,
                                                                        simulated, monkeypatch):
  """The SuperLink on 127.0.0.1 (the operator's CLI), nginx on the public port (the nodes): a
  1-round run gives the simulation's losses, while a partner's `flwr list` and `flwr supernode
  register` on the public port get 403 and register nothing, as do paths that try to leave
  /v1/fleet/ once decoded or normalised."""
  try:
    proxy.nginx()
  except proxy.ProxyError as e:
    pytest.skip(str(e))
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', jax_cache)
  federation = launcher.LocalFederation(tmp_path / 'deploy', proxy=True)
  try:
    federation.start_superlink()
    public = f'{federation.host}:{federation.port}'
    assert federation.control != public
    for k in range(2):
      federation.add_node(f'client-{k}', f"partition-id={k} num-partitions=2 "
                          f"state-dir='{tmp_path}/nodes/{k}'")
    federation.wait_online(2)
    _, rogue = certs.make_node_key(tmp_path / 'partner', 'rogue')
    home, ca = tmp_path / 'deploy' / 'home' / 'partner', federation.tls.ca
    listed = _partner_cli(home, public, ca, 'list')
    registered = _partner_cli(home, public, ca, 'supernode', 'register', str(rogue), 'fed',
                              '--name', 'client-1')
    context = ssl.create_default_context(cafile=str(ca))
    codes = {}
    for path in ('/v1/control/list-runs', '/v1/fleet/../control/list-runs',
                 '/v1/fleet/%2e%2e/control/list-runs', '/v1/fleet/..%2Fcontrol/list-runs',
                 '/v1/runtime/get-nodes', '/docs'):
      connection = http.client.HTTPSConnection(federation.host, federation.port, timeout=30,
                                               context=context)
      connection.request('POST', path, body=b'')
      codes[path] = connection.getresponse().status
      connection.close()
    status = federation.run({'config': str(REPO / 'configs' / 'tiny.py') + ':test',
                             'workdir': str(tmp_path / 'run'),
                             'overrides': ' '.join(TINY[1:]) + ' --config.fl.rounds=1'},
                            timeout_s=300)
    nodes = federation.cli_json('supernode', 'list', launcher.CONNECTION)['nodes']
  finally:
    federation.stop()
  assert not _ours(tmp_path)
  for refused, url in ((listed, 'list-runs'), (registered, 'register-node')):
    said = ' '.join((refused.stdout + refused.stderr).replace('│', ' ').split())
    assert refused.returncode != 0, said
    assert f"Client error '403 Forbidden' for url 'https://{public}/v1/control/{url}'" in said
  assert set(codes.values()) == {403}, codes
  assert sorted(int(n['node-id']) for n in nodes) == sorted(federation.node_ids.values())
  assert status == ('finished:completed', None)
  deployed = records.read_records(str(tmp_path / 'run')).rounds
  for key in ('val_loss', 'train_loss', 'tokens'):
    assert _column(deployed, key) == _column(simulated[:2], key), key
  log = (tmp_path / 'deploy' / 'logs' / 'proxy.log').read_text()
  assert '"POST /v1/fleet/push-messages HTTP/1.1" 200' in log
  assert '"POST /v1/control/register-node HTTP/1.1" 403' in log


def test_the_superexec_polls_its_node_often_unless_told_otherwise(tmp_path, monkeypatch):
  monkeypatch.delenv(processes.SUPEREXEC_POLL_VAR, raising=False)
  assert processes.flower_env(tmp_path, 'x')[processes.SUPEREXEC_POLL_VAR] == '0.2'
  monkeypatch.setenv(processes.SUPEREXEC_POLL_VAR, '1.0')
  assert processes.flower_env(tmp_path, 'x')[processes.SUPEREXEC_POLL_VAR] == '1.0'
