"""Checkpoints: kill-and-resume is bit-identical, bad checkpoints fall back, workdirs are protected.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from fedjax_pt.configs import tiny
from fedjax_pt import checkpoint as checkpoint_lib
from fedjax_pt import errors
from fedjax_pt import optimizers
from fedjax_pt import records
from fedjax_pt import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = 4
FLAGS = ['--config=configs/tiny.py:test', '--config.fl.num_clients=2',
         '--config.fl.clients_per_round=2', '--config.log.every_steps=1',
         # Kept Adam moments make the per-client optimizer state part of what must be restored.
         '--config.fl.reset_optimizer=False']
TIMING = records.CLOCK_KEYS


def _config(**fl):
  config = tiny.get_config('test')
  config.fl.num_clients = config.fl.clients_per_round = 2
  config.fl.rounds = 3
  config.fl.update(fl)
  return config


# Clients that carry their own model (fragments, mixing) and error-feedback residuals across
# rounds: both must come back from the checkpoint.
STREAMING = ['--config.fl.fragments=3', '--config.fl.fragment_mixing=0.5',
             '--config.fl.compression.upload=int4', '--config.fl.compression.download=int8',
             '--config.fl.compression.error_feedback=True']


def _command(workdir, extra=()):
  return [sys.executable, '-m', 'fedjax_pt.main', f'--workdir={workdir}', *FLAGS,
          f'--config.fl.rounds={ROUNDS}', *extra]


def _json_records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.endswith('\n')]


def _comparable_records(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in _json_records(workdir)]


def _final_params(workdir, rounds):
  """The saved global parameters after `rounds`, restored without a template (plain arrays)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                             item_names=('state', 'meta')) as manager:
    return manager.restore(rounds, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))['state']['params']


def _assert_bit_identical(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  subprocess.run(_command(workdir), cwd=REPO, check=True, capture_output=True, timeout=600)
  return workdir


def _kill_when(workdir, condition, timeout=300, extra=()):
  process = subprocess.Popen(_command(workdir, extra), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + timeout
  path = os.path.join(workdir, 'metrics.jsonl')
  while time.time() < deadline and process.poll() is None:
    if os.path.exists(path) and condition(_json_records(workdir)):
      process.send_signal(signal.SIGKILL)
      break
    time.sleep(0.02)
  process.wait()
  assert process.returncode == -signal.SIGKILL, 'the run ended before it could be killed'


@pytest.mark.parametrize('when, condition', [
    # Right after round 3's record: its checkpoint is being written (asynchronously) then, while
    # an earlier one is complete.
    ('during_save', lambda records: any(r['kind'] == 'round' and r['round'] == 3
                                        for r in records)),
    # In the middle of round 3's local steps, well after round 2's checkpoint.
    ('mid_round', lambda records: any(r['kind'] == 'step' and r['round'] == 3 and
                                      r['client'] == 1 for r in records)),
])
def test_sigkill_and_resume_is_bit_identical(uninterrupted, tmp_path, when, condition):
  del when
  _kill_when(tmp_path, condition)
  resumed = subprocess.run(_command(tmp_path), cwd=REPO, capture_output=True, text=True,
                           timeout=600, check=False)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resuming' in resumed.stderr
  _assert_bit_identical(_final_params(tmp_path, ROUNDS), _final_params(uninterrupted, ROUNDS))
  assert _comparable_records(tmp_path) == _comparable_records(uninterrupted)


def test_sigkill_and_resume_is_bit_identical_with_fragments_and_error_feedback(tmp_path):
  reference = tmp_path / 'reference'
  subprocess.run(_command(reference, STREAMING), cwd=REPO, check=True, capture_output=True,
                 timeout=600)
  # In round 3's first segment: the checkpoint of round 2 holds the clients' models, residuals
  # and Adam states.
  _kill_when(tmp_path / 'run', lambda records: any(
      r['kind'] == 'step' and r['round'] == 3 and r['client'] == 1 for r in records),
             extra=STREAMING)
  resumed = subprocess.run(_command(tmp_path / 'run', STREAMING), cwd=REPO, capture_output=True,
                           text=True, timeout=600, check=False)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resuming' in resumed.stderr
  _assert_bit_identical(_final_params(tmp_path / 'run', ROUNDS), _final_params(reference, ROUNDS))
  assert _comparable_records(tmp_path / 'run') == _comparable_records(reference)
  with open(tmp_path / 'run' / 'checkpoints' / str(ROUNDS) / 'meta' / 'metadata',
            encoding='utf-8') as f:
    memory = json.load(f)['clients']['memory']
  assert {k: m['parts'] for k, m in memory.items()} == {
      k: ['opt_state', 'residual', 'model', 'anchor'] for k in ('0', '1')}


# fl.quorum=1 with client 1 2.5x slower than client 0 (tests/quorum_test.py): client 1's update
# of round 1 is still in flight in round 2's checkpoint, and lands in round 3.
QUORUM = ['--config.fl.quorum=1',
          '--config.fl.profiles=[{"tokens_per_s": 400}, {"tokens_per_s": 160}]']


def test_sigkill_and_resume_is_bit_identical_with_an_update_in_flight(tmp_path):
  reference = tmp_path / 'reference'
  subprocess.run(_command(reference, QUORUM), cwd=REPO, check=True, capture_output=True,
                 timeout=600)
  _kill_when(tmp_path / 'run', lambda records: any(
      r['kind'] == 'step' and r['round'] == 3 for r in records), extra=QUORUM)
  with open(tmp_path / 'run' / 'checkpoints' / '2' / 'meta' / 'metadata', encoding='utf-8') as f:
    pending = json.load(f)['server']['pending']
  assert [(u['client'], u['born']) for u in pending] == [(1, 1)]
  resumed = subprocess.run(_command(tmp_path / 'run', QUORUM), cwd=REPO, capture_output=True,
                           text=True, timeout=600, check=False)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resuming' in resumed.stderr
  _assert_bit_identical(_final_params(tmp_path / 'run', ROUNDS), _final_params(reference, ROUNDS))
  records_ = _comparable_records(tmp_path / 'run')
  assert records_ == _comparable_records(reference)
  assert [r.get('stale_clients') for r in records_ if r['kind'] == 'round'][1:] == [
      {}, {}, {'1': 2}, {'0': 1}]


def _as_layout_1(workdir, round_idx):
  """Rewrites the checkpoint of `round_idx` as fedjax_pt wrote checkpoints before the clients
  owned their state (layout 1): their arrays in one flat dict 'kept' ('3' its Adam state,
  'residual_3', 'model_3'; no anchor), who kept what and the data positions in the meta."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, 'checkpoints')
  with ocp.CheckpointManager(directory, item_names=('state', 'meta')) as manager:
    saved = manager.restore(round_idx, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  state, meta = dict(saved['state']), dict(saved['meta'])
  memory = state.pop('clients')
  kept, carried = {}, {}
  for k, parts in memory.items():
    for name, value in parts.items():
      if name == 'opt_state':
        kept[k] = value
      elif name != 'anchor':
        kept[f'{name}_{k}'] = value
        carried.setdefault(name, []).append(int(k))
  if 'step' not in state:  # the centralized learner's state had no 'kept'
    state['kept'] = kept
  old_meta = {'round': round_idx, 'totals': meta['totals'],
              'iterators': meta['clients']['iterators'],
              'kept_clients': sorted(int(k) for k, parts in memory.items() if 'opt_state' in parts),
              'metrics_bytes': meta['metrics_bytes'], 'carried': carried}
  shutil.rmtree(os.path.join(directory, str(round_idx)))
  with ocp.CheckpointManager(directory, item_names=('state', 'meta')) as manager:
    manager.save(round_idx, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(old_meta)))
  return old_meta


@pytest.mark.parametrize('mode', ['federated', 'centralized'])
def test_a_checkpoint_of_the_previous_layout_resumes_exactly(tmp_path, mode):
  """A run stopped after round 2 whose checkpoint has layout 1, resumed: bit for bit the
  uninterrupted run (with every kind of client state: Adam states, residuals, own models)."""
  extra = {'mode': mode}
  if mode == 'federated':
    extra = {'fl.fragments': 3, 'fl.fragment_mixing': 0.5, 'fl.compression.upload': 'int4',
             'fl.compression.download': 'int8', 'fl.compression.error_feedback': True}
  config = _config(reset_optimizer=False, rounds=2)
  for key, value in extra.items():
    config.update_from_flattened_dict({key: value})
  train.run(config, str(tmp_path / 'run'))
  old_meta = _as_layout_1(tmp_path / 'run', 2)
  if mode == 'federated':
    assert old_meta['kept_clients'] == [0, 1] and old_meta['carried'] == {
        'residual': [0, 1], 'model': [0, 1]}
  config.fl.rounds = 3
  resumed = train.run(config, str(tmp_path / 'run'))
  reference = train.run(config, str(tmp_path / 'reference'))
  _assert_bit_identical(resumed.params, reference.params)
  assert _comparable_records(tmp_path / 'run') == _comparable_records(tmp_path / 'reference')


def test_muon_trains_and_its_kept_states_resume_exactly(tmp_path):
  """opt.optimizer='muon' with fl.reset_optimizer=False: the clients' Muon momenta and AdamW
  moments (a partitioned state, unlike Adam's) come back from the checkpoint of round 2."""
  config = _config(reset_optimizer=False, rounds=2)
  config.opt.optimizer = 'muon'
  train.run(config, str(tmp_path / 'run'))
  config.fl.rounds = 3
  resumed = train.run(config, str(tmp_path / 'run'))
  reference = train.run(config, str(tmp_path / 'reference'))
  _assert_bit_identical(resumed.params, reference.params)
  assert _comparable_records(tmp_path / 'run') == _comparable_records(tmp_path / 'reference')
  val = [r['val_loss'] for r in _json_records(tmp_path / 'reference') if r['kind'] == 'round']
  assert len(val) == 4 and val[3] < val[1] < val[0], val


FIXTURES = os.path.join(REPO, 'tests', 'fixtures', 'checkpoint_v1')


def _fixture_config(mode):
  """The config of tests/fixtures/checkpoint_v1/<mode> (see its README)."""
  config = _config(reset_optimizer=False, rounds=3)
  config.model.d_model, config.model.num_layers, config.model.num_heads = 16, 1, 2
  config.log.every_steps, config.log.tensorboard, config.ckpt.keep = 1, False, 1
  config.mode = mode
  if mode == 'federated':
    config.fl.fragments, config.fl.fragment_mixing = 3, 0.5
    config.fl.compression.update(upload='int4', download='int8', error_feedback=True)
  return config


_EXACT = ('kind', 'round', 'client', 'step', 'local_step', 'tokens', 'bytes_sent',
          'bytes_received', 'clients', 'client_local_steps', 'client_download_bytes',
          'client_upload_bytes', 'failed_clients', 'num_aggregated')


@pytest.mark.parametrize('mode', ['federated', 'centralized'])
def test_a_checkpoint_written_by_the_previous_version_resumes(tmp_path, mode):
  """tests/fixtures/checkpoint_v1: runs that fedjax_pt wrote with layout 1, stopped after
  round 2. Resumed here, the run continues from exactly the arrays and data positions they saved,
  and round 3 counts the same tokens, steps and bytes as that version's uninterrupted run. (Its
  losses are not compared: they were computed on another CPU, whose float arithmetic may differ
  in the last bits; the exact resume is the test above.)"""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  shutil.copytree(os.path.join(FIXTURES, mode), tmp_path / 'run')
  with ocp.CheckpointManager(tmp_path / 'run' / 'checkpoints', item_names=('state',)) as manager:
    saved = manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  config = _fixture_config(mode)
  config.fl.rounds = 2  # restores the checkpoint of round 2 and trains nothing more
  restored = train.run(config, str(tmp_path / 'run'))
  _assert_bit_identical(restored.params, saved['params'])
  resumed = train.run(_fixture_config(mode), str(tmp_path / 'run'))
  assert [r.round for r in resumed.rounds] == [0, 1, 2, 3]
  with open(os.path.join(FIXTURES, f'{mode}-uninterrupted.jsonl'), encoding='utf-8') as f:
    then = [{k: v for k, v in json.loads(line).items() if k in _EXACT} for line in f]
  now = [{k: v for k, v in r.items() if k in _EXACT} for r in _json_records(tmp_path / 'run')]
  assert now == then


def test_a_workdir_of_an_older_version_resumes(tmp_path):
  """A config.json from before a key existed lacks it: the key's default is what that run did."""
  train.run(_config(), str(tmp_path))
  with open(tmp_path / 'config.json', encoding='utf-8') as f:
    saved = json.load(f)
  for key in ('compression', 'fragments', 'fragment_mixing', 'outer_lr_warmup_rounds',
              'outer_momentum_warmup_rounds'):
    del saved['fl'][key]
  del saved['data']['seed'], saved['init']  # data.seed = -1 and no warm start: what it did
  with open(tmp_path / 'config.json', 'w', encoding='utf-8') as f:
    json.dump(saved, f)
  longer = train.run(_config(rounds=4), str(tmp_path))
  assert [r.round for r in longer.rounds] == [0, 1, 2, 3, 4]
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  with pytest.raises(errors.WorkdirRefused, match=r'fl.fragments: 1 -> 2'):
    train.run(_config(rounds=5, fragments=2, local_steps=4), str(tmp_path))


def _largest_file(directory):
  files = [os.path.join(root, f) for root, _, names in os.walk(directory) for f in names]
  return max(files, key=os.path.getsize)


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path):
  config = _config()
  reference = train.run(_config(), str(tmp_path / 'reference')).params
  train.run(config, str(tmp_path / 'run'))
  victim = _largest_file(tmp_path / 'run' / 'checkpoints' / '3' / 'state')
  with open(victim, 'r+b') as f:
    f.truncate(os.path.getsize(victim) // 2)
  resumed = train.run(config, str(tmp_path / 'run'))  # falls back to round 2, redoes round 3
  _assert_bit_identical(resumed.params, reference)
  assert os.path.isdir(tmp_path / 'run' / 'corrupted-checkpoint-3')
  assert sorted(os.listdir(tmp_path / 'run' / 'checkpoints')) == ['1', '2', '3']
  assert [r.round for r in resumed.rounds] == [0, 1, 2, 3]


def test_a_finished_run_resumes_to_nothing_and_can_be_extended(tmp_path):
  train.run(_config(), str(tmp_path))
  again = train.run(_config(), str(tmp_path))
  assert [r.round for r in again.rounds] == [0, 1, 2, 3]
  longer = train.run(_config(rounds=4), str(tmp_path))
  assert [r.round for r in longer.rounds] == [0, 1, 2, 3, 4]
  rounds = [r['round'] for r in _json_records(tmp_path) if r['kind'] == 'round']
  assert rounds == [0, 1, 2, 3, 4]


def test_restore_false_refuses_to_overwrite(tmp_path):
  train.run(_config(rounds=1), str(tmp_path))
  config = _config(rounds=1)
  config.ckpt.restore = False
  with pytest.raises(errors.WorkdirRefused, match='ckpt.restore=False refuses to overwrite'):
    train.run(config, str(tmp_path))


def test_resuming_a_different_experiment_is_refused(tmp_path):
  train.run(_config(rounds=1), str(tmp_path))
  with pytest.raises(ValueError, match=r"fl.outer_lr: 0.7 -> 0.1"):
    train.run(_config(rounds=2, outer_lr=0.1), str(tmp_path))
  before = (tmp_path / 'metrics.jsonl').read_bytes()
  assert before and json.loads(before.splitlines()[-1])['round'] == 1


def test_metrics_without_checkpoint_are_kept_aside(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"kind": "round", "round": 9}\n')
  train.run(_config(rounds=1), str(tmp_path))
  assert (tmp_path / 'metrics.jsonl.stale-1').read_text() == '{"kind": "round", "round": 9}\n'


def test_checkpoint_config_errors():
  with pytest.raises(ValueError, match='ckpt.keep must be positive'):
    checkpoint_lib.CheckpointConfig(keep=0)


def test_resume_allocates_no_adam_state_to_learn_its_shape(tmp_path, monkeypatch):
  """Kept Adam states are restored into shapes from jax.eval_shape: at 1.3B parameters a real
  template would cost two more copies of the model. Here every Adam init must be traced (jit or
  eval_shape), never run eagerly on concrete parameters."""
  train.run(_config(rounds=2, reset_optimizer=False), str(tmp_path))
  real_local_optimizer = optimizers.local_optimizer

  def traced_only(cfg):
    tx = real_local_optimizer(cfg)

    def init(params):
      if any(not isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(params)):
        raise AssertionError('an Adam state was allocated eagerly')
      return tx.init(params)

    return optax.GradientTransformation(init, tx.update)

  monkeypatch.setattr(optimizers, 'local_optimizer', traced_only)
  resumed = train.run(_config(rounds=3, reset_optimizer=False), str(tmp_path))
  assert [r.round for r in resumed.rounds] == [0, 1, 2, 3]
  assert not list(tmp_path.glob('corrupted-checkpoint-*'))  # resumed, not started over


def _tensorboard_points(directory):
  """{tag: [steps]} as TensorBoard shows a run directory: files in order, and a SessionLog START
  at step s (what a resumed writer's purge_step writes) drops the points at steps >= s before it."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  points = {}
  for name in sorted(f for f in os.listdir(directory) if f.startswith('events.')):
    with open(os.path.join(directory, name), 'rb') as f:
      data = f.read()
    offset = 0
    while offset < len(data):  # TFRecord: length (8 bytes), crc (4), payload, crc (4)
      length = int.from_bytes(data[offset:offset + 8], 'little')
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 16 + length
      if event.HasField('session_log') and event.session_log.status == event.session_log.START:
        points = {tag: [s for s in steps if s < event.step] for tag, steps in points.items()}
      for value in event.summary.value:
        points.setdefault(value.tag, []).append(event.step)
  return points


def test_tensorboard_has_no_duplicate_points_after_a_resume(uninterrupted, tmp_path):
  _kill_when(tmp_path, lambda records: any(r['kind'] == 'round' and r['round'] == 3
                                           for r in records))
  resumed = subprocess.run(_command(tmp_path), cwd=REPO, capture_output=True, text=True,
                           timeout=600, check=False)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  rounds = _tensorboard_points(tmp_path / 'tensorboard')
  assert rounds['val_loss'] == [0, 1, 2, 3, 4]
  assert rounds == _tensorboard_points(uninterrupted / 'tensorboard')
  steps = _tensorboard_points(tmp_path / 'tensorboard' / 'steps')
  assert steps['step/loss/client_0'] == list(range(1, ROUNDS * 3 + 1))


class _Stopped(Exception):
  pass


def test_a_signal_during_a_save_is_delivered_when_the_save_call_returns():
  """A KeyboardInterrupt inside orbax's save left its commit thread waiting and the interrupted
  run hanging at exit: the signal must wait until the save call has returned."""
  def stop(signum, frame):
    raise _Stopped(signum)

  previous = signal.signal(signal.SIGTERM, stop)
  try:
    finished = []
    with pytest.raises(_Stopped):
      with checkpoint_lib._interrupts_deferred():  # pylint: disable=protected-access
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the signal has arrived: it would have been raised by now
        finished.append(True)
    assert finished == [True]
    assert signal.getsignal(signal.SIGTERM) is stop  # the handler is back
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_a_storage_error_names_its_os_cause_first(tmp_path, monkeypatch):
  """Tensorstore reports a full disk as a long message whose cause is only a trailing
  `[os_error_code='28']` after kilobytes of specs (seen in CI on a 1 MB tmpfs): the one-line error
  must still say "No space left on device", whatever the shortening cuts."""
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), checkpoint_lib.CheckpointConfig())
  spec = 'x' * 3000
  tensorstore_error = ValueError(
      f'Error writing local file "{tmp_path}/checkpoints/3.orbax-checkpoint-tmp/state/d/0a1b": '
      f"[tensorstore_spec='{spec}'] [os_error_code='28']")

  def refuse(*args, **kwargs):
    raise tensorstore_error
  monkeypatch.setattr(checkpointer._manager, 'save', refuse)
  with pytest.raises(checkpoint_lib.SaveFailed) as failure:
    checkpointer.save(3, {'w': np.zeros(2)}, {'round': 3})
  line = str(failure.value)
  assert '\n' not in line and len(line) < 600
  assert f'({os.strerror(28)}: ValueError: Error writing' in line  # "No space left on device"
  assert 'the last complete checkpoint is none' in line
  # An error that carries no OS code is reported as it is, with no invented cause.
  assert checkpoint_lib._os_cause(ValueError('bad spec')) == ''
  assert checkpoint_lib._os_cause(OSError(28, 'x')) == f'{os.strerror(28)}: '


def _rewrite_state(checkpoint, change):
  """Writes the arrays of `checkpoint` (a checkpoints/N directory) again, changed by `change`,
  leaving its meta as it was: what a flipped byte that the compressor still decodes does."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.restore(checkpoint / 'state')
    checkpointer.save(checkpoint / 'rewritten', change(tree))
    checkpointer.wait_until_finished()
  shutil.rmtree(checkpoint / 'state')
  os.rename(checkpoint / 'rewritten', checkpoint / 'state')


def _nudged(tree):
  """One value of the embedding moved by one ulp."""
  embedding = np.array(tree['params']['wte']['embedding'])
  embedding[3, 5] = np.nextafter(embedding[3, 5], np.float32(1))
  tree['params']['wte']['embedding'] = embedding
  return tree


def test_a_checkpoint_whose_values_changed_is_set_aside_and_the_run_falls_back(tmp_path, caplog):
  """Every array's fingerprint is in the checkpoint's meta: values that read back fine but differ
  from what was saved are corruption. The resume names the array, moves the checkpoint aside and
  continues from the previous one: bit for bit the uninterrupted run."""
  reference = train.run(_config(), str(tmp_path / 'reference'))
  train.run(_config(), str(tmp_path / 'run'))
  _rewrite_state(tmp_path / 'run' / 'checkpoints' / '3', _nudged)
  resumed = train.run(_config(), str(tmp_path / 'run'))
  _assert_bit_identical(resumed.params, reference.params)
  assert (tmp_path / 'run' / 'corrupted-checkpoint-3').is_dir()
  assert 'params.wte.embedding does not hold the values that were saved' in caplog.text


def test_a_warm_start_from_a_changed_checkpoint_is_one_line(tmp_path):
  train.run(_config(rounds=1), str(tmp_path / 'pre'))
  _rewrite_state(tmp_path / 'pre' / 'checkpoints' / '1', _nudged)
  config = _config(rounds=1)
  config.init.from_checkpoint = str(tmp_path / 'pre')
  with pytest.raises(checkpoint_lib.WarmStartError,
                     match=r'init.from_checkpoint: .*/pre/checkpoints/1 params.wte.embedding does '
                           r'not hold the values that were saved'):
    train.run(config, str(tmp_path / 'warm'))
