"""Causal self-attention kernels of the decoders: positions (rotary, ALiBi), the CPU-tuned blocked
attention of training, and the attention of decoding over a key/value cache.

Letter key as in `fedjax_pt.model`.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pt.model_config import ModelConfig

def rope(x_BxLxNxH: jax.Array, theta: float, positions_BxL: jax.Array | None = None,
          num_positions: int = 0) -> jax.Array:
  """Rotary embedding (rotate-half convention, as GPT-NeoX and Hugging Face's Llama), computed in
  float32, at positions 0..L-1 or at `positions_BxL` (decoding; below 0, padding, as 0). The
  latter looks its angles up in a table of `num_positions` made as the former makes them, so that
  a token is rotated by the same float32 angle in training and in decoding."""
  _, length, _, head_dim = x_BxLxNxH.shape
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2) / head_dim))
  if positions_BxL is None:
    angles_LxH2 = np.arange(length)[:, None] * inv_freq[None, :]
    sin, cos = jnp.sin(angles_LxH2)[None, :, None, :], jnp.cos(angles_LxH2)[None, :, None, :]
  else:
    table_MxH2 = jnp.asarray(np.arange(num_positions)[:, None] * inv_freq[None, :], jnp.float32)
    angles_BxLxH2 = table_MxH2[jnp.clip(positions_BxL, 0, num_positions - 1)]
    sin, cos = jnp.sin(angles_BxLxH2)[:, :, None, :], jnp.cos(angles_BxLxH2)[:, :, None, :]
  x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxLxNxH.dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
  return 2.0 ** (-8.0 * np.arange(1, num_heads + 1) / num_heads)


def alibi_bias(num_heads: int, length: int) -> np.ndarray:
  """ALiBi slopes 2^(-8i/N) times the (non-positive) key-query distance: [1, N, L, L]."""
  distance_LxL = np.arange(length)[None, :] - np.arange(length)[:, None]
  return (alibi_slopes(num_heads)[:, None, None] * np.minimum(distance_LxL, 0)[None])[None].astype(
      np.float32)


# Query rows per block of `blocked_causal_attention` (at least 2 blocks, at most 8): 64 was the
# fastest of 32, 64 and 128 at L = 128 and 256 on a 2-core CPU (BENCHMARKS.md).
QUERY_BLOCK = 64
# A masked score, as in jax.nn.dot_product_attention: exp(masked - max) is exactly 0.
MASKED = -0.7 * float(np.finfo(np.float32).max)


def query_blocks(length: int) -> list[tuple[int, int]]:
  num_blocks = min(max(length // QUERY_BLOCK, 2), 8, length)
  bounds = [round(i * length / num_blocks) for i in range(num_blocks + 1)]
  return list(zip(bounds[:-1], bounds[1:]))


def blocked_causal_attention(q_BxLxNxH: jax.Array, k_BxLxNxH: jax.Array, v_BxLxNxH: jax.Array,
                              bias_1xNxLxL: jax.Array | None) -> jax.Array:
  """Causal softmax attention as `jax.nn.dot_product_attention` computes it (scores and softmax
  in float32, probabilities in the compute dtype), with fewer passes over the [L, L] scores, which
  is what attention costs on a CPU:

  - queries go in blocks, each attending to the keys up to its last query only: the scores that
    the causal mask would zero are not computed (25% fewer with 2 blocks, 44% with 8);
  - the mask is added (0 or a large negative, with the ALiBi bias) rather than selected, which
    XLA fuses into the matmul that makes the scores, and the 1/sqrt(H) scale multiplies q;
  - the softmax is normalised after the values: (exp(s - max) @ v) / sum(exp(s - max)) divides
    [L, H] instead of [L, L], and its gradient needs no reduction over the scores;
  - q, k and v are transposed to [B, N, L, H] once, not per block and per matmul.

  Only the order of float operations differs (tests/model_numerics_test.py).
  """
  length, head_dim = q_BxLxNxH.shape[1], q_BxLxNxH.shape[3]
  q_BxLxNxH = q_BxLxNxH * jnp.asarray(1 / math.sqrt(head_dim), q_BxLxNxH.dtype)
  q_BxNxLxH, k_BxNxLxH, v_BxNxLxH = (jnp.swapaxes(t, 1, 2)
                                     for t in (q_BxLxNxH, k_BxLxNxH, v_BxLxNxH))
  outs = []
  for start, end in query_blocks(length):
    # Block rows are queries start..end-1, columns keys 0..end-1.
    # jnp, not np: traced, so abstract evaluation (parameter shapes, memory checks) allocates no
    # [L, L] mask however long the sequence.
    causal_TxS = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
    bias_1xNxTxS = 0.0 if bias_1xNxLxL is None else (
        bias_1xNxLxL[:, :, start:end, :end].astype(jnp.float32))
    mask_1xNxTxS = jnp.where(causal_TxS, bias_1xNxTxS, MASKED)
    s_BxNxTxS = jnp.einsum('BNTH,BNSH->BNTS', q_BxNxLxH[:, :, start:end], k_BxNxLxH[:, :, :end],
                           preferred_element_type=jnp.float32) + mask_1xNxTxS
    e_BxNxTxS = jnp.exp(s_BxNxTxS - jax.lax.stop_gradient(s_BxNxTxS.max(-1, keepdims=True)))
    out_BxNxTxH = jnp.einsum('BNTS,BNSH->BNTH', e_BxNxTxS.astype(v_BxNxLxH.dtype),
                             v_BxNxLxH[:, :, :end], preferred_element_type=jnp.float32)
    out_BxNxTxH = out_BxNxTxH / e_BxNxTxS.sum(-1, keepdims=True)
    outs.append(out_BxNxTxH.astype(v_BxNxLxH.dtype))
  return jnp.swapaxes(jnp.concatenate(outs, axis=2), 1, 2)


def scores_per_query(cfg: ModelConfig, length: int, platform: str) -> float:
  """Attention scores one query computes, and the backward pass keeps, on average over a sequence
  of `length`: all `length` keys where jax.nn.dot_product_attention's XLA path masks a full
  [L, L] (accelerators), the causal blocks of `blocked_causal_attention` on CPUs, and none with
  cuDNN's flash attention, which keeps O(L) statistics instead."""
  if cfg.attention == 'cudnn':
    return 0.0
  if platform != 'cpu':
    return float(length)
  return sum((end - start) * end for start, end in query_blocks(length)) / length


def causal_attention(cfg: ModelConfig, q_BxLxNxH: jax.Array, k_BxLxNxH: jax.Array,
                      v_BxLxNxH: jax.Array, bias_1xNxLxL: jax.Array | None) -> jax.Array:
  if cfg.attention == 'cudnn':
    return jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, bias=bias_1xNxLxL,
                                        is_causal=True, implementation='cudnn')
  # The blocked formulation is tuned and measured on CPUs; elsewhere XLA's attention is JAX's.
  return jax.lax.platform_dependent(
      q_BxLxNxH, k_BxLxNxH, v_BxLxNxH,
      cpu=lambda q, k, v: blocked_causal_attention(q, k, v, bias_1xNxLxL),
      default=lambda q, k, v: jax.nn.dot_product_attention(q, k, v, bias=bias_1xNxLxL,
                                                           is_causal=True))


class DecodeStep(NamedTuple):
  """Where the tokens of one decoding call go: cache slots index..index+L-1, at absolute positions
  `positions_BxL`; `key_positions_BxS` are the positions of all S slots once they are written."""
  index: jax.Array
  positions_BxL: jax.Array
  key_positions_BxS: jax.Array


def cached_attention(cfg: ModelConfig, q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array,
                      v_BxSxKxH: jax.Array, step: DecodeStep) -> jax.Array:
  """The new queries' attention to every cache slot, computed as `blocked_causal_attention` does
  (scale on q, float32 scores, normalised after the values). A slot is a key of a query if it was
  written no later (left padding keeps a row's positions in slot order) and holds a token (position
  >= 0). Groups of query heads read their shared key/value head in place, without repeating the
  cache."""
  batch, length, _, head_dim = q_BxTxNxH.shape
  slots = k_BxSxKxH.shape[1]
  group = cfg.num_heads // cfg.kv_heads
  q_BxTxKxGxH = (q_BxTxNxH * jnp.asarray(1 / math.sqrt(head_dim), q_BxTxNxH.dtype)).reshape(
      batch, length, cfg.kv_heads, group, head_dim)
  written_TxS = jnp.arange(slots)[None, :] <= step.index + jnp.arange(length)[:, None]
  key_BxTxS = written_TxS[None] & (step.key_positions_BxS >= 0)[:, None, :]
  bias = 0.0
  if cfg.position_embedding == 'alibi':
    # The training bias's own values, looked up by key-query distance.
    table_NxM = jnp.asarray(
        alibi_slopes(cfg.num_heads)[:, None] * -np.arange(cfg.max_seq_len)[None, :],
        jnp.float32).astype(cfg.compute_dtype).astype(jnp.float32)
    distance_BxTxS = jnp.clip(step.positions_BxL[:, :, None] - step.key_positions_BxS[:, None, :],
                              0, cfg.max_seq_len - 1)
    bias = jnp.moveaxis(table_NxM[:, distance_BxTxS], 0, 1).reshape(
        batch, cfg.kv_heads, group, length, slots)
  mask_BxKxGxTxS = jnp.where(key_BxTxS[:, None, None], bias, MASKED)
  s_BxKxGxTxS = jnp.einsum('BTKGH,BSKH->BKGTS', q_BxTxKxGxH, k_BxSxKxH,
                           preferred_element_type=jnp.float32) + mask_BxKxGxTxS
  e_BxKxGxTxS = jnp.exp(s_BxKxGxTxS - s_BxKxGxTxS.max(-1, keepdims=True))
  out_BxKxGxTxH = jnp.einsum('BKGTS,BSKH->BKGTH', e_BxKxGxTxS.astype(v_BxSxKxH.dtype), v_BxSxKxH,
                             preferred_element_type=jnp.float32)
  out_BxKxGxTxH = (out_BxKxGxTxH / e_BxKxGxTxS.sum(-1, keepdims=True)).astype(v_BxSxKxH.dtype)
  return jnp.moveaxis(out_BxKxGxTxH, 3, 1).reshape(batch, length, cfg.num_heads, head_dim)
