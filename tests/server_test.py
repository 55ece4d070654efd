"""Server: sampling, weighting, averaging and the outer step against hand-computed numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pt import optimizers
from fedjax_pt import server


def _tree(a, b):
  return {'w': jnp.asarray(a, jnp.float32), 'block': {'b': jnp.asarray(b, jnp.float32)}}


def test_client_weights_tokens_and_uniform():
  np.testing.assert_allclose(server.client_weights([100, 300], 'tokens'), [0.25, 0.75])
  np.testing.assert_allclose(server.client_weights([100, 300], 'uniform'), [0.5, 0.5])


def test_weighted_average_hand_computed():
  mean = server.weighted_average([_tree([1., 2.], 4.), _tree([3., 6.], 8.)], [0.25, 0.75])
  np.testing.assert_allclose(mean['w'], [2.5, 5.0])
  np.testing.assert_allclose(mean['block']['b'], 7.0)


def test_running_average_matches_weighted_average():
  rng = np.random.default_rng(0)
  clients = [_tree(rng.normal(size=3), rng.normal()) for _ in range(3)]
  tokens = [10, 30, 60]
  acc = server.RunningAverage()
  for params, n in zip(clients, tokens):
    acc.add(params, n)
  expected = server.weighted_average(clients, server.client_weights(tokens, 'tokens'))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), acc.result(), expected)


def test_running_average_without_clients_is_an_error():
  with pytest.raises(ValueError, match='no client'):
    server.RunningAverage().result()


def test_pseudo_gradient_is_global_minus_mean():
  delta = server.pseudo_gradient(_tree([1., 1.], 0.), _tree([0.5, 2.], -1.))
  np.testing.assert_allclose(delta['w'], [0.5, -1.0])
  np.testing.assert_allclose(delta['block']['b'], 1.0)


def _run_outer(tx, theta0, means):
  update = server.make_server_update(tx)
  state = server.init_server_state({'w': jnp.asarray(theta0, jnp.float32)}, tx)
  history = []
  for mean in means:
    state, _ = update(state, {'w': jnp.asarray(mean, jnp.float32)})
    history.append(float(state.params['w']))
  return history, state


def test_nesterov_outer_step_hand_computed():
  # theta0 = 1, lr 0.5, mu 0.9. Round 1: mean 0.8, delta 0.2, v = 0.2,
  # theta = 1 - 0.5 (0.2 + 0.9 * 0.2) = 0.81. Round 2: mean 0.71, delta 0.1, v = 0.28,
  # theta = 0.81 - 0.5 (0.1 + 0.252) = 0.634. Round 3: mean 0.584, delta 0.05, v = 0.302,
  # theta = 0.634 - 0.5 (0.05 + 0.2718) = 0.4731.
  tx = optimizers.outer_optimizer('nesterov', lr=0.5, momentum=0.9)
  history, state = _run_outer(tx, 1.0, [0.8, 0.71, 0.584])
  np.testing.assert_allclose(history, [0.81, 0.634, 0.4731], rtol=1e-6)
  assert state.round == 3


def test_nesterov_matches_textbook_over_rounds():
  """Sutskever's form of Nesterov: v <- mu v + delta; theta <- theta - lr (delta + mu v)."""
  rng = np.random.default_rng(1)
  lr, mu = 0.7, 0.9
  tx = optimizers.outer_optimizer('nesterov', lr=lr, momentum=mu)
  update = server.make_server_update(tx)
  theta = rng.normal(size=(4, 3)).astype(np.float32)
  state = server.init_server_state({'w': jnp.asarray(theta)}, tx)
  v = np.zeros_like(theta)
  for _ in range(6):
    mean = theta - rng.normal(scale=0.1, size=theta.shape).astype(np.float32)
    state, metrics = update(state, {'w': jnp.asarray(mean)})
    delta = theta - mean
    v = mu * v + delta
    theta = theta - lr * (delta + mu * v)
    np.testing.assert_allclose(state.params['w'], theta, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics['pseudo_grad_norm'], np.linalg.norm(delta), rtol=1e-5)
    np.testing.assert_allclose(metrics['outer_update_norm'], np.linalg.norm(lr * (delta + mu * v)),
                               rtol=1e-5)


def test_heavy_ball_sgd_hand_computed():
  # v1 = 0.2, theta = 1 - 0.5 * 0.2 = 0.9; delta 0.1, v2 = 0.28, theta = 0.9 - 0.14 = 0.76.
  tx = optimizers.outer_optimizer('sgd', lr=0.5, momentum=0.9)
  history, _ = _run_outer(tx, 1.0, [0.8, 0.8])
  np.testing.assert_allclose(history, [0.9, 0.76], rtol=1e-6)


def test_outer_adam_first_step_moves_by_lr():
  # Adam's first bias-corrected step is lr * sign(delta).
  tx = optimizers.outer_optimizer('adam', lr=0.05, momentum=0.9)
  history, _ = _run_outer(tx, 1.0, [0.3])
  np.testing.assert_allclose(history, [0.95], rtol=1e-5)


@pytest.mark.parametrize('name', ['nesterov', 'sgd'])
def test_lr_one_momentum_zero_is_fedavg(name):
  rng = np.random.default_rng(2)
  clients = [_tree(rng.normal(size=5), rng.normal()) for _ in range(3)]
  weights = server.client_weights([1, 2, 5], 'tokens')
  mean = server.weighted_average(clients, weights)
  tx = optimizers.outer_optimizer(name, lr=1.0, momentum=0.0)
  state = server.init_server_state(_tree(rng.normal(size=5), rng.normal()), tx)
  state, _ = server.make_server_update(tx)(state, mean)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               state.params, mean)


def test_sample_clients_is_seeded_subset():
  a = server.sample_clients(10, 4, seed=3, round_idx=7)
  assert len(set(a.tolist())) == 4 and all(0 <= k < 10 for k in a)
  np.testing.assert_array_equal(a, server.sample_clients(10, 4, seed=3, round_idx=7))
  draws = {tuple(server.sample_clients(10, 4, seed=3, round_idx=r)) for r in range(20)}
  assert len(draws) > 10
  np.testing.assert_array_equal(server.sample_clients(8, 8, seed=0, round_idx=1), np.arange(8))


@pytest.mark.parametrize('overrides, message', [
    ({'clients_per_round': 9}, 'fl.clients_per_round=9 exceeds fl.num_clients=8'),
    ({'local_steps': 0}, 'fl.local_steps must be positive'),
    ({'outer_optimizer': 'lamb'}, 'fl.outer_optimizer must be one of'),
    ({'weighting': 'size'}, 'fl.weighting'),
])
def test_fl_config_errors(overrides, message):
  values = dict(num_clients=8, clients_per_round=8, rounds=2, local_steps=5)
  values.update(overrides)
  with pytest.raises(ValueError, match=message):
    server.FLConfig(**values)
