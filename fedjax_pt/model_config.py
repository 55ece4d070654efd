"""The model's configuration: `model.*` resolved and validated (one line naming the key)."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

REMAT_POLICIES = {
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
    if self.remat not in ('none', *REMAT_POLICIES):
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
