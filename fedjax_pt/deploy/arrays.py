"""Pytrees <-> Flower `ArrayRecord`s, keyed by '/'-joined key paths, and content digests.

Both ends know the model's structure (they build it from the same config), so a record is read
back *into* a template: every key, shape and dtype is checked, and the arrays come back in the
template's tree. Flower stores an array with `np.save`, which has no bfloat16: such an array
returns as raw 2-byte voids and is re-viewed as the template's dtype, bit for bit.
"""

import hashlib
from typing import Any

import jax
import numpy as np
from flwr.app import Array, ArrayRecord


def key_path(path) -> str:
  """'decoder/layer_0/attn/kernel' for a jax key path (dict keys, attributes, indices)."""
  parts = []
  for entry in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      raise ValueError(f'unsupported key path entry {entry!r}')
  return '/'.join(parts)


def flatten(tree) -> dict[str, np.ndarray]:
  """The leaves of `tree` as host arrays, by key path, in the tree's (deterministic) order."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {key_path(path): np.asarray(jax.device_get(leaf)) for path, leaf in leaves}


def to_record(tree) -> ArrayRecord:
  # np.asarray, not np.ascontiguousarray: that one turns a 0-d array into shape (1,).
  return ArrayRecord({k: Array.from_numpy_ndarray(np.asarray(v, order='C'))
                      for k, v in flatten(tree).items()})


def from_record(record: ArrayRecord, like) -> Any:
  """The tree of `like` (arrays or ShapeDtypeStructs) filled from `record`, as numpy arrays."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(like)
  expected = [key_path(path) for path, _ in paths]
  if sorted(record.keys()) != sorted(expected):
    missing = sorted(set(expected) - set(record.keys()))
    extra = sorted(set(record.keys()) - set(expected))
    raise ValueError(f'the arrays do not fit the model: missing {missing[:3]}, unexpected '
                     f'{extra[:3]}')
  leaves = []
  for key, (_, want) in zip(expected, paths):
    x = record[key].numpy()
    dtype = np.dtype(want.dtype)
    if x.dtype.kind == 'V' and x.dtype.itemsize == dtype.itemsize:
      x = x.view(dtype)  # an extended dtype (bfloat16) that np.save wrote as raw bytes
    if x.shape != tuple(want.shape) or x.dtype != dtype:
      raise ValueError(f'{key}: got {x.dtype}{list(x.shape)}, the model has '
                       f'{dtype}{list(want.shape)}')
    leaves.append(x)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def digest(tree) -> str:
  """SHA-256 of every leaf's key path, dtype, shape and bytes: equal digests, equal trees."""
  h = hashlib.sha256()
  for key, x in flatten(tree).items():
    h.update(f'{key}:{x.dtype.name}:{x.shape};'.encode())
    h.update(np.asarray(x, order='C').reshape(-1).view(np.uint8))
  return h.hexdigest()


def nested(tree) -> dict[str, Any]:
  """`tree` as nested dicts keyed by its key path's parts: a compression payload (whose leaves
  are `EncodedArray` fields) in the plain form a checkpointer stores."""
  out: dict[str, Any] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    *parents, name = key_path(path).split('/')
    node = out
    for part in parents:
      node = node.setdefault(part, {})
    node[name] = leaf
  return out


def unnested(tree: dict[str, Any], like) -> Any:
  """The tree of `like` with the leaves of `nested(...)` from `tree`."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(like)
  leaves = []
  for path, _ in paths:
    node = tree
    for part in key_path(path).split('/'):
      node = node[part]
    leaves.append(node)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def abstract(tree) -> Any:
  """Shapes and dtypes of `tree`, on no device: what a host-side restore fills."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
