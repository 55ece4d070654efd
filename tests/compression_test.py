"""Codecs against hand-computed numbers and their error bounds, error feedback, exact wire sizes,
and the delta form against the model form of the pseudo-gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracles
from fedjax_pt.federated import aggregation
from fedjax_pt.federated import compression
from fedjax_pt import model as model_lib
from fedjax_pt import sharding

U = 2.0 ** -24  # float32 unit roundoff (round to nearest)
MODEL = model_lib.ModelConfig(vocab_size=384, d_model=32, num_layers=2, num_heads=2, mlp_ratio=4,
                              max_seq_len=32)


def _model_sized(seed=0, scale=0.02):
  shapes = jax.eval_shape(lambda: model_lib.init_params(MODEL, jax.random.key(0)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(scale=scale, size=s.shape), jnp.float32),
                      shapes)


def test_int8_hand_computed():
  # Blocks of 4. Block 1: max |x| = 1.27, s = 0.01, q = round(x / s) = [50, -127, 33, 0]; the
  # decoded 0.33 and 0 are off by 0.003 and 0.004 <= s / 2. Block 2 (zero-padded): max 2.54,
  # s = 0.02, -0.013 / s = -0.65 -> q = -1, decoded -0.02 (off by 0.007 <= 0.01).
  x = jnp.asarray([0.5, -1.27, 0.333, 0.004, 2.54, -0.013], jnp.float32)
  payload = compression.encode({'x': x}, 'int8', 4)['x']
  np.testing.assert_array_equal(payload.values, [[50, -127, 33, 0], [127, -1, 0, 0]])
  np.testing.assert_allclose(payload.scales, [0.01, 0.02], rtol=U * 4)
  np.testing.assert_allclose(compression.decode({'x': payload})['x'],
                             [0.5, -1.27, 0.33, 0.0, 2.54, -0.02], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('codec', ['int8', 'int4'])
def test_blockwise_codecs_stay_within_half_a_quantum(codec):
  """|x - q s| <= s / 2 up to float32 rounding: x / s rounds by at most u |x / s| <= u qmax
  before q is taken, and q s rounds by at most u |q s| <= u max|x|; together <= 2 u max|x|."""
  block, qmax = 64, {'int8': 127, 'int4': 7}[codec]
  x = np.random.default_rng(1).standard_t(3, size=(37, 50)).astype(np.float32)  # heavy tails
  payload = compression.encode({'x': jnp.asarray(x)}, codec, block)
  decoded = np.asarray(compression.decode(payload)['x'])
  flat, err = x.reshape(-1), np.abs(decoded - x).reshape(-1)
  pad = -len(flat) % block
  m = np.abs(np.pad(flat, (0, pad))).reshape(-1, block).max(axis=1)
  scale = m / qmax
  np.testing.assert_allclose(payload['x'].scales, scale, rtol=2 * U)
  bound = np.repeat(scale / 2 + 2 * U * m, block)[:len(flat)]
  assert np.all(err <= bound)
  assert err.max() > 0.4 * scale.max() / 2  # the bound is nearly reached: not a vacuous test


def test_bf16_and_none():
  x = np.random.default_rng(2).normal(size=(300,)).astype(np.float32)
  decoded = compression.decode(compression.encode({'x': jnp.asarray(x)}, 'bf16'))['x']
  assert np.all(np.abs(np.asarray(decoded) - x) <= 2.0 ** -8 * np.abs(x))  # 8-bit significand
  exact = compression.decode(compression.encode({'x': jnp.asarray(x)}, 'none'))['x']
  np.testing.assert_array_equal(exact, x)


@pytest.mark.parametrize('codec', compression.CODECS)
def test_non_finite_values_stay_non_finite(codec):
  x = jnp.asarray([1.0, np.nan, 2.0, 3.0, np.inf, 0.5], jnp.float32)
  decoded = np.asarray(compression.decode(compression.encode({'x': x}, codec, 2))['x'])
  assert not np.isfinite(decoded[1]) and not np.isfinite(decoded[4])


def test_error_feedback_sends_the_cumulative_delta_within_one_quantum():
  """With error feedback, sum_t decode(p_t) = sum_t d_t - e_T exactly in real arithmetic, and
  |e_T| <= s_T / 2 (+ 2 u max|x|, as above) is half a quantum of the last message. Float32 adds
  at most 2 roundings of u |d_t + e_t| per message to the residual recurrence."""
  rng = np.random.default_rng(3)
  steps, block = 40, 32
  shape = (3, 70)
  residual = {'x': jnp.zeros(shape, jnp.float32)}
  zero = {'x': jnp.zeros(shape, jnp.float32)}
  sent, true, plain, drift = (np.zeros(shape) for _ in range(4))
  for _ in range(steps):
    delta = rng.normal(scale=0.01, size=shape).astype(np.float32)
    drift = np.maximum(drift, np.abs(delta + np.asarray(residual['x'])))
    payload, residual = compression.compress_delta({'x': jnp.asarray(delta)}, zero, residual,
                                                   'int4', block)
    sent += np.asarray(compression.decode(payload)['x'], np.float64)
    true += delta
    plain += np.asarray(compression.decode(compression.encode({'x': jnp.asarray(delta)},
                                                              'int4', block))['x'])
  last_scale = np.repeat(np.asarray(payload['x'].scales), block)[:np.prod(shape)].reshape(shape)
  bound = last_scale / 2 + 2 * U * 7 * last_scale + 2 * steps * U * drift
  assert np.all(np.abs(sent - true) <= bound)
  # Without it, the rounding errors add up like a random walk, well past one quantum.
  assert np.abs(plain - true).max() > last_scale.max()


def test_wire_size_hand_computed():
  # A 5 x 7 array in int8 blocks of 4: 35 values -> 9 blocks: 36 bytes of values, 36 of scales.
  # Message header 9 (magic 5 + count 4); array header 8 (path length 2, codec 1, ndim 1,
  # block size 4) + the path 'w' (1) + 2 dims x 4.
  payload = compression.encode({'w': jnp.zeros((5, 7))}, 'int8', 4)
  assert compression.payload_bytes(payload) == 9 + 8 + 1 + 8 + 36 + 36
  assert compression.raw_bytes(payload) == 35 * 4


@pytest.mark.parametrize('codec', compression.CODECS)
def test_byte_counts_are_the_serialized_sizes(codec):
  params = _model_sized()
  payload = compression.encode(params, codec, 64)
  message = oracles.to_bytes(payload)
  assert compression.payload_bytes(payload) == len(message)
  # Sizes come from shapes alone: a jax.eval_shape payload costs the same.
  shapes = jax.eval_shape(lambda p: compression.encode(p, codec, 64), params)
  assert compression.payload_bytes(shapes) == len(message)
  # The message holds everything: decoding what was read back gives the same tree.
  arrays = oracles.from_bytes(message)
  decoded = compression.decode(payload)
  for path, leaf in jax.tree_util.tree_flatten_with_path(decoded)[0]:
    name = jax.tree_util.keystr(path, simple=True, separator='/')
    np.testing.assert_array_equal(compression.decode(arrays[name]), leaf)


def test_delta_form_matches_the_model_form_within_float32_rounding():
  """The server used to average the clients' models and subtract; it now averages their deltas.

  Model form: each of the K adds of the running sum rounds its product and its sum, at most
  2 K u max_k |theta_k| together, and theta - mean rounds once more. Delta form: theta_k - theta
  rounds by u |delta_k| and the average of the deltas by 2 K u max_k |delta_k|. So per value
  |difference| <= (2K + 3) u (max_k |theta_k| + max_k |delta_k|)."""
  k_clients = 5
  theta = _model_sized(seed=4)
  clients = [jax.tree.map(lambda p, d: p + d, theta, _model_sized(seed=10 + k, scale=1e-3))
             for k in range(k_clients)]
  tokens = [100, 300, 250, 120, 90]
  by_model, by_delta = aggregation.RunningAverage(), aggregation.RunningAverage()
  for params, n in zip(clients, tokens):
    by_model.add(params, n)
    payload, _ = compression.compress_delta(params, theta, None, 'none')
    by_delta.add(compression.decode(payload), n)
  old = oracles.pseudo_gradient(theta, by_model.result())
  new = aggregation.pseudo_gradient_of_deltas(by_delta.result())

  def check(old, new, theta, *clients):
    models = np.abs(np.stack(clients)).max(axis=0)
    deltas = np.abs(np.stack(clients) - theta).max(axis=0)
    bound = (2 * k_clients + 3) * U * (models + deltas)
    assert np.all(np.abs(np.asarray(old) - np.asarray(new)) <= bound)

  jax.tree.map(check, old, new, theta, *clients)


@pytest.mark.parametrize('codec', ['none', 'int8', 'topk'])
def test_codec_keeps_payloads_split_like_the_parameters(codec):
  """On 8 devices (FSDP): float32 payloads are laid out like the parameters; int8 blocks (top-k
  codes, scales and positions) are split over the devices that split the parameter; decoded trees
  and residuals land where the parameters are."""
  layout = sharding.Layout.create(sharding.MeshConfig(1, 1, 8))
  params = sharding.init_params(MODEL, jax.random.key(0), layout)
  codec_fn = compression.Codec(codec, 64, params)
  payload = codec_fn.encode(params)
  received = codec_fn.decode(payload)
  update, residual = codec_fn.compress_delta(params, received, jax.tree.map(jnp.zeros_like,
                                                                            params))

  def check(p, e, r, d):
    assert r.sharding == p.sharding and d.sharding == p.sharding
    if codec == 'none':
      assert e.values.sharding == p.sharding
    elif 'fsdp' in p.sharding.spec:
      split = jax.sharding.PartitionSpec(('fsdp',))
      assert e.scales.sharding.spec == split
      if codec == 'topk':  # packed codes: split when the devices divide their bytes
        assert e.indices.sharding.spec == split
        split = split if e.values.shape[0] % 8 == 0 else jax.sharding.PartitionSpec()
      assert e.values.sharding.spec == split

  jax.tree.map(check, params, update, residual, received,
               is_leaf=lambda x: isinstance(x, compression.EncodedArray))


@pytest.mark.parametrize('values, message', [
    (dict(upload='fp8'), 'fl.compression.upload must be one of'),
    (dict(download='int2'), 'fl.compression.download must be one of'),
    (dict(block_size=63), 'fl.compression.block_size must be an even integer'),
    (dict(error_feedback=1), 'fl.compression.error_feedback must be a bool'),
])
def test_config_errors(values, message):
  with pytest.raises(ValueError, match=message):
    compression.CompressionConfig(**values)
