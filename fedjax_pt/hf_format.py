"""fedjax_pt models as Hugging Face `transformers` models: the architecture each variant is, its
config.json, and the parameters as named tensors, both ways. Pure functions (no files); reading
a Hugging Face directory back, with its checks, is fedjax_pt/hf_import.py.

Each variant maps onto an architecture that `transformers` implements with exactly the same
arithmetic, so the exported model computes what fedjax_pt computes (tests/export_test.py compares
the logits):

| fedjax_pt                            | transformers | how                                     |
|--------------------------------------|--------------|-----------------------------------------|
| family mpt, position_embedding learned | GPT-2      | exact GELU, zero biases, tied           |
| family mpt, position_embedding alibi   | MPT        | no_bias, alibi_bias_max 8               |
| family mpt, position_embedding rope    | GPT-NeoX   | rotary_pct 1, zero biases, embed_out = wte |
| family llama                           | Llama      | no biases, num_key_value_heads, head_dim |

A flax kernel is [in, out]; torch's nn.Linear weight is [out, in] (GPT-2's Conv1D keeps [in, out]).
"""

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

import jax
import numpy as np

from fedjax_pt import model as model_lib

# What a tensor is, in (the HF name, its array) pairs; arrays are numpy (or, to compute shapes
# without allocating, anything with .reshape/.transpose/.T such as a tracer).
Tensors = dict[str, Any]


class HFFormatError(ValueError):
  """A model that has no exact Hugging Face counterpart, or a Hugging Face model that is not
  one of fedjax_pt's (one line, naming the key)."""


@dataclasses.dataclass(frozen=True)
class Architecture:
  name: str  # config.json's architectures[0]
  model_type: str
  # (fedjax_pt's model.* key, its value here, the HF config key, the value it must have there)
  matched_keys: Callable[[model_lib.ModelConfig], list[tuple[str, Any, str, Any]]]
  to_hf: Callable[[model_lib.ModelConfig, Any], Tensors]
  from_hf: Callable[[model_lib.ModelConfig, Mapping[str, Any]], Any]
  zero_biases: Callable[[model_lib.ModelConfig], list[str]]  # HF tensors fedjax_pt lacks
  extra_config: Callable[[model_lib.ModelConfig], dict[str, Any]]  # fixed, structural keys


def _mlp_key(cfg: model_lib.ModelConfig) -> tuple[str, int]:
  return ('mlp_dim', cfg.mlp_dim) if cfg.mlp_dim else ('mlp_ratio', cfg.mlp_ratio)


def _split_qkv(cfg: model_lib.ModelConfig, wqkv):
  """wqkv [D, (N + 2K)H] -> q [D, NH], k [D, KH], v [D, KH]."""
  kv = cfg.kv_heads * cfg.head_dim
  d = cfg.num_heads * cfg.head_dim
  return wqkv[:, :d], wqkv[:, d:d + kv], wqkv[:, d + kv:]


def _kernel(tree, *path: str):
  for name in path:
    tree = tree[name]
  return tree['kernel']


# GPT-2 (position_embedding='learned'). Conv1D weights are [in, out], as flax kernels.


def _gpt2_to_hf(cfg, params) -> Tensors:
  out = {'transformer.wte.weight': params['wte']['embedding'], 'transformer.wpe.weight':
         params['wpe'], 'transformer.ln_f.weight': params['norm_f']['scale']}
  for i in range(cfg.num_layers):
    b, p = params[f'block_{i}'], f'transformer.h.{i}.'
    out.update({
        p + 'ln_1.weight': b['norm_1']['scale'],
        p + 'attn.c_attn.weight': _kernel(b, 'attn', 'wqkv'),
        p + 'attn.c_proj.weight': _kernel(b, 'attn', 'out_proj'),
        p + 'ln_2.weight': b['norm_2']['scale'],
        p + 'mlp.c_fc.weight': _kernel(b, 'mlp', 'up_proj'),
        p + 'mlp.c_proj.weight': _kernel(b, 'mlp', 'down_proj'),
    })
  return out


def _gpt2_from_hf(cfg, t) -> Any:
  params = {'wte': {'embedding': t['transformer.wte.weight']}, 'wpe': t['transformer.wpe.weight'],
            'norm_f': {'scale': t['transformer.ln_f.weight']}}
  for i in range(cfg.num_layers):
    p = f'transformer.h.{i}.'
    params[f'block_{i}'] = {
        'norm_1': {'scale': t[p + 'ln_1.weight']},
        'attn': {'wqkv': {'kernel': t[p + 'attn.c_attn.weight']},
                 'out_proj': {'kernel': t[p + 'attn.c_proj.weight']}},
        'norm_2': {'scale': t[p + 'ln_2.weight']},
        'mlp': {'up_proj': {'kernel': t[p + 'mlp.c_fc.weight']},
                'down_proj': {'kernel': t[p + 'mlp.c_proj.weight']}},
    }
  return params


def _gpt2_biases(cfg) -> list[str]:
  names = ['transformer.ln_f.bias']
  for i in range(cfg.num_layers):
    p = f'transformer.h.{i}.'
    names += [p + n for n in ('ln_1.bias', 'attn.c_attn.bias', 'attn.c_proj.bias', 'ln_2.bias',
                              'mlp.c_fc.bias', 'mlp.c_proj.bias')]
  return names


def _gpt2_keys(cfg):
  return [('vocab_size', cfg.vocab_size, 'vocab_size', cfg.vocab_size),
          ('d_model', cfg.d_model, 'n_embd', cfg.d_model),
          ('num_layers', cfg.num_layers, 'n_layer', cfg.num_layers),
          ('num_heads', cfg.num_heads, 'n_head', cfg.num_heads),
          (*_mlp_key(cfg), 'n_inner', cfg.mlp_width),
          ('max_seq_len', cfg.max_seq_len, 'n_positions', cfg.max_seq_len),
          ('norm_eps', cfg.norm_eps, 'layer_norm_epsilon', cfg.norm_eps)]


def _gpt2_extra(cfg) -> dict[str, Any]:
  del cfg
  # GPT-2's own activation is the tanh approximation ('gelu_new'); 'gelu' is the exact erf GELU.
  return {'activation_function': 'gelu', 'scale_attn_weights': True,
          'scale_attn_by_inverse_layer_idx': False, 'reorder_and_upcast_attn': False,
          'add_cross_attention': False, 'tie_word_embeddings': True, 'resid_pdrop': 0.0,
          'embd_pdrop': 0.0, 'attn_pdrop': 0}


# MPT (position_embedding='alibi'). nn.Linear weights: transposed kernels.


def _mpt_to_hf(cfg, params) -> Tensors:
  out = {'transformer.wte.weight': params['wte']['embedding'],
         'transformer.norm_f.weight': params['norm_f']['scale']}
  for i in range(cfg.num_layers):
    b, p = params[f'block_{i}'], f'transformer.blocks.{i}.'
    out.update({
        p + 'norm_1.weight': b['norm_1']['scale'],
        p + 'attn.Wqkv.weight': _kernel(b, 'attn', 'wqkv').T,
        p + 'attn.out_proj.weight': _kernel(b, 'attn', 'out_proj').T,
        p + 'norm_2.weight': b['norm_2']['scale'],
        p + 'ffn.up_proj.weight': _kernel(b, 'mlp', 'up_proj').T,
        p + 'ffn.down_proj.weight': _kernel(b, 'mlp', 'down_proj').T,
    })
  return out


def _mpt_from_hf(cfg, t) -> Any:
  params = {'wte': {'embedding': t['transformer.wte.weight']},
            'norm_f': {'scale': t['transformer.norm_f.weight']}}
  for i in range(cfg.num_layers):
    p = f'transformer.blocks.{i}.'
    params[f'block_{i}'] = {
        'norm_1': {'scale': t[p + 'norm_1.weight']},
        'attn': {'wqkv': {'kernel': t[p + 'attn.Wqkv.weight'].T},
                 'out_proj': {'kernel': t[p + 'attn.out_proj.weight'].T}},
        'norm_2': {'scale': t[p + 'norm_2.weight']},
        'mlp': {'up_proj': {'kernel': t[p + 'ffn.up_proj.weight'].T},
                'down_proj': {'kernel': t[p + 'ffn.down_proj.weight'].T}},
    }
  return params


def _mpt_keys(cfg):
  # HF's MptMLP is 4 * d_model wide whatever expansion_ratio says.
  return [('vocab_size', cfg.vocab_size, 'vocab_size', cfg.vocab_size),
          ('d_model', cfg.d_model, 'd_model', cfg.d_model),
          ('num_layers', cfg.num_layers, 'n_layers', cfg.num_layers),
          ('num_heads', cfg.num_heads, 'n_heads', cfg.num_heads),
          (*_mlp_key(cfg), "expansion_ratio", cfg.mlp_width // cfg.d_model),
          ('max_seq_len', cfg.max_seq_len, 'max_seq_len', cfg.max_seq_len),
          ('norm_eps', cfg.norm_eps, 'layer_norm_epsilon', cfg.norm_eps)]


def _mpt_extra(cfg) -> dict[str, Any]:
  del cfg
  # HF's MPT always adds its ALiBi bias and has no position table (learned_pos_emb is unread).
  return {'no_bias': True, 'learned_pos_emb': False, 'logit_scale': None,
          'tie_word_embeddings': True, 'resid_pdrop': 0, 'emb_pdrop': 0,
          'attn_config': {'alibi': True, 'alibi_bias_max': 8, 'attn_type': 'multihead_attention',
                          'clip_qkv': None, 'qk_ln': False, 'softmax_scale': None,
                          'prefix_lm': False, 'attn_pdrop': 0}}


# GPT-NeoX (position_embedding='rope'). Its fused query_key_value is per head: rows [N, 3, H].


def _neox_qkv(cfg, wqkv):
  d, n, h = cfg.d_model, cfg.num_heads, cfg.head_dim
  return wqkv.reshape(d, 3, n, h).transpose(0, 2, 1, 3).reshape(d, 3 * d).T


def _neox_wqkv(cfg, weight):
  d, n, h = cfg.d_model, cfg.num_heads, cfg.head_dim
  return weight.T.reshape(d, n, 3, h).transpose(0, 2, 1, 3).reshape(d, 3 * d)


def _neox_to_hf(cfg, params) -> Tensors:
  wte = params['wte']['embedding']
  out = {'gpt_neox.embed_in.weight': wte, 'embed_out.weight': wte,
         'gpt_neox.final_layer_norm.weight': params['norm_f']['scale']}
  for i in range(cfg.num_layers):
    b, p = params[f'block_{i}'], f'gpt_neox.layers.{i}.'
    out.update({
        p + 'input_layernorm.weight': b['norm_1']['scale'],
        p + 'attention.query_key_value.weight': _neox_qkv(cfg, _kernel(b, 'attn', 'wqkv')),
        p + 'attention.dense.weight': _kernel(b, 'attn', 'out_proj').T,
        p + 'post_attention_layernorm.weight': b['norm_2']['scale'],
        p + 'mlp.dense_h_to_4h.weight': _kernel(b, 'mlp', 'up_proj').T,
        p + 'mlp.dense_4h_to_h.weight': _kernel(b, 'mlp', 'down_proj').T,
    })
  return out


def _neox_from_hf(cfg, t) -> Any:
  params = {'wte': {'embedding': t['gpt_neox.embed_in.weight']},
            'norm_f': {'scale': t['gpt_neox.final_layer_norm.weight']}}
  for i in range(cfg.num_layers):
    p = f'gpt_neox.layers.{i}.'
    params[f'block_{i}'] = {
        'norm_1': {'scale': t[p + 'input_layernorm.weight']},
        'attn': {'wqkv': {'kernel': _neox_wqkv(cfg, t[p + 'attention.query_key_value.weight'])},
                 'out_proj': {'kernel': t[p + 'attention.dense.weight'].T}},
        'norm_2': {'scale': t[p + 'post_attention_layernorm.weight']},
        'mlp': {'up_proj': {'kernel': t[p + 'mlp.dense_h_to_4h.weight'].T},
                'down_proj': {'kernel': t[p + 'mlp.dense_4h_to_h.weight'].T}},
    }
  return params


def _neox_biases(cfg) -> list[str]:
  names = ['gpt_neox.final_layer_norm.bias']
  for i in range(cfg.num_layers):
    p = f'gpt_neox.layers.{i}.'
    names += [p + n for n in ('input_layernorm.bias', 'attention.query_key_value.bias',
                              'attention.dense.bias', 'post_attention_layernorm.bias',
                              'mlp.dense_h_to_4h.bias', 'mlp.dense_4h_to_h.bias')]
  return names


def _neox_keys(cfg):
  return [('vocab_size', cfg.vocab_size, 'vocab_size', cfg.vocab_size),
          ('d_model', cfg.d_model, 'hidden_size', cfg.d_model),
          ('num_layers', cfg.num_layers, 'num_hidden_layers', cfg.num_layers),
          ('num_heads', cfg.num_heads, 'num_attention_heads', cfg.num_heads),
          (*_mlp_key(cfg), 'intermediate_size', cfg.mlp_width),
          ('max_seq_len', cfg.max_seq_len, 'max_position_embeddings', cfg.max_seq_len),
          ('norm_eps', cfg.norm_eps, 'layer_norm_eps', cfg.norm_eps),
          ('rope_theta', cfg.rope_theta, 'rotary_emb_base', cfg.rope_theta)]


def _neox_extra(cfg) -> dict[str, Any]:
  # rotary_pct/rotary_emb_base are what transformers 4.x reads, rope_parameters what 5.x reads.
  # attention_bias=True with zero biases loads the same in versions that predate the key.
  # The output projection is written as a copy of the embedding, untied: every GPT-NeoX loader
  # reads embed_out.weight, not all of them honour tie_word_embeddings.
  return {'hidden_act': 'gelu', 'rotary_pct': 1.0,
          'rope_parameters': {'rope_type': 'default', 'rope_theta': cfg.rope_theta,
                              'partial_rotary_factor': 1.0},
          'use_parallel_residual': False, 'attention_bias': True, 'tie_word_embeddings': False,
          'hidden_dropout': 0, 'attention_dropout': 0}


# Llama (family='llama').


def _llama_to_hf(cfg, params) -> Tensors:
  out = {'model.embed_tokens.weight': params['wte']['embedding'],
         'model.norm.weight': params['norm_f']['scale']}
  if not cfg.tie_embeddings:
    out['lm_head.weight'] = params['lm_head']['kernel'].T
  for i in range(cfg.num_layers):
    b, p = params[f'block_{i}'], f'model.layers.{i}.'
    q, k, v = _split_qkv(cfg, _kernel(b, 'attn', 'wqkv'))
    out.update({
        p + 'input_layernorm.weight': b['norm_1']['scale'],
        p + 'self_attn.q_proj.weight': q.T,
        p + 'self_attn.k_proj.weight': k.T,
        p + 'self_attn.v_proj.weight': v.T,
        p + 'self_attn.o_proj.weight': _kernel(b, 'attn', 'out_proj').T,
        p + 'post_attention_layernorm.weight': b['norm_2']['scale'],
        p + 'mlp.gate_proj.weight': _kernel(b, 'mlp', 'gate_proj').T,
        p + 'mlp.up_proj.weight': _kernel(b, 'mlp', 'up_proj').T,
        p + 'mlp.down_proj.weight': _kernel(b, 'mlp', 'down_proj').T,
    })
  return out


def _llama_from_hf(cfg, t) -> Any:
  params = {'wte': {'embedding': t['model.embed_tokens.weight']},
            'norm_f': {'scale': t['model.norm.weight']}}
  if not cfg.tie_embeddings:
    params['lm_head'] = {'kernel': t['lm_head.weight'].T}
  for i in range(cfg.num_layers):
    p = f'model.layers.{i}.'
    wqkv = np.concatenate([t[p + f'self_attn.{n}_proj.weight'].T for n in 'qkv'], axis=1)
    params[f'block_{i}'] = {
        'norm_1': {'scale': t[p + 'input_layernorm.weight']},
        'attn': {'wqkv': {'kernel': wqkv},
                 'out_proj': {'kernel': t[p + 'self_attn.o_proj.weight'].T}},
        'norm_2': {'scale': t[p + 'post_attention_layernorm.weight']},
        'mlp': {n: {'kernel': t[p + f'mlp.{n}.weight'].T}
                for n in ('gate_proj', 'up_proj', 'down_proj')},
    }
  return params


def _llama_keys(cfg):
  return [('vocab_size', cfg.vocab_size, 'vocab_size', cfg.vocab_size),
          ('d_model', cfg.d_model, 'hidden_size', cfg.d_model),
          ('num_layers', cfg.num_layers, 'num_hidden_layers', cfg.num_layers),
          ('num_heads', cfg.num_heads, 'num_attention_heads', cfg.num_heads),
          ('num_kv_heads', cfg.num_kv_heads, 'num_key_value_heads', cfg.kv_heads),
          (*_mlp_key(cfg), 'intermediate_size', cfg.mlp_width),
          ('max_seq_len', cfg.max_seq_len, 'max_position_embeddings', cfg.max_seq_len),
          ('norm_eps', cfg.norm_eps, 'rms_norm_eps', cfg.norm_eps),
          ('rope_theta', cfg.rope_theta, 'rope_theta', cfg.rope_theta),
          ('tie_embeddings', cfg.tie_embeddings, 'tie_word_embeddings', cfg.tie_embeddings)]


def _llama_extra(cfg) -> dict[str, Any]:
  return {'hidden_act': 'silu', 'head_dim': cfg.head_dim, 'attention_bias': False,
          'mlp_bias': False, 'pretraining_tp': 1, 'attention_dropout': 0,
          'rope_parameters': {'rope_type': 'default', 'rope_theta': cfg.rope_theta}}


ARCHITECTURES = {
    'gpt2': Architecture('GPT2LMHeadModel', 'gpt2', _gpt2_keys, _gpt2_to_hf, _gpt2_from_hf,
                         _gpt2_biases, _gpt2_extra),
    'mpt': Architecture('MptForCausalLM', 'mpt', _mpt_keys, _mpt_to_hf, _mpt_from_hf,
                        lambda cfg: [], _mpt_extra),
    'gpt_neox': Architecture('GPTNeoXForCausalLM', 'gpt_neox', _neox_keys, _neox_to_hf,
                             _neox_from_hf, _neox_biases, _neox_extra),
    'llama': Architecture('LlamaForCausalLM', 'llama', _llama_keys, _llama_to_hf, _llama_from_hf,
                          lambda cfg: [], _llama_extra),
}


def architecture(cfg: model_lib.ModelConfig) -> Architecture:
  """The architecture that computes exactly what `cfg`'s model computes; HFFormatError naming
  the model.* key that has none."""
  if cfg.family == 'llama':
    return ARCHITECTURES['llama']
  if cfg.position_embedding == 'alibi':
    if cfg.num_heads & (cfg.num_heads - 1):
      raise HFFormatError(f'model.num_heads={cfg.num_heads}: an ALiBi model exports to MPT, whose '
                          'slopes are 2^(-8i/N) only for a power-of-two number of heads')
    if cfg.mlp_width != 4 * cfg.d_model:
      key, value = _mlp_key(cfg)
      raise HFFormatError(f'model.{key}={value}: an ALiBi model exports to MPT, whose MLP '
                          f'transformers makes 4 * d_model wide (here {cfg.mlp_width})')
    return ARCHITECTURES['mpt']
  return ARCHITECTURES['gpt2' if cfg.position_embedding == 'learned' else 'gpt_neox']


def hf_config(cfg: model_lib.ModelConfig, *, bos_token_id: int, eos_token_id: int,
              torch_dtype: str) -> dict[str, Any]:
  """config.json of the exported model (without the fedjax_pt provenance key)."""
  arch = architecture(cfg)
  config = {'architectures': [arch.name], 'model_type': arch.model_type}
  config.update({hf_key: value for _, _, hf_key, value in arch.matched_keys(cfg)})
  config.update(arch.extra_config(cfg))
  config.update({'bos_token_id': bos_token_id, 'eos_token_id': eos_token_id,
                 'initializer_range': cfg.init_std, 'use_cache': True,
                 'dtype': torch_dtype, 'torch_dtype': torch_dtype})
  return config


def to_hf(cfg: model_lib.ModelConfig, params: Any) -> Tensors:
  """The named tensors of the exported model (float32 numpy), zero biases included."""
  arch = architecture(cfg)
  tensors = {name: np.ascontiguousarray(np.asarray(x, np.float32))
             for name, x in arch.to_hf(cfg, params).items()}
  for name, shape in bias_shapes(cfg).items():
    tensors[name] = np.zeros(shape, np.float32)
  return tensors


def hf_shapes(cfg: model_lib.ModelConfig) -> dict[str, tuple[int, ...]]:
  """The shape of every tensor `to_hf` writes, without allocating one."""
  shapes = jax.eval_shape(lambda p: architecture(cfg).to_hf(cfg, p), model_lib.param_shapes(cfg))
  return {name: tuple(s.shape) for name, s in shapes.items()} | bias_shapes(cfg)


def bias_shapes(cfg: model_lib.ModelConfig) -> dict[str, tuple[int, ...]]:
  """Zero biases of the architecture: the shape of the weight they add to, its output axis."""
  arch = architecture(cfg)
  if not arch.zero_biases(cfg):
    return {}
  weights = jax.eval_shape(lambda p: arch.to_hf(cfg, p), model_lib.param_shapes(cfg))
  shapes = {}
  for name in arch.zero_biases(cfg):
    weight = weights[name[:-len('bias')] + 'weight'].shape
    # LayerNorm scales are [D]; GPT-2's Conv1D is [in, out]; nn.Linear is [out, in].
    shapes[name] = (weight[-1],) if (len(weight) == 1 or arch.name == 'GPT2LMHeadModel') else (
        weight[0],)
  return shapes
