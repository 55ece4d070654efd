"""Local AdamW, Muon and their schedule against hand-computed numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pt import model as model_lib
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
    ({'optimizer': 'sgd'}, r"opt.optimizer must be one of \('adamw', 'muon'\), got 'sgd'"),
    ({'muon_lr': 0.01}, "opt.muon_lr=0.01 is set but opt.optimizer='adamw', which ignores it"),
    ({'muon_ns_steps': 3}, "opt.muon_ns_steps=3 is set but opt.optimizer='adamw'"),
    ({'optimizer': 'muon', 'muon_beta': 1.0}, r'opt.muon_beta must be in \[0, 1\)'),
    ({'optimizer': 'muon', 'muon_ns_steps': 0}, 'opt.muon_ns_steps must be an integer >= 1'),
])
def test_opt_config_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    _cfg(**overrides)


def _newton_schulz(g, steps=5):
  """Muon's quintic iteration (Jordan's coefficients), by hand in float64: X / |X|_F, then
  X <- a X + (b A + c A^2) X with A = X X^T, on the wide orientation of the matrix."""
  a, b, c = 3.4445, -4.7750, 2.0315
  tall = g.shape[0] > g.shape[1]
  x = g.T if tall else g
  x = x / (np.linalg.norm(x) + 1e-8)
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if tall else x


def test_muon_two_steps_on_a_2x3_matrix_against_a_numpy_newton_schulz():
  beta, ratio = 0.95, 20.0
  tx = optimizers.local_optimizer(_cfg(optimizer='muon', muon_lr=ratio * 1e-3, grad_clip=0.0))
  params = {'kernel': jnp.zeros((2, 3))}
  state = tx.init(params)
  g1 = np.array([[1.0, 2.0, 0.5], [-1.0, 0.0, 3.0]])
  g2 = np.array([[0.0, -1.0, 2.0], [4.0, 1.0, -2.0]])
  # Nesterov momentum with bias correction: m_t = beta m + (1 - beta) g, and the step uses
  # beta m_t / (1 - beta^(t+1)) + (1 - beta) g / (1 - beta^t). Width scaling sqrt(3 / 2); the
  # direction is scaled by muon_lr / lr so that the train step's lr schedule peaks at muon_lr.
  m1 = (1 - beta) * g1
  m2 = beta * m1 + (1 - beta) * g2
  for t, (g, m) in enumerate([(g1, m1), (g2, m2)], start=1):
    d, state = tx.update({'kernel': jnp.asarray(g, jnp.float32)}, state, params)
    m_hat = beta * m / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta ** t)
    expected = ratio * np.sqrt(3 / 2) * _newton_schulz(m_hat)
    np.testing.assert_allclose(d['kernel'], expected, rtol=2e-4, atol=1e-5)
  # Five steps of this iteration leave singular values near (not at) one: 0.7-1.2.
  np.testing.assert_array_less(np.abs(np.linalg.svd(expected / ratio / np.sqrt(1.5))[1] - 1),
                               0.35)


def test_muon_orthogonalises_the_block_kernels_and_leaves_the_rest_on_adamw():
  cfg = model_lib.ModelConfig(vocab_size=64, d_model=16, num_layers=1, num_heads=2, mlp_ratio=2,
                              max_seq_len=8)
  params = model_lib.init_params(cfg, jax.random.key(0))
  params['block_0']['mlp']['up_proj']['bias'] = jnp.zeros(32)
  mask = optimizers.muon_mask(params)
  names = {jax.tree_util.keystr(path): muon
           for path, muon in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert {k for k, muon in names.items() if muon} == {
      f"['block_0']['{m}']['{p}']['kernel']"
      for m, p in [('attn', 'wqkv'), ('attn', 'out_proj'), ('mlp', 'up_proj'),
                   ('mlp', 'down_proj')]}
  assert not names["['wte']['embedding']"] and not names["['wpe']"]
  assert not names["['block_0']['norm_1']['scale']"]
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
  adamw, muon = (optimizers.local_optimizer(_cfg(weight_decay=0.1, **kw))
                 for kw in ({}, {'optimizer': 'muon'}))
  d_adamw, _ = adamw.update(grads, adamw.init(params), params)
  d_muon, _ = muon.update(grads, muon.init(params), params)
  for path, is_muon in jax.tree_util.tree_flatten_with_path(mask)[0]:
    a, m = (jax.tree_util.tree_flatten_with_path(d)[0] for d in (d_adamw, d_muon))
    a, m = dict(a)[path], dict(m)[path]
    if is_muon:
      assert not np.allclose(a, m)
    else:  # exactly AdamW's direction, weight decay on the embeddings included
      np.testing.assert_array_equal(a, m)
  assert optimizers.state_copies(_cfg(optimizer='muon'), params)['wte']['embedding'] == 2
  assert optimizers.state_copies(_cfg(optimizer='muon'), params)['wpe'] == 2
  assert optimizers.state_copies(_cfg(optimizer='muon'), params)['block_0']['attn']['wqkv'][
      'kernel'] == 1
