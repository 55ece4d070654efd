"""Client-level differential privacy (DP-FedAvg) and its privacy budget.

With `fl.dp.enabled`, every synchronisation releases a Gaussian mechanism over the clients:
  1. each client's delta d_k = theta_k - theta is clipped to L2 norm C = `fl.dp.clip_norm`:
     d_k <- d_k * min(1, C / ||d_k||), so adding or removing one client moves the sum by <= C;
  2. Gaussian noise of standard deviation sigma * C (sigma = `fl.dp.noise_multiplier`) is added to
     the sum of the n clipped deltas, and the server steps on (sum + noise) / n.
`fl.dp.noise_at` says who clips and adds the noise:
  'server'   the server clips each decoded delta and draws the noise: protects against whoever
             sees the model (other clients, its users), not against the server itself.
  'clients'  each of the m = fl.clients_per_round clients clips its own delta and adds
             N(0, sigma^2 C^2 / m) before it is encoded; the noise of m clients adds up to
             sigma * C. Distributed DP: with secure aggregation (`fl.secagg`) the server sees
             only the sum, which carries the whole noise. When only n < m clients arrive, the
             server adds the missing N(0, sigma^2 C^2 (m - n) / m), so the released model has the
             full noise (the sum the server itself saw had sigma * sqrt(n / m)).
Weights must not depend on the clients' data, or one client's influence is not bounded by C:
the mean is uniform over the clients (fl.weighting 'uniform', or 'tokens' with identical
clients, which is the same).

The budget: each synchronisation that moved the model samples m of N = fl.num_clients clients
and releases one Gaussian mechanism of noise multiplier sigma; `epsilon` composes them with
Google's `dp-accounting` (RDP, or PLD: tighter and slower), Poisson sampling at rate q = m / N
(the customary stand-in for sampling m without replacement; q = 1, cross-silo, is exact; a
retried round, fl.on_too_few_clients='retry', samples more clients than q says when q < 1). The
round records carry `dp_epsilon` at `dp_delta`, for the model after that round.
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

NOISE_AT = ('server', 'clients')
ACCOUNTANTS = ('rdp', 'pld')


@dataclasses.dataclass(frozen=True)
class DPConfig:
  """`fl.dp`: client-level DP-FedAvg."""
  enabled: bool = False
  clip_norm: float = 1.0  # C: the largest L2 norm of a client's delta (inf: no clipping)
  noise_multiplier: float = 1.0  # sigma: the noise's standard deviation is sigma * C
  noise_at: str = 'server'  # 'server' | 'clients' (distributed; needed with fl.secagg)
  delta: float = 1e-5  # the delta of (epsilon, delta)-DP
  accountant: str = 'rdp'  # 'rdp' | 'pld'

  def __post_init__(self):
    if not isinstance(self.enabled, bool):
      raise ValueError(f'fl.dp.enabled must be True or False, got {self.enabled!r}')
    number = (int, float)
    if (not isinstance(self.clip_norm, number) or math.isnan(self.clip_norm)
        or self.clip_norm <= 0):
      raise ValueError(f'fl.dp.clip_norm must be > 0 (inf: no clipping), got {self.clip_norm!r}')
    if (not isinstance(self.noise_multiplier, number) or not math.isfinite(self.noise_multiplier)
        or self.noise_multiplier < 0):
      raise ValueError(f'fl.dp.noise_multiplier must be a finite number >= 0, got '
                       f'{self.noise_multiplier!r}')
    if self.noise_multiplier and math.isinf(self.clip_norm):
      raise ValueError('fl.dp.noise_multiplier > 0 needs a finite fl.dp.clip_norm (the noise is '
                       'noise_multiplier * clip_norm)')
    if not isinstance(self.delta, number) or not 0 < self.delta < 1:
      raise ValueError(f'fl.dp.delta must be in (0, 1), got {self.delta!r}')
    if self.noise_at not in NOISE_AT:
      raise ValueError(f'fl.dp.noise_at must be one of {NOISE_AT}, got {self.noise_at!r}')
    if self.accountant not in ACCOUNTANTS:
      raise ValueError(f'fl.dp.accountant must be one of {ACCOUNTANTS}, got '
                       f'{self.accountant!r}')

  @classmethod
  def from_config(cls, dp: ml_collections.ConfigDict) -> 'DPConfig':
    values = dp.to_dict()
    for key in ('clip_norm', 'noise_multiplier', 'delta'):
      if isinstance(values.get(key), str):  # 'inf' from the command line
        try:
          values[key] = float(values[key])
        except ValueError:
          raise ValueError(f'fl.dp.{key} must be a number, got {values[key]!r}') from None
    return cls(**values)

  @property
  def noise_std(self) -> float:
    """Of the noise on the sum of the clipped deltas."""
    return self.noise_multiplier * self.clip_norm if self.noise_multiplier else 0.0


@dataclasses.dataclass(frozen=True)
class SecAggConfig:
  """`fl.secagg`: Flower's SecAgg+ between the nodes and the server (deployment only).

  Each client quantises its delta over [-clip_range, clip_range] to 2**quantization_bits levels
  (stochastic rounding: unbiased, off by less than one level), the masked integers are summed
  modulo 2**32 and only the sum is unmasked. The decoded mean is therefore within
  `error_bound` = 2 * clip_range / 2**bits of the plain float32 mean, per value, when every delta
  value lies in the range; values outside are clipped to it (the nodes count them:
  `secagg_clipped_values` in the round records).
  """
  enabled: bool = False
  clip_range: float = 1.0
  quantization_bits: int = 22
  num_shares: float = 1.0
  reconstruction_threshold: float = 0.67
  timeout_s: float = 0.0

  MODULUS_BITS = 32  # Flower's masks are drawn below 2**32

  def __post_init__(self):
    if not isinstance(self.enabled, bool):
      raise ValueError(f'fl.secagg.enabled must be True or False, got {self.enabled!r}')
    if not self.clip_range > 0:
      raise ValueError(f'fl.secagg.clip_range must be > 0, got {self.clip_range!r}')
    if not isinstance(self.quantization_bits, int) or not 1 <= self.quantization_bits < 31:
      raise ValueError(f'fl.secagg.quantization_bits must be an integer in [1, 30], got '
                       f'{self.quantization_bits!r}')
    if not 0 < self.num_shares <= 1 or not 0 < self.reconstruction_threshold <= 1:
      raise ValueError(f'fl.secagg.num_shares and fl.secagg.reconstruction_threshold are '
                       f'fractions in (0, 1], got {self.num_shares} and '
                       f'{self.reconstruction_threshold}')
    if self.timeout_s < 0:
      raise ValueError(f'fl.secagg.timeout_s must be >= 0, got {self.timeout_s}')

  @classmethod
  def from_config(cls, secagg: ml_collections.ConfigDict) -> 'SecAggConfig':
    return cls(**secagg.to_dict())

  @property
  def error_bound(self) -> float:
    """The largest difference, per value, between the decoded and the plain mean."""
    return 2 * self.clip_range / 2 ** self.quantization_bits

  def check(self, clients_per_round: int) -> None:
    """What the number of clients must allow: >= 2 (a sum of one is that client's delta) and a
    sum of quantised values that cannot wrap around the masks' modulus."""
    if clients_per_round < 2:
      raise ValueError(f'fl.secagg needs fl.clients_per_round >= 2 (the sum of one client is its '
                       f'update), got {clients_per_round}')
    if clients_per_round > 2 ** (self.MODULUS_BITS - self.quantization_bits):
      raise ValueError(f'fl.secagg.quantization_bits={self.quantization_bits}: the sum of '
                       f'{clients_per_round} clients would overflow 2**{self.MODULUS_BITS}; use '
                       f'at most {self.MODULUS_BITS - math.ceil(math.log2(clients_per_round))}')


@dataclasses.dataclass(frozen=True)
class ClientNoise:
  """What a client does to its delta before encoding it, with fl.dp.noise_at='clients': clip to
  `clip_norm`, add N(0, noise_std^2) per value. Hashable by value: a static argument of jit."""
  clip_norm: float
  noise_std: float

  def __call__(self, delta: Any, key: jax.Array) -> Any:
    return add_noise(clip(delta, self.clip_norm)[0], self.noise_std, key)


def client_noise(dp: DPConfig, clients_per_round: int) -> ClientNoise | None:
  """The clients' part of the mechanism (None when the server does it all, or DP is off)."""
  if not dp.enabled or dp.noise_at != 'clients':
    return None
  return ClientNoise(dp.clip_norm, dp.noise_std / math.sqrt(clients_per_round))


@functools.partial(jax.jit, static_argnames='clip_norm')
def clip(tree: Any, clip_norm: float) -> tuple[Any, jax.Array]:
  """`tree` scaled to L2 norm <= clip_norm, and its norm before. Under the bound (or with an
  infinite one) the scale is exactly 1, so the values are unchanged bit for bit."""
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
  scale = jnp.minimum(1.0, clip_norm / norm)  # norm 0: clip_norm / 0 = inf, scale 1
  return jax.tree.map(lambda x: (x * scale).astype(x.dtype), tree), norm


def add_noise(tree: Any, std: float, key: jax.Array) -> Any:
  """`tree` + N(0, std^2) per value, a key per array (std 0: `tree` itself, untouched)."""
  if not std:
    return tree
  return _gaussian(tree, jnp.float32(std), key)


@jax.jit
def _gaussian(tree: Any, std: jax.Array, key: jax.Array) -> Any:
  # Split like `tree` (the partitionable threefry draws the same numbers on any layout).
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [
      x + (std * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
      for x, k in zip(leaves, keys)])


def noise_key(seed: int, round_idx: int, client: int, attempt: int) -> jax.Array:
  """Where a noise draw comes from: client k's own (k >= 0) or the server's (k = -1), per round
  and attempt, never a global stream: a resumed run and a deployment draw the same noise."""
  key = jax.random.fold_in(jax.random.key(seed), 0x0D9)  # apart from every training stream
  for value in (round_idx, client + 1, attempt):
    key = jax.random.fold_in(key, value)
  return key


def server_noise_std(dp: DPConfig, clients_per_round: int, arrived: int) -> float:
  """The noise the server adds to the sum of `arrived` clipped deltas so that it carries
  sigma * C in all: all of it ('server'), or what the missing clients' shares lacked."""
  if not dp.enabled or not dp.noise_std:
    return 0.0
  if dp.noise_at == 'server':
    return dp.noise_std
  missing = max(clients_per_round - arrived, 0)
  return dp.noise_std * math.sqrt(missing / clients_per_round)


@functools.lru_cache(maxsize=64)
def epsilon(noise_multiplier: float, sampling_rate: float, releases: int, delta: float,
            accountant: str = 'rdp') -> float:
  """The epsilon of `releases` Gaussian mechanisms of `noise_multiplier`, each on a Poisson
  sample of rate `sampling_rate`, at `delta` (inf without noise; 0 before any release)."""
  # dp_accounting (with scipy) takes about 1 s to import: only the server's accounting needs it,
  # not a node's ClientApp, which Flower starts afresh for every message.
  from dp_accounting import dp_event  # pylint: disable=import-outside-toplevel
  from dp_accounting.pld import pld_privacy_accountant  # pylint: disable=import-outside-toplevel
  if releases == 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  gaussian = dp_event.GaussianDpEvent(noise_multiplier)
  rdp_epsilon = _rdp_epsilon(gaussian, sampling_rate, releases, delta)
  if accountant == 'rdp':
    return rdp_epsilon
  event = gaussian if sampling_rate >= 1 else dp_event.PoissonSampledDpEvent(sampling_rate,
                                                                             gaussian)
  # The PLD's grid spans the privacy losses, up to about the RDP epsilon: at 1e-4 nats a step
  # (the library's default) a small noise multiplier needs billions of points (0.01: 255 s and
  # 19 GB a round). A step of 1e-5 of the RDP bound, when that is coarser, bounds the grid near
  # 1e5 points and costs at most about 1e-5 of epsilon, relatively (the grid rounds up).
  interval = max(_PLD_STEP, rdp_epsilon * _PLD_RELATIVE_STEP)
  try:
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
    acc.compose(event, releases)
    return min(float(acc.get_epsilon(delta)), rdp_epsilon)
  except (MemoryError, ValueError, OverflowError, FloatingPointError) as e:
    raise ValueError(f'fl.dp.accountant=pld failed at fl.dp.noise_multiplier='
                     f'{noise_multiplier:g} after {releases} releases ({type(e).__name__}: {e}); '
                     "use fl.dp.accountant='rdp'") from None


_PLD_STEP = 1e-4  # nats: dp-accounting's default
_PLD_RELATIVE_STEP = 1e-5  # of the RDP epsilon, when that is coarser


def _rdp_epsilon(gaussian, sampling_rate: float, releases: int, delta: float) -> float:
  from dp_accounting import dp_event  # pylint: disable=import-outside-toplevel  (see epsilon)
  from dp_accounting import rdp  # pylint: disable=import-outside-toplevel
  unsampled = rdp.RdpAccountant()
  unsampled.compose(gaussian, releases)
  if sampling_rate >= 1:
    return float(unsampled.get_epsilon(delta))
  # Orders below 2 do not converge for subsampled Gaussians (dp-accounting warns, then drops
  # them), and with little noise the best order is below 2: subsampling never costs privacy, so
  # the unsampled bound (all orders) is a bound too, and the smaller of the two holds.
  sampled = rdp.RdpAccountant(orders=list(range(2, 257)))
  sampled.compose(dp_event.PoissonSampledDpEvent(sampling_rate, gaussian), releases)
  return float(min(sampled.get_epsilon(delta), unsampled.get_epsilon(delta)))
