"""`python -m fedjax_pt.generate --workdir=RUN --prompt=TEXT`: text sampled from a run's model.

  --prompt=TEXT          a prompt (repeat the flag for several; they are decoded as one batch)
  --prompts_file=PATH    one prompt per line (blank lines skipped), after any --prompt
  --checkpoint=N         the checkpoint of round N (default: the latest complete one)
  --max_new_tokens=64    tokens generated per sample at most; a sample also ends at end of text
  --temperature=0.8      0 is greedy (argmax); above 0 samples from softmax(logits / temperature)
  --top_k=0 --top_p=1.0  sample among the k most likely tokens (0: all) / the smallest set whose
                         probability reaches p (1: all): after the temperature, as transformers does
  --seed=0               the same seed, prompts and settings give the same text
  --num_samples=1        samples per prompt
  --json                 one JSON object instead of text

Each prompt starts the way training saw every document start, after the end-of-text token (the
packing puts one after each document), and a sample stops at the next end-of-text token.

The decode loop is one jitted program: the prompts (left-padded to the longest, their padding
never attended to) fill the model's key/value cache in one forward, then a `lax.while_loop` feeds
one token per step, each attending to the cache, until every row has ended or the limit is reached.
A prompt plus `max_new_tokens` may not exceed the model's context (`model.max_seq_len`): learned
positions have no embedding beyond it, and rotary or ALiBi models never saw a longer context.
"""

import dataclasses
import functools
import json
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pt import model as model_lib


class GenerationError(ValueError):
  """Generation cannot do what it was asked (one line, naming the culprit)."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  max_new_tokens: int = 64
  temperature: float = 0.8  # 0: greedy
  top_k: int = 0  # 0: no limit
  top_p: float = 1.0  # 1: no limit

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise GenerationError(f'--max_new_tokens={self.max_new_tokens} must be at least 1')
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise GenerationError(f'--temperature={self.temperature} must be >= 0 (0 is greedy)')
    if self.top_k < 0:
      raise GenerationError(f'--top_k={self.top_k} must be >= 0 (0: no limit)')
    if not 0 < self.top_p <= 1:
      raise GenerationError(f'--top_p={self.top_p} must be in (0, 1] (1: no limit)')


def filter_logits(logits_BxV: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """-inf for every token outside the k most likely (top_k > 0) and outside the nucleus: the most
  likely tokens down to the first whose more likely ones already hold `top_p` of the probability
  (so the nucleus holds at least top_p, and always the most likely token)."""
  if 0 < top_k < logits_BxV.shape[-1]:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV >= kth_Bx1, logits_BxV, -jnp.inf)
  if top_p < 1:
    descending_BxV = -jnp.sort(-logits_BxV, axis=-1)
    probs_BxV = jax.nn.softmax(descending_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of the more likely tokens
    least_Bx1 = jnp.min(jnp.where(before_BxV < top_p, descending_BxV, jnp.inf), axis=-1,
                        keepdims=True)
    logits_BxV = jnp.where(logits_BxV >= least_Bx1, logits_BxV, -jnp.inf)
  return logits_BxV


def sample_tokens(logits_BxV: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  """One token per row: the argmax at temperature 0, else a draw after temperature, top-k, top-p."""
  if sampling.temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = filter_logits(logits_BxV / sampling.temperature, sampling.top_k, sampling.top_p)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('cfg', 'sampling', 'eot_id', 'num_tokens'))
def _decode(params: Any, tokens_BxP: jax.Array, lengths_B: jax.Array, rng: jax.Array, *,
            cfg: model_lib.ModelConfig, sampling: Sampling, eot_id: int | None,
            num_tokens: int) -> jax.Array:
  """[B, max_new_tokens] new tokens of left-padded prompts; after a row's end of text, eot_id."""
  batch, prompt_len = tokens_BxP.shape
  steps = sampling.max_new_tokens
  decoder = model_lib.Decoder(cfg)

  def forward(cache, tokens_BxL, positions_BxL):
    logits_Bx1xV, variables = decoder.apply({'params': params, 'cache': cache}, tokens_BxL,
                                            positions_BxL, decode=True, last_only=True,
                                            mutable=['cache'])
    return logits_Bx1xV[:, 0], variables['cache']

  def pick(logits_BxV, i):
    # Ids the tokenizer does not have (the vocabulary's padding rows) are never drawn.
    logits_BxV = jnp.where(jnp.arange(cfg.vocab_size) < num_tokens, logits_BxV, -jnp.inf)
    return sample_tokens(logits_BxV, jax.random.fold_in(rng, i), sampling)

  ended = (lambda t: t == eot_id) if eot_id is not None else (lambda t: jnp.zeros_like(t, bool))
  fill = 0 if eot_id is None else eot_id
  # A row's padding has negative positions: it is never a key, and its own outputs are unused.
  positions_BxP = jnp.arange(prompt_len)[None, :] - (prompt_len - lengths_B)[:, None]
  cache = model_lib.init_cache(cfg, batch, prompt_len + steps)
  logits_BxV, cache = forward(cache, tokens_BxP, positions_BxP)
  token_B = pick(logits_BxV, 0)
  out_BxT = jnp.full((batch, steps), fill, jnp.int32).at[:, 0].set(token_B)

  def unfinished(state):
    i, _, _, done_B, _ = state
    return (i < steps) & ~done_B.all()

  def step(state):
    i, cache, token_B, done_B, out_BxT = state
    # Token i-1 of a row is at position length + i - 1.
    logits_BxV, cache = forward(cache, token_B[:, None], (lengths_B + i - 1)[:, None])
    token_B = jnp.where(done_B, fill, pick(logits_BxV, i))
    return i + 1, cache, token_B, done_B | ended(token_B), out_BxT.at[:, i].set(token_B)

  state = (jnp.int32(1), cache, token_B, ended(token_B), out_BxT)
  return jax.lax.while_loop(unfinished, step, state)[-1]


def generate(cfg: model_lib.ModelConfig, params: Any, prompts: Sequence[Sequence[int]],
             sampling: Sampling, *, seed: int = 0, num_samples: int = 1,
             eot_id: int | None = None, num_tokens: int = 0) -> list[list[list[int]]]:
  """New tokens for each prompt (token ids), `num_samples` of them: [prompt][sample] -> ids, ending
  with `eot_id` where the sample reached it. All prompts and samples are one batch. `num_tokens`:
  the tokenizer's vocabulary, ids beyond it (padding rows) never drawn (0: the model's)."""
  if num_samples < 1:
    raise GenerationError(f'--num_samples={num_samples} must be at least 1')
  if not prompts:
    raise GenerationError('no prompt given')
  for i, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise GenerationError(f'prompt {i + 1} has no token')
    _check_length(cfg, sampling, i, len(prompt))
  rows = [list(p) for p in prompts for _ in range(num_samples)]
  prompt_len = max(len(r) for r in rows)
  tokens_BxP = np.zeros((len(rows), prompt_len), np.int32)
  for b, row in enumerate(rows):
    tokens_BxP[b, prompt_len - len(row):] = row
  lengths_B = np.array([len(r) for r in rows], np.int32)
  out_BxT = np.asarray(_decode(params, tokens_BxP, lengths_B, jax.random.key(seed), cfg=cfg,
                               sampling=sampling, eot_id=eot_id,
                               num_tokens=num_tokens or cfg.vocab_size))
  samples = [_until_eot(list(map(int, row)), eot_id) for row in out_BxT]
  return [samples[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]


def _check_length(cfg: model_lib.ModelConfig, sampling: Sampling, index: int, length: int,
                  what: str = '') -> None:
  total = length + sampling.max_new_tokens
  if total > cfg.max_seq_len:
    raise GenerationError(
        f'prompt {index + 1} is {length} tokens{what}, and with --max_new_tokens='
        f"{sampling.max_new_tokens} that is {total}, beyond the model's context of "
        f'{cfg.max_seq_len} tokens (model.max_seq_len)')


def _until_eot(tokens: list[int], eot_id: int | None) -> list[int]:
  if eot_id is not None and eot_id in tokens:
    return tokens[:tokens.index(eot_id) + 1]
  return tokens


def generate_text(trained, prompts: Sequence[str], sampling: Sampling, *, seed: int = 0,
                  num_samples: int = 1) -> list[dict[str, Any]]:
  """Samples of a `trained_model.TrainedModel` for text prompts, each prompt after the end-of-text
  token as a document starts in training: one dict per sample (prompt and sample indices from 0,
  the prompt, the continuation's text and token ids, and why it stopped)."""
  tokenizer = trained.tokenizer
  eot = tokenizer.eot_id
  encoded = [[eot, *tokenizer.encode(p)] for p in prompts]
  for i, ids in enumerate(encoded):
    _check_length(trained.cfg, sampling, i, len(ids),
                  f' (the end-of-text token that starts a document, then {len(ids) - 1} of text)')
  samples = generate(trained.cfg, trained.params, encoded, sampling, seed=seed,
                     num_samples=num_samples, eot_id=eot, num_tokens=tokenizer.vocab_size)
  results = []
  for i, (prompt, per_prompt) in enumerate(zip(prompts, samples)):
    for j, tokens in enumerate(per_prompt):
      stopped = bool(tokens) and tokens[-1] == eot
      results.append({'prompt_index': i, 'sample_index': j, 'prompt': prompt,
                      'continuation': tokenizer.decode(tokens[:-1] if stopped else tokens),
                      'tokens': tokens, 'stop': 'end_of_text' if stopped else 'max_new_tokens'})
  return results


def render(results: Sequence[dict[str, Any]], num_prompts: int, num_samples: int) -> str:
  """The samples for a terminal: a header line each, then the prompt and its continuation."""
  lines = []
  for r in results:
    why = ('ended at end of text' if r['stop'] == 'end_of_text' else
           'stopped at --max_new_tokens')
    lines.append(f'=== prompt {r["prompt_index"] + 1}/{num_prompts}, sample '
                 f'{r["sample_index"] + 1}/{num_samples}: {len(r["tokens"])} new tokens, {why} ===')
    lines.append(r['prompt'] + r['continuation'])
  return '\n'.join(lines)


def _cli() -> None:
  # Flags are defined here, not at import, so importing this module defines nothing.
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  from fedjax_pt import cli  # pylint: disable=g-import-not-at-top
  from fedjax_pt import trained_model  # pylint: disable=g-import-not-at-top
  workdir = flags.DEFINE_string('workdir', '', 'The run directory.')
  prompt = flags.DEFINE_multi_string('prompt', [], 'A prompt (repeat for several).')
  prompts_file = flags.DEFINE_string('prompts_file', '', 'A file of prompts, one per line.')
  checkpoint = flags.DEFINE_integer('checkpoint', None, 'Round to load (default: latest).')
  max_new_tokens = flags.DEFINE_integer('max_new_tokens', 64, 'New tokens per sample at most.')
  temperature = flags.DEFINE_float('temperature', 0.8, 'Softmax temperature; 0 is greedy.')
  top_k = flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens (0: all).')
  top_p = flags.DEFINE_float('top_p', 1.0, 'Sample within the nucleus of probability p (1: all).')
  seed = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  num_samples = flags.DEFINE_integer('num_samples', 1, 'Samples per prompt.')
  as_json = flags.DEFINE_bool('json', False, 'Print one JSON object.')
  program = 'fedjax_pt.generate'

  def main(argv) -> None:
    if len(argv) > 1:
      cli.fail(f'unexpected arguments: {" ".join(argv[1:])}', program=program)
    if not workdir.value:
      cli.fail('--workdir is required', program=program)
    prompts = list(prompt.value)
    if prompts_file.value:
      try:
        with open(prompts_file.value, encoding='utf-8') as f:
          prompts += [line.rstrip('\n') for line in f if line.strip()]
      except (OSError, UnicodeDecodeError) as e:
        cli.fail(f'--prompts_file={prompts_file.value}: {e}', program=program)
    if not prompts:
      cli.fail('give at least one --prompt=TEXT or a --prompts_file', program=program)
    try:
      sampling = Sampling(max_new_tokens.value, temperature.value, top_k.value, top_p.value)
      if num_samples.value < 1:
        raise GenerationError(f'--num_samples={num_samples.value} must be at least 1')
      cli.quiet_logs()
      trained = trained_model.load(workdir.value, checkpoint.value)
      results = generate_text(trained, prompts, sampling, seed=seed.value,
                              num_samples=num_samples.value)
    except (GenerationError, trained_model.TrainedModelError) as e:
      cli.fail(e, program=program)
    if as_json.value:
      print(json.dumps({'workdir': workdir.value, 'checkpoint': trained.checkpoint_path,
                        'round': trained.round, 'seed': seed.value,
                        'sampling': dataclasses.asdict(sampling), 'samples': results}, indent=1))
    else:
      print(render(results, len(prompts), num_samples.value))

  app.run(main)


if __name__ == '__main__':
  _cli()
