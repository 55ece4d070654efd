"""Norms, bytes and evaluation against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_pt import local_training
from fedjax_pt import metrics
from fedjax_pt import model as model_lib
from fedjax_pt import optimizers
from fedjax_pt import sharding

TREE = {'wte': {'embedding': jnp.array([[3.0, 0.0], [0.0, 4.0]])},  # norm 5
        'block_0': {'scale': jnp.array([1.0, 2.0, 2.0])}}  # norm 3


def test_l2_norm_and_per_module_norms():
  np.testing.assert_allclose(metrics.l2_norm(TREE), math.sqrt(25 + 9), rtol=1e-6)
  norms = metrics.per_module_norms(TREE)
  np.testing.assert_allclose([norms['wte'], norms['block_0']], [5.0, 3.0], rtol=1e-6)


def test_l2_norm_is_float32_for_bfloat16_trees():
  # 300 ones: their squares sum to 300 in float32; in bfloat16 (8-bit significand) the running
  # sum would stall at 256.
  tree = {'a': jnp.ones(300, jnp.bfloat16)}
  np.testing.assert_allclose(metrics.l2_norm(tree), math.sqrt(300), rtol=1e-6)


def test_tree_bytes_for_known_parameter_count():
  # 4 + 3 = 7 float32 values = 28 bytes; a 1.31B-parameter model is 5.26 GB each way.
  assert metrics.tree_bytes(TREE) == 28
  assert metrics.tree_bytes({'a': jnp.zeros((10, 10), jnp.bfloat16)}) == 200


@pytest.mark.parametrize('name, expected', [('nesterov', 5.0), ('sgd', 5.0), ('adam', 0.5)])
def test_outer_momentum_norm(name, expected):
  params = {'w': jnp.zeros(2)}
  tx = optimizers.outer_optimizer(name, lr=1.0, momentum=0.9)
  state = tx.init(params)
  _, state = tx.update({'w': jnp.array([3.0, 4.0])}, state, params)
  # After one step the first moment is g (SGD trace) or (1 - b1) g = 0.1 g (Adam mu).
  np.testing.assert_allclose(metrics.outer_momentum_norm(state), expected, rtol=1e-6)
  assert metrics.outer_momentum_norm(optimizers.outer_optimizer(
      'sgd', 1.0, 0.0).init(params)) == 0.0


def test_perplexity_does_not_overflow():
  assert metrics.perplexity(1.0) == pytest.approx(math.e)
  assert math.isfinite(metrics.perplexity(1e6))


def test_padded_batches_are_masked_and_of_one_size():
  batches = [np.ones((5, 4), np.int32), np.ones((2, 4), np.int32)]
  out = metrics.padded(batches, multiple=4)
  assert [t.shape for t, _ in out] == [(8, 4), (8, 4)]
  np.testing.assert_array_equal(out[1][1], [1, 1, 0, 0, 0, 0, 0, 0])
  assert out[1][0][2:].sum() == 0


def test_sharded_evaluation_equals_one_device_and_ignores_padding():
  """The eval step on 8 devices (padded, masked batches) gives the one-device loss over the real
  sequences only. float32 sums in another order: rtol 1e-6."""
  model_cfg = model_lib.ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2,
                                    mlp_ratio=4, max_seq_len=8)
  layout = sharding.Layout.create(sharding.MeshConfig(fsdp=8))
  params = sharding.init_params(model_cfg, jax.random.key(0), layout)
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, 64, (5, 9), dtype=np.int32), rng.integers(0, 64, (3, 9),
                                                                       dtype=np.int32)]
  sharded = metrics.evaluate(metrics.make_eval_step(model_cfg, layout), params,
                             metrics.padded(batches, 8))
  single = metrics.evaluate(metrics.make_eval_step(model_cfg), jax.device_get(params),
                            metrics.padded(batches, 1))
  assert sharded['loss'] == pytest.approx(single['loss'], rel=1e-6)
  # By hand: the mean of every real token's cross-entropy.
  decoder = model_lib.Decoder(model_cfg)
  tokens = np.concatenate(batches)
  logits = decoder.apply({'params': jax.device_get(params)}, tokens[:, :-1])
  expected = float(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean())
  assert single['loss'] == pytest.approx(expected, rel=1e-6)


def test_evaluation_loss_is_the_training_loss_in_bfloat16():
  """The eval step and the training loss are one function (`model.next_token_losses`): on the
  same batch of a bf16 model they agree. Both sum the same 5 x 8 float32 terms in different
  orders, so to ~40 float32 roundings (rtol 1e-5)."""
  model_cfg = model_lib.ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2,
                                    mlp_ratio=4, max_seq_len=8, dtype='bfloat16')
  params = model_lib.init_params(model_cfg, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, 64, (5, 9), dtype=np.int32)
  evaluated = metrics.evaluate(metrics.make_eval_step(model_cfg), params,
                               metrics.padded([tokens], 1))
  trained = float(jax.jit(local_training.make_loss_fn(model_cfg))(params, tokens))
  assert evaluated['loss'] == pytest.approx(trained, rel=1e-5)
