"""Tokens/s of generation with the KV cache against a full forward per token, in the same run.

  python -m benchmarks.generation                           # configs/tiny.py's model
  python -m benchmarks.generation --config=configs/llama_tiny.py --batch=8

Both decode greedily, as one jitted program each, from the same prompt (random tokens of the
model's byte vocabulary; random parameters of the config's shape: speed depends on neither):
- cached: `fedjax_pt.generate` (the prompt in one forward that fills the cache, then one token
  per step against it);
- full forward: a buffer of prompt + new tokens, and per new token a forward of the whole buffer
  (causal, so the slots not yet written do not change the logits read), `lax.fori_loop` over the
  steps: what generating without a cache costs, without Python dispatch per token.
Each setting runs at the config's context (`data.seq_len`) and at 4x it, half prompt and half new
tokens; tokens/s counts new tokens of all rows, prefill included in the cached time. Both programs
are compiled and run once before the timed calls (then timed in turn, the fastest of --repeats
kept), and must give the same tokens.
"""

import dataclasses
import functools

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from benchmarks import harness
from fedjax_pt import generate as generate_lib
from fedjax_pt import model as model_lib

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', lock_config=True)
_BATCH = flags.DEFINE_integer('batch', 1, 'prompts decoded together')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'timed calls of each (the fastest is kept)')


@functools.partial(jax.jit, static_argnames=('cfg', 'new_tokens'))
def _full_forward_greedy(params, prompt_BxP, *, cfg, new_tokens):
  batch, prompt_len = prompt_BxP.shape
  buffer_BxS = jnp.zeros((batch, prompt_len + new_tokens), jnp.int32).at[:, :prompt_len].set(
      prompt_BxP)

  def step(i, buffer_BxS):
    logits_BxSxV = model_lib.Decoder(cfg).apply({'params': params}, buffer_BxS)
    last_BxV = jax.lax.dynamic_index_in_dim(logits_BxSxV, prompt_len + i - 1, 1, keepdims=False)
    token_B = jnp.argmax(last_BxV, axis=-1).astype(jnp.int32)
    return jax.lax.dynamic_update_index_in_dim(buffer_BxS, token_B, prompt_len + i, 1)

  return jax.lax.fori_loop(0, new_tokens, step, buffer_BxS)[:, prompt_len:]


def _measure(cfg: model_lib.ModelConfig, batch: int, repeats: int) -> dict[str, float]:
  params = model_lib.init_params(cfg, jax.random.key(0))
  prompt_len = new_tokens = cfg.max_seq_len // 2
  prompt_BxP = np.random.default_rng(0).integers(0, 256, (batch, prompt_len), dtype=np.int32)
  greedy = generate_lib.Sampling(max_new_tokens=new_tokens, temperature=0.0)
  cached = lambda: generate_lib.generate(cfg, params, list(prompt_BxP), greedy)
  full = lambda: _full_forward_greedy(params, prompt_BxP, cfg=cfg, new_tokens=new_tokens)
  same = [s for (s,) in cached()] == np.asarray(full()).tolist()
  # Interleaved, so that a busy spell of a shared machine slows both rather than one.
  cached_s = full_s = float('inf')
  for _ in range(repeats):
    cached_s = min(cached_s, harness.best_time(cached, 1, warmup=0))
    full_s = min(full_s, harness.best_time(full, 1, warmup=0))
  tokens = batch * new_tokens
  return {'context': cfg.max_seq_len, 'cached': tokens / cached_s, 'full': tokens / full_s,
          'same_tokens': same}


def main(_):
  config = _CONFIG.value
  # The byte tokenizer's 257 ids, padded as a run pads them.
  base = model_lib.ModelConfig.from_config(config.model, vocab_size=257,
                                           seq_len=config.data.seq_len, default_vocab_size=384)
  print(f'{jax.devices()[0].device_kind}; {model_lib.param_count(base):,} parameters '
        f'(d_model {base.d_model}, {base.num_layers} layers, {base.num_heads} heads, '
        f'{base.family}, {base.position_embedding}); batch {_BATCH.value}; greedy, half the '
        'context prompt and half new tokens')
  print(f'{"context":>8} {"cached tok/s":>13} {"full-forward tok/s":>19} {"ratio":>7}  same tokens')
  for context in (base.max_seq_len, 4 * base.max_seq_len):
    cfg = dataclasses.replace(base, max_seq_len=context)
    r = _measure(cfg, _BATCH.value, _REPEATS.value)
    print(f'{r["context"]:>8} {r["cached"]:>13.0f} {r["full"]:>19.0f} '
          f'{r["cached"] / r["full"]:>6.1f}x  {r["same_tokens"]}')


if __name__ == '__main__':
  app.run(main)
