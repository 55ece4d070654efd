"""What keeps partners in their lane and a resumed deployment on its track, on the fake grid
(`fake_grid`): seats bound to keys, the run's identity in its workdir, the snapshot a node must
continue from, the code-version handshake, and the status view. Real processes:
deploy_local_test.py."""

import json
import logging
import shutil
import socket
import subprocess
import sys

import pytest

from fake_grid import FakeGrid, FakeNode
from fedjax_pt import records
from fedjax_pt import train
from fedjax_pt.deploy import client_app
from fedjax_pt.deploy import node as node_lib
from fedjax_pt.deploy import protocol
from fedjax_pt.deploy import seats
from fedjax_pt.deploy import server_app

import deploy_fleet_test as fleet_test

KEY_A, KEY_B, ROGUE = b'key of org A', b'key of org B', b'rogue key'


@pytest.fixture(autouse=True)
def _no_compilation_cache(monkeypatch):
  monkeypatch.setattr(node_lib, 'use_compilation_cache', lambda node: None)


def _node(tmp_path, k, name, key, where=None, **node_config):
  return FakeNode({'partition-id': k, 'num-partitions': 2,
                   'state-dir': str(tmp_path / (where or f'node{k}')), **node_config},
                  name=name, public_key=key)


def _round_records(workdir):
  return [r for r in records.read_records(str(workdir)).rounds if r.round > 0]


def test_a_second_key_claiming_a_seat_is_refused_recorded_and_warned(tmp_path, caplog):
  """Org A registers a rogue key under org B's name client-1. The seat is bound to the key
  that claimed it first: the rogue node gets no message, every round records it, and the log
  warns with both fingerprints. The run equals the simulation's."""
  simulated = train.run(fleet_test._config(rounds=2), str(tmp_path / 'sim'))
  grid = FakeGrid({100: _node(tmp_path, 0, 'client-0', KEY_A),
                   101: _node(tmp_path, 1, 'client-1', KEY_B),
                   102: _node(tmp_path, 1, 'client-1', ROGUE, where='rogue'),
                   103: _node(tmp_path, 1, 'alice', KEY_A, where='alice')})
  workdir = tmp_path / 'dep'
  with caplog.at_level(logging.WARNING):
    deployed = server_app.serve(grid, fleet_test._run_config(workdir, '--config.fl.rounds=2'))
  assert fleet_test._val_losses(deployed) == fleet_test._val_losses(simulated)
  assert {node for node, kind, _ in grid.log if kind == protocol.TRAIN} == {100, 101}
  state = seats.FederationState.load(str(workdir))
  assert state.seats == {'client-0': seats.fingerprint(KEY_A), 'client-1': seats.fingerprint(KEY_B)}
  for r in _round_records(workdir):
    assert set(r.refused_nodes) == {'102', '103'}  # JSON's keys
    assert seats.fingerprint(ROGUE) in r.refused_nodes['102']
    assert seats.fingerprint(KEY_B) in r.refused_nodes['102']
    assert "registered name 'alice' names no seat" in r.refused_nodes['103']
  warnings = [m for m in caplog.messages if m.startswith('node 102 refused')]
  assert len(warnings) == 1 and seats.fingerprint(ROGUE) in warnings[0]


def test_a_released_seat_is_bound_to_the_next_key_that_claims_it(tmp_path):
  state = seats.FederationState.open(str(tmp_path), holds_run=False)
  table = seats.Seats(str(tmp_path), state, num_clients=2)
  node_of, refused = table.settle([seats.Claim(1, 1, 'partition-id', KEY_B),
                                   seats.Claim(2, 1, 'partition-id', ROGUE)])
  assert node_of == {1: 1} and list(refused) == [2]
  assert seats.release(str(tmp_path), 'client-1') == seats.fingerprint(KEY_B)
  node_of, refused = table.settle([seats.Claim(2, 1, 'partition-id', ROGUE),
                                   seats.Claim(1, 1, 'partition-id', KEY_B)])
  assert node_of == {1: 2} and list(refused) == [1]  # the operator's choice holds now
  # A restarted node (new id, same key) takes its seat back from its stale id.
  node_of, _ = table.settle([seats.Claim(2, 1, 'partition-id', ROGUE),
                             seats.Claim(5, 1, 'partition-id', ROGUE)])
  assert node_of == {1: 5}


def test_a_resume_on_another_host_and_path_continues_the_nodes_exactly(tmp_path, monkeypatch):
  """Kept Adam states live on the nodes, named by the run's id in federation.json: a server
  that resumes from a copy of its workdir on another host finds them (it used to start them
  afresh: val_loss 3.2915 instead of 3.3038)."""
  simulated = train.run(fleet_test._config(reset_optimizer=False, rounds=3), str(tmp_path / 'sim'))
  grid = FakeGrid(fleet_test._nodes(tmp_path))
  flags = '--config.fl.reset_optimizer=False --config.fl.rounds='
  first = server_app.serve(grid, fleet_test._run_config(tmp_path / 'dep', flags + '2'))
  shutil.copytree(tmp_path / 'dep', tmp_path / 'moved')
  monkeypatch.setattr(socket, 'gethostname', lambda: 'another-host')
  resumed = server_app.serve(grid, fleet_test._run_config(tmp_path / 'moved', flags + '3'))
  assert fleet_test._val_losses(first) == fleet_test._val_losses(simulated)[:3]
  assert fleet_test._val_losses(resumed) == fleet_test._val_losses(simulated)


def test_a_node_without_the_expected_snapshot_refuses_unless_told_to_start_afresh(tmp_path):
  grid = FakeGrid(fleet_test._nodes(tmp_path))
  flags = '--config.fl.reset_optimizer=False --config.fl.rounds='
  server_app.serve(grid, fleet_test._run_config(tmp_path / 'dep', flags + '1'))
  shutil.rmtree(tmp_path / 'node1')  # client 1's machine lost its disk
  server_app.serve(grid, fleet_test._run_config(tmp_path / 'dep', flags + '2'))
  failed = _round_records(tmp_path / 'dep')[-1].failed_clients
  assert list(failed) == ['1']
  assert failed['1'].startswith('raised SnapshotMissing: this node has no snapshot r000001-s0-a0 ')
  assert 'set node config reset-state=true' in failed['1']
  nodes = fleet_test._nodes(tmp_path)
  nodes[101].node_config['reset-state'] = 'true'
  server_app.serve(FakeGrid(nodes), fleet_test._run_config(tmp_path / 'dep', flags + '3'))
  assert not _round_records(tmp_path / 'dep')[-1].failed_clients


def test_a_node_on_other_code_refuses_in_one_line(tmp_path):
  """The server sends its version and source digest; a node on other code trains nothing."""

  def older_server(message, context):
    if message.metadata.message_type == protocol.TRAIN:
      message.content['config']['code_version'] = '0.0.9+0123456789ab'
    return client_app.app(message=message, context=context)

  nodes = fleet_test._nodes(tmp_path)
  for node in nodes.values():
    node.handler = older_server
  with pytest.raises(train.errors.TrainingFailed) as failure:
    server_app.serve(FakeGrid(nodes), fleet_test._run_config(tmp_path / 'dep',
                                                             '--config.fl.rounds=1'))
  assert (f'the server runs fedjax_pt 0.0.9+0123456789ab, this node {protocol.code_version()} '
          '(version+source digest): install the same fedjax_pt on both') in str(failure.value)
  assert '\n' not in str(failure.value)


def test_code_version_changes_with_the_source(tmp_path, monkeypatch):
  package = tmp_path / 'fedjax_pt'
  shutil.copytree(protocol.pathlib.Path(protocol.fedjax_pt.__file__).parent, package,
                  ignore=shutil.ignore_patterns('__pycache__'))
  monkeypatch.setattr(protocol.fedjax_pt, '__file__', str(package / '__init__.py'))
  protocol.code_version.cache_clear()
  same = protocol.code_version()
  (package / 'train.py').write_text((package / 'train.py').read_text() + '\n# patched\n')
  protocol.code_version.cache_clear()
  patched = protocol.code_version()
  monkeypatch.undo()
  protocol.code_version.cache_clear()
  assert same == protocol.code_version() != patched


def test_status_shows_seats_keys_nodes_and_rounds(tmp_path):
  grid = FakeGrid({100: _node(tmp_path, 0, 'client-0', KEY_A),
                   101: _node(tmp_path, 1, 'client-1', KEY_B),
                   102: _node(tmp_path, 1, 'client-1', ROGUE, where='rogue')})
  workdir = tmp_path / 'dep'
  server_app.serve(grid, fleet_test._run_config(workdir, '--config.fl.rounds=2'))
  grid.nodes[101].online = False
  out = subprocess.run([sys.executable, '-m', 'fedjax_pt.deploy.status', f'--workdir={workdir}'],
                       capture_output=True, text=True, timeout=60, check=True).stdout
  lines = out.splitlines()
  seat_a = next(line for line in lines if line.startswith('client-0'))
  assert seats.fingerprint(KEY_A) in seat_a and 'node 100' in seat_a and 'round 2' in seat_a
  assert any(line.startswith('node 102') and 'refused' in line and seats.fingerprint(ROGUE) in line
             for line in lines), out
  as_json = json.loads(subprocess.run(
      [sys.executable, '-m', 'fedjax_pt.deploy.status', f'--workdir={workdir}', '--json'],
      capture_output=True, text=True, timeout=60, check=True).stdout)
  assert as_json['seats']['client-1']['key'] == seats.fingerprint(KEY_B)
  assert as_json['seats']['client-1']['last_round'] == 2
  released = subprocess.run(
      [sys.executable, '-m', 'fedjax_pt.deploy.status', f'--workdir={workdir}',
       '--release=client-1'], capture_output=True, text=True, timeout=60, check=True)
  assert f'client-1 released (was bound to key {seats.fingerprint(KEY_B)})' in released.stdout
  assert 'client-1' not in seats.FederationState.load(str(workdir)).seats
  bad = subprocess.run([sys.executable, '-m', 'fedjax_pt.deploy.status',
                        f'--workdir={tmp_path / "nothing"}'], capture_output=True, text=True,
                       timeout=60)
  assert bad.returncode == 2 and bad.stderr.strip().count('\n') == 0
  assert 'federation.json does not exist' in bad.stderr


def test_a_corrupt_federation_file_is_one_line_and_left_alone(tmp_path):
  (tmp_path / seats.FILE).write_text('{not json')
  with pytest.raises(ValueError, match='is not a federation state file'):
    seats.FederationState.open(str(tmp_path), holds_run=True)
  assert (tmp_path / seats.FILE).read_text() == '{not json'
