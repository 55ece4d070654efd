"""Local AdamW and its schedule against hand-computed numbers."""

import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pt import optimizers


def _cfg(**kw):
  values = dict(lr=1e-3, warmup_steps=10, schedule_steps=110)
  values.update(kw)
  return optimizers.OptConfig(**values)


def test_schedule_warmup_then_cosine_to_a_tenth():
  schedule = optimizers.lr_schedule(_cfg())
  np.testing.assert_allclose(schedule(0), 0.0)
  np.testing.assert_allclose(schedule(5), 0.5e-3, rtol=1e-6)
  np.testing.assert_allclose(schedule(10), 1e-3, rtol=1e-6)
  # Halfway through the decay, cos = 0: lr = peak * (0.1 + 0.9 * 0.5) = 0.55 peak.
  np.testing.assert_allclose(schedule(60), 0.55e-3, rtol=1e-5)
  np.testing.assert_allclose(schedule(110), 1e-4, rtol=1e-5)
  np.testing.assert_allclose(schedule(500), 1e-4, rtol=1e-5)


def test_adamw_two_steps_with_clipping_hand_computed():
  cfg = _cfg(grad_clip=1.0, weight_decay=0.0)
  tx = optimizers.local_optimizer(cfg)
  params = {'w': jnp.zeros(2)}
  state = tx.init(params)
  # Step 1: [3, 4] has norm 5 and is clipped to [0.6, 0.8]; Adam's first step is sign(g).
  d1, state = tx.update({'w': jnp.array([3.0, 4.0])}, state, params)
  np.testing.assert_allclose(d1['w'], [1.0, 1.0], rtol=1e-6)
  # Step 2: g = [0.3, 0] (not clipped). m = 0.9 [0.06, 0.08] + 0.1 [0.3, 0] = [0.084, 0.072],
  # v = 0.95 [0.018, 0.032] + 0.05 [0.09, 0] = [0.0216, 0.0304]; bias corrections 0.19, 0.0975.
  d2, state = tx.update({'w': jnp.array([0.3, 0.0])}, state, params)
  m_hat = np.array([0.084, 0.072]) / 0.19
  v_hat = np.array([0.0216, 0.0304]) / 0.0975
  np.testing.assert_allclose(d2['w'], m_hat / (np.sqrt(v_hat) + 1e-8), rtol=1e-5)
  np.testing.assert_allclose(d2['w'], [0.939293, 0.678647], rtol=1e-5)


def test_decoupled_weight_decay_only_on_matrices():
  tx = optimizers.local_optimizer(_cfg(weight_decay=0.1, grad_clip=0.0))
  params = {'kernel': jnp.full((2, 2), 2.0), 'scale': jnp.full((2,), 2.0)}
  grads = {'kernel': jnp.full((2, 2), 0.5), 'scale': jnp.full((2,), 0.5)}
  direction, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(direction['kernel'], 1.0 + 0.1 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(direction['scale'], 1.0, rtol=1e-6)
  updates = optimizers.apply_lr(direction, jnp.float32(0.01))
  np.testing.assert_allclose(updates['kernel'], -0.012, rtol=1e-5)


@pytest.mark.parametrize('overrides, message', [
    ({'lr': 0.0}, 'opt.lr must be positive'),
    ({'warmup_steps': 200}, 'opt.warmup_steps=200 must be smaller'),
    ({'final_lr_ratio': 2.0}, 'opt.final_lr_ratio'),
])
def test_opt_config_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    _cfg(**overrides)
