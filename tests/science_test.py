"""The tools of a careful small-scale study: warm starts, data.seed, outer warmups (tiny settings).

Outer-optimizer numbers are computed by hand in the comments; runs use configs/tiny.py:test.
"""

import fcntl
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from fedjax_pt.configs import tiny
from fedjax_pt import checkpoint as checkpoint_lib
from fedjax_pt import data as data_lib
from fedjax_pt import errors
from fedjax_pt import optimizers
from fedjax_pt import records
from fedjax_pt.federated.config import FLConfig
from fedjax_pt import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(rounds=2, **fl):
  config = tiny.get_config('test')
  config.fl.num_clients = config.fl.clients_per_round = 2
  config.fl.rounds = rounds
  config.fl.update(fl)
  config.log.tensorboard = False
  return config


def _saved_state(workdir, round_idx):
  """The raw arrays of a checkpoint's state, as nested dicts."""
  return ocp.PyTreeCheckpointer().restore(os.path.join(workdir, 'checkpoints', str(round_idx),
                                                       'state'))


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A 2-round federated run: the checkpoint the warm starts below start from."""
  workdir = tmp_path_factory.mktemp('pretrain')
  return str(workdir), train.run(_config(), str(workdir))


# --- warm start ----------------------------------------------------------------------------------

def test_warm_start_takes_the_parameters_with_a_fresh_outer_state(pretrained, tmp_path):
  source, before = pretrained
  config = _config(rounds=1)
  config.init.from_checkpoint, config.init.step = source, 6
  result = train.run(config, str(tmp_path))
  # Round 0 evaluates the loaded model: the source's last one, on the same held-out data.
  assert result.rounds[0].val_loss == pytest.approx(before.last_round.val_loss, rel=1e-6)
  # The lr schedule continues from local step 6: the step logged as s used schedule(s - 1).
  schedule = optimizers.lr_schedule(optimizers.OptConfig.from_config(config.opt))
  steps = records.read_records(str(tmp_path)).steps
  assert steps and all(s.lr == pytest.approx(float(schedule(s.step - 1 + 6)), rel=1e-6)
                       for s in steps)
  # Fresh outer Nesterov state: one step from v = 0 gives v = g and theta_1 = theta_0 - lr (1 + mu)
  # g, so the saved momentum is (theta_0 - theta_1) / (lr (1 + mu)); momentum carried over from
  # the source run would add mu v_source to it.
  lr, mu = config.fl.outer_lr, config.fl.outer_momentum
  trace = _saved_state(str(tmp_path), 1)['opt_state'][0]['trace']
  expected = jax.tree.map(lambda a, b: (np.asarray(a) - np.asarray(b)) / (lr * (1 + mu)),
                          before.params, result.params)
  for got, want in zip(jax.tree.leaves(trace), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, atol=1e-5 * float(np.abs(want).max()) + 1e-8)
  source_trace = _saved_state(source, 2)['opt_state'][0]['trace']
  assert not np.allclose(jax.tree.leaves(trace)[0], jax.tree.leaves(source_trace)[0])


def test_a_centralized_run_starts_from_a_federated_checkpoint(pretrained, tmp_path):
  source, before = pretrained
  config = _config(rounds=1)
  config.mode = 'centralized'
  config.init.from_checkpoint = os.path.join(source, 'checkpoints', '1')  # one named checkpoint
  result = train.run(config, str(tmp_path))
  first = records.read_records(source).rounds[1]
  assert result.rounds[0].val_loss == pytest.approx(first.val_loss, rel=1e-6)
  # Resuming ignores init: the run continues from its own checkpoint.
  config.fl.rounds = 2
  assert [r.round for r in train.run(config, str(tmp_path)).rounds] == [0, 1, 2]


def test_a_warm_start_of_another_model_is_refused_before_anything_is_read(pretrained, tmp_path):
  source, _ = pretrained
  config = _config()
  config.init.from_checkpoint = source
  config.model.d_model = 64
  with pytest.raises(checkpoint_lib.WarmStartError,
                     match=r'holds another model than this config \(params\.\S+ is float32\[32'):
    train.run(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'metrics.jsonl')


def test_a_warm_start_from_a_run_still_writing_is_refused(pretrained, tmp_path):
  source, _ = pretrained
  config = _config()
  config.init.from_checkpoint = source
  fd = os.open(os.path.join(source, '.lock'), os.O_RDWR)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running trainer holds it
    with pytest.raises(checkpoint_lib.WarmStartError, match='a run is still writing there'):
      train.run(config, str(tmp_path / 'run'))
  finally:
    os.close(fd)


def test_a_missing_warm_start_is_one_line_on_the_command_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'fedjax_pt.main', '--config=configs/tiny.py:test',
       f'--workdir={tmp_path / "run"}', f'--config.init.from_checkpoint={tmp_path / "nothing"}'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == errors.EXIT_BAD_INPUT
  lines = [l for l in result.stderr.splitlines() if l.startswith('fedjax_pt: error:')]
  assert lines == [f'fedjax_pt: error: init.from_checkpoint={tmp_path / "nothing"}: no such '
                   'directory (give a workdir, or its checkpoints/N)'], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr


def test_init_step_must_be_a_non_negative_integer():
  config = _config()
  config.init.step = -5
  with pytest.raises(ValueError, match='init.step must be >= 0, got -5'):
    train.run(config, '/nonexistent/never/written')


# --- data.seed -----------------------------------------------------------------------------------

def _data(seed, data_seed):
  cfg = data_lib.DataConfig(seq_len=32, batch_size=4, val_fraction=0.2, seed=data_seed)
  return data_lib.build_federated_data(cfg, num_clients=2, seed=seed)


def test_data_seed_fixes_the_held_out_documents_and_seed_still_orders_the_batches():
  fixed = [_data(seed, data_seed=0) for seed in (0, 1)]
  coupled = [_data(seed, data_seed=-1) for seed in (0, 1)]
  val = lambda d: np.concatenate(d.val_batches(64))
  first_batch = lambda d: np.asarray(next(d.client_iterator(0)))
  # data.seed fixed: one validation set for both seeds, but each seed its own batch order.
  np.testing.assert_array_equal(val(fixed[0]), val(fixed[1]))
  assert not np.array_equal(first_batch(fixed[0]), first_batch(fixed[1]))
  # -1 (the default): `seed` chooses the held-out documents too, as before data.seed existed, so
  # seed 0 is exactly what it was.
  assert not np.array_equal(val(coupled[0]), val(coupled[1]))
  np.testing.assert_array_equal(val(coupled[0]), val(fixed[0]))
  np.testing.assert_array_equal(first_batch(coupled[0]), first_batch(fixed[0]))


def test_data_seed_must_be_an_integer_from_minus_one():
  with pytest.raises(ValueError, match='data.seed must be an integer >= 0'):
    data_lib.DataConfig(seed=-2).validate()


# --- outer warmups -------------------------------------------------------------------------------

def test_warmup_ramps_linearly_to_the_value_over_r_rounds():
  # value * min(1, (t + 1) / R) with R = 4: 0.175, 0.35, 0.525, 0.7, then 0.7.
  ramp = optimizers.warmup(0.7, 4)
  np.testing.assert_allclose([float(ramp(t)) for t in range(6)],
                             [0.175, 0.35, 0.525, 0.7, 0.7, 0.7], rtol=1e-6)
  assert optimizers.warmup(0.7, 1) == 0.7 and optimizers.warmup(0.7, 0) == 0.7


def _outer_updates(tx, grads):
  state, out = tx.init(0.0), []
  for g in grads:
    update, state = tx.update(np.float32(g), state)
    out.append(-float(update))
  return out


@pytest.mark.parametrize('lr_rounds, momentum_rounds, expected', [
    # Nesterov lr 0.7, mu 0.9, pseudo-gradient 1 twice. v1 = 1, step 0.7 (1 + 0.9) = 1.33;
    # v2 = 0.9 + 1 = 1.9, step 0.7 (1 + 0.9 * 1.9) = 1.897: 3.227 in two rounds, where FedAvg
    # moves 2 (the round-2 overshoot).
    (0, 0, [1.33, 1.897]),
    # lr ramp over 2 rounds: 0.35 * 1.9 = 0.665, then 1.897.
    (2, 0, [0.665, 1.897]),
    # momentum ramp over 2 rounds: mu = 0.45, step 0.7 * 1.45 = 1.015; then mu = 0.9 on
    # v2 = 0.9 * 1 + 1 = 1.9: 1.897.
    (0, 2, [1.015, 1.897]),
    # both: 0.35 * 1.45 = 0.5075, then 1.897.
    (2, 2, [0.5075, 1.897]),
])
def test_outer_warmups_damp_the_first_nesterov_steps(lr_rounds, momentum_rounds, expected):
  tx = optimizers.outer_optimizer('nesterov', 0.7, 0.9, lr_warmup_rounds=lr_rounds,
                                  momentum_warmup_rounds=momentum_rounds)
  np.testing.assert_allclose(_outer_updates(tx, [1.0, 1.0]), expected, rtol=1e-6)


def test_without_warmups_the_outer_optimizer_and_its_state_are_unchanged():
  # Checkpoints of runs from before the warmups existed hold exactly this state.
  tx = optimizers.outer_optimizer('nesterov', 0.7, 0.9)
  plain = optax.sgd(0.7, momentum=0.9, nesterov=True)
  assert jax.tree.structure(tx.init(np.zeros(3))) == jax.tree.structure(plain.init(np.zeros(3)))


@pytest.mark.parametrize('fl, message', [
    (dict(outer_momentum=0.0, outer_momentum_warmup_rounds=2), 'ramps a momentum of 0'),
    (dict(outer_lr_warmup_rounds=-1), 'fl.outer_lr_warmup_rounds must be an integer >= 0'),
    (dict(outer_momentum_warmup_rounds=1.5), 'fl.outer_momentum_warmup_rounds must be an integer'),
])
def test_bad_warmups_name_the_key(fl, message):
  with pytest.raises(ValueError, match=message):
    FLConfig(num_clients=2, clients_per_round=2, rounds=2, local_steps=2, **fl)


def test_a_run_with_a_warmup_resumes_to_the_uninterrupted_one(tmp_path):
  """The ramp's position (the optimizer's count) is in the checkpoint: 2 rounds, then 1 more,
  equals 3 rounds at once."""
  whole = train.run(_config(rounds=3, outer_lr_warmup_rounds=3), str(tmp_path / 'whole'))
  train.run(_config(rounds=2, outer_lr_warmup_rounds=3), str(tmp_path / 'split'))
  split = train.run(_config(rounds=3, outer_lr_warmup_rounds=3), str(tmp_path / 'split'))
  for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(split.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # And the ramp did act: round 1 moved the model lr / 3 (1 + mu) |g|, a third of the step
  # without the ramp.
  first = records.read_records(str(tmp_path / 'whole')).rounds[1]
  assert first.outer_update_norm == pytest.approx(
      0.7 / 3 * 1.9 * first.pseudo_grad_norm, rel=1e-4)
