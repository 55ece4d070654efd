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
forward never creates it and is the same program as without it. The attention kernels and
positions are in `fedjax_pt.attention`, the validated `model.*` config in `fedjax_pt.model_config`.
"""

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pt import attention as attention_lib
from fedjax_pt.model_config import REMAT_POLICIES, ModelConfig

__all__ = ['ModelConfig']  # re-exported: `model.ModelConfig` is how callers name it

# The residual stream stays split over the batch (the 'batch' rule of `fedjax_pt.sharding`), so
# sharded parameters are all-gathered where used instead of activations being resharded. Without
# rules in context (one device, or `sharding.Layout.activate` not entered) these are no-ops.
_ACTIVATION_AXES = ('batch', None, None)



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


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, step: attention_lib.DecodeStep | None = None) -> jax.Array:
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
        q, k = (attention_lib.rope(t, cfg.rope_theta, step.positions_BxL, cfg.max_seq_len)
                for t in (q, k))
      # The kv heads themselves are cached, [B, S, K, H], in the compute dtype.
      shape = (batch, step.key_positions_BxS.shape[1], cfg.kv_heads, cfg.head_dim)
      cached_k, cached_v = (self.variable('cache', name, jnp.zeros, shape, cfg.compute_dtype)
                            for name in ('k', 'v'))
      for cached, new in ((cached_k, k), (cached_v, v)):
        cached.value = jax.lax.dynamic_update_slice(
            cached.value, new.astype(cfg.compute_dtype), (0, step.index, 0, 0))
      out_BxLxNxH = attention_lib.cached_attention(cfg, q, cached_k.value, cached_v.value, step)
    else:
      if cfg.position_embedding == 'rope':
        q, k = attention_lib.rope(q, cfg.rope_theta), attention_lib.rope(k, cfg.rope_theta)
      if cfg.kv_heads != cfg.num_heads:
        # Grouped-query attention: query heads g*i .. g*i+g-1 share key/value head i.
        group = cfg.num_heads // cfg.kv_heads
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
      bias = None
      if cfg.position_embedding == 'alibi':
        bias = jnp.asarray(attention_lib.alibi_bias(cfg.num_heads, length), cfg.compute_dtype)
      out_BxLxNxH = attention_lib.causal_attention(cfg, q, k, v, bias)
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
  def __call__(self, x_BxLxD: jax.Array, step: attention_lib.DecodeStep | None = None) -> jax.Array:
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
      step = attention_lib.DecodeStep(index.value, positions_BxL, key_positions.value)
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
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
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
