"""fedjax_pt.export: every model variant, loaded by the real `transformers`, computes fedjax_pt's
logits; bf16 and sharded exports load; bad input is one line and a non-zero exit.

Tolerance of the logits comparison (float32 on both sides, the same arithmetic in another order):
a dot product of K float32 terms differs from any other summation order of it by at most
gamma_K = K u / (1 - K u) ~ K u relative to sum |a_i b_i| (Higham, Accuracy and Stability of
Numerical Algorithms, 3.1), u = 2^-24. A block's output goes through at most 8 such reductions in
sequence (norm statistics, qkv, scores, softmax sum, values, out projection, MLP up and down), the
embedding adds one and the output projection one more; errors add to first order, and the terms
of the tiny models here are of the size of the logits. So
    |logits_hf - logits_fedjax| <= 8 (num_layers + 1) K u max|logits|,  K = the widest reduction,
a worst-case bound that reordering alone cannot exceed; a wrong mapping (a transposed kernel, a
permuted head, a bias) is off by O(max|logits|).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

# The test extra installs both: a missing one is an error here, not a skip.
import torch
import transformers

from fedjax_pt import errors
from fedjax_pt import export as export_lib
from fedjax_pt import generate as generate_lib
from fedjax_pt import hf_format
from fedjax_pt import model as model_lib
from fedjax_pt import trained_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
U = 2.0 ** -24

VARIANTS = {
    'learned': {},
    'alibi': {'position_embedding': 'alibi'},
    'rope': {'position_embedding': 'rope', 'rope_theta': 500.0},
    'llama': {'family': 'llama', 'position_embedding': 'rope', 'mlp_dim': 96},
    'llama_gqa_untied': {'family': 'llama', 'position_embedding': 'rope', 'num_kv_heads': 2,
                         'tie_embeddings': False, 'mlp_dim': 96, 'norm_eps': 1e-5},
}


def _cfg(**overrides) -> model_lib.ModelConfig:
  base = dict(vocab_size=384, d_model=32, num_layers=2, num_heads=4, mlp_ratio=4, max_seq_len=32,
              init_std=0.3)  # larger than the default 0.02: attention far from uniform
  return model_lib.ModelConfig(**(base | overrides))


def _params(cfg, seed=0):
  """init_params, with norm scales drawn around 1 (init makes them all 1, which would hide a
  scale mapped onto the wrong norm)."""
  params = model_lib.init_params(cfg, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (np.asarray(x) * rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
                       if 'scale' in jax.tree_util.keystr(path) else np.asarray(x)), params)


def _write(cfg, params, directory, dtype='float32'):
  """What export() writes for the weights and config.json, without a workdir."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  save_file(hf_format.to_hf(cfg, params), os.path.join(directory, 'model.safetensors'),
            metadata={'format': 'pt'})
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(hf_format.hf_config(cfg, bos_token_id=256, eos_token_id=256, torch_dtype=dtype), f)


def _hf_logits(directory, tokens, dtype=None):
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or torch.float32)
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))).logits.float().numpy(), model


def _tolerance(cfg, logits) -> float:
  widest = max(cfg.d_model, cfg.mlp_width, cfg.max_seq_len)
  return 8 * (cfg.num_layers + 1) * widest * U * float(np.abs(logits).max())


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_transformers_computes_the_same_logits(variant, tmp_path):
  cfg = _cfg(**VARIANTS[variant])
  params = _params(cfg)
  _write(cfg, params, tmp_path)
  tokens = np.random.default_rng(1).integers(0, 257, (3, cfg.max_seq_len))
  ours = np.asarray(model_lib.Decoder(cfg).apply({'params': params}, tokens))
  theirs, model = _hf_logits(tmp_path, tokens)
  assert type(model).__name__ == hf_format.architecture(cfg).name
  diff, tol = float(np.abs(theirs - ours).max()), _tolerance(cfg, ours)
  print(f'{variant}: max |logits diff| {diff:.3g}, tolerance {tol:.3g}')
  assert diff <= tol


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_greedy_generation_equals_transformers_greedy_generate(variant, tmp_path):
  """fedjax_pt's KV-cache decoding and transformers' `generate` (its own cache), both greedy,
  choose the same tokens. The two differ only by float32 reordering (the bound above), so they
  may part only at a near tie: there the test checks that the two best logits of the common
  prefix are within that bound, and compares no further."""
  cfg = _cfg(**VARIANTS[variant])
  params = _params(cfg)
  _write(cfg, params, tmp_path)
  prompts = np.random.default_rng(2).integers(0, 256, (2, 6))
  sampling = generate_lib.Sampling(max_new_tokens=20, temperature=0.0)
  ours = [samples[0] for samples in generate_lib.generate(cfg, params, prompts.tolist(), sampling,
                                                           num_tokens=257)]
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
  # Only the tokenizer's 257 ids may be chosen, as fedjax_pt's `num_tokens` says.
  banned = [[i] for i in range(257, cfg.vocab_size)]
  with torch.no_grad():
    theirs = model.generate(torch.tensor(prompts), do_sample=False, max_new_tokens=20,
                            min_new_tokens=20, eos_token_id=None, pad_token_id=0,
                            bad_words_ids=banned).numpy()[:, prompts.shape[1]:]
  compared = 0
  for prompt, mine, hf in zip(prompts, ours, theirs):
    assert len(mine) == 20
    for t, (a, b) in enumerate(zip(mine, hf.tolist())):
      if a != b:
        context = np.concatenate([prompt, mine[:t]])[None]
        logits = np.asarray(model_lib.Decoder(cfg).apply({'params': params}, context))[0, -1, :257]
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] <= _tolerance(cfg, logits), (variant, t, a, b)
        break
      compared += 1
  assert compared >= 20, compared  # at least one whole continuation agreed


def test_unsupported_variants_are_refused_naming_the_key():
  with pytest.raises(hf_format.HFFormatError, match=r'^model\.num_heads=6: .*power-of-two'):
    hf_format.architecture(_cfg(position_embedding='alibi', d_model=48, num_heads=6))
  with pytest.raises(hf_format.HFFormatError, match=r'^model\.mlp_ratio=2: .*MPT'):
    hf_format.architecture(_cfg(position_embedding='alibi', mlp_ratio=2))


# --- the command, on a real run ------------------------------------------------------------------

@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A tiny trained run (byte tokenizer), made by the real command."""
  workdir = str(tmp_path_factory.mktemp('run') / 'run')
  subprocess.run([sys.executable, '-m', 'fedjax_pt.main',
                  '--config=fedjax_pt/configs/tiny.py:test', f'--workdir={workdir}',
                  '--config.log.tensorboard=False'], cwd=REPO, check=True, timeout=300,
                 capture_output=True)
  return workdir


def _export(*args, timeout=120):
  return subprocess.run([sys.executable, '-m', 'fedjax_pt.export', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def test_export_command_writes_a_model_transformers_loads(run, tmp_path):
  out = str(tmp_path / 'hf')
  done = _export(f'--workdir={run}', f'--out={out}', '--checkpoint=1')
  assert done.returncode == 0, done.stderr
  assert 'list(text.encode("utf-8"))' in done.stdout  # how to tokenize, for the byte tokenizer
  assert sorted(os.listdir(out)) == ['README.md', 'config.json', 'generation_config.json',
                                     'model.safetensors']
  with open(os.path.join(out, 'config.json')) as f:
    meta = json.load(f)['fedjax_pt']
  assert (meta['round'], meta['tokenizer'], meta['tokenizer_vocab_size']) == (1, 'bytes', 257)
  assert 'text.encode' in open(os.path.join(out, 'README.md')).read()
  model = trained_model.load(run, checkpoint=1)
  tokens = np.asarray([list(b'The federation trained this.' + bytes([32] * 4))])
  ours = np.asarray(model_lib.Decoder(model.cfg).apply({'params': model.params}, tokens))
  theirs, hf_model = _hf_logits(out, tokens)
  assert np.abs(theirs - ours).max() <= _tolerance(model.cfg, ours)
  assert hf_model.generation_config.eos_token_id == 256
  # Exporting again replaces the previous export in place.
  assert _export(f'--workdir={run}', f'--out={out}').returncode == 0
  with open(os.path.join(out, 'config.json')) as f:
    assert json.load(f)['fedjax_pt']['round'] == 2


def test_bfloat16_export_loads_as_bfloat16(run, tmp_path):
  export_lib.export(run, str(tmp_path / 'bf16'), dtype='bfloat16')
  _, hf_model = _hf_logits(str(tmp_path / 'bf16'), [[1, 2, 3]], dtype='auto')
  assert hf_model.dtype == torch.bfloat16
  model = trained_model.load(run)
  wte = np.asarray(model.params['wte']['embedding'])
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(  # round to nearest even, as torch's own .to(torch.bfloat16)
      hf_model.transformer.wte.weight.detach().float().numpy(),
      wte.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_sharded_export_has_an_index_and_loads(run, tmp_path):
  export_lib.export(run, str(tmp_path / 'one'))
  export_lib.export(run, str(tmp_path / 'sharded'), max_shard_size='40KB')
  names = sorted(os.listdir(tmp_path / 'sharded'))
  shards = [n for n in names if n.startswith('model-') and n.endswith('.safetensors')]
  assert len(shards) > 1 and 'model.safetensors.index.json' in names
  tokens = [list(range(40, 72))]
  np.testing.assert_array_equal(_hf_logits(str(tmp_path / 'sharded'), tokens)[0],
                                _hf_logits(str(tmp_path / 'one'), tokens)[0])


def _one_line_error(done, *fragments):
  assert done.returncode == errors.EXIT_BAD_INPUT, done.stderr
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('fedjax_pt.export: error: '), done.stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


def test_bad_input_is_one_line(run, tmp_path):
  out = str(tmp_path / 'out')
  _one_line_error(_export(f'--workdir={tmp_path / "nothing"}', f'--out={out}'),
                  'no such directory')
  bare = tmp_path / 'bare'  # a run that has saved no checkpoint yet
  bare.mkdir()
  (bare / 'config.json').write_text(open(os.path.join(run, 'config.json')).read())
  _one_line_error(_export(f'--workdir={bare}', f'--out={out}'), 'no complete checkpoint')
  _one_line_error(_export(f'--workdir={run}', f'--out={out}', '--checkpoint=7'),
                  '--checkpoint=7', 'it has 1, 2')
  config = json.load(open(os.path.join(run, 'config.json')))
  config['model'].update(position_embedding='alibi', mlp_ratio=2)
  alibi = tmp_path / 'alibi'
  alibi.mkdir()
  (alibi / 'config.json').write_text(json.dumps(config))
  _one_line_error(_export(f'--workdir={alibi}', f'--out={out}'), 'model.mlp_ratio=2')
  busy = tmp_path / 'busy'
  busy.mkdir()
  (busy / 'notes.txt').write_text('mine')
  _one_line_error(_export(f'--workdir={run}', f'--out={busy}'), 'not empty')
  assert not os.path.exists(out) and os.listdir(busy) == ['notes.txt']
  assert not [n for n in os.listdir(tmp_path) if n.startswith('.')]  # no staging left behind


def test_tokenizer_json_is_shipped_and_encodes_as_the_run(tmp_path):
  tokenizers = pytest.importorskip('tokenizers')
  from fedjax_pt import data as data_lib  # pylint: disable=g-import-not-at-top
  texts = [f'the quick brown fox jumps over the lazy dog {i} times.' for i in range(100)]
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<|endoftext|>'],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(tmp_path / 'tokenizer.json'))
  ours = data_lib.load_tokenizer(str(tmp_path / 'tokenizer.json'))
  out = tmp_path / 'hf'
  out.mkdir()
  export_lib._write_tokenizer(str(out), str(tmp_path / 'tokenizer.json'), ours, 32)  # pylint: disable=protected-access
  theirs = transformers.AutoTokenizer.from_pretrained(str(out))
  text = 'the lazy fox, 7 times. Hello!'
  assert theirs(text)['input_ids'] == ours.encode(text)
  assert theirs.eos_token_id == ours.eot_id


def test_sentencepiece_model_is_shipped_as_the_run_used_it(tmp_path):
  spm = pytest.importorskip('sentencepiece')
  from fedjax_pt import data as data_lib  # pylint: disable=g-import-not-at-top
  texts = [f'the quick brown fox jumps over the lazy dog {i} times.' for i in range(100)]
  spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_path / 'sp'),
                                 vocab_size=48, eos_id=2, minloglevel=2, num_threads=1)
  ours = data_lib.load_tokenizer(str(tmp_path / 'sp.model'))
  out = tmp_path / 'hf'
  out.mkdir()
  note = export_lib._write_tokenizer(str(out), str(tmp_path / 'sp.model'), ours, 32)  # pylint: disable=protected-access
  assert os.listdir(out) == ['tokenizer.model'] and 'SentencePieceProcessor' in note
  shipped = spm.SentencePieceProcessor(model_file=str(out / 'tokenizer.model'))
  assert shipped.encode('the lazy fox') == ours.encode('the lazy fox')
