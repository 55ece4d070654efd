"""Shaped links on one machine (`fedjax_pt/deploy/local/links.py`, `deploy.local --link`): the
tc commands, the rate they really enforce, a deployment behind them that equals the simulation,
and nothing left behind after a run, a SIGTERM or a refusal.

Tests that make namespaces skip, with the reason, where they cannot be made (not root, no `ip` or
`tc`, no permission). Every namespace and device they make carries this process's id, or the
launcher's, in its name (fjl<pid>...) and is removed by name even when a test fails; every Flower
process by PID (`deploy_local_test._ours`).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import deploy_local_test as local
from deploy_local_test import jax_cache, simulated  # noqa: F401  (fixtures)
import pytest

from fedjax_pt.deploy.local import links as links_lib


def _why_no_namespaces() -> str | None:
  try:
    links_lib.check_available()
  except links_lib.LinkError as e:
    return str(e)
  probe = f'fjl{os.getpid()}probe'
  made = subprocess.run(['ip', 'netns', 'add', probe], capture_output=True, text=True,
                        check=False)
  subprocess.run(['ip', 'netns', 'delete', probe], capture_output=True, check=False)
  return None if made.returncode == 0 else f'cannot make a network namespace: {made.stderr}'


_WHY = _why_no_namespaces()
needs_namespaces = pytest.mark.skipif(_WHY is not None, reason=f'{_WHY}')


def _leftovers(prefix: str) -> list[str]:
  """Namespaces, devices and qdiscs whose name starts with `prefix`."""
  names = os.listdir('/run/netns') if os.path.isdir('/run/netns') else []
  names += os.listdir('/sys/class/net')
  qdiscs = subprocess.run(['tc', 'qdisc', 'show'], capture_output=True, text=True,
                          check=False).stdout
  return sorted({n for n in names if n.startswith(prefix)} |
                {line for line in qdiscs.splitlines() if f'dev {prefix}' in line})


def _remove(prefix: str) -> None:
  """Whatever a failed test left: host devices (their peers go with them), then namespaces."""
  for name in os.listdir('/sys/class/net'):
    if name.startswith(prefix):
      subprocess.run(['ip', 'link', 'delete', name], capture_output=True, check=False)
  for name in os.listdir('/run/netns') if os.path.isdir('/run/netns') else []:
    if name.startswith(prefix):
      subprocess.run(['ip', 'netns', 'delete', name], capture_output=True, check=False)


# --- commands and parsing (no root needed) --------------------------------------------------------

def test_rates_are_parsed_as_tc_writes_them():
  assert links_lib.parse_rates('50mbit,200mbit', 2) == (50_000_000, 200_000_000)
  assert links_lib.parse_rates('1.5Gbit', 3) == (1_500_000_000,) * 3
  assert links_lib.parse_rates(' 500kbit ', 1) == (500_000,)
  for bad, message in (('50mbps', "'50mbps' is not a rate"), ('0mbit', "'0mbit' is not a rate"),
                       ('fast', "'fast' is not a rate"), ('50mbit,', "'' is not a rate"),
                       ('1mbit,2mbit,3mbit', 'gives 3 rates for 2 nodes')):
    with pytest.raises(links_lib.LinkError, match=re.escape(message)):
      links_lib.parse_rates(bad, 2)
  assert links_lib.profiles((50_000_000, 500_000)) == [
      {'uplink_mbps': 50.0, 'downlink_mbps': 50.0}, {'uplink_mbps': 0.5, 'downlink_mbps': 0.5}]


def test_tbf_commands():
  assert links_lib.tbf_command('fjl1h0', 50_000_000) == [
      'tc', 'qdisc', 'add', 'dev', 'fjl1h0', 'root', 'tbf', 'rate', '50000000bit', 'burst',
      '65536', 'latency', '100ms']
  # Inside the node's namespace; a fast link's bucket holds 10 ms of it.
  assert links_lib.tbf_command('fjl1n0', 10**9, 'fjl1-0') == [
      'tc', '-n', 'fjl1-0', 'qdisc', 'add', 'dev', 'fjl1n0', 'root', 'tbf', 'rate',
      '1000000000bit', 'burst', '1250000', 'latency', '100ms']


def test_subnets_avoid_every_network_in_use():
  used = [links_lib.ipaddress.ip_network(n) for n in ('10.213.0.0/29', '10.213.0.12/32',
                                                      '10.213.0.64/26', '192.0.2.0/24')]
  got = [str(n) for n in links_lib.free_subnets(3, used)]
  assert got == ['10.213.0.8/30', '10.213.0.16/30', '10.213.0.20/30']


def test_without_root_one_line(monkeypatch):
  monkeypatch.setattr(os, 'geteuid', lambda: 1000)
  with pytest.raises(links_lib.LinkError, match=r'^--link needs root \(it makes network'):
    links_lib.check_available()
  monkeypatch.setattr(os, 'geteuid', lambda: 0)
  monkeypatch.setattr(links_lib.shutil, 'which', lambda tool: None if tool == 'tc' else tool)
  with pytest.raises(links_lib.LinkError, match=r'^--link needs `tc` \(iproute2\) on PATH$'):
    links_lib.check_available()


@pytest.mark.parametrize('flags, message', [
    (('--link=50mbps',), "--link: '50mbps' is not a rate of at least 8kbit"),
    (('--link=10mbit,20mbit,30mbit',), '--link gives 3 rates for 2 nodes'),
    (('--link=50mbit', '--config.fl.profiles=[{"uplink_mbps": 50, "downlink_mbps": 10}]'),
     '--link=50mbit and fl.profiles disagree: client 0 has uplink_mbps=50.0, downlink_mbps=10.0'),
    (('--link=50mbit', '--config.fl.profiles=[{"uplink_mbps": 50, "downlink_mbps": 50, '
      '"latency_ms": 20}]'), 'latency_ms=20, the link 50 each way and no latency'),
])
def test_bad_link_is_one_line_before_anything_starts(tmp_path, flags, message):
  result = subprocess.run([sys.executable, '-m', 'fedjax_pt.deploy.local', '--nodes=2',
                           f'--workdir={tmp_path}', *local.TINY, *flags], cwd=local.REPO,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith('fedjax_pt.deploy.local: error: ') and message in lines[-1], lines
  assert not (tmp_path / 'deploy').exists()


# --- real namespaces ------------------------------------------------------------------------------

_PEER = '''
import socket, sys
mode, host, port, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.create_connection((host, port), timeout=60)
if mode == 'send':
  s.recv(1)  # go: the clock runs
  s.sendall(b'x' * size)
  s.shutdown(socket.SHUT_WR)
  s.recv(1)
else:
  while s.recv(1 << 16):
    pass
s.close()
'''


def _transfer_s(links: links_lib.Links, size: int, upload: bool) -> float:
  """Seconds to move `size` bytes over link 0, from its node (`upload`) or to it."""
  link = links.links[0]
  with socket.create_server((link.host_ip, 0)) as server:
    server.settimeout(60)
    peer = subprocess.Popen([*links.exec_prefix(0), sys.executable, '-c', _PEER,
                             'send' if upload else 'receive', link.host_ip,
                             str(server.getsockname()[1]), str(size)])
    try:
      conn, _ = server.accept()
      with conn:
        conn.settimeout(60)
        start = time.monotonic()
        if upload:
          conn.sendall(b'g')
          got = 0
          while chunk := conn.recv(1 << 16):
            got += len(chunk)
          assert got == size
        else:
          conn.sendall(b'x' * size)
          conn.shutdown(socket.SHUT_WR)
          assert conn.recv(1) == b''  # the node has read everything and closed
        elapsed = time.monotonic() - start
      assert peer.wait(timeout=60) == 0
      return elapsed
    finally:
      if peer.poll() is None:
        peer.kill()
        peer.wait()


@needs_namespaces
def test_the_link_is_made_as_built_limits_both_ways_and_is_removed():
  """8 Mbit/s, 2 MB each way. tbf lets at most its bucket (`burst_bytes`, 64 KiB here, full at
  the start) through at once and then no more than the rate, and TCP/IP headers only add bytes,
  so moving N payload bytes takes at least (N - burst) * 8 / rate = 1.93 s (above 0.8 x the
  2.0 s at the rate); an unshaped veth takes milliseconds."""
  rate, size = 8_000_000, 2_000_000
  prefix = f'fjl{os.getpid()}t'
  links = links_lib.Links((rate,), prefix=prefix)
  try:
    links.start()
    link = links.links[0]
    for dev, ns in ((link.host_dev, []), (link.node_dev, ['-n', link.namespace])):
      shown = subprocess.run(['tc', *ns, 'qdisc', 'show', 'dev', dev], capture_output=True,
                             text=True, check=True).stdout
      assert re.search(r'qdisc tbf \S+ root .*rate 8Mbit burst 64Kb lat 100ms', shown), shown
    bound = (size - links_lib.burst_bytes(rate)) * 8 / rate
    assert bound >= 0.8 * size * 8 / rate
    for upload in (True, False):
      elapsed = _transfer_s(links, size, upload)
      assert bound <= elapsed < 3 * size * 8 / rate, (upload, elapsed, bound)
    assert links.remaining() == [link.namespace, link.host_dev]
  finally:
    assert links.stop() == []
    left = _leftovers(prefix)
    _remove(prefix)
  assert not left


@needs_namespaces
def test_what_exists_already_is_refused_and_kept():
  prefix = f'fjl{os.getpid()}e'
  subprocess.run(['ip', 'netns', 'add', f'{prefix}-1'], check=True)
  links = links_lib.Links((8_000_000, 8_000_000), prefix=prefix)
  try:
    with pytest.raises(links_lib.LinkError, match=f'ip netns add {prefix}-1 failed: .*exists'):
      links.start()
    assert links.stop() == [f'{prefix}-1 still exists']  # not this object's: kept
    assert _leftovers(prefix) == [f'{prefix}-1']  # link 0, made before, is removed
  finally:
    _remove(prefix)


@needs_namespaces
def test_a_link_that_fails_is_one_line_and_removes_what_was_made(tmp_path):
  """A `tc` that fails (as one without tbf would): link 0's namespace and veth are made first,
  then the run is refused in one line, exit 2, before any process starts, and they are gone."""
  fake = tmp_path / 'bin' / 'tc'
  fake.parent.mkdir()
  fake.write_text('#!/bin/sh\necho "Error: Specified qdisc kind is unknown." >&2\nexit 2\n')
  fake.chmod(0o755)
  env = dict(os.environ, PATH=f'{fake.parent}{os.pathsep}{os.environ["PATH"]}')
  proc = subprocess.Popen([sys.executable, '-m', 'fedjax_pt.deploy.local', '--nodes=2',
                           f'--workdir={tmp_path / "run"}', *local.TINY, '--link=8mbit'],
                          cwd=local.REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    left = _leftovers(f'fjl{proc.pid}')
    _remove(f'fjl{proc.pid}')
  assert proc.returncode == 2, out[-2000:] + err[-2000:]
  last = err.strip().splitlines()[-1]
  assert re.fullmatch(r'fedjax_pt.deploy.local: error: tc qdisc add dev fjl\d+ah0 root tbf rate '
                      r'8000000bit burst 65536 latency 100ms failed: Error: Specified qdisc kind '
                      r'is unknown.', last), last
  assert not left
  assert not (tmp_path / 'run' / 'deploy' / 'logs' / 'superlink.log').exists()
  assert not local._ours(tmp_path)


def _names_printed(out: str) -> list[str]:
  return re.findall(r'\] (fjl\d+[a-z]-\d+): ', out)


@needs_namespaces
def test_deployment_behind_shaped_links_equals_the_simulation(
    tmp_path, jax_cache, simulated):  # noqa: F811
  code, out = local._launch(tmp_path, '--link=50mbit,200mbit', '--config.fl.rounds=2',
                            jax_cache=jax_cache)
  namespaces = _names_printed(out)
  prefix = namespaces[0].split('-')[0] if namespaces else 'fjl-none'
  left = _leftovers(prefix)
  _remove(prefix)
  assert code == 0, out[-4000:]
  assert len(namespaces) == 2 and not left, (namespaces, left)
  assert 'every link removed' in out and 'finished:completed' in out and 'Traceback' not in out
  deployed = local.records.read_records(str(tmp_path)).rounds
  assert len(deployed) == 3
  for key in ('round', 'val_loss', 'train_loss', 'tokens', 'client_train_loss',
              'pseudo_grad_norm', 'bytes_sent', 'bytes_received'):
    assert local._column(deployed, key) == local._column(simulated[:3], key), key
  config = json.loads((tmp_path / 'config.json').read_text())
  assert json.loads(config['fl']['profiles']) == [
      {'uplink_mbps': 50.0, 'downlink_mbps': 50.0}, {'uplink_mbps': 200.0, 'downlink_mbps': 200.0}]


@needs_namespaces
def test_sigterm_mid_run_leaves_nothing_behind(tmp_path, jax_cache):  # noqa: F811
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')
  proc = subprocess.Popen([sys.executable, '-m', 'fedjax_pt.deploy.local', '--nodes=2',
                           f'--workdir={tmp_path}', *local.TINY, '--config.fl.rounds=20',
                           '--link=20mbit'], cwd=local.REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  prefix = f'fjl{proc.pid}'
  lines, started = [], threading.Event()

  def read():
    for line in proc.stdout:
      lines.append(line)
      if re.match(r'round 1/20 \|', line):
        started.set()

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  try:
    assert started.wait(300), ''.join(lines)[-4000:]
    during = _leftovers(prefix)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    reader.join(timeout=10)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    ours = local._ours(tmp_path)
    for pid in ours:
      os.kill(pid, signal.SIGKILL)
    left = _leftovers(prefix)
    _remove(prefix)
  out = ''.join(lines)
  assert len([n for n in during if '-' in n]) == 2, during  # both namespaces existed
  assert code == 130, out[-4000:]
  assert not ours and not left, (ours, left)
  assert re.search(r'every process stopped( \(\d+ needed SIGKILL\))?, every link removed', out)
