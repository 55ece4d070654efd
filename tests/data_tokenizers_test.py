"""Tests of fedjax_pt.data.tokenizers: bytes, HuggingFace tokenizer.json, SentencePiece."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from fedjax_pt.data.tokenizers import load_tokenizer, padded_vocab_size, tokenize_corpus

SHARED = Path(__file__).resolve().parents[2] / 'shared'
NEOX = SHARED / 'data' / 'tokenizers' / 'gpt-neox-20b' / 'tokenizer.json'
C4 = SHARED / 'data' / 'c4' / 'c4_sample.jsonl'

SENTENCES = [f'the {a} {n} {v} over the lazy {b} number {i}.' for i, (a, n, v, b) in enumerate(
    (a, n, v, b) for a in ('quick', 'slow', 'red', 'tiny') for n in ('fox', 'cat', 'owl')
    for v in ('jumps', 'runs', 'looks') for b in ('dog', 'frog', 'bird', 'bee', 'cow', 'ant',
                                                  'yak', 'elk', 'emu'))]  # 324 sentences


def _check_batch_matches_encode(tok, texts):
  batch = tok.encode_batch(texts)
  assert [b.dtype for b in batch] == [np.int32] * len(texts)
  assert [b.tolist() for b in batch] == [tok.encode(t) for t in texts]


def test_bytes_tokenizer():
  tok = load_tokenizer('bytes')
  assert (tok.vocab_size, tok.eot_id, tok.name) == (257, 256, 'bytes')
  text = 'héllo, wörld ✓'
  assert tok.encode(text) == list(text.encode('utf-8'))
  assert tok.decode(tok.encode(text)) == text
  assert tok.decode(tok.encode('a') + [256] + tok.encode('b')) == 'a<|endoftext|>b'
  _check_batch_matches_encode(tok, [text, '', 'x'])
  assert tok.encode_batch([]) == []


def test_tokenize_corpus_flat_ids_and_offsets():
  tok = load_tokenizer('bytes')
  ids, offsets = tokenize_corpus(tok, ['ab', '', 'cde', 'f'], chunk_size=2)
  assert ids.dtype == np.int32 and ids.tolist() == list(b'abcdef')
  assert offsets.tolist() == [0, 2, 2, 5, 6]


def _hf_tokenizer_json(path: Path, special: str | None) -> Path:
  specials = [special] if special else []
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token='[UNK]'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.train_from_iterator(SENTENCES, tokenizers.trainers.WordLevelTrainer(
      special_tokens=['[UNK]'] + specials))
  tok.save(str(path))
  return path


def test_huggingface_tokenizer(tmp_path):
  path = _hf_tokenizer_json(tmp_path / 'tokenizer.json', '<|endoftext|>')
  tok = load_tokenizer(str(path))
  assert tok.eot_id == 1 and tok.name == str(path)
  assert tok.vocab_size == len(tokenizers.Tokenizer.from_file(str(path)).get_vocab())
  ids = tok.encode('the quick fox')
  assert len(ids) == 3 and tok.decode(ids) == 'the quick fox'
  _check_batch_matches_encode(tok, SENTENCES[:5] + [''])


@pytest.mark.parametrize('special', ['</s>', '<eos>'])
def test_huggingface_eot_alternatives(tmp_path, special):
  tok = load_tokenizer(str(_hf_tokenizer_json(tmp_path / 't.json', special)))
  assert tok.eot_id == 1


def test_huggingface_without_eot_is_named(tmp_path):
  path = _hf_tokenizer_json(tmp_path / 't.json', None)
  with pytest.raises(ValueError, match=rf'^{re.escape(str(path))}: tokenizer has no end-of-text'):
    load_tokenizer(str(path))


def test_broken_and_missing_tokenizer_files_are_named(tmp_path):
  broken = tmp_path / 'tokenizer.json'
  broken.write_text('{"not": "a tokenizer"}')
  with pytest.raises(ValueError, match=rf'^{broken}: not a valid HuggingFace tokenizer.json'):
    load_tokenizer(str(broken))
  with pytest.raises(FileNotFoundError, match=f'tokenizer file not found: {tmp_path}/nope.json'):
    load_tokenizer(str(tmp_path / 'nope.json'))
  with pytest.raises(ValueError, match="data.tokenizer must be 'bytes'"):
    load_tokenizer('gpt2')
  garbage = tmp_path / 'sp.model'
  garbage.write_bytes(b'\x00garbage')
  pytest.importorskip('sentencepiece')
  with pytest.raises(ValueError, match=rf'^{garbage}: not a valid SentencePiece model'):
    load_tokenizer(str(garbage))


@pytest.fixture(scope='module')
def sp_model_dir(tmp_path_factory):
  spm = pytest.importorskip('sentencepiece', reason='sentencepiece is not installed')
  out = tmp_path_factory.mktemp('sp')
  for name, eos in (('eos', 2), ('noeos', -1)):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES), model_prefix=str(out / name), vocab_size=50,
        model_type='unigram', eos_id=eos, minloglevel=2, num_threads=1)
  return out


def test_sentencepiece_tokenizer(sp_model_dir):
  path = str(sp_model_dir / 'eos.model')
  tok = load_tokenizer(path)
  assert (tok.vocab_size, tok.eot_id, tok.name) == (50, 2, path)
  text = 'the quick fox runs over the lazy dog number 7.'
  assert tok.decode(tok.encode(text)) == text
  assert tok.eot_id not in tok.encode(text)
  _check_batch_matches_encode(tok, SENTENCES[:5] + [''])


def test_sentencepiece_without_eos_is_named(sp_model_dir):
  path = sp_model_dir / 'noeos.model'
  with pytest.raises(ValueError, match=rf'^{path}: SentencePiece model has no eos piece'):
    load_tokenizer(str(path))


@pytest.mark.skipif(not NEOX.exists(), reason=f'{NEOX} (shared data) is absent')
def test_real_gpt_neox_tokenizer():
  tok = load_tokenizer(str(NEOX))
  assert tok.encode('Hello world') == [12092, 1533]
  assert (tok.vocab_size, tok.eot_id) == (50277, 0)
  assert padded_vocab_size(tok.vocab_size) == 50304  # MPT uses 50,368: not a multiple of 128
  _check_batch_matches_encode(tok, ['Hello world', ' spaced  out\n\n', ''])


@pytest.mark.skipif(not (NEOX.exists() and C4.exists()), reason=f'{SHARED}/data is absent')
def test_real_c4_sample_token_count():
  # shared/data/README.md: the 1,000 documents hold 485,789 GPT-NeoX-20B tokens.
  texts = [json.loads(line)['text'] for line in C4.read_text().splitlines()]
  ids, offsets = tokenize_corpus(load_tokenizer(str(NEOX)), texts)
  assert len(ids) == offsets[-1] == 485_789


def test_missing_sentencepiece_package_says_what_to_install(tmp_path, monkeypatch):
  model = tmp_path / 'sp.model'
  model.write_bytes(b'x')
  monkeypatch.setitem(sys.modules, 'sentencepiece', None)
  with pytest.raises(ImportError, match='pip install sentencepiece'):
    load_tokenizer(str(model))


def test_padded_vocab_size():
  assert [padded_vocab_size(v) for v in (1, 128, 129, 257, 50277)] == [128, 128, 256, 384, 50304]
  assert padded_vocab_size(257, multiple=64) == 320
  with pytest.raises(ValueError):
    padded_vocab_size(0)
