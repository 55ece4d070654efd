"""The 'topk' upload codec (SparseLoCo, arXiv 2508.15706; DeMo): per chunk, the largest
magnitudes only, quantised to a few bits, with their positions.

Each array is flattened in row-major order and cut into N = ceil(n / C) chunks of C =
`fl.compression.topk_chunk` consecutive values, the last one zero-padded. Of each chunk it keeps
the k = max(1, min(C, floor(f C + 1/2))) values of largest magnitude (f =
`fl.compression.topk_fraction`; ties go to the lower position), in increasing order of position,
and sends
  indices  [N, k] their positions in the chunk, uint8 when C <= 256, else uint16;
  scales   [N] float32 s = m / qmax, m the largest kept magnitude (NaN when the chunk holds a
           non-finite value: the whole chunk then decodes to NaN, so a diverged update stays
           non-finite);
  values   N k codes of b = `fl.compression.topk_bits` bits, row-major over [N, k]:
    b = 8  int8 q = round(x / s) in [-127, 127] (as the int8 codec): |x - q s| <= s / 2;
    b = 4  q in [-7, 7] as the int4 codec, stored q + 8, two a byte (low nibble first);
    b = 2  sign and magnitude: code c = round((x / s + 3) / 2) in {0, 1, 2, 3} (half to even)
           stands for (2c - 3) s in {-3s, -s, s, 3s} with s = m / 3, four a byte (lowest bits
           first): the largest kept value is exact, any other within s = m / 3.
    4- and 2-bit codes are packed over the whole [N, k] stream, zero-padded to a whole byte.
Everything else decodes to 0. Per chunk that is k (index bytes + b / 8) + 4 bytes: on the wire
about (k (i + b / 8) + 4) / C bytes a value (i = 1 or 2), against 4 for float32.

Top-k sends deltas only: a model broadcast with most of its weights zeroed is no model, so the
download refuses it (`fedjax_pt.federated.compression.CompressionConfig`).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

BITS = (2, 4, 8)
_QMAX = {8: 127, 4: 7, 2: 3}
MAX_CHUNK = 2 ** 16  # positions fit a uint16


@dataclasses.dataclass(frozen=True)
class TopK:
  """fl.compression.topk_*: the fraction of each chunk kept, the chunk, the bits of a value."""
  fraction: float = 1 / 64
  chunk: int = 64
  bits: int = 2

  def __post_init__(self):
    if (isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float))
        or not 0 < self.fraction <= 1):
      raise ValueError(f'fl.compression.topk_fraction must be in (0, 1], got {self.fraction!r}')
    if (isinstance(self.chunk, bool) or not isinstance(self.chunk, int)
        or not 1 <= self.chunk <= MAX_CHUNK):
      raise ValueError(f'fl.compression.topk_chunk must be an integer in [1, {MAX_CHUNK}], got '
                       f'{self.chunk!r}')
    if self.bits not in BITS:
      raise ValueError(f'fl.compression.topk_bits must be one of {BITS}, got {self.bits!r}')

  @property
  def k(self) -> int:
    """Values kept per chunk: f C rounded to nearest (half up), at least 1."""
    return max(1, min(self.chunk, math.floor(self.fraction * self.chunk + 0.5)))

  @property
  def index_dtype(self):
    return np.uint8 if self.chunk <= 256 else np.uint16


def _chunks(n: int, spec: TopK) -> int:
  return -(-n // spec.chunk)


def encode(x: jax.Array, spec: TopK) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(values, scales, indices) of the array `x`, as the module's docstring defines them."""
  chunk, k, bits = spec.chunk, spec.k, spec.bits
  flat = x.reshape(-1).astype(jnp.float32)
  n = _chunks(flat.size, spec)
  chunks_NxC = jnp.pad(flat, (0, n * chunk - flat.size)).reshape(n, chunk)
  _, idx_NxK = jax.lax.top_k(jnp.abs(chunks_NxC), k)
  idx_NxK = jnp.sort(idx_NxK, axis=1)
  kept_NxK = jnp.take_along_axis(chunks_NxC, idx_NxK, axis=1)
  finite_N = jnp.all(jnp.isfinite(chunks_NxC), axis=1)
  scales_N = jnp.where(finite_N, jnp.max(jnp.abs(kept_NxK), axis=1) / _QMAX[bits], jnp.nan)
  # An all-zero chunk has scale 0 (and a non-finite one NaN): divide by 1, the codes are moot.
  ratio_NxK = kept_NxK / jnp.where(scales_N > 0, scales_N, 1.0)[:, None]
  if bits == 2:
    codes = jnp.clip(jnp.round((ratio_NxK + 3) / 2), 0, 3)
  else:
    codes = jnp.clip(jnp.round(ratio_NxK), -_QMAX[bits], _QMAX[bits])
  codes = jnp.nan_to_num(codes).reshape(-1)
  if bits == 8:
    values = codes.astype(jnp.int8)
  else:
    if bits == 4:
      codes = codes + 8
    per_byte = 8 // bits
    codes = jnp.pad(codes.astype(jnp.uint8), (0, -codes.size % per_byte)).reshape(-1, per_byte)
    values = codes[:, 0]
    for j in range(1, per_byte):
      values = values | (codes[:, j] << (bits * j))
  return values, scales_N, idx_NxK.astype(spec.index_dtype)


def decode(values: jax.Array, scales_N: jax.Array, idx_NxK: jax.Array, size: int,
           spec: TopK) -> jax.Array:
  """The flat float32 array of `size` values that `encode` sent."""
  chunk, k, bits = spec.chunk, spec.k, spec.bits
  n = scales_N.shape[0]
  if bits == 8:
    q = values.astype(jnp.float32)
  else:
    mask = (1 << bits) - 1
    codes = jnp.stack([(values >> (bits * j)) & mask for j in range(8 // bits)], axis=-1)
    codes = codes.reshape(-1)[:n * k].astype(jnp.float32)
    q = codes - 8 if bits == 4 else 2 * codes - 3
  kept_NxK = q.reshape(n, k) * scales_N[:, None]
  rows_Nx1 = jnp.arange(n)[:, None]
  dense_NxC = jnp.zeros((n, chunk), jnp.float32).at[rows_Nx1, idx_NxK.astype(jnp.int32)].set(
      kept_NxK)
  # 0 s is 0 in a finite chunk and NaN in a non-finite one: the whole chunk decodes to NaN.
  dense_NxC = dense_NxC + 0 * scales_N[:, None]
  return dense_NxC.reshape(-1)[:size]
