"""One client on two processes (jax.distributed, 2 x 4 fake CPU devices over gloo on 127.0.0.1)
computes the run of one process with 8 devices; it resumes after SIGKILL; a dead process stops it.

The two layouts split the batch and the parameters over the same 8 devices; only the reductions
differ (gloo's all-reduce across processes sums in another order than XLA's in-process one), so
the results differ by float32 rounding, bounded as in tests/sharding_test.py: losses rtol 1e-5;
parameters by at most rounds x (1 + momentum) x outer lr x rounds x (sum of local lr in a round)
x 2.3e-5 (each round's difference, carried by the momentum into at most every later round):
2.5e-6 here, measured 1.2e-7.
Runs of the same layout are deterministic: a resumed run equals an uninterrupted one bit for bit.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fedjax_pt.configs import tiny
from fedjax_pt import errors
from fedjax_pt import launch_local
from fedjax_pt import records
from fedjax_pt import sharding
from fedjax_pt import train

ROUNDS = 3
FLAGS = ['--config=configs/tiny.py:test', '--config.opt.eps=1e-3', '--config.data.batch_size=8',
         f'--config.fl.rounds={ROUNDS}', '--config.log.tensorboard=False',
         '--config.mesh.heartbeat_timeout_s=10']
RTOL = 1e-5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300


def _config(mode):
  config = tiny.get_config('test')
  config.mode = mode
  config.opt.eps, config.data.batch_size, config.fl.rounds = 1e-3, 8, ROUNDS
  config.log.tensorboard = False
  return config


def _params_atol(config):
  local_lr = config.fl.local_steps * config.opt.lr  # an upper bound of a round's sum of lr
  return (ROUNDS * (1 + config.fl.outer_momentum) * config.fl.outer_lr * ROUNDS * local_lr *
          2.3e-5)


def _launch(workdir, *flags, processes=2):
  os.makedirs(os.path.join(workdir, 'logs'), exist_ok=True)
  procs, _ = launch_local.start([f'--workdir={workdir}', *FLAGS, *flags], processes,
                                devices_per_process=8 // processes,
                                primary_output=os.path.join(workdir, 'logs', 'process_0.out'))
  return procs


def _output(workdir, tail=3000):
  """Every process's log (the last `tail` characters of each, or all of it with tail=None)."""
  logs = os.path.join(workdir, 'logs')
  text = ''
  for name in sorted(os.listdir(logs)):
    with open(os.path.join(logs, name), encoding='utf-8', errors='replace') as f:
      lines = [l for l in f if '[Gloo]' not in l]
    kept = ''.join(l for l in lines if not l.startswith('    @'))
    text += f'--- {name}\n' + (kept if tail is None else kept[-tail:])
  return text


def _wait(procs, timeout=TIMEOUT_S):
  deadline = time.monotonic() + timeout
  for proc in procs:
    proc.wait(timeout=max(1.0, deadline - time.monotonic()))
  return [p.returncode for p in procs]


def _run(workdir, *flags):
  procs = _launch(workdir, *flags)
  try:
    codes = _wait(procs)
  finally:
    launch_local.stop(procs, grace_s=5)
  assert codes == [0, 0], _output(workdir)
  return workdir


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _val_losses(records):
  return [r['val_loss'] for r in records if 'val_loss' in r]


def _final_params(workdir):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  # Written by 2 processes' devices: read back onto this process's first device.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), item_handlers={
      'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()}) as manager:
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          manager.item_metadata(ROUNDS)['state'])
    state = manager.restore(ROUNDS, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
  return jax.device_get(state['state']['params'])


@pytest.fixture(scope='module')
def two_process_federated(tmp_path_factory):
  return _run(str(tmp_path_factory.mktemp('fed2x4')))


@pytest.mark.parametrize('mode, data', [('federated', 1), ('centralized', 1), ('federated', 2)],
                         ids=['federated-fsdp8', 'centralized-fsdp8', 'federated-data2xfsdp4'])
def test_two_processes_compute_the_one_process_run(mode, data, two_process_federated, tmp_path):
  """fsdp over 8 devices crosses the processes; with data=2 x fsdp=4 the data axis does."""
  config = _config(mode)
  config.mesh.data = data
  one = train.run(config, str(tmp_path / 'one'))  # this process: 8 devices (tests/conftest.py)
  two = (two_process_federated if (mode, data) == ('federated', 1) else
         _run(str(tmp_path / 'two'), f'--config.mode={mode}', f'--config.mesh.data={data}'))
  written = _records(two)
  # Process 0 alone wrote the records (once each); the other process logged to its own file.
  assert [r['round'] for r in written if 'val_loss' in r] == list(range(ROUNDS + 1))
  assert os.path.getsize(os.path.join(two, 'logs', 'process_1.log')) > 0
  np.testing.assert_allclose(_val_losses(written), [r.val_loss for r in one.rounds], rtol=RTOL)
  params = _final_params(two)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=_params_atol(config)),
               params, jax.device_get(one.params))


def test_sigkilled_run_resumes_to_the_uninterrupted_one(two_process_federated, tmp_path):
  workdir = str(tmp_path / 'killed')
  procs = _launch(workdir)
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while not os.path.isdir(os.path.join(workdir, 'checkpoints', '1')):
      assert all(p.poll() is None for p in procs), _output(workdir)
      assert time.monotonic() < deadline, 'no checkpoint of round 1'
      time.sleep(0.05)
    for proc in procs:
      proc.send_signal(signal.SIGKILL)
    _wait(procs, 60)
  finally:
    launch_local.stop(procs, grace_s=5)
  done = [r['round'] for r in _records(workdir) if 'val_loss' in r]
  assert max(done) < ROUNDS, f'the run finished before it was killed ({done})'
  _run(workdir)
  resumed, uninterrupted = _records(workdir), _records(two_process_federated)
  strip = lambda rs: [{k: v for k, v in r.items() if k not in records.CLOCK_KEYS} for r in rs]
  assert strip(resumed) == strip(uninterrupted)
  jax.tree.map(np.testing.assert_array_equal, _final_params(workdir),
               _final_params(two_process_federated))


def test_a_dead_process_stops_the_other_within_the_heartbeat(tmp_path):
  workdir = str(tmp_path / 'dead')
  procs = _launch(workdir, '--config.fl.rounds=1000')
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while not [r for r in (_records(workdir) if os.path.exists(
        os.path.join(workdir, 'metrics.jsonl')) else []) if r.get('round', 0) >= 1]:
      assert all(p.poll() is None for p in procs), _output(workdir)
      assert time.monotonic() < deadline, 'round 1 never finished'
      time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    code = procs[0].wait(timeout=60)  # heartbeat_timeout_s=10, then JAX stops it
    waited = time.monotonic() - killed
  finally:
    launch_local.stop(procs, grace_s=5)
  assert code != 0 and waited < 60
  # JAX's coordination service stops it, or its next collective fails first and says so.
  # Searched in the whole log: after JAX's fatal message, Python's fault handler prints ~3 kB of
  # loaded extension modules, which a tail would keep instead of the message.
  output = _output(workdir, tail=None)
  assert ('another task died' in output or
          'fedjax_pt: error: process 0: another process of this run is gone' in output), (
              _output(workdir))


def test_process_id_outside_the_processes_is_one_line(tmp_path):
  config = _config('federated')
  config.mesh.num_processes, config.mesh.process_id = 2, 2
  config.mesh.coordinator = '127.0.0.1:1234'
  with pytest.raises(ValueError, match=r'mesh.process_id=2 must be in \[0, mesh.num_processes=2\)'):
    train.run(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('mesh, message', [
    (dict(clients=2, fsdp=4), 'a multi-process mesh trains one client at a time'),
    (dict(fsdp=4), 'a multi-process mesh must use them all'),
])
def test_multi_process_meshes_that_cannot_work_are_refused(mesh, message):
  config = _config('federated').mesh
  config.update(mesh)
  with pytest.raises(ValueError, match=message):
    sharding.MeshConfig.from_config(config, mode='federated', batch_size=8, micro_batch_size=0,
                                    clients_per_round=4, num_devices=8, num_processes=2)


def test_launcher_refuses_the_keys_it_sets(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'fedjax_pt.launch_local', '--processes=2', '--',
       f'--workdir={tmp_path}', '--config.mesh.process_id=1'],
      capture_output=True, text=True, timeout=60, check=False, cwd=REPO)
  assert result.returncode == errors.EXIT_BAD_INPUT
  assert result.stderr.strip().count('\n') == 0 and 'sets mesh.num_processes' in result.stderr


def test_a_multi_process_run_without_workdir_is_refused():
  result = subprocess.run(
      [sys.executable, '-m', 'fedjax_pt.main', '--config.mesh.num_processes=2',
       '--config.mesh.coordinator=127.0.0.1:1234'],
      capture_output=True, text=True, timeout=120, check=False, cwd=REPO)
  assert result.returncode == errors.EXIT_BAD_INPUT
  assert result.stderr.strip() == ('fedjax_pt: error: mesh.num_processes=2 needs --workdir: the '
                                   'same directory (on a file system that every host sees) for '
                                   'every process')


def test_launcher_stops_the_others_when_one_dies(capsys):
  """`launch_local` names the process that died and stops the rest (here stand-in processes)."""
  alive = subprocess.Popen(['sleep', '60'])
  dead = subprocess.Popen(['sh', '-c', 'sleep 0.5; kill -9 $$'])
  try:
    start = time.monotonic()
    code = launch_local.supervise([alive, dead], 'WORKDIR', grace_s=5)
    assert time.monotonic() - start < 10
  finally:
    launch_local.stop([alive, dead], grace_s=1)
  assert code == 128 + signal.SIGKILL
  assert alive.returncode == -signal.SIGTERM
  assert (f'process 1 (pid {dead.pid}) was killed by SIGKILL; stopping the other 1 (logs: '
          'WORKDIR/logs)') in capsys.readouterr().err


def test_launcher_gives_each_process_its_devices():
  base = {'XLA_FLAGS': '--xla_cpu_foo=1 --xla_force_host_platform_device_count=8'}
  env = launch_local.process_env(1, devices_per_process=4, gpus_per_process=2, base=base)
  assert env['XLA_FLAGS'] == '--xla_cpu_foo=1 --xla_force_host_platform_device_count=4'
  assert env['CUDA_VISIBLE_DEVICES'] == '2,3'
  assert 'CUDA_VISIBLE_DEVICES' not in launch_local.process_env(0, base=base)


def test_a_broken_collective_is_told_apart_from_other_errors(monkeypatch):
  from fedjax_pt import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from fedjax_pt import distributed  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(distributed.jax, 'process_count', lambda: 2)
  try:
    try:
      raise RuntimeError('UNKNOWN: Gloo AllGather failed: Read error: Connection reset by peer')
    except RuntimeError as e:
      raise checkpoint_lib.SaveFailed('a checkpoint could not be written') from e
  except OSError as e:
    message = distributed.lost_peer(e)
  assert message.startswith('process 0: another process of this run is gone (the collective '
                            'failed: UNKNOWN: Gloo AllGather failed')
  assert distributed.lost_peer(checkpoint_lib.SaveFailed('No space left on device')) is None
