"""Robust aggregation (`fl.aggregation`): how the server combines the clients' decoded deltas
when some of them may be wrong (a scaled, sign-flipped, noisy or stale delta is finite and passes
`faults.verdict`).

  'mean'          the weighted mean (`aggregation.RunningAverage`, streaming: one extra model).
  'trimmed_mean'  per coordinate, the `t` largest and `t` smallest values are dropped and the rest
                  averaged (Yin et al., 2018); `fl.aggregation_trim` is t, or below 1 a fraction
                  of the clients (t = floor(fraction * K)).
  'median'        per coordinate, the median: the trimmed mean with t = floor((K - 1) / 2).
  'norm_clipped'  each delta scaled down to at most `fl.aggregation_clip` times the median of the
                  clients' delta norms, then the weighted mean (`fl.weighting`).

The robust rules hold every delta of a synchronisation until its last report: a coordinate's
median needs all the values, and so does the median norm, which a later report can still lower
(any earlier delta may then be clipped). The server then holds `fl.clients_per_round` deltas, not
one running sum (`planning/memory.py` counts them).

Trimmed mean and median count each client once: the weights of `fl.weighting` are what clients
report (their tokens, their data), so a weighted order statistic would let a poisoned client
outweigh the rest by claiming more; they need fl.weighting='uniform'. If fewer clients than t
allows arrive (failures, fl.min_clients), t shrinks to floor((K - 1) / 2): the median.
"""

import functools
import math

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pt import metrics

AGGREGATIONS = ('mean', 'trimmed_mean', 'median', 'norm_clipped')
COORDINATE_WISE = ('trimmed_mean', 'median')


def trim_count(trim: float, clients: int) -> int:
  """Values dropped from each end of a coordinate among `clients` (`fl.aggregation_trim`: a count
  when >= 1, a fraction of the clients below)."""
  return int(trim) if trim >= 1 else math.floor(trim * clients)


def check(aggregation: str, trim: float, clip: float, weighting: str,
          clients_per_round: int) -> None:
  """Raises ValueError, in one line, for a rule that cannot work as configured."""
  if aggregation not in AGGREGATIONS:
    raise ValueError(f'fl.aggregation must be one of {AGGREGATIONS}, got {aggregation!r}')
  if aggregation in COORDINATE_WISE and weighting != 'uniform':
    raise ValueError(f"fl.aggregation={aggregation!r} counts each client once (weights are what "
                     f"clients report: a poisoned one could claim more): fl.weighting must be "
                     f"'uniform', got {weighting!r}")
  if aggregation == 'trimmed_mean':
    if trim <= 0 or (trim >= 1 and trim != int(trim)):
      raise ValueError(f'fl.aggregation_trim must be a fraction in (0, 1) or a whole count of '
                       f'clients, got {trim}')
    t = trim_count(trim, clients_per_round)
    if t < 1 or 2 * t >= clients_per_round:
      raise ValueError(f'fl.aggregation_trim={trim} trims {t} of fl.clients_per_round='
                       f'{clients_per_round} clients from each end: it must trim at least one '
                       'and leave at least one')
  if aggregation == 'norm_clipped' and clip <= 0:
    raise ValueError(f'fl.aggregation_clip must be positive (a multiple of the median delta '
                     f'norm), got {clip}')


def make(aggregation: str, trim: float, clip: float):
  """The accumulator of one synchronisation's deltas under `aggregation` ('mean' excluded)."""
  if aggregation in COORDINATE_WISE:
    return CoordinateWise(trim if aggregation == 'trimmed_mean' else None)
  return NormClipped(clip)


@functools.partial(jax.jit, static_argnums=1)
def _trimmed(stacked_KxS: jax.Array, t: int) -> tuple[jax.Array, jax.Array]:
  """Per coordinate (of shape S) of K clients' values: the mean without the t smallest and t
  largest, and how many of each client's values were dropped. Ties are broken by client order."""
  k = stacked_KxS.shape[0]
  order_KxS = jnp.argsort(stacked_KxS, axis=0, stable=True)
  ordered_KxS = jnp.take_along_axis(stacked_KxS, order_KxS, axis=0)
  keep_K = (jnp.arange(k) >= t) & (jnp.arange(k) < k - t)
  keep_KxS = keep_K.reshape((k,) + (1,) * (stacked_KxS.ndim - 1))
  mean_S = jnp.sum(jnp.where(keep_KxS, ordered_KxS, 0.0), axis=0) / jnp.sum(keep_K)
  rank_KxS = jnp.argsort(order_KxS, axis=0)
  dropped_K = jnp.sum(~keep_K[rank_KxS], axis=tuple(range(1, stacked_KxS.ndim)))
  return mean_S, dropped_K


class _Kept:
  """Every delta of a synchronisation, with its client and weight."""

  def __init__(self):
    self._deltas, self._weights, self.clients = [], [], []
    self.count = 0
    # client: (values dropped, values), every client of a coordinate-wise rule
    self.trimmed: dict[int, tuple[int, int]] = {}
    self.clipped: dict[int, float] = {}  # client: the scale its delta was multiplied by (< 1)

  def add(self, params, weight: float, count: int = 1, client: int | None = None) -> None:
    if weight <= 0:
      raise ValueError(f'a client weight must be positive, got {weight}')
    if count != 1 or client is None:
      raise ValueError('a robust rule needs each client\'s own delta (no secure sums)')
    self._deltas.append(params)
    self._weights.append(float(weight))
    self.clients.append(client)
    self.count += 1

  def _check(self):
    if not self._deltas:
      raise ValueError('no client was added to the average')


class CoordinateWise(_Kept):
  """Trimmed mean (`trim`) or, with trim None, median, coordinate by coordinate, unweighted."""

  def __init__(self, trim: float | None):
    super().__init__()
    self._trim = trim

  def result(self):
    self._check()
    k = self.count
    median = (k - 1) // 2
    t = median if self._trim is None else trim_count(self._trim, k)
    if t > median:
      logging.warning('fl.aggregation_trim=%g trims %d of %d clients from each end; trimming %d '
                      '(the median)', self._trim, t, k, median)
      t = median
    leaves = [jax.tree.leaves(d) for d in self._deltas]
    treedef = jax.tree.structure(self._deltas[0])
    dropped = np.zeros(k, np.int64)
    values = 0
    out = []
    for parts in zip(*leaves):
      mean, dropped_k = _trimmed(jnp.stack([p.astype(jnp.float32) for p in parts]), t)
      # Where the deltas are (the parameters' layout), as the mean's result is.
      out.append(jax.device_put(mean, parts[0].sharding))
      dropped += np.asarray(dropped_k)
      values += parts[0].size
    self.trimmed = {c: (int(d), values) for c, d in zip(self.clients, dropped)}
    return jax.tree.unflatten(treedef, out)


class NormClipped(_Kept):
  """The weighted mean of the deltas, each clipped to `clip` times the median delta norm."""

  def __init__(self, clip: float):
    super().__init__()
    self._clip = clip

  def result(self):
    self._check()
    norms = [float(metrics.l2_norm(d)) for d in self._deltas]
    bound = self._clip * float(np.median(norms))
    scales = [min(1.0, bound / n) if n > 0 else 1.0 for n in norms]
    self.clipped = {c: s for c, s in zip(self.clients, scales) if s < 1.0}
    total = sum(self._weights)
    out = None
    for delta, weight, scale in zip(self._deltas, self._weights, scales):
      w = jnp.float32(weight / total * scale)
      term = jax.tree.map(lambda d, w=w: w * d.astype(jnp.float32), delta)
      out = term if out is None else jax.tree.map(jnp.add, out, term)
    return out


def combine(trimmed: dict[int, tuple[int, int]], more: dict[int, tuple[int, int]]) -> None:
  """Adds one synchronisation's (values dropped, values) per client to `trimmed`."""
  for k, (dropped, values) in more.items():
    have = trimmed.get(k, (0, 0))
    trimmed[k] = (have[0] + dropped, have[1] + values)
