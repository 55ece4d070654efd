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
  """The payload as one message: header, then per array its header, values and scales."""
  named = _named(payload)
  out = [_HEADER.pack(_MAGIC, len(named))]
  for name, e in named:
    path = name.encode()
    out += [_ARRAY_HEADER.pack(len(path), _CODEC_IDS[e.codec], len(e.shape), e.block_size), path,
            *(_DIM.pack(d) for d in e.shape)]
    out += [np.asarray(a).astype(np.asarray(a).dtype.newbyteorder('<')).tobytes()
            for a in (e.values, e.scales) if a is not None]
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
