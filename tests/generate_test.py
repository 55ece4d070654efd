"""Decoding with the KV cache computes what the full forward computes; sampling does what it says.

The cache's tolerance is derived as in model_numerics_test.py: float64 runs of the plain formulation
are exact as far as float32 can tell, and the float32 plain formulation's own error against them is
float32's rounding on this model and input. Decoding only reorders float32 operations (one query
row at a time against the whole cache, skipping exactly-zero terms), so its error must be of the
same size: at most twice the plain formulation's, as root-mean-square errors over all logits.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_numerics_test as numerics
from fedjax_pt import generate as generate_lib
from fedjax_pt import model as model_lib
from fedjax_pt import trained_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_LLAMA = dict(family='llama', position_embedding='rope', num_kv_heads=2, tie_embeddings=False)
VARIANTS = pytest.mark.parametrize('variant', [
    {'position_embedding': 'learned'}, {'position_embedding': 'rope'},
    {'position_embedding': 'alibi'}, _LLAMA],
    ids=['learned', 'rope', 'alibi', 'llama-gqa2-untied'])


def _cached_logits(cfg, params, tokens_BxS, pads_B, prefill):
  """Logits of left-padded rows (row b: pads_B[b] padding slots, then its tokens), the first
  `prefill` slots in one call filling the cache, then one slot per call."""
  batch, length = tokens_BxS.shape
  positions_BxS = np.arange(length)[None, :] - np.asarray(pads_B)[:, None]
  apply = jax.jit(lambda cache, t, p: model_lib.Decoder(cfg).apply(
      {'params': params, 'cache': cache}, t, p, decode=True, mutable=['cache']))
  cache = model_lib.init_cache(cfg, batch, cfg.max_seq_len)
  logits, bounds = [], [(0, prefill)] + [(s, s + 1) for s in range(prefill, length)]
  for start, end in bounds:
    step_logits, variables = apply(cache, tokens_BxS[:, start:end], positions_BxS[:, start:end])
    cache = variables['cache']
    logits.append(step_logits)
  return np.concatenate(logits, axis=1)


@VARIANTS
def test_cached_decoding_gives_the_full_forwards_logits_at_every_position(variant):
  cfg = numerics._cfg(**variant)
  length, pads = 24, [0, 3, 7]
  params, batch = numerics._inputs(cfg, length)
  tokens_BxL = batch[:, :length]
  exact = numerics._float64(lambda p, t: numerics._reference_logits(cfg, p, t), params, tokens_BxL)
  plain = jax.jit(lambda p, t: numerics._reference_logits(cfg, p, t))(params, tokens_BxL)
  full = jax.jit(model_lib.Decoder(cfg).apply)({'params': params}, tokens_BxL)
  # Row b is its first length - pads[b] tokens after pads[b] slots of padding (token 0).
  padded_BxL = np.zeros_like(tokens_BxL)
  for b, pad in enumerate(pads):
    padded_BxL[b, pad:] = tokens_BxL[b, :length - pad]
  cached_padded = _cached_logits(cfg, params, padded_BxL, pads, prefill=10)
  cached = np.zeros_like(exact)
  for b, pad in enumerate(pads):
    cached[b, :length - pad] = cached_padded[b, pad:]
  kept = np.arange(length)[None, :] < (length - np.asarray(pads))[:, None]  # unpadded positions
  bound = numerics._ERROR_MARGIN * numerics._rms_error(plain[kept], exact[kept])
  assert 0 < bound < 1e-5 * np.sqrt(np.mean(exact ** 2))
  assert numerics._rms_error(cached[kept], exact[kept]) <= bound
  assert numerics._rms_error(np.asarray(full)[kept], exact[kept]) <= bound


def _tiny(variant, scale=8.0):
  cfg = numerics._cfg(**variant)
  params = model_lib.init_params(cfg, jax.random.key(0))
  # Blocks larger than at initialisation, so that greedy tokens depend on the context rather than
  # repeat the last one (whose embedding dominates the residual stream of a tied model).
  return cfg, {name: jax.tree.map(lambda p: p * scale if p.ndim == 2 else p, tree)
               if name.startswith('block_') else tree for name, tree in params.items()}


def _naive_greedy(cfg, params, prompt, max_new_tokens):
  """Argmax of a full forward of the whole sequence, once per new token. The sequence sits at the
  start of a buffer of the model's context (one compiled forward for every length): the forward is
  causal, so the zeros after it do not change the logits read."""
  forward = jax.jit(model_lib.Decoder(cfg).apply)
  buffer = np.zeros((1, cfg.max_seq_len), np.int32)
  buffer[0, :len(prompt)] = prompt
  for length in range(len(prompt), len(prompt) + max_new_tokens):
    buffer[0, length] = int(jnp.argmax(forward({'params': params}, buffer)[0, length - 1]))
  return buffer[0, len(prompt):len(prompt) + max_new_tokens].tolist()


_PROMPTS = [[5, 9, 2, 40, 33, 7, 1], [12], [60, 3, 3, 8]]


@VARIANTS
def test_greedy_generation_is_the_argmax_of_full_forwards_and_batching_changes_nothing(variant):
  cfg, params = _tiny(variant)
  greedy = generate_lib.Sampling(max_new_tokens=12, temperature=0.0)
  batched = generate_lib.generate(cfg, params, _PROMPTS, greedy)
  for prompt, (tokens,) in zip(_PROMPTS, batched):
    assert tokens == _naive_greedy(cfg, params, prompt, 12)
    assert generate_lib.generate(cfg, params, [prompt], greedy) == [[tokens]]
  assert len({t for (tokens,) in batched for t in tokens}) > 3  # not one token repeated


def test_a_sample_stops_at_end_of_text_and_the_batch_when_all_have():
  cfg, params = _tiny({'position_embedding': 'rope'})
  greedy = generate_lib.Sampling(max_new_tokens=12, temperature=0.0)
  (free,), = generate_lib.generate(cfg, params, [_PROMPTS[0]], greedy)
  eot = free[4]
  (stopped,), = generate_lib.generate(cfg, params, [_PROMPTS[0]], greedy, eot_id=eot)
  assert stopped == free[:free.index(eot) + 1]


def test_sampling_is_deterministic_under_a_seed_and_top_k_1_is_greedy():
  cfg, params = _tiny({'position_embedding': 'learned'})
  hot = generate_lib.Sampling(max_new_tokens=16, temperature=1.0)
  run = lambda sampling, seed: generate_lib.generate(cfg, params, _PROMPTS, sampling, seed=seed,
                                                     num_samples=2)
  first = run(hot, 0)
  assert run(hot, 0) == first
  assert run(hot, 1) != first
  assert all(a != b for a, b in first)  # the samples of one prompt differ
  top1 = generate_lib.Sampling(max_new_tokens=16, temperature=1.0, top_k=1)
  greedy = generate_lib.Sampling(max_new_tokens=16, temperature=0.0)
  assert run(top1, 3) == run(greedy, 0)


def test_padding_rows_of_the_vocabulary_are_never_drawn():
  cfg, params = _tiny({'position_embedding': 'learned'}, scale=1.0)
  hot = generate_lib.Sampling(max_new_tokens=16, temperature=5.0)
  samples = generate_lib.generate(cfg, params, _PROMPTS, hot, num_samples=4, num_tokens=10)
  drawn = {t for per_prompt in samples for tokens in per_prompt for t in tokens}
  assert drawn <= set(range(10)) and len(drawn) > 1


def test_top_k_and_top_p_keep_what_they_should_on_hand_computed_probabilities():
  # Probabilities 0.5, 0.05, 0.3, 0.15: descending 0, 2, 3, 1 with mass before them 0, .5, .8, .95.
  logits = jnp.log(jnp.asarray([[0.5, 0.05, 0.3, 0.15]]))
  kept = lambda **kw: np.isfinite(np.asarray(generate_lib.filter_logits(logits, **kw)))[0].tolist()
  assert kept(top_p=0.4) == [True, False, False, False]
  assert kept(top_p=0.6) == [True, False, True, False]
  assert kept(top_p=0.9) == [True, False, True, True]
  assert kept(top_p=1.0) == [True, True, True, True]
  assert kept(top_k=2) == [True, False, True, False]
  assert kept(top_k=3, top_p=0.6) == [True, False, True, False]
  nucleus = generate_lib.Sampling(temperature=1.0, top_p=0.6)
  draws = generate_lib.sample_tokens(jnp.repeat(logits, 2000, axis=0), jax.random.key(0), nucleus)
  counts = np.bincount(np.asarray(draws), minlength=4)
  assert counts[1] == counts[3] == 0
  assert abs(counts[0] / 2000 - 0.5 / 0.8) < 0.05  # renormalised within the nucleus


@pytest.mark.parametrize('kw, culprit', [
    (dict(temperature=-1.0), '--temperature=-1.0'), (dict(top_p=0.0), '--top_p=0.0'),
    (dict(top_p=1.5), '--top_p=1.5'), (dict(top_k=-1), '--top_k=-1'),
    (dict(max_new_tokens=0), '--max_new_tokens=0')])
def test_bad_sampling_settings_are_named(kw, culprit):
  with pytest.raises(generate_lib.GenerationError, match=culprit):
    generate_lib.Sampling(**kw)


def test_a_prompt_beyond_the_context_is_refused_with_its_lengths():
  cfg, params = _tiny({'position_embedding': 'rope'})
  with pytest.raises(generate_lib.GenerationError,
                     match=r'prompt 2 is 30 tokens.*--max_new_tokens=3 that is 33.*context of 32'):
    generate_lib.generate(cfg, params, [[1], [2] * 30], generate_lib.Sampling(max_new_tokens=3))
  assert generate_lib.generate(cfg, params, [[2] * 29], generate_lib.Sampling(max_new_tokens=3))


# The CLI on a real run of configs/tiny.py:test (32-byte context).

@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('generate') / 'run'
  subprocess.run([sys.executable, '-m', 'fedjax_pt.main', '--config=configs/tiny.py:test',
                  f'--workdir={workdir}'], cwd=REPO, check=True, capture_output=True, timeout=600)
  return workdir


def _generate(*flags):
  return subprocess.run([sys.executable, '-m', 'fedjax_pt.generate', *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=300, check=False)


def test_cli_prints_samples_and_its_json_matches_the_library(run_dir, tmp_path):
  (tmp_path / 'prompts.txt').write_text('\nimport\n\n')
  flags = [f'--workdir={run_dir}', '--prompt=The ', f'--prompts_file={tmp_path / "prompts.txt"}',
           '--max_new_tokens=8', '--temperature=0']
  text = _generate(*flags)
  assert text.returncode == 0, text.stderr
  headers = [line for line in text.stdout.splitlines() if line.startswith('=== prompt')]
  assert [h.split(':')[0] for h in headers] == ['=== prompt 1/2, sample 1/1',
                                                '=== prompt 2/2, sample 1/1']
  as_json = _generate(*flags, '--json')
  assert as_json.returncode == 0, as_json.stderr
  output = json.loads(as_json.stdout)
  trained = trained_model.load(str(run_dir))
  expected = generate_lib.generate_text(trained, ['The ', 'import'],
                                        generate_lib.Sampling(8, temperature=0.0))
  assert output['samples'] == expected
  assert output['round'] == 2
  assert text.stdout == generate_lib.render(expected, 2, 1) + '\n'


@pytest.mark.parametrize('case', ['no_checkpoint', 'long_prompt', 'temperature', 'top_p'])
def test_cli_refuses_bad_input_in_one_line(run_dir, tmp_path, case):
  flags = {'workdir': str(run_dir), 'prompt': 'x', 'max_new_tokens': '8'}
  expected = {'long_prompt': 'prompt 1 is 31 tokens', 'temperature': '--temperature=-0.5',
              'top_p': '--top_p=2.0', 'no_checkpoint': 'no complete checkpoint'}[case]
  if case == 'no_checkpoint':
    os.makedirs(tmp_path / 'empty')
    shutil.copy(run_dir / 'config.json', tmp_path / 'empty' / 'config.json')
    flags['workdir'] = str(tmp_path / 'empty')
  elif case == 'long_prompt':
    flags['prompt'] = 'y' * 30  # 31 tokens with the end-of-text token before it, + 8 > 32
  elif case == 'temperature':
    flags['temperature'] = '-0.5'
  else:
    flags['top_p'] = '2.0'
  result = _generate(*(f'--{k}={v}' for k, v in flags.items()))
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('fedjax_pt.generate: error:'), result.stderr
  assert expected in lines[0], lines[0]
