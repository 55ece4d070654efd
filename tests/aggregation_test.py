"""Aggregation: the weight rule, the weighted mean and the pseudo-gradient, by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracles
from fedjax_pt.federated import aggregation


def _tree(a, b):
  return {'w': jnp.asarray(a, jnp.float32), 'block': {'b': jnp.asarray(b, jnp.float32)}}


def test_client_weight_rules():
  assert aggregation.client_weight('tokens', 300, 5) == 300.0
  assert aggregation.client_weight('examples', 300, 5) == 5.0
  assert aggregation.client_weight('uniform', 300, 5) == 1.0
  with pytest.raises(ValueError, match='fl.weighting must be one of'):
    aggregation.client_weight('size', 1, 1)


def test_weighted_average_hand_computed():
  mean = oracles.weighted_average([_tree([1., 2.], 4.), _tree([3., 6.], 8.)], [0.25, 0.75])
  np.testing.assert_allclose(mean['w'], [2.5, 5.0])
  np.testing.assert_allclose(mean['block']['b'], 7.0)


def test_running_average_matches_weighted_average():
  rng = np.random.default_rng(0)
  clients = [_tree(rng.normal(size=3), rng.normal()) for _ in range(3)]
  tokens = [10, 30, 60]
  acc = aggregation.RunningAverage()
  for params, n in zip(clients, tokens):
    acc.add(params, n)
  expected = oracles.weighted_average(clients, oracles.normalized_weights(tokens))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), acc.result(), expected)


def test_equal_clients_are_summed_with_weight_one():
  # Weights relative to the first client: equal clients give the plain float32 sum / K.
  clients = [_tree([0.1 * k, 0.3], 0.7 * k) for k in range(1, 4)]
  acc = aggregation.RunningAverage()
  for params in clients:
    acc.add(params, 12345)
  expected = jax.tree.map(lambda a, b, c: (a + b + c) / 3.0, *clients)
  jax.tree.map(np.testing.assert_array_equal, acc.result(), expected)


def test_running_average_without_clients_or_with_a_zero_weight_is_an_error():
  with pytest.raises(ValueError, match='no client'):
    aggregation.RunningAverage().result()
  with pytest.raises(ValueError, match='must be positive'):
    aggregation.RunningAverage().add(_tree([1.], 1.), 0.0)


def test_pseudo_gradient_is_global_minus_mean():
  delta = oracles.pseudo_gradient(_tree([1., 1.], 0.), _tree([0.5, 2.], -1.))
  np.testing.assert_allclose(delta['w'], [0.5, -1.0])
  np.testing.assert_allclose(delta['block']['b'], 1.0)
