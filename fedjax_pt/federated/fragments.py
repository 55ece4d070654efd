"""Streaming fragments (Streaming DiLoCo, Douillard et al. 2025): the model synchronised in parts.

`fl.fragments = F` cuts the parameters into F fragments of consecutive layers, of about equal size.
Fragment f is synchronised at local steps f * tau / F + k * tau (rounded down): a round of tau
local steps is F segments of about tau / F steps, and after segment j (j = 1..F) the clients send
fragment j mod F and the server updates it. Every parameter is still synchronised once per tau
steps, but each message carries 1/F of the model, so the peak traffic of a synchronisation drops
F-fold. The clients keep their model between segments and across rounds: fragments not being
synchronised keep training.
When fragment f comes back from the server, a client takes
    alpha * (its own fragment) + (1 - alpha) * (the global fragment),  alpha = fl.fragment_mixing
alpha = 0 replaces it, as DiLoCo does for the whole model; with F = 1 and alpha = 0 this is plain
federated training.

A fragment of a tree is the same tree with None in place of the arrays of other fragments, so
`jax.tree.map`, the codecs of `fedjax_pt.federated.compression` and optax apply to it unchanged.
"""

import dataclasses
import re
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Segment:
  """Local steps [start, start + steps) of a round, after which `fragment` is synchronised."""
  fragment: int
  start: int
  steps: int


def schedule(local_steps: int, fragments: int) -> list[Segment]:
  """The segments of a round: fragment f syncs at local step floor(f * tau / F) (mod tau), so the
  round's last segment syncs fragment 0, at the round boundary. When F does not divide tau the
  segments differ by one step."""
  ends = [j * local_steps // fragments for j in range(fragments + 1)]
  return [Segment(j % fragments, ends[j - 1], ends[j] - ends[j - 1])
          for j in range(1, fragments + 1)]


def _depth(path) -> tuple:
  """Order of a parameter in the forward pass: embeddings, blocks by index, the rest (the final
  norm)."""
  top = str(getattr(path[0], 'key', path[0]))
  block = re.fullmatch(r'block_(\d+)', top)
  rank = {'wte': 0, 'wpe': 1}.get(top, 2 if block else 3)
  return rank, int(block.group(1)) if block else 0, jax.tree_util.keystr(path)


def partition(params: Any, fragments: int) -> Any:
  """The fragment of every array (a tree of ints like `params`): arrays in forward order, cut
  into `fragments` runs of about equal parameter count (an array is never split; each fragment
  gets at least one)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  if fragments > len(leaves):
    raise ValueError(f'fl.fragments={fragments} exceeds the model\'s {len(leaves)} parameter '
                     'arrays')
  order = sorted(range(len(leaves)), key=lambda i: _depth(leaves[i][0]))
  sizes = np.array([int(np.prod(leaves[i][1].shape)) for i in order], np.float64)
  # An array goes to the fragment where the middle of its span falls, moved by at most one so
  # that no fragment is empty (an array larger than 1/F of the model, e.g. a big embedding, would
  # otherwise skip one) and enough arrays remain for the fragments after it.
  middles = (np.cumsum(sizes) - sizes / 2) / sizes.sum()
  wanted = np.minimum((middles * fragments).astype(int), fragments - 1)
  ids, previous = [], -1
  for position, want in enumerate(wanted):
    lowest = max(previous, fragments - (len(order) - position))
    previous = int(min(max(want, lowest), previous + 1))
    ids.append(previous)
  assignment = [0] * len(leaves)
  for position, i in enumerate(order):
    assignment[i] = ids[position]
  return jax.tree_util.tree_unflatten(treedef, assignment)


def select(tree: Any, assignment: Any, fragment: int) -> Any:
  """`tree` with None in place of every array outside `fragment`."""
  return jax.tree.map(lambda f, x: x if f == fragment else None, assignment, tree)


def replace(tree: Any, part: Any, assignment: Any, fragment: int) -> Any:
  """`tree` with the arrays of `fragment` taken from `part` (a fragment tree, or a full one)."""
  return jax.tree.map(lambda f, x, p: p if f == fragment else x, assignment, tree, part,
                      is_leaf=lambda x: x is None)


def mix(local: Any, received: Any, alpha: float) -> Any:
  """alpha * local + (1 - alpha) * received, leaf by leaf (fragment trees: None stays None);
  alpha = 0 returns `received` itself (0 * local would turn -0.0 into +0.0 and NaN into NaN)."""
  return received if alpha == 0 else _mix(local, received, alpha)


@jax.jit
def _mix(local: Any, received: Any, alpha: float) -> Any:
  return jax.tree.map(lambda l, g: alpha * l + (1 - alpha) * g, local, received)


def fragment_sizes(params: Any, assignment: Any, fragments: int) -> list[int]:
  """Parameters per fragment."""
  sizes = [0] * fragments
  for f, x in zip(jax.tree.leaves(assignment), jax.tree.leaves(params)):
    sizes[f] += int(np.prod(x.shape))
  return sizes

