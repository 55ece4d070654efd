"""No silent failure: a run that says "done" succeeded, every failure is one line with its own exit
code, one writer per workdir, and nothing already saved is lost or taken for corrupt."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fedjax_pt.configs import tiny
from fedjax_pt import errors
from fedjax_pt import records
from fedjax_pt import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_CONFIG = '--config=configs/tiny.py:test'


def _main(workdir, *flags, timeout=300):
  return subprocess.run([sys.executable, '-m', 'fedjax_pt.main', f'--workdir={workdir}', *flags],
                        cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


def _one_error_line(result):
  """The run's single error line (and that it printed no traceback)."""
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors_ = [l for l in result.stderr.splitlines() if l.startswith('fedjax_pt: error:')]
  assert len(errors_) == 1, result.stderr[-3000:]
  return errors_[0]


def _start(workdir, *flags):
  return subprocess.Popen([sys.executable, '-m', 'fedjax_pt.main', f'--workdir={workdir}',
                           TEST_CONFIG, *flags], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_round(workdir, round_idx, process, timeout=240):
  """Waits until metrics.jsonl holds round `round_idx`'s record (or a step of it, if negative)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + timeout
  while time.time() < deadline and process.poll() is None:
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        lines = [json.loads(l) for l in f if l.endswith('\n')]
      if any(l['kind'] == 'round' and l['round'] == round_idx for l in lines):
        return
    time.sleep(0.05)
  raise AssertionError(f'round {round_idx} was not logged in time (exit {process.poll()})')


def _stop(process):
  if process.poll() is None:
    process.kill()
  process.communicate(timeout=60)


def test_divergence_is_a_failure_not_done(tmp_path):
  result = _main(tmp_path, TEST_CONFIG, '--config.mode=centralized', '--config.opt.lr=1e30')
  assert result.returncode == errors.EXIT_TRAINING_FAILED
  line = _one_error_line(result)
  assert 'the global model is not finite after round 1: training diverged' in line
  assert 'done:' not in result.stdout
  rounds = records.read_records(str(tmp_path)).rounds
  assert rounds[-1].round == 1 and rounds[-1].val_loss != rounds[-1].val_loss  # NaN, not None
  assert not os.path.isdir(tmp_path / 'checkpoints' / '1')  # the NaN model is not saved


@pytest.mark.parametrize('mode, flags', [
    # Parameters near 1e25: finite, but their norm overflows float32 and the loss is NaN.
    ('federated', ('--config.fl.outer_lr=1e25', '--config.fl.outer_momentum=0')),
    # One Adam step moves every value by about lr: 1e20, finite, but its square overflows.
    ('centralized', ('--config.opt.lr=1e20', '--config.opt.warmup_steps=0',
                     '--config.fl.local_steps=1')),
])
def test_a_destroyed_model_with_finite_parameters_is_a_failure(tmp_path, mode, flags):
  result = _main(tmp_path, TEST_CONFIG, f'--config.mode={mode}', '--config.fl.rounds=1', *flags)
  assert result.returncode == errors.EXIT_TRAINING_FAILED, result.stderr[-2000:]
  line = _one_error_line(result)
  assert "the global model's" in line and 'after round 1: training diverged' in line, line
  assert 'done:' not in result.stdout
  assert not os.path.isdir(tmp_path / 'checkpoints' / '1')


def test_a_run_whose_every_round_is_skipped_is_a_failure(tmp_path):
  result = _main(tmp_path, TEST_CONFIG, '--config.fl.round_timeout_s=0.001',
                 '--config.fl.on_too_few_clients=skip')
  assert result.returncode == errors.EXIT_TRAINING_FAILED
  assert 'no round aggregated a client update: all 2 rounds were skipped' in _one_error_line(
      result)


def test_a_second_writer_is_refused_and_the_lock_dies_with_its_holder(tmp_path):
  first = _start(tmp_path, '--config.fl.rounds=40')
  try:
    _wait_for_round(tmp_path, 1, first)
    second = _main(tmp_path, TEST_CONFIG, '--config.fl.rounds=40')
    assert second.returncode == errors.EXIT_WORKDIR_BUSY
    assert f'is in use by another run (pid {first.pid} on ' in _one_error_line(second)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    # The operating system released the lock of the killed run: the same command resumes.
    third = _main(tmp_path, TEST_CONFIG, '--config.fl.rounds=40')
    assert third.returncode == 0 and 'resuming' in third.stderr, third.stderr[-3000:]
    rounds = [r.round for r in records.read_records(str(tmp_path)).rounds]
    assert rounds == list(range(41))
  finally:
    _stop(first)


def test_ctrl_c_stops_with_one_line_and_the_same_command_resumes(tmp_path):
  process = _start(tmp_path, '--config.fl.rounds=40')
  try:
    _wait_for_round(tmp_path, 2, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
  finally:
    _stop(process)
  assert process.returncode == errors.EXIT_INTERRUPTED, stderr[-3000:]
  assert 'Traceback' not in stderr
  last = stderr.strip().splitlines()[-1]
  assert last.startswith('fedjax_pt: error: interrupted at round ')
  assert 're-run the same command to resume (from the checkpoint of round' in last
  resumed = _main(tmp_path, TEST_CONFIG, '--config.fl.rounds=4')
  assert resumed.returncode == 0 and 'resuming' in resumed.stderr, resumed.stderr[-3000:]


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_while_stopping_is_noted_and_the_stop_completes(tmp_path, signum):
  """A user (or a scheduler) signals twice: the second arrives while the run saves and closes.
  It is one line, the run still ends with its own line and exit 130, and resumes."""
  process = _start(tmp_path, '--config.fl.rounds=40')
  try:
    _wait_for_round(tmp_path, 2, process)
    process.send_signal(signum)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
  finally:
    _stop(process)
  assert process.returncode == errors.EXIT_INTERRUPTED, stderr[-3000:]
  assert 'Traceback' not in stderr and 'Exception ignored' not in stderr, stderr[-3000:]
  assert stderr.strip().splitlines()[-1].startswith('fedjax_pt: error: interrupted at round ')
  resumed = _main(tmp_path, TEST_CONFIG, '--config.fl.rounds=4')
  assert resumed.returncode == 0 and 'resuming' in resumed.stderr, resumed.stderr[-3000:]


def test_a_stop_request_whose_interrupt_was_swallowed_still_stops_at_the_next_round(tmp_path):
  """A KeyboardInterrupt raised inside a finalizer (Python prints "Exception ignored" and goes
  on) or caught by a library is lost; main's handler also sets STOP_REQUESTED, which the run
  loop checks at every round boundary."""
  errors.STOP_REQUESTED.set()
  try:
    with pytest.raises(errors.Interrupted, match='interrupted at round 1; re-run the same'):
      train.run(tiny.get_config('test'), str(tmp_path))
  finally:
    errors.STOP_REQUESTED.clear()
  assert [r.round for r in records.read_records(str(tmp_path)).rounds] == [0]


@pytest.mark.parametrize('workdir, message', [
    ('{file}/run', 'is not usable: Not a directory'),
    ('/sys/fs/fedjax_pt_test', 'is not usable:'),  # nobody, not even root, may write here
])
def test_an_unusable_workdir_is_one_line(tmp_path, workdir, message):
  (tmp_path / 'file').write_text('')
  result = _main(workdir.format(file=tmp_path / 'file'), TEST_CONFIG)
  assert result.returncode == errors.EXIT_BAD_INPUT
  assert message in _one_error_line(result)


def test_a_run_that_cannot_fit_is_refused_in_seconds():
  start = time.perf_counter()
  result = _main('/nonexistent/run', '--config=configs/125m.py', '--config.data.path=x.jsonl')
  assert result.returncode == errors.EXIT_BAD_INPUT
  assert 'this run needs at least' in _one_error_line(result)
  assert time.perf_counter() - start < 60  # start-up only: no data read, nothing compiled


def test_running_out_of_memory_after_the_estimate_is_one_line(tmp_path):
  """An out-of-memory error that the up-front estimate let through (here a real XLA allocation
  of 4 TiB where training would start) ends with one line and exit 4, not XLA's pages."""
  script = ('import jax.numpy as jnp\n'
            'from absl import app\n'
            'from fedjax_pt import main, train\n'
            'def run(config, workdir):\n'
            '  jnp.ones((2**40,), jnp.float32).block_until_ready()\n'
            'train.run = run\n'
            'app.run(main.main, flags_parser=main._parse_flags)\n')
  result = subprocess.run([sys.executable, '-c', script, f'--workdir={tmp_path}', TEST_CONFIG],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == errors.EXIT_TRAINING_FAILED, result.stderr[-3000:]
  line = _one_error_line(result)
  assert 'out of memory while training: RESOURCE_EXHAUSTED' in line
  assert '4398046511104 bytes' in line and 'data.micro_batch_size' in line


def test_dry_run_prints_the_plan_and_exits(tmp_path):
  result = _main(tmp_path / 'run', '--config=configs/125m.py', '--config.dry_run=True')
  assert result.returncode == 0, result.stderr[-2000:]
  assert '125,209,344 parameters' in result.stdout and 'fits: no;' in result.stdout
  assert not (tmp_path / 'run').exists()


def test_help_exits_zero():
  result = subprocess.run([sys.executable, '-m', 'fedjax_pt.main', '--help'], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0 and '--workdir' in result.stdout and 'Exit codes' in result.stdout


def test_a_checkpoint_of_another_config_is_refused_not_renamed(tmp_path):
  assert _main(tmp_path, TEST_CONFIG).returncode == 0
  os.remove(tmp_path / 'config.json')  # nothing but the checkpoint itself says what it holds
  result = _main(tmp_path, TEST_CONFIG, '--config.model.d_model=64')
  assert result.returncode == errors.EXIT_WORKDIR_REFUSED
  line = _one_error_line(result)
  assert 'the checkpoint of round 2' in line and 'does not match this config' in line
  assert ('params.block_0.attn.out_proj.kernel is float32[32, 32] there, float32[64, 64] here'
          in line)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']
  assert not [d for d in os.listdir(tmp_path) if d.startswith('corrupted')]


def test_logs_are_quiet(tmp_path):
  result = _main(tmp_path, TEST_CONFIG, '--config.fl.rounds=1')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'Unable to initialize backend' not in result.stderr
  assert 'orbax' not in result.stderr


def _mount_tmpfs(path, size):
  os.makedirs(path)
  return subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                        capture_output=True, check=False).returncode == 0


def test_a_full_disk_stops_at_the_failed_save_and_keeps_the_last_good_checkpoint(tmp_path):
  """On a 1 MB filesystem two checkpoints (380 kB each) fit and the third does not: the run stops
  there with one line, and the complete checkpoints are intact."""
  disk = tmp_path / 'disk'
  if not _mount_tmpfs(disk, '1m'):
    pytest.skip('mounting a tmpfs needs privileges this machine does not give')
  try:
    result = _main(disk / 'run', TEST_CONFIG, '--config.fl.rounds=20', '--config.ckpt.keep=20',
                   '--config.log.tensorboard=False')
    assert result.returncode == errors.EXIT_BAD_INPUT, result.stderr[-3000:]
    line = _one_error_line(result)
    # Whichever file the disk refused first names itself: a checkpoint, or metrics.jsonl.
    assert 'No space left' in line
    assert 'a checkpoint could not be written' in line or 'metrics.jsonl could not be' in line
    saved = sorted(int(d) for d in os.listdir(disk / 'run' / 'checkpoints') if d.isdigit())
    assert saved
    if 'a checkpoint' in line:
      assert f'the last complete checkpoint is round {saved[-1]}' in line
    rounds = [r.round for r in records.read_records(str(disk / 'run')).rounds]
    assert rounds[-1] <= saved[-1] + 1  # it did not train on past the failed save
    # The failed save's partial files are gone: their space is what the user needs back.
    assert not [d for d in os.listdir(disk / 'run' / 'checkpoints') if 'tmp' in d]
  finally:
    subprocess.run(['umount', '-l', str(disk)], check=False)
