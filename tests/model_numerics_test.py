"""The decoder as tuned for speed computes what the plain formulation computes.

`_reference_logits` writes the model out the way `model.py` first did: 3-D einsums over [B, L, D],
attention as in `jax.nn.dot_product_attention`'s XLA implementation (scores, scale, bias, causal
mask, softmax, weighted values) and flax's LayerNorm; for the Llama family RMSNorm, SwiGLU and
grouped-query attention by indexing the shared key/value head. Run in float32 it is the old
formulation (up to the order of a few sums); run in float64 it is exact arithmetic as far as
float32 can tell.

The tolerance is derived from float32 itself: the old formulation's own rounding error, measured
against float64 on the same inputs. The fast formulation only reorders float32 operations (and
skips terms that are exactly zero), so its error must be of the same size: at most twice the old
one's, as root-mean-square errors over all elements (rounding errors of different orders of
operations differ by chance, not by a factor).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_pt import attention as attention_lib
from fedjax_pt import model as model_lib

_ERROR_MARGIN = 2.0


def _cfg(**kw):
  values = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, mlp_ratio=4, max_seq_len=32)
  values.update(kw)
  return model_lib.ModelConfig(**values)


def _layer_norm(x, scale):
  # flax.linen.LayerNorm (use_fast_variance): var = E[x^2] - E[x]^2, epsilon 1e-6.
  mean = x.mean(-1, keepdims=True)
  var = jnp.maximum((x * x).mean(-1, keepdims=True) - mean * mean, 0.0)
  return (x - mean) * jax.lax.rsqrt(var + 1e-6) * scale


def _attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, bias):
  length, head_dim = q_BxLxNxH.shape[1], q_BxLxNxH.shape[3]
  scores = jnp.einsum('BTNH,BSNH->BNTS', q_BxLxNxH, k_BxLxNxH)
  scores = scores * jnp.asarray(1 / np.sqrt(head_dim), scores.dtype)
  if bias is not None:
    scores = scores + bias.astype(scores.dtype)
  causal = np.tril(np.ones((length, length), bool))
  scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
  return jnp.einsum('BNTS,BSNH->BTNH', jax.nn.softmax(scores, axis=-1), v_BxLxNxH)


def _rms_norm(x, scale):
  # flax.linen.RMSNorm: x / sqrt(E[x^2] + epsilon), epsilon 1e-6.
  return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * scale


def _reference_logits(cfg, params, tokens_BxL):
  batch, length = tokens_BxL.shape
  llama = cfg.family == 'llama'
  norm = _rms_norm if llama else _layer_norm
  x = params['wte']['embedding'][tokens_BxL]
  if cfg.position_embedding == 'learned':
    x = x + params['wpe'][:length]
  bias = (attention_lib.alibi_bias(cfg.num_heads, length) if cfg.position_embedding == 'alibi'
          else None)
  for i in range(cfg.num_layers):
    p = params[f'block_{i}']
    h = norm(x, p['norm_1']['scale'])
    qkv = jnp.einsum('BLD,DE->BLE', h, p['attn']['wqkv']['kernel'])
    q = qkv[..., :cfg.d_model].reshape(batch, length, cfg.num_heads, cfg.head_dim)
    k, v = (t.reshape(batch, length, cfg.kv_heads, cfg.head_dim)
            for t in jnp.split(qkv[..., cfg.d_model:], 2, axis=-1))
    if cfg.position_embedding == 'rope':
      q, k = attention_lib.rope(q, cfg.rope_theta), attention_lib.rope(k, cfg.rope_theta)
    # Grouped-query attention written out: query head n reads key/value head n // group.
    kv_head = np.arange(cfg.num_heads) // (cfg.num_heads // cfg.kv_heads)
    out = _attention(q, k[:, :, kv_head], v[:, :, kv_head], bias)
    x = x + jnp.einsum('BLD,DE->BLE', out.reshape(batch, length, cfg.d_model),
                       p['attn']['out_proj']['kernel'])
    h = norm(x, p['norm_2']['scale'])
    m = p['mlp']
    if llama:
      h = (jax.nn.silu(jnp.einsum('BLD,DF->BLF', h, m['gate_proj']['kernel'])) *
           jnp.einsum('BLD,DF->BLF', h, m['up_proj']['kernel']))
    else:
      h = jax.nn.gelu(jnp.einsum('BLD,DF->BLF', h, m['up_proj']['kernel']), approximate=False)
    x = x + jnp.einsum('BLF,FD->BLD', h, m['down_proj']['kernel'])
  x = norm(x, params['norm_f']['scale'])
  if 'lm_head' in params:
    return jnp.einsum('BLD,DV->BLV', x, params['lm_head']['kernel'])
  return jnp.einsum('BLD,VD->BLV', x, params['wte']['embedding'])


def _reference_decoder(cfg):
  return lambda params, tokens_BxL: _reference_logits(cfg, params, tokens_BxL)


def _model_decoder(cfg):
  return lambda params, tokens_BxL: model_lib.Decoder(cfg).apply({'params': params}, tokens_BxL)


def _logits_and_grads(decoder):
  """One program: the logits of a batch and the gradient of its mean next-token loss."""

  def loss(params, batch_BxL1):
    logits = decoder(params, batch_BxL1[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch_BxL1[:, 1:]).mean(), logits

  return jax.jit(lambda params, batch_BxL1: jax.grad(loss, has_aux=True)(params, batch_BxL1)[::-1])


def _rms_error(tree, exact_tree):
  """Root-mean-square error over every element: a steadier measure of rounding than the maximum,
  which over a few thousand elements varies by 2x from one summation order to another."""
  errors = [(np.asarray(a, np.float64) - b).ravel()
            for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(exact_tree))]
  return float(np.sqrt(np.mean(np.concatenate(errors) ** 2)))


def _float64(fn, *args):
  with jax.enable_x64(True):
    args64 = jax.tree.map(lambda x: np.asarray(x, np.float64) if x.dtype == np.float32 else x,
                          args)
    return jax.tree.map(np.asarray, fn(*args64))


def _inputs(cfg, length):
  params = model_lib.init_params(cfg, jax.random.key(0))
  # Weights larger than at initialisation make the attention and the GELU far from linear.
  params = jax.tree.map(lambda p: p * 8 if p.ndim == 2 else p, params)
  batch = np.asarray(jax.random.randint(jax.random.key(1), (3, length + 1), 0, cfg.vocab_size))
  return params, batch


_LLAMA = dict(family='llama', position_embedding='rope', num_kv_heads=2, tie_embeddings=False)


@pytest.mark.parametrize('variant', [
    {'position_embedding': 'learned'}, {'position_embedding': 'rope'},
    {'position_embedding': 'alibi'}, _LLAMA, {**_LLAMA, 'num_kv_heads': 1, 'tie_embeddings': True}],
    ids=['learned', 'rope', 'alibi', 'llama-gqa2-untied', 'llama-mqa-tied'])
def test_logits_and_gradients_agree_with_the_plain_formulation(variant):
  cfg = _cfg(**variant)
  params, batch = _inputs(cfg, cfg.max_seq_len)
  exact = _float64(_logits_and_grads(_reference_decoder(cfg)), params, batch)
  old = _logits_and_grads(_reference_decoder(cfg))(params, batch)
  new = _logits_and_grads(_model_decoder(cfg))(params, batch)
  # The margin is meaningful only if float32 rounding is what separates old from exact.
  assert 0 < _rms_error(old[0], exact[0]) < 1e-5 * np.sqrt(np.mean(exact[0] ** 2))
  for new_part, old_part, exact_part in zip(new, old, exact):  # logits, then gradients
    assert _rms_error(new_part, exact_part) <= _ERROR_MARGIN * _rms_error(old_part, exact_part)


def _attention_and_grads(attention, q, k, v, bias, cotangent):
  out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, bias), q, k, v)
  return out, vjp(cotangent)


def _jax_attention(q, k, v, bias):
  return jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=True)


@pytest.mark.parametrize('length, alibi', [(129, True), (390, False)])
def test_blocked_attention_agrees_with_jax_attention(length, alibi):
  # Query blocks of 64 and 65 rows, then 6 of 65 (the decoder test above has 2 of 16).
  num_heads, head_dim = 2, 16
  q, k, v, cotangent = (3 * jax.random.normal(key, (2, length, num_heads, head_dim))
                        for key in jax.random.split(jax.random.key(2), 4))
  bias = attention_lib.alibi_bias(num_heads, length) if alibi else None
  args = (q, k, v, bias, cotangent)
  exact = _float64(jax.jit(functools.partial(_attention_and_grads, _attention)), *args)
  old = jax.jit(functools.partial(_attention_and_grads, _jax_attention))(*args)
  new = jax.jit(functools.partial(_attention_and_grads,
                                  attention_lib.blocked_causal_attention))(*args)
  for new_part, old_part, exact_part in zip(new, old, exact):  # outputs, then gradients
    assert _rms_error(new_part, exact_part) <= _ERROR_MARGIN * _rms_error(old_part, exact_part)
