"""The decoders (MPT block, Llama family): sizes of the configs, causality, dtypes, logical axes."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pt import build
from fedjax_pt import model as model_lib


def _tiny(**kw):
  values = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, mlp_ratio=4, max_seq_len=16)
  values.update(kw)
  return model_lib.ModelConfig(**values)


# The paper's counts (74M, 124M, 354M, 1.31B) leave out the learned position embeddings.
@pytest.mark.parametrize('name, expected', [
    ('75m', 74.0e6), ('125m', 123.6e6), ('350m', 353.6e6), ('1p3b', 1.311e9)])
def test_paper_config_parameter_counts(name, expected):
  config = importlib.import_module(f'fedjax_pt.configs.{name}').get_config()
  cfg = model_lib.ModelConfig.from_config(config.model, vocab_size=50277,
                                          seq_len=config.data.seq_len)
  assert cfg.vocab_size == 50368
  without_positions = model_lib.param_count(cfg) - cfg.max_seq_len * cfg.d_model
  assert abs(without_positions - expected) / expected < 0.005, without_positions


def test_vocabulary_defaults_to_the_padded_one_and_may_be_the_tokenizers_own():
  config = importlib.import_module('configs.tiny').get_config('test')  # byte tokenizer: 257
  assert build.model_config(config).vocab_size == 384  # model.vocab_size=0: padded
  config.model.vocab_size = 257  # exactly the tokenizer's
  assert build.model_config(config).vocab_size == 257
  config.model.vocab_size = 256
  with pytest.raises(ValueError, match=r"model.vocab_size=256 is smaller than the tokenizer's "
                                       r'vocabulary \(257\)'):
    build.model_config(config)


def test_parameter_count_formula():
  cfg = _tiny()
  # Embedding V*D + positions L*D + per layer (QKV 3D^2 + out D^2 + MLP 8D^2 + 2 norms) + final
  # norm.
  expected = 64 * 32 + 16 * 32 + 2 * (12 * 32 * 32 + 2 * 32) + 32
  assert model_lib.param_count(cfg) == expected
  assert model_lib.param_count(cfg) == sum(
      x.size for x in jax.tree.leaves(model_lib.init_params(cfg, jax.random.key(0))))


_LLAMA = dict(family='llama', position_embedding='rope', num_kv_heads=2, tie_embeddings=False)


def _llama_param_count(d, layers, heads, kv_heads, mlp, vocab, tied):
  head_dim = d // heads
  # Per layer: q and out D^2 each, k and v D x (kv_heads * H) each, SwiGLU 3 D x F, 2 RMSNorms.
  block = 2 * d * d + 2 * d * kv_heads * head_dim + 3 * d * mlp + 2 * d
  return layers * block + vocab * d * (1 if tied else 2) + d


def test_llama_config_parameter_counts():
  config = importlib.import_module('fedjax_pt.configs.llama_1b').get_config()
  cfg = model_lib.ModelConfig.from_config(config.model, vocab_size=50277,
                                          seq_len=config.data.seq_len)
  expected = _llama_param_count(2048, 16, 32, 8, 8192, 50368, tied=True)
  assert model_lib.param_count(cfg) == expected
  assert abs(expected - 1.076e9) < 0.001e9
  tiny = build.model_config(importlib.import_module('configs.llama_tiny').get_config())
  mpt = build.model_config(importlib.import_module('configs.tiny').get_config())
  assert model_lib.param_count(tiny) == _llama_param_count(128, 2, 4, 2, 336, 384, tied=False)
  # The tiny pair compares the families at equal size (configs/llama_tiny.py).
  assert abs(model_lib.param_count(tiny) / model_lib.param_count(mpt) - 1) < 0.01


def test_llama_swiglu_width_defaults_to_llamas_rounding():
  assert _tiny(d_model=64, **_LLAMA).mlp_width == 192  # 8 * 64 / 3 = 170.7, up to a multiple of 64
  assert _tiny(d_model=64, mlp_dim=100, **_LLAMA).mlp_width == 100
  assert _tiny(d_model=64).mlp_width == 256  # the MPT block: mlp_ratio * d_model


@pytest.mark.parametrize('variant', [{'position_embedding': 'learned'},
                                     {'position_embedding': 'rope'},
                                     {'position_embedding': 'alibi'}, _LLAMA],
                         ids=['learned', 'rope', 'alibi', 'llama'])
def test_decoder_is_causal(variant):
  cfg = _tiny(**variant)
  params = model_lib.init_params(cfg, jax.random.key(0))
  decoder = model_lib.Decoder(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
  logits = decoder.apply({'params': params}, tokens)
  assert logits.shape == (2, 16, 64) and logits.dtype == jnp.float32
  changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % 64)
  logits2 = decoder.apply({'params': params}, changed)
  np.testing.assert_allclose(logits[:, :10], logits2[:, :10], atol=1e-5)
  assert not np.allclose(logits[:, 10:], logits2[:, 10:])


def test_bf16_compute_keeps_float32_parameters():
  cfg = _tiny(dtype='bfloat16')
  params = model_lib.init_params(cfg, jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  tokens = jnp.zeros((1, 16), jnp.int32)
  logits = model_lib.Decoder(cfg).apply({'params': params}, tokens)
  logits32 = model_lib.Decoder(_tiny()).apply({'params': params}, tokens)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, logits32, atol=0.05)


def test_every_parameter_has_logical_axes():
  cfg = _tiny()
  axes = model_lib.logical_axes(cfg)
  shapes = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  flat_axes = jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: x is not None and
                                                  not isinstance(x, dict))
  flat_shapes = jax.tree_util.tree_leaves_with_path(shapes)
  assert [p for p, _ in flat_axes] == [p for p, _ in flat_shapes]
  for (_, spec), (_, shape) in zip(flat_axes, flat_shapes):
    assert len(spec) == len(shape.shape) and all(isinstance(a, str) for a in spec)
  assert tuple(axes['wte']['embedding']) == ('vocab', 'embed')
  assert tuple(axes['block_0']['mlp']['up_proj']['kernel']) == ('embed', 'mlp')
  llama = model_lib.logical_axes(_tiny(**_LLAMA))
  assert tuple(llama['lm_head']['kernel']) == ('embed', 'vocab')
  assert tuple(llama['block_0']['mlp']['gate_proj']['kernel']) == ('embed', 'mlp')
  assert tuple(llama['block_0']['attn']['wqkv']['kernel']) == ('embed', 'heads')


def test_flops_per_token_is_six_n_plus_attention():
  cfg = _tiny()
  non_embedding = 2 * 12 * 32 * 32
  assert model_lib.flops_per_token(cfg, 16) == 6 * (non_embedding + 64 * 32) + 12 * 2 * 32 * 16


def test_llama_flops_count_swiglu_and_grouped_keys():
  cfg = _tiny(mlp_dim=64, **_LLAMA)  # D 32, 4 heads of 8, 2 kv heads, SwiGLU width 64
  per_layer = 32 * (32 + 2 * 2 * 8) + 32 * 32 + 3 * 32 * 64
  assert cfg.mlp_width == 64
  assert model_lib.flops_per_token(cfg, 16) == 6 * (2 * per_layer + 64 * 32) + 12 * 2 * 32 * 16


@pytest.mark.parametrize('overrides, message', [
    ({'family': 'gpt'}, "model.family must be 'mpt' or 'llama'"),
    ({'family': 'llama'}, "model.family='llama' uses rotary positions"),
    ({'num_kv_heads': 2}, "model.num_kv_heads=2 needs model.family='llama'"),
    ({'tie_embeddings': False}, "model.tie_embeddings=False needs model.family='llama'"),
    ({**_LLAMA, 'num_kv_heads': 3}, 'model.num_kv_heads=3 must divide model.num_heads=4'),
    ({'mlp_dim': -1}, 'model.mlp_dim must be >= 0'),
    ({'rope_theta': 0.0}, 'model.rope_theta and model.norm_eps must be positive'),
    ({'d_model': 30}, 'not divisible by model.num_heads'),
    ({'position_embedding': 'sinusoid'}, 'model.position_embedding'),
    ({'num_layers': 0}, 'model.num_layers must be positive'),
    ({'remat': 'some'}, 'model.remat'),
])
def test_model_config_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    _tiny(**overrides)
