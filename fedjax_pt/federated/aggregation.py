"""How client models become one: aggregation weights, the weighted mean, the pseudo-gradient.

The weight rule (`fl.weighting`) lives here and nowhere else:
  'tokens'   w_k ∝ tokens client k trained on this round (differs when clients do unequal work);
  'examples' w_k ∝ the size of client k's training set, in tokens (FedAvg's n_k, fedjax's
             `num_examples`: a client with twice the data counts twice, however long it trained);
  'uniform'  w_k = 1/K.

This is `fl.aggregation='mean'`; the robust rules are in `robust`.
"""


import jax
import jax.numpy as jnp

WEIGHTINGS = ('tokens', 'examples', 'uniform')


def client_weight(rule: str, num_tokens: int, num_examples: int) -> float:
  """Client k's unnormalised weight under `rule` (divided by the sum over the round's clients)."""
  if rule == 'tokens':
    return float(num_tokens)
  if rule == 'examples':
    return float(num_examples)
  if rule == 'uniform':
    return 1.0
  raise ValueError(f'fl.weighting must be one of {WEIGHTINGS}, got {rule!r}')


@jax.jit
def _scaled(params, weight):
  return jax.tree.map(lambda p: weight * p.astype(jnp.float32), params)


@jax.jit
def _add_scaled(acc, params, weight):
  return jax.tree.map(lambda a, p: a + weight * p.astype(a.dtype), acc, params)


class RunningAverage:
  """Weighted mean of client trees (their deltas) accumulated one client at a time.

  Memory stays at one extra copy of the model whatever the number of clients, which matters at
  1.3B parameters x 8 clients. Weights are taken relative to the first client's, so equal clients
  add with weight exactly 1 and their mean is the plain float32 sum divided by K.
  """

  def __init__(self):
    self._sum = None
    self._unit = None
    self._total_weight = 0.0
    self.count = 0

  def add(self, params, weight: float, count: int = 1, client: int | None = None) -> None:
    """Adds a client's tree with its weight; a tree that is already the mean of `count` clients
    (a secure aggregate) comes with their total weight. `client` names the tree for the robust
    rules' records (`robust`); the mean singles no client out."""
    del client
    if weight <= 0:
      raise ValueError(f'a client weight must be positive, got {weight}')
    if self._unit is None:
      self._unit = float(weight)
    weight = float(weight) / self._unit
    # The sum starts from the first client's scaled copy, so it is split over the devices exactly
    # like the clients' parameters (a zeros tree would sit whole on one device).
    if self._sum is None:
      self._sum = _scaled(params, jnp.float32(weight))
    else:
      self._sum = _add_scaled(self._sum, params, jnp.float32(weight))
    self._total_weight += weight
    self.count += count

  def result(self):
    if self._sum is None:
      raise ValueError('no client was added to the average')
    return jax.tree.map(lambda s: s / self._total_weight, self._sum)


def pseudo_gradient_of_deltas(mean_delta):
  """Delta = -sum_k w_k (theta_k - theta), from the mean of the deltas clients send.

  Equal to `pseudo_gradient` up to float32 rounding: the deltas are formed before averaging, so
  the sums round at the scale of the deltas instead of that of the weights (tests/compression_test
  bounds the difference)."""
  return jax.tree.map(jnp.negative, mean_delta)
