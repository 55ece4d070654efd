"""Reference implementations that the library's code is checked against: the plain weighted mean
and pseudo-gradient of client models, and the self-describing message whose length
`compression.payload_bytes` computes."""

from collections.abc import Sequence
import math
import struct
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pt.federated import compression

_MAGIC = b'FJPC\x01'  # format name and version
_HEADER = struct.Struct('<5sI')  # magic, number of arrays
_ARRAY_HEADER = struct.Struct('<HBBI')  # path length, codec, ndim, block size
_DIM = struct.Struct('<I')
_TOPK_HEADER = struct.Struct('<IB')  # values kept per chunk, bits of a value
_CODEC_IDS = {name: i for i, name in enumerate(compression.CODECS)}


def normalized_weights(weights: Sequence[float]) -> np.ndarray:
  w = np.asarray(weights, np.float64)
  return w / w.sum()


def weighted_average(client_params: Sequence[Any], weights: Sequence[float]) -> Any:
  """sum_k w_k theta_k (weights already summing to one): the reference for `RunningAverage`."""
  return jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights, xs)), *client_params)


def pseudo_gradient(global_params, mean_client_params):
  """theta - sum_k w_k theta_k, from models: the reference for `pseudo_gradient_of_deltas`."""
  return jax.tree.map(jnp.subtract, global_params, mean_client_params)


def _named(payload: Any) -> list[tuple[str, compression.EncodedArray]]:
  leaves = jax.tree_util.tree_flatten_with_path(
      payload, is_leaf=lambda x: isinstance(x, compression.EncodedArray))[0]
  return [(jax.tree_util.keystr(path, simple=True, separator='/'), e) for path, e in leaves]


def to_bytes(payload: Any) -> bytes:
  """The payload as one message: header, then per array its header (a top-k array's with its
  values per chunk and bits), values, scales and (top-k) positions."""
  named = _named(payload)
  out = [_HEADER.pack(_MAGIC, len(named))]
  for name, e in named:
    path = name.encode()
    out += [_ARRAY_HEADER.pack(len(path), _CODEC_IDS[e.codec], len(e.shape), e.block_size), path,
            *(_DIM.pack(d) for d in e.shape)]
    if e.codec == 'topk':
      out.append(_TOPK_HEADER.pack(e.topk.k, e.topk.bits))
    out += [np.asarray(a).astype(np.asarray(a).dtype.newbyteorder('<')).tobytes()
            for a in (e.values, e.scales, e.indices) if a is not None]
  return b''.join(out)


def from_bytes(message: bytes) -> dict[str, compression.EncodedArray]:
  """The arrays of a `to_bytes` message, by path ('block_0/attn/wqkv/kernel')."""
  magic, count = _HEADER.unpack_from(message, 0)
  if magic != _MAGIC:
    raise ValueError(f'not a fedjax_pt payload (header {magic!r})')
  offset, arrays = _HEADER.size, {}
  for _ in range(count):
    path_len, codec_id, ndim, block_size = _ARRAY_HEADER.unpack_from(message, offset)
    offset += _ARRAY_HEADER.size
    name = message[offset:offset + path_len].decode()
    offset += path_len
    shape = tuple(_DIM.unpack_from(message, offset + _DIM.size * i)[0] for i in range(ndim))
    offset += _DIM.size * ndim
    codec = compression.CODECS[codec_id]
    size = math.prod(shape)
    if codec == 'topk':
      k, bits = _TOPK_HEADER.unpack_from(message, offset)
      offset += _TOPK_HEADER.size
      arrays[name], offset = _read_topk(message, offset, shape, block_size, k, bits)
      continue
    if codec in ('none', 'bf16'):
      dtype = np.float32 if codec == 'none' else jnp.bfloat16
      values_shape, scales_len = shape, 0
    else:
      blocks = -(-size // block_size)
      dtype = np.int8 if codec == 'int8' else np.uint8
      values_shape = (blocks, block_size if codec == 'int8' else block_size // 2)
      scales_len = blocks
    values = np.frombuffer(message, dtype, math.prod(values_shape), offset).reshape(values_shape)
    offset += values.nbytes
    scales = None
    if scales_len:
      scales = np.frombuffer(message, '<f4', scales_len, offset)
      offset += scales.nbytes
    arrays[name] = compression.EncodedArray(values, scales, shape, codec, block_size)
  if offset != len(message):
    raise ValueError(f'payload of {len(message)} bytes has {len(message) - offset} trailing bytes')
  return arrays


def _read_topk(message: bytes, offset: int, shape, chunk: int, k: int,
               bits: int) -> tuple[compression.EncodedArray, int]:
  chunks = -(-math.prod(shape) // chunk)
  if bits == 8:
    values = np.frombuffer(message, np.int8, chunks * k, offset)
  else:
    values = np.frombuffer(message, np.uint8, -(-chunks * k * bits // 8), offset)
  offset += values.nbytes
  scales = np.frombuffer(message, '<f4', chunks, offset)
  offset += scales.nbytes
  index = '<u1' if chunk <= 256 else '<u2'
  indices = np.frombuffer(message, index, chunks * k, offset).reshape(chunks, k)
  offset += indices.nbytes
  fraction = k / chunk  # any fraction that rounds to k
  spec = compression.topk_lib.TopK(fraction, chunk, bits)
  assert spec.k == k
  return compression.EncodedArray(values, scales, shape, 'topk', chunk, indices, spec), offset
