"""Decoder-only transformers: the paper's MPT-style block and a Llama-style family.

`model.family='mpt'` (the paper's models): pre-LayerNorm blocks without biases, GELU MLP of width
`mlp_ratio * d_model`, tied input/output embeddings, learned absolute positions (RoPE or ALiBi
optional). `model.family='llama'`: pre-RMSNorm blocks, SwiGLU MLP, rotary positions, grouped-query
attention (`model.num_kv_heads`), tied or separate output embeddings. Every parameter carries
logical axis names so `fedjax_pt.sharding` can map them onto a device mesh.

Letter key for tensor names: B batch, L sequence length, D d_model, N heads, H head dim, F MLP
width, V vocabulary, T and S the query and key positions of an attention block, K key/value heads,
G query heads per key/value head.

Decoding (`Decoder(cfg).apply(..., decode=True, mutable=['cache'])`, as in flax's lm1b example)
keeps each layer's keys and values in a 'cache' collection made by `init_cache`; training's
forward never creates it and is the same program as without it.
"""

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

# The residual stream stays split over the batch (the 'batch' rule of `fedjax_pt.sharding`), so
# sharded parameters are all-gathered where used instead of activations being resharded. Without
# rules in context (one device, or `sharding.Layout.activate` not entered) these are no-ops.
_ACTIVATION_AXES = ('batch', None, None)

_REMAT_POLICIES = {
    'full': None,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  mlp_ratio: int
  max_seq_len: int
  position_embedding: str = 'learned'
  dtype: str = 'float32'
  remat: str = 'none'
  attention: str = 'xla'
  init_std: float = 0.02
  # The Llama-style family (RMSNorm, SwiGLU, rotary, grouped-query attention) and its options.
  family: str = 'mpt'
  num_kv_heads: int = 0  # 0: num_heads (multi-head attention); fewer: grouped-query attention
  mlp_dim: int = 0  # 0: mlp_ratio * d_model (mpt); the SwiGLU width of Llama, 8/3 d_model rounded
  tie_embeddings: bool = True  # False: a separate output projection lm_head
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6

  def __post_init__(self):
    for name in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'mlp_ratio', 'max_seq_len'):
      if getattr(self, name) <= 0:
        raise ValueError(f'model.{name} must be positive, got {getattr(self, name)}')
    if self.d_model % self.num_heads:
      raise ValueError(f'model.d_model={self.d_model} is not divisible by '
                       f'model.num_heads={self.num_heads}')
    if self.position_embedding not in ('learned', 'rope', 'alibi'):
      raise ValueError("model.position_embedding must be 'learned', 'rope' or 'alibi', got "
                       f'{self.position_embedding!r}')
    if self.position_embedding == 'rope' and (self.d_model // self.num_heads) % 2:
      raise ValueError('model.position_embedding=rope needs an even head dimension')
    if self.dtype not in ('float32', 'bfloat16', 'float16'):
      raise ValueError(
          f"model.dtype must be 'float32', 'bfloat16' or 'float16', got {self.dtype!r}")
    if self.remat not in ('none', *_REMAT_POLICIES):
      raise ValueError(f"model.remat must be 'none', 'full' or 'dots', got {self.remat!r}")
    if self.attention not in ('xla', 'cudnn'):
      raise ValueError(f"model.attention must be 'xla' or 'cudnn', got {self.attention!r}")
    if self.family not in ('mpt', 'llama'):
      raise ValueError(f"model.family must be 'mpt' or 'llama', got {self.family!r}")
    if self.family == 'llama' and self.position_embedding != 'rope':
      raise ValueError("model.family='llama' uses rotary positions: set "
                       f"model.position_embedding='rope' (got {self.position_embedding!r})")
    if self.family == 'mpt' and (self.num_kv_heads not in (0, self.num_heads)
                                 or not self.tie_embeddings):
      key = 'tie_embeddings' if self.num_kv_heads in (0, self.num_heads) else 'num_kv_heads'
      raise ValueError(f"model.{key}={getattr(self, key)} needs model.family='llama' (the MPT "
                       'block has multi-head attention and tied embeddings)')
    if self.num_kv_heads < 0 or self.num_heads % self.kv_heads:
      raise ValueError(f'model.num_kv_heads={self.num_kv_heads} must divide '
                       f'model.num_heads={self.num_heads} (0: as many as num_heads)')
    if self.mlp_dim < 0:
      raise ValueError(f'model.mlp_dim must be >= 0 (0: derived), got {self.mlp_dim}')
    if not self.rope_theta > 0 or not self.norm_eps > 0:
      raise ValueError(f'model.rope_theta and model.norm_eps must be positive, got '
                       f'{self.rope_theta} and {self.norm_eps}')

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict, *, vocab_size: int, seq_len: int,
                  default_vocab_size: int = 0) -> 'ModelConfig':
    """Resolves the 0 = 'derive it' defaults from the tokenizer and data.seq_len.

    `vocab_size` is the tokenizer's vocabulary, the least the model may have; model.vocab_size=0
    takes `default_vocab_size` (the tokenizer's padded to a matmul-friendly multiple) or else it.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in model.to_dict().items() if k in fields}
    values['vocab_size'] = values['vocab_size'] or default_vocab_size or vocab_size
    values['max_seq_len'] = values['max_seq_len'] or seq_len
    if values['vocab_size'] < vocab_size:
      raise ValueError(f'model.vocab_size={values["vocab_size"]} is smaller than the '
                       f"tokenizer's vocabulary ({vocab_size})")
    if values['max_seq_len'] < seq_len:
      raise ValueError(f'data.seq_len={seq_len} exceeds model.max_seq_len='
                       f'{values["max_seq_len"]}')
    return cls(**values)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def kv_heads(self) -> int:
    """Heads of keys and values: num_heads, or fewer that groups of query heads share."""
    return self.num_kv_heads or self.num_heads

  @property
  def mlp_width(self) -> int:
    """The MLP's hidden width: mlp_ratio * d_model, or for SwiGLU (three matrices, not two) the
    parameter-matched 2/3 of 4 d_model rounded up to a multiple of 64, as Llama does."""
    if self.mlp_dim:
      return self.mlp_dim
    if self.family == 'llama':
      return -(-(8 * self.d_model // 3) // 64) * 64
    return self.mlp_ratio * self.d_model

  @property
  def compute_dtype(self) -> Any:
    return jnp.dtype(self.dtype)


def _init(std: float, axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def _tokens(x_BxLxD: jax.Array) -> jax.Array:
  """[B, L, D] -> [B*L, D], a free reshape.

  Matmuls see the tokens as one axis so that each weight gradient (activations^T @ gradient)
  contracts a single axis, which XLA folds into the matmul as a transposed operand. Contracting
  [B, L] instead made XLA:CPU materialise a transposed copy of the gradient (plus the GELU
  derivative fused into it) before every weight-gradient matmul: ~20% of the step (BENCHMARKS.md).
  """
  return x_BxLxD.reshape(-1, x_BxLxD.shape[-1])


class _Dense(nn.Dense):
  """nn.Dense (same parameters and names) over the flattened tokens of a [B, L, D] input."""

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    return super().__call__(_tokens(x_BxLxD)).reshape(*x_BxLxD.shape[:-1], self.features)


def _rope(x_BxLxNxH: jax.Array, theta: float, positions_BxL: jax.Array | None = None,
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


def _alibi_slopes(num_heads: int) -> np.ndarray:
  return 2.0 ** (-8.0 * np.arange(1, num_heads + 1) / num_heads)


def _alibi_bias(num_heads: int, length: int) -> np.ndarray:
  """ALiBi slopes 2^(-8i/N) times the (non-positive) key-query distance: [1, N, L, L]."""
  distance_LxL = np.arange(length)[None, :] - np.arange(length)[:, None]
  return (_alibi_slopes(num_heads)[:, None, None] * np.minimum(distance_LxL, 0)[None])[None].astype(
      np.float32)


# Query rows per block of `_blocked_causal_attention` (at least 2 blocks, at most 8): 64 was the
# fastest of 32, 64 and 128 at L = 128 and 256 on a 2-core CPU (BENCHMARKS.md).
_QUERY_BLOCK = 64
# A masked score, as in jax.nn.dot_product_attention: exp(masked - max) is exactly 0.
_MASKED = -0.7 * float(np.finfo(np.float32).max)


def _query_blocks(length: int) -> list[tuple[int, int]]:
  num_blocks = min(max(length // _QUERY_BLOCK, 2), 8, length)
  bounds = [round(i * length / num_blocks) for i in range(num_blocks + 1)]
  return list(zip(bounds[:-1], bounds[1:]))


def _blocked_causal_attention(q_BxLxNxH: jax.Array, k_BxLxNxH: jax.Array, v_BxLxNxH: jax.Array,
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
  for start, end in _query_blocks(length):
    # Block rows are queries start..end-1, columns keys 0..end-1.
    # jnp, not np: traced, so abstract evaluation (parameter shapes, memory checks) allocates no
    # [L, L] mask however long the sequence.
    causal_TxS = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
    bias_1xNxTxS = 0.0 if bias_1xNxLxL is None else (
        bias_1xNxLxL[:, :, start:end, :end].astype(jnp.float32))
    mask_1xNxTxS = jnp.where(causal_TxS, bias_1xNxTxS, _MASKED)
    s_BxNxTxS = jnp.einsum('BNTH,BNSH->BNTS', q_BxNxLxH[:, :, start:end], k_BxNxLxH[:, :, :end],
                           preferred_element_type=jnp.float32) + mask_1xNxTxS
    e_BxNxTxS = jnp.exp(s_BxNxTxS - jax.lax.stop_gradient(s_BxNxTxS.max(-1, keepdims=True)))
    out_BxNxTxH = jnp.einsum('BNTS,BNSH->BNTH', e_BxNxTxS.astype(v_BxNxLxH.dtype),
                             v_BxNxLxH[:, :, :end], preferred_element_type=jnp.float32)
    out_BxNxTxH = out_BxNxTxH / e_BxNxTxS.sum(-1, keepdims=True)
    outs.append(out_BxNxTxH.astype(v_BxNxLxH.dtype))
  return jnp.swapaxes(jnp.concatenate(outs, axis=2), 1, 2)


def scores_per_query(cfg: 'ModelConfig', length: int, platform: str) -> float:
  """Attention scores one query computes, and the backward pass keeps, on average over a sequence
  of `length`: all `length` keys where jax.nn.dot_product_attention's XLA path masks a full
  [L, L] (accelerators), the causal blocks of `_blocked_causal_attention` on CPUs, and none with
  cuDNN's flash attention, which keeps O(L) statistics instead."""
  if cfg.attention == 'cudnn':
    return 0.0
  if platform != 'cpu':
    return float(length)
  return sum((end - start) * end for start, end in _query_blocks(length)) / length


def _causal_attention(cfg: 'ModelConfig', q_BxLxNxH: jax.Array, k_BxLxNxH: jax.Array,
                      v_BxLxNxH: jax.Array, bias_1xNxLxL: jax.Array | None) -> jax.Array:
  if cfg.attention == 'cudnn':
    return jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, bias=bias_1xNxLxL,
                                        is_causal=True, implementation='cudnn')
  # The blocked formulation is tuned and measured on CPUs; elsewhere XLA's attention is JAX's.
  return jax.lax.platform_dependent(
      q_BxLxNxH, k_BxLxNxH, v_BxLxNxH,
      cpu=lambda q, k, v: _blocked_causal_attention(q, k, v, bias_1xNxLxL),
      default=lambda q, k, v: jax.nn.dot_product_attention(q, k, v, bias=bias_1xNxLxL,
                                                           is_causal=True))


class DecodeStep(NamedTuple):
  """Where the tokens of one decoding call go: cache slots index..index+L-1, at absolute positions
  `positions_BxL`; `key_positions_BxS` are the positions of all S slots once they are written."""
  index: jax.Array
  positions_BxL: jax.Array
  key_positions_BxS: jax.Array


def _cached_attention(cfg: 'ModelConfig', q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array,
                      v_BxSxKxH: jax.Array, step: DecodeStep) -> jax.Array:
  """The new queries' attention to every cache slot, computed as `_blocked_causal_attention` does
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
        _alibi_slopes(cfg.num_heads)[:, None] * -np.arange(cfg.max_seq_len)[None, :],
        jnp.float32).astype(cfg.compute_dtype).astype(jnp.float32)
    distance_BxTxS = jnp.clip(step.positions_BxL[:, :, None] - step.key_positions_BxS[:, None, :],
                              0, cfg.max_seq_len - 1)
    bias = jnp.moveaxis(table_NxM[:, distance_BxTxS], 0, 1).reshape(
        batch, cfg.kv_heads, group, length, slots)
  mask_BxKxGxTxS = jnp.where(key_BxTxS[:, None, None], bias, _MASKED)
  s_BxKxGxTxS = jnp.einsum('BTKGH,BSKH->BKGTS', q_BxTxKxGxH, k_BxSxKxH,
                           preferred_element_type=jnp.float32) + mask_BxKxGxTxS
  e_BxKxGxTxS = jnp.exp(s_BxKxGxTxS - s_BxKxGxTxS.max(-1, keepdims=True))
  out_BxKxGxTxH = jnp.einsum('BKGTS,BSKH->BKGTH', e_BxKxGxTxS.astype(v_BxSxKxH.dtype), v_BxSxKxH,
                             preferred_element_type=jnp.float32)
  out_BxKxGxTxH = (out_BxKxGxTxH / e_BxKxGxTxS.sum(-1, keepdims=True)).astype(v_BxSxKxH.dtype)
  return jnp.moveaxis(out_BxKxGxTxH, 3, 1).reshape(batch, length, cfg.num_heads, head_dim)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, step: DecodeStep | None = None) -> jax.Array:
    cfg = self.cfg
    batch, length, _ = x_BxLxD.shape
    # One matmul for queries, keys and values: columns [q | k | v], each head's H contiguous.
    kv_width = cfg.kv_heads * cfg.head_dim
    qkv = _Dense(cfg.d_model + 2 * kv_width, use_bias=False, dtype=cfg.compute_dtype,
                 name='wqkv', kernel_init=_init(cfg.init_std, ('embed', 'heads')))(x_BxLxD)
    q = qkv[..., :cfg.d_model].reshape(batch, length, cfg.num_heads, cfg.head_dim)
    k, v = (t.reshape(batch, length, cfg.kv_heads, cfg.head_dim)
            for t in jnp.split(qkv[..., cfg.d_model:], 2, axis=-1))
    if step is not None:
      if cfg.position_embedding == 'rope':
        q, k = (_rope(t, cfg.rope_theta, step.positions_BxL, cfg.max_seq_len) for t in (q, k))
      # The kv heads themselves are cached, [B, S, K, H], in the compute dtype.
      shape = (batch, step.key_positions_BxS.shape[1], cfg.kv_heads, cfg.head_dim)
      cached_k, cached_v = (self.variable('cache', name, jnp.zeros, shape, cfg.compute_dtype)
                            for name in ('k', 'v'))
      for cached, new in ((cached_k, k), (cached_v, v)):
        cached.value = jax.lax.dynamic_update_slice(
            cached.value, new.astype(cfg.compute_dtype), (0, step.index, 0, 0))
      out_BxLxNxH = _cached_attention(cfg, q, cached_k.value, cached_v.value, step)
    else:
      if cfg.position_embedding == 'rope':
        q, k = _rope(q, cfg.rope_theta), _rope(k, cfg.rope_theta)
      if cfg.kv_heads != cfg.num_heads:
        # Grouped-query attention: query heads g*i .. g*i+g-1 share key/value head i.
        group = cfg.num_heads // cfg.kv_heads
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
      bias = None
      if cfg.position_embedding == 'alibi':
        bias = jnp.asarray(_alibi_bias(cfg.num_heads, length), cfg.compute_dtype)
      out_BxLxNxH = _causal_attention(cfg, q, k, v, bias)
    return _Dense(cfg.d_model, use_bias=False, dtype=cfg.compute_dtype, name='out_proj',
                  kernel_init=_init(_residual_std(cfg), ('heads', 'embed')))(
                      out_BxLxNxH.reshape(batch, length, cfg.d_model))


class Mlp(nn.Module):
  """MPT's GELU MLP: down(gelu(up(x)))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    cfg = self.cfg
    h_BxLxF = _Dense(cfg.mlp_width, use_bias=False, dtype=cfg.compute_dtype,
                     name='up_proj', kernel_init=_init(cfg.init_std, ('embed', 'mlp')))(x_BxLxD)
    h_BxLxF = nn.gelu(h_BxLxF, approximate=False)
    return _Dense(cfg.d_model, use_bias=False, dtype=cfg.compute_dtype, name='down_proj',
                  kernel_init=_init(_residual_std(cfg), ('mlp', 'embed')))(h_BxLxF)


class SwiGlu(nn.Module):
  """Llama's gated MLP: down(silu(gate(x)) * up(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    cfg = self.cfg
    gate_BxLxF, up_BxLxF = (
        _Dense(cfg.mlp_width, use_bias=False, dtype=cfg.compute_dtype, name=name,
               kernel_init=_init(cfg.init_std, ('embed', 'mlp')))(x_BxLxD)
        for name in ('gate_proj', 'up_proj'))
    return _Dense(cfg.d_model, use_bias=False, dtype=cfg.compute_dtype, name='down_proj',
                  kernel_init=_init(_residual_std(cfg), ('mlp', 'embed')))(
                      nn.silu(gate_BxLxF) * up_BxLxF)


def _residual_std(cfg: ModelConfig) -> float:
  # GPT-2 scaling of residual-branch outputs keeps the residual stream's variance flat in depth.
  return cfg.init_std / math.sqrt(2 * cfg.num_layers)


def _norm(cfg: ModelConfig, name: str) -> nn.Module:
  """MPT's LayerNorm without bias, or Llama's RMSNorm; statistics in float32 whatever the
  compute dtype."""
  scale_init = nn.with_logical_partitioning(nn.initializers.ones, ('norm',))
  if cfg.family == 'llama':
    return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                      name=name, scale_init=scale_init)
  return nn.LayerNorm(epsilon=cfg.norm_eps, use_bias=False, dtype=cfg.compute_dtype,
                      param_dtype=jnp.float32, name=name, scale_init=scale_init)


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, step: DecodeStep | None = None) -> jax.Array:
    mlp = SwiGlu if self.cfg.family == 'llama' else Mlp
    x_BxLxD = x_BxLxD + Attention(self.cfg, name='attn')(_norm(self.cfg, 'norm_1')(x_BxLxD), step)
    return x_BxLxD + mlp(self.cfg, name='mlp')(_norm(self.cfg, 'norm_2')(x_BxLxD))


class Decoder(nn.Module):
  """Maps token ids [B, L] to next-token logits [B, L, V] (float32).

  With decode=True the tokens continue the ones already in the 'cache' collection (`init_cache`):
  they are written to its next L slots, at `positions_BxL` (absolute positions; default: the slots'
  own indices; negative: padding, never attended to), and each attends to the slots written so far.
  last_only=True gives the last position's logits only, [B, 1, V]: all that sampling reads after a
  prompt, whose other logits would take [B, L, V].
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
               decode: bool = False, last_only: bool = False) -> jax.Array:
    cfg = self.cfg
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, name='wte',
                     embedding_init=_init(cfg.init_std, ('vocab', 'embed')))
    x_BxLxD = embed(tokens_BxL)
    step = None
    if decode:
      index = self.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
      key_positions = self.variable('cache', 'positions', jnp.zeros, tokens_BxL.shape, jnp.int32)
      if positions_BxL is None:
        positions_BxL = jnp.broadcast_to(index.value + jnp.arange(tokens_BxL.shape[1]),
                                         tokens_BxL.shape)
      key_positions.value = jax.lax.dynamic_update_slice(
          key_positions.value, positions_BxL.astype(jnp.int32), (0, index.value))
      step = DecodeStep(index.value, positions_BxL, key_positions.value)
      index.value = index.value + tokens_BxL.shape[1]
    if cfg.position_embedding == 'learned':
      wpe = self.param('wpe', _init(cfg.init_std, ('pos', 'embed')), (cfg.max_seq_len, cfg.d_model))
      if step is None:
        x_BxLxD = x_BxLxD + wpe[:tokens_BxL.shape[1]].astype(cfg.compute_dtype)
      else:
        x_BxLxD = x_BxLxD + wpe[jnp.maximum(step.positions_BxL, 0)].astype(cfg.compute_dtype)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, _ACTIVATION_AXES)
    block = Block
    if cfg.remat != 'none' and not decode:
      block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
    for i in range(cfg.num_layers):
      args = (x_BxLxD,) if step is None else (x_BxLxD, step)
      x_BxLxD = nn.with_logical_constraint(block(cfg, name=f'block_{i}')(*args),
                                           _ACTIVATION_AXES)
    if last_only:
      x_BxLxD = x_BxLxD[:, -1:]
    x_BxLxD = _norm(cfg, 'norm_f')(x_BxLxD)
    if cfg.tie_embeddings:
      logits_BxLxV = embed.attend(_tokens(x_BxLxD)).reshape(*x_BxLxD.shape[:2], cfg.vocab_size)
    else:
      logits_BxLxV = _Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                            name='lm_head', kernel_init=_init(cfg.init_std, ('embed', 'vocab')))(
                                x_BxLxD)
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    return nn.with_logical_constraint(logits_BxLxV, ('batch', None, 'vocab'))


def next_token_losses(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """Cross-entropy of every position's next token, in float32 whatever the compute dtype: the
  one loss that training (its mean) and evaluation (its masked sum) both use."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV.astype(jnp.float32),
                                                         targets_BxL)


def init_cache(cfg: ModelConfig, batch: int, length: int) -> Any:
  """An empty 'cache' collection for decoding `batch` rows of up to `length` tokens: per layer the
  keys and values of the kv heads [B, length, K, H] in the compute dtype, the slots' positions and
  the next slot, all zeros (slots not yet written are never attended to)."""
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  shapes = jax.eval_shape(
      lambda t: Decoder(cfg).init(jax.random.key(0), t, decode=True)['cache'], tokens)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def init_params(cfg: ModelConfig, rng: jax.Array) -> Any:
  """Plain (unboxed) float32 parameters."""
  tokens = jnp.zeros((1, cfg.max_seq_len), jnp.int32)
  return nn.unbox(Decoder(cfg).init(rng, tokens)['params'])


@functools.lru_cache(maxsize=16)
def _abstract_boxed_params(cfg: ModelConfig) -> Any:
  # Cached: tracing the init of a deep model takes seconds, and a plan asks for it many times.
  tokens = jax.ShapeDtypeStruct((1, cfg.max_seq_len), jnp.int32)
  return jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), tokens)['params'])


def _traceable(cfg: ModelConfig) -> ModelConfig:
  # The parameters do not depend on the attention kernel, and cuDNN's cannot be traced where
  # there is no GPU (a plan for an H100 made on a laptop).
  return dataclasses.replace(cfg, attention='xla')


def param_shapes(cfg: ModelConfig) -> Any:
  """The parameters (those of `init_params`) as ShapeDtypeStructs, allocating nothing."""
  return nn.unbox(_abstract_boxed_params(_traceable(cfg)))


def logical_axes(cfg: ModelConfig) -> Any:
  """PartitionSpec of logical axis names for every parameter, without allocating any."""
  return nn.get_partition_spec(_abstract_boxed_params(_traceable(cfg)))


def param_count(cfg: ModelConfig) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(param_shapes(cfg)))


def mlp_matrices(cfg: ModelConfig) -> int:
  """d_model x mlp_width matrices per block: up and down, and SwiGLU's gate."""
  return 3 if cfg.family == 'llama' else 2


def block_matrix_params(cfg: ModelConfig) -> int:
  """Parameters of one block's matrices: queries, keys, values, output and the MLP's."""
  attention = cfg.d_model * (2 * cfg.d_model + 2 * cfg.kv_heads * cfg.head_dim)
  return attention + mlp_matrices(cfg) * cfg.d_model * cfg.mlp_width


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3x forward), as in the PaLM/MFU convention.

  6 N for the matmuls against non-embedding parameters and the output projection (tied or not),
  plus 12 * layers * d_model * seq_len for attention scores and values.
  """
  matmul_params = cfg.num_layers * block_matrix_params(cfg) + cfg.vocab_size * cfg.d_model
  return 6.0 * matmul_params + 12.0 * cfg.num_layers * cfg.d_model * seq_len
