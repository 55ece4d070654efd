"""What travels between server and clients: pure pytree encode/decode and exact wire sizes.

    payload = encode(delta, 'int8', block_size=64)   # jittable; a pytree of EncodedArrays
    delta_hat = decode(payload)                       # float32, the shapes of `delta`
    payload_bytes(payload)                            # what the message costs on the wire

Codecs (`fl.compression.upload` / `download`), for a value x of a block whose largest magnitude
is m:
  'none'  float32 as it is: exact, 4 bytes a value.
  'bf16'  rounded to bfloat16 (8-bit significand, to nearest): |x - x^| <= 2^-8 |x|, 2 bytes a
          value.
  'int8'  blockwise absmax: q = round(x / s) in [-127, 127] with s = m / 127, one float32 s per
          `block_size` values: |x - q s| <= s / 2 = m / 254, 1 byte a value + 4 per block.
  'int4'  the same with q in [-7, 7] (s = m / 7), two values a byte: |x - q s| <= m / 14.
  'topk'  (upload only) per chunk, the largest magnitudes quantised to 2, 4 or 8 bits and their
          positions: `fedjax_pt.federated.topk`.
Blocks run over each array flattened in row-major order, the last one zero-padded, so the padding
is under one block per array. A non-finite value makes its block's scale non-finite, so a
diverged client's update still decodes to non-finite values and the server's verdict sees it.

`payload_bytes` is the length of the payload as one self-describing message: a header naming
every array (its path, codec, shape, block size), then each array's values and scales as raw
bytes (tests/oracles.py writes that message); a top-k array's header adds the values it keeps
per chunk and their bits, and its positions follow its scales. A deployment's transport adds its
own framing (Flower's records, orbax's files) to it. It needs shapes only, so it also sizes
`jax.eval_shape` trees.
"""

import dataclasses
import functools
import math
import struct
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from fedjax_pt.federated import topk as topk_lib

CODECS = ('none', 'bf16', 'int8', 'int4', 'topk')
_QMAX = {'int8': 127, 'int4': 7}
_HEADER = struct.Struct('<5sI')  # format name and version, number of arrays
_ARRAY_HEADER = struct.Struct('<HBBI')  # path length, codec, ndim, block size
_DIM = struct.Struct('<I')
_TOPK_HEADER = struct.Struct('<IB')  # values kept per chunk, bits of a value


@dataclasses.dataclass(frozen=True)
class CompressionConfig:
  """`fl.compression`: codecs of each direction, the block of one scale, error feedback."""
  upload: str = 'none'
  download: str = 'none'
  block_size: int = 64
  error_feedback: bool = False
  topk_fraction: float = topk_lib.TopK.fraction
  topk_chunk: int = topk_lib.TopK.chunk
  topk_bits: int = topk_lib.TopK.bits

  def __post_init__(self):
    for name in ('upload', 'download'):
      if getattr(self, name) not in CODECS:
        raise ValueError(f'fl.compression.{name} must be one of {CODECS}, got '
                         f'{getattr(self, name)!r}')
    if self.download == 'topk':
      raise ValueError("fl.compression.download='topk' is refused: the server broadcasts the "
                       'model itself, not a delta, and a model with most weights zeroed is no '
                       "model; choose 'none', 'bf16', 'int8' or 'int4'")
    topk_lib.TopK(self.topk_fraction, self.topk_chunk, self.topk_bits)  # validates topk_*
    if not isinstance(self.block_size, int) or self.block_size < 2 or self.block_size % 2:
      raise ValueError(f'fl.compression.block_size must be an even integer >= 2 (int4 packs two '
                       f'values a byte), got {self.block_size!r}')
    if not isinstance(self.error_feedback, bool):
      raise ValueError(f'fl.compression.error_feedback must be a bool, got '
                       f'{self.error_feedback!r}')

  @property
  def topk(self) -> topk_lib.TopK:
    return topk_lib.TopK(self.topk_fraction, self.topk_chunk, self.topk_bits)

  @classmethod
  def from_config(cls, compression: ml_collections.ConfigDict) -> 'CompressionConfig':
    return cls(**compression.to_dict())


def check_block_size(cfg: CompressionConfig, like: Any) -> None:
  """Raises ValueError when a block is larger than every array of `like` (the parameters): each
  array would be padded to a whole block, inflating its messages without a word. The same for
  the chunk of the top-k codec."""
  named = jax.tree_util.tree_leaves_with_path(like)
  path, largest = max(((p, math.prod(x.shape)) for p, x in named), key=lambda pair: pair[1])
  where = f'({jax.tree_util.keystr(path, simple=True, separator=".")}, {largest} values)'
  if {cfg.upload, cfg.download} & set(_QMAX) and cfg.block_size > largest:
    raise ValueError(f'fl.compression.block_size={cfg.block_size} exceeds the largest parameter '
                     f'array {where}: every array would be sent padded to a whole block')
  if cfg.upload == 'topk' and cfg.topk_chunk > largest:
    raise ValueError(f'fl.compression.topk_chunk={cfg.topk_chunk} exceeds the largest parameter '
                     f'array {where}: every array would be sent padded to a whole chunk')


class EncodedArray(flax.struct.PyTreeNode):
  """One array as sent: `values` (float32 or bfloat16 in the array's shape; int8 [blocks, block];
  int4 as uint8 [blocks, block / 2]; topk as `fedjax_pt.federated.topk` says), for int8/int4/topk
  one float32 scale per block or chunk, and for topk the kept values' `indices` and its `topk`
  (whose chunk is also `block_size`)."""
  values: Any
  scales: Any
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
  codec: str = flax.struct.field(pytree_node=False)
  block_size: int = flax.struct.field(pytree_node=False, default=0)
  indices: Any = None
  topk: topk_lib.TopK | None = flax.struct.field(pytree_node=False, default=None)


def _is_encoded(x) -> bool:
  return isinstance(x, EncodedArray)


def _encode_array(x: jax.Array, codec: str, block_size: int, topk: topk_lib.TopK) -> EncodedArray:
  if codec == 'topk':
    values, scales, indices = topk_lib.encode(x, topk)
    return EncodedArray(values, scales, x.shape, codec, topk.chunk, indices, topk)
  if codec == 'none':
    return EncodedArray(x.astype(jnp.float32), None, x.shape, codec)
  if codec == 'bf16':
    return EncodedArray(x.astype(jnp.bfloat16), None, x.shape, codec)
  qmax = _QMAX[codec]
  flat = x.reshape(-1).astype(jnp.float32)
  blocks = -(-flat.size // block_size)
  blocks_NxB = jnp.pad(flat, (0, blocks * block_size - flat.size)).reshape(blocks, block_size)
  scales_N = jnp.max(jnp.abs(blocks_NxB), axis=1) / qmax
  # An all-zero block has scale 0: divide by 1 instead, its values are 0 either way.
  q_NxB = jnp.round(blocks_NxB / jnp.where(scales_N > 0, scales_N, 1.0)[:, None])
  # NaN/Inf make the block's scale non-finite already; the cast needs a finite value.
  q_NxB = jnp.nan_to_num(jnp.clip(q_NxB, -qmax, qmax)).astype(jnp.int8)
  if codec == 'int4':
    nibbles = (q_NxB + 8).astype(jnp.uint8)  # 1..15
    q_NxB = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
  return EncodedArray(q_NxB, scales_N, x.shape, codec, block_size)


def _decode_array(e: EncodedArray) -> jax.Array:
  if e.codec in ('none', 'bf16'):
    return e.values.astype(jnp.float32)
  size = math.prod(e.shape)
  if e.codec == 'topk':
    return topk_lib.decode(e.values, e.scales, e.indices, size, e.topk).reshape(e.shape)
  q = e.values
  if e.codec == 'int4':
    q = jnp.stack([q & 15, q >> 4], axis=-1).reshape(q.shape[0], -1).astype(jnp.int8) - 8
  return (q.astype(jnp.float32) * e.scales[:, None]).reshape(-1)[:size].reshape(e.shape)


@functools.partial(jax.jit, static_argnames=('codec', 'block_size', 'topk'))
def encode(tree: Any, codec: str, block_size: int = 64,
           topk: topk_lib.TopK = topk_lib.TopK()) -> Any:
  """The payload of `tree`: its structure, every array an `EncodedArray`."""
  return jax.tree.map(lambda x: _encode_array(x, codec, block_size, topk), tree)


@jax.jit
def decode(payload: Any) -> Any:
  """The float32 tree a payload stands for."""
  return jax.tree.map(_decode_array, payload, is_leaf=_is_encoded)


@functools.partial(jax.jit, static_argnames=('codec', 'block_size', 'topk', 'privatize'))
def compress_delta(local: Any, received: Any, residual: Any, codec: str,
                   block_size: int = 64, topk: topk_lib.TopK = topk_lib.TopK(), privatize=None,
                   key=None) -> tuple[Any, Any]:
  """A client's message and its new error-feedback residual.

  The message is the encoded delta `local - received` (the client's model minus the global
  model it received). `privatize(delta, key)`, if given, clips and noises the delta first
  (`fedjax_pt.privacy.ClientNoise`). With a `residual` (error feedback), what earlier messages
  could not carry is added to the delta then, and the new residual is what this message cannot
  carry: over many messages the decoded ones add up to the true deltas, up to the last residual.
  """
  delta = jax.tree.map(jnp.subtract, local, received)
  if privatize is not None:
    delta = privatize(delta, key)
  if residual is None:
    return encode(delta, codec, block_size, topk), None
  delta = jax.tree.map(jnp.add, delta, residual)
  payload = encode(delta, codec, block_size, topk)
  return payload, jax.tree.map(jnp.subtract, delta, decode(payload))


def _mesh_axes(spec: PartitionSpec) -> tuple[str, ...]:
  return tuple(axis for entry in spec if entry is not None
               for axis in (entry if isinstance(entry, tuple) else (entry,)))


def _place(encoded: EncodedArray, where: NamedSharding) -> EncodedArray:
  """Where a payload array of an array laid out as `where` goes: float32/bf16 values like the
  array; int8/int4 blocks and scales (and top-k codes, scales and positions) split along their
  first axis over the mesh axes that split the array (so every device holds about its share),
  each replicated when those do not divide it."""
  if encoded.scales is None:
    return encoded.replace(values=where)
  axes = _mesh_axes(where.spec)
  ways = math.prod(where.mesh.shape[a] for a in axes)

  def split(a):
    if a is None:
      return None
    return NamedSharding(where.mesh, PartitionSpec(axes) if axes and a.shape[0] % ways == 0
                         else PartitionSpec())

  return encoded.replace(values=split(encoded.values), scales=split(encoded.scales),
                         indices=split(encoded.indices))


class Codec:
  """`encode`, `decode` and `compress_delta` for trees laid out like `like` (arrays or
  ShapeDtypeStructs with NamedShardings: the parameters, or a fragment of them), jitted so that
  payloads stay split over the devices that hold the arrays and decoded trees land where the
  arrays are. Without NamedShardings (one device) they are the plain functions."""

  def __init__(self, codec: str, block_size: int, like: Any,
               topk: topk_lib.TopK = topk_lib.TopK()):
    self.codec, self.block_size = codec, block_size
    shardings = [getattr(x, 'sharding', None) for x in jax.tree.leaves(like)]
    encode_fn = functools.partial(encode, codec=codec, block_size=block_size, topk=topk)
    delta_fn = functools.partial(compress_delta, codec=codec, block_size=block_size, topk=topk)
    if not shardings or not all(isinstance(s, NamedSharding) for s in shardings):
      self.encode, self.decode, self._delta = encode_fn, decode, delta_fn
      self._delta_ef = delta_fn
      return
    tree = jax.tree.map(lambda x: x.sharding, like)
    payload = jax.tree.map(_place, jax.eval_shape(encode_fn, like), tree, is_leaf=_is_encoded)
    self.encode = jax.jit(encode_fn, out_shardings=payload)
    self.decode = jax.jit(decode, out_shardings=tree)
    self._delta = jax.jit(delta_fn, out_shardings=(payload, None), static_argnames='privatize')
    self._delta_ef = jax.jit(delta_fn, out_shardings=(payload, tree),
                             static_argnames='privatize')

  def compress_delta(self, local: Any, received: Any, residual: Any, privatize=None,
                     key=None) -> tuple[Any, Any]:
    """`compress_delta` of this codec (error feedback when `residual` is not None)."""
    if residual is None:
      return self._delta(local, received, None, privatize=privatize, key=key)
    return self._delta_ef(local, received, residual, privatize=privatize, key=key)


def _named(payload: Any) -> list[tuple[str, EncodedArray]]:
  leaves = jax.tree_util.tree_flatten_with_path(payload, is_leaf=_is_encoded)[0]
  return [(jax.tree_util.keystr(path, simple=True, separator='/'), e) for path, e in leaves]


def _array_bytes(name: str, e: EncodedArray) -> int:
  data = sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize
             for a in (e.values, e.scales, e.indices) if a is not None)
  header = _ARRAY_HEADER.size + (_TOPK_HEADER.size if e.codec == 'topk' else 0)
  return header + len(name.encode()) + _DIM.size * len(e.shape) + data


def payload_bytes(payload: Any) -> int:
  """The length of the payload as one message, from shapes and dtypes only (no transfer, no
  copy)."""
  return _HEADER.size + sum(_array_bytes(name, e) for name, e in _named(payload))


def raw_bytes(tree: Any) -> int:
  """What the arrays of `tree` (or of a payload) take as plain float32: the uncompressed size."""
  return 4 * sum(math.prod(x.shape) for x in jax.tree.leaves(tree, is_leaf=_is_encoded))
