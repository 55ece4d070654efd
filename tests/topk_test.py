"""The top-k codec against hand-computed numbers, its wire size, error feedback, its config keys,
and a tiny federated run (SparseLoCo's recipe) that trains."""

import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pt.configs import tiny
from fedjax_pt.federated import compression
from fedjax_pt.federated.topk import TopK
from fedjax_pt import train

U = 2.0 ** -24  # float32 unit roundoff
# Two chunks of 4; with fraction 0.5, k = 2 values each.
X = jnp.asarray([0.1, -0.8, 0.3, 0.05, 2.0, -0.2, 0.0, -1.1], jnp.float32)
# Message header 9 + array header 8 + top-k header 5 + path 'x' 1 + one dim 4; then the codes, two
# float32 scales (8) and four uint8 positions (4).
_FIXED = 9 + 8 + 5 + 1 + 4 + 8 + 4


def _encode(x, bits, fraction=0.5, chunk=4):
  return compression.encode({'x': x}, 'topk', topk=TopK(fraction, chunk, bits))


def test_k_is_the_fraction_of_a_chunk_rounded_half_up_and_at_least_one():
  assert TopK(1 / 64, 64).k == 1 and TopK(0.03, 64).k == 2 and TopK(0.001, 64).k == 1
  assert TopK(0.07, 100).k == 7  # 7.000000000000001, not rounded up to 8
  assert TopK(0.5, 3).k == 2 and TopK(1.0, 5).k == 5
  assert TopK(0.5, 256).index_dtype == np.uint8 and TopK(0.5, 257).index_dtype == np.uint16


def test_8_bit_hand_computed():
  # Chunk 1 [0.1, -0.8, 0.3, 0.05] keeps positions 1, 2: s = 0.8 / 127, q = -127 and
  # round(0.3 / s = 47.625) = 48, decoded 48 s = 0.30236. Chunk 2 [2, -0.2, 0, -1.1] keeps 0, 3:
  # s = 2 / 127, q = 127 and round(-69.85) = -70, decoded -70 s = -1.10236.
  payload = _encode(X, 8)
  e = payload['x']
  np.testing.assert_array_equal(e.indices, [[1, 2], [0, 3]])
  assert e.indices.dtype == np.uint8
  np.testing.assert_array_equal(e.values, [-127, 48, 127, -70])
  np.testing.assert_allclose(e.scales, [0.8 / 127, 2 / 127], rtol=2 * U)
  np.testing.assert_allclose(compression.decode(payload)['x'],
                             [0, -0.8, 48 * 0.8 / 127, 0, 2.0, 0, 0, -140 / 127], rtol=4 * U)
  assert compression.payload_bytes(payload) == _FIXED + 4 == 43


def test_4_bit_hand_computed():
  # s = 0.8 / 7 and 2 / 7: q = -7, round(2.625) = 3, 7, round(-3.85) = -4, stored q + 8 =
  # 1, 11, 15, 4, two a byte, low nibble first: 1 + 11 * 16 = 177, 15 + 4 * 16 = 79.
  payload = _encode(X, 4)
  np.testing.assert_array_equal(payload['x'].values, [177, 79])
  np.testing.assert_allclose(compression.decode(payload)['x'],
                             [0, -0.8, 3 * 0.8 / 7, 0, 2.0, 0, 0, -8 / 7], rtol=4 * U)
  assert compression.payload_bytes(payload) == _FIXED + 2


def test_2_bit_hand_computed():
  # s = m / 3 = 0.8 / 3 and 2 / 3; c = round((x / s + 3) / 2): -0.8 -> 0 (-3 s = -0.8),
  # 0.3 -> round(2.0625) = 2 (+s = 0.26667), 2 -> 3 (3 s = 2), -1.1 -> round(0.675) = 1
  # (-s = -0.66667). Four codes a byte, lowest bits first: 0 + 2 * 4 + 3 * 16 + 1 * 64 = 120.
  payload = _encode(X, 2)
  np.testing.assert_array_equal(payload['x'].values, [120])
  np.testing.assert_allclose(compression.decode(payload)['x'],
                             [0, -0.8, 0.8 / 3, 0, 2.0, 0, 0, -2 / 3], rtol=4 * U)
  assert compression.payload_bytes(payload) == _FIXED + 1


def test_a_non_finite_value_makes_its_whole_chunk_non_finite():
  x = X.at[2].set(jnp.nan)
  decoded = np.asarray(compression.decode(_encode(x, 2))['x'])
  assert np.all(np.isnan(decoded[:4])) and np.all(np.isfinite(decoded[4:]))


def test_payload_bytes_is_the_sum_of_the_arrays_and_the_formula():
  # Chunk 16, fraction 0.1: k = floor(1.6 + 0.5) = 2, 2 bits. 'a' (5 x 7 = 35 values): 3 chunks,
  # ceil(3 * 2 * 2 / 8) = 2 bytes of codes, 12 of scales, 6 of positions; header 8 + 5 + 1 + 2 x 4.
  # 'b' (300): 19 chunks, ceil(19 * 2 * 2 / 8) = 10 + 76 + 38; header 8 + 5 + 1 + 4.
  tree = {'a': jnp.ones((5, 7)), 'b': jnp.arange(300.0)}
  payload = compression.encode(tree, 'topk', topk=TopK(0.1, 16, 2))
  arrays = sum(a.nbytes for e in payload.values() for a in (e.values, e.scales, e.indices))
  assert arrays == 2 + 12 + 6 + 10 + 76 + 38
  assert compression.payload_bytes(payload) == 9 + (22 + 20) + (18 + 124) == 193


def test_error_feedback_keeps_what_was_not_sent_and_sends_it_later():
  zero = {'x': jnp.zeros(8, jnp.float32)}
  spec = TopK(0.5, 4, 8)
  payload, residual = compression.compress_delta({'x': X}, zero, zero, 'topk', topk=spec)
  decoded, residual = compression.decode(payload)['x'], residual['x']
  np.testing.assert_array_equal(residual, np.float32(X) - np.float32(decoded))
  np.testing.assert_array_equal(np.asarray(residual)[[0, 3, 5, 6]], np.asarray(X)[[0, 3, 5, 6]])
  np.testing.assert_allclose(residual + decoded, X, rtol=0, atol=U)
  # Round 2 sends 0.1 more at position 0: with the 0.1 kept from round 1, 0.2 is now the chunk's
  # largest and goes out; position 3 (0.05 kept) is the second largest.
  delta2 = jnp.zeros(8, jnp.float32).at[0].set(0.1)
  payload2, residual2 = compression.compress_delta({'x': delta2}, zero, {'x': residual}, 'topk',
                                                   topk=spec)
  assert payload2['x'].indices[0].tolist() == [0, 3]
  decoded2 = compression.decode(payload2)['x']
  np.testing.assert_allclose(decoded2[0], 0.2, rtol=4 * U)
  np.testing.assert_allclose(decoded + decoded2 + residual2['x'], X + delta2, rtol=0, atol=2 * U)


@pytest.mark.parametrize('keys, message', [
    ({'upload': 'topk', 'topk_fraction': 0.0}, 'fl.compression.topk_fraction must be in (0, 1]'),
    ({'upload': 'topk', 'topk_chunk': 0}, 'fl.compression.topk_chunk must be an integer in [1, '),
    ({'upload': 'topk', 'topk_bits': 3}, 'fl.compression.topk_bits must be one of (2, 4, 8)'),
    ({'upload': 'int8', 'topk_bits': 4}, "fl.compression.topk_bits is set, but only fl.compres"),
    ({'download': 'topk'}, "fl.compression.download='topk' is refused"),
    ({'upload': 'topk', 'topk_chunk': 2**16}, 'fl.compression.topk_chunk=65536 exceeds the larg'),
])
def test_bad_keys_are_one_line(tmp_path, keys, message):
  config = tiny.get_config('test')
  config.fl.compression.update(keys)
  with pytest.raises(ValueError) as info:
    train.run(config, str(tmp_path / 'run'))
  assert message in str(info.value) and '\n' not in str(info.value)


def test_secure_aggregation_refuses_topk(tmp_path):
  config = tiny.get_config('test')
  config.fl.compression.upload, config.fl.secagg.enabled = 'topk', True
  with pytest.raises(ValueError, match="fl.secagg cannot take fl.compression.upload='topk': its "
                                       'masks cancel only in a sum over the same positions'):
    train.run(config, str(tmp_path / 'run'))


def test_sparseloco_recipe_trains(tmp_path):
  """Top-k 1/16 of chunks of 64 at 2 bits, error feedback, no outer momentum: the loss falls."""
  config = tiny.get_config('test')
  config.fl.rounds, config.fl.outer_momentum = 3, 0.0
  config.fl.compression.update(dict(upload='topk', error_feedback=True, topk_fraction=1 / 16))
  result = train.run(config, str(tmp_path / 'run'))
  losses = [r.val_loss for r in result.rounds]
  assert losses[-1] < losses[1] < losses[0]
  # k = 4 of 64 at 2 bits: (4 (1 + 2 / 8) + 4) / 64 bytes a value against float32 broadcasts.
  assert result.rounds[-1].bytes_sent > 25 * result.rounds[-1].bytes_received
