"""Server: the outer step against hand-computed numbers, and the fl.* config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracles
from fedjax_pt import optimizers
from fedjax_pt.federated import server
from fedjax_pt.federated.config import FLConfig


def _tree(a, b):
  return {'w': jnp.asarray(a, jnp.float32), 'block': {'b': jnp.asarray(b, jnp.float32)}}


def _mean_delta(state, mean_params):
  """What the clients whose models average to `mean_params` send on average."""
  return jax.tree.map(lambda m, p: jnp.asarray(m, jnp.float32) - p, mean_params, state.params)


def _run_outer(tx, theta0, means):
  update = server.make_server_update(tx)
  state = server.init_server_state({'w': jnp.asarray(theta0, jnp.float32)}, tx)
  history = []
  for mean in means:
    state, _ = update(state, _mean_delta(state, {'w': mean}))
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
    state, metrics = update(state, _mean_delta(state, {'w': mean}))
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
  weights = oracles.normalized_weights([1, 2, 5])
  mean = oracles.weighted_average(clients, weights)
  tx = optimizers.outer_optimizer(name, lr=1.0, momentum=0.0)
  state = server.init_server_state(_tree(rng.normal(size=5), rng.normal()), tx)
  state, _ = server.make_server_update(tx)(state, _mean_delta(state, mean))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               state.params, mean)


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
    FLConfig(**values)
