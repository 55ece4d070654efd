"""Local training: one compilation for all clients, gradient accumulation, remat, learning.

Gradient accumulation and remat compute the same gradients with float32 sums in another order,
so the runs they are compared with differ by rounding, which Adam amplifies: its update
m / (sqrt(v) + eps) moves by up to dg / eps for a gradient difference dg. With the default
eps = 1e-8 a coordinate whose gradient is ~0 can move by +-lr in either run, whatever the ISA
(this is what made a sharding test fail on AMD hosts only), so the comparisons use eps = 1e-3
(`OPT_EXACT`), as tests/sharding_test.py does. Reordered float32 sums change a gradient by a
few ulps of its largest terms: here max |g| = 0.064 (ulp 7.5e-9) and accumulation moved
gradients by at most 2.0e-8 = 2.7 ulps (measured with AVX-512 and with --xla_cpu_max_isa=AVX2;
remat gave bit-identical gradients). Allowing 16 ulps (1.2e-7), three steps at learning rates 0,
5e-3 and 1e-2 move the parameters apart by at most 1.5e-2 x 1.2e-7 / 1e-3 = 1.8e-6: ATOL 2e-6
(measured 1.9e-8). Losses are means of 128 float32 terms: RTOL 1e-5. A wrong accumulation (a sum
in place of a mean, a dropped micro-batch) or a remat that changes the function moves losses and
updates by O(1e-3) and more, far beyond both.
"""

import dataclasses
import itertools

import jax
import numpy as np
import pytest

from fedjax_pt import local_training
from fedjax_pt import model as model_lib
from fedjax_pt import optimizers

MODEL = model_lib.ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, mlp_ratio=4,
                              max_seq_len=16)
OPT = optimizers.OptConfig(lr=1e-2, warmup_steps=2, schedule_steps=40)
OPT_EXACT = dataclasses.replace(OPT, eps=1e-3)  # bounds Adam's amplification (module docstring)
RTOL, ATOL = 1e-5, 2e-6


def _batches(seed, batch_size=8):
  rng = np.random.default_rng(seed)
  while True:
    yield rng.integers(0, 64, size=(batch_size, 17), dtype=np.int32)


def _params():
  return model_lib.init_params(MODEL, jax.random.key(0))


def test_train_step_compiles_once_across_clients_and_rounds():
  train_step = local_training.make_train_step(MODEL, OPT)
  compiled = []

  def on_event(name, *_, **__):
    if name == '/jax/core/compile/backend_compile_duration':
      compiled.append(name)

  for i, (round_idx, k) in enumerate(itertools.product(range(2), range(3))):
    if i == 1:  # everything is compiled by the first client's round
      jax.monitoring.register_event_duration_secs_listener(on_event)
    state = local_training.init_local_state(_params(), OPT, round_idx * 3)
    local_training.client_update(train_step, state, _batches(k), num_steps=3)
  jax.monitoring.unregister_event_duration_listener(on_event)
  assert not compiled, f'{len(compiled)} compilations after the first client'


def test_loss_falls_on_a_repeated_batch():
  batch = next(_batches(0))
  result = local_training.client_update(local_training.make_train_step(MODEL, OPT),
                                    local_training.init_local_state(_params(), OPT, 2),
                                    itertools.repeat(batch), num_steps=20, log_every=5)
  losses = [m['loss'] for m in result.step_metrics]
  assert [m['local_step'] for m in result.step_metrics] == [5, 10, 15, 20]
  assert losses[-1] < 0.5 * losses[0], losses
  assert result.summary.num_tokens == 20 * 8 * 16
  assert int(result.state.step) == 22


def _run(train_step, steps=3, opt=OPT_EXACT):
  state = local_training.init_local_state(_params(), opt, 0)
  return local_training.client_update(train_step, state, _batches(1), num_steps=steps, log_every=1)


def _assert_same(a, b, **tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tol), a.state.params, b.state.params)
  np.testing.assert_allclose([m['loss'] for m in a.step_metrics],
                             [m['loss'] for m in b.step_metrics], **tol)


@pytest.mark.parametrize('micro_batch_size', [2, 4])
def test_gradient_accumulation_matches_full_batch(micro_batch_size):
  full = _run(local_training.make_train_step(MODEL, OPT_EXACT))
  accumulated = _run(local_training.make_train_step(MODEL, OPT_EXACT,
                                                micro_batch_size=micro_batch_size))
  _assert_same(full, accumulated, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_does_not_change_results(remat):
  plain = _run(local_training.make_train_step(MODEL, OPT_EXACT))
  rematted = _run(local_training.make_train_step(dataclasses.replace(MODEL, remat=remat),
                                                 OPT_EXACT))
  _assert_same(plain, rematted, rtol=RTOL, atol=ATOL)


def test_step_metrics_are_consistent():
  result = _run(local_training.make_train_step(MODEL, OPT), steps=3, opt=OPT)
  schedule = optimizers.lr_schedule(OPT)
  for m in result.step_metrics:
    np.testing.assert_allclose(m['lr'], schedule(m['local_step'] - 1), rtol=1e-6)
    assert m['grad_norm'] > 0
  assert all(m['update_norm'] > 0 for m in result.step_metrics[1:])
  # Step 0 has lr 0 (warmup starts at zero): the applied update is exactly zero.
  assert result.step_metrics[0]['update_norm'] == 0.0
