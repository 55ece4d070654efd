"""Tests of fedjax_pt.data.token_cache and fingerprint: the tokenised corpus kept on disk."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from fedjax_pt.data import DataConfig, build_federated_data
from fedjax_pt.data import corpus as corpus_lib
from fedjax_pt.data import fingerprint
from fedjax_pt.data import token_cache
from fedjax_pt.data.tokenizers import BytesTokenizer

SHARED = Path(__file__).resolve().parents[2] / 'shared'
NEOX = SHARED / 'data' / 'tokenizers' / 'gpt-neox-20b' / 'tokenizer.json'


def _corpus(path: Path, n: int = 40, letter: str = 'a') -> Path:
  records = [{'text': f'document {i:02d}: ' + letter * (i % 7 + 1), 'url': f'http://s{i % 3}.org/'}
             for i in range(n)]
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return path


def _cfg(path: Path, cache_dir: Path | str = '', **kw) -> DataConfig:
  return DataConfig.from_config({'source': 'jsonl', 'path': str(path), 'seq_len': 8,
                                 'batch_size': 2, 'cache_dir': str(cache_dir), **kw})


@pytest.fixture
def tokenised(monkeypatch):
  """The texts each call of the uncached path tokenises."""
  calls = []
  real = corpus_lib.tokenize_corpus

  def counted(tokenizer, texts, *args, **kw):
    calls.append(list(texts))
    return real(tokenizer, texts, *args, **kw)

  monkeypatch.setattr(corpus_lib, 'tokenize_corpus', counted)
  return calls


def _windows(data):
  return ([data._train[k] for k in range(data.num_clients)],  # pylint: disable=protected-access
          [data._val[k] for k in range(data.num_clients)])  # pylint: disable=protected-access


def _assert_same(a, b):
  for xs, ys in zip(_windows(a), _windows(b)):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
      assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.mark.parametrize('partition', ['iid', 'dirichlet'])
def test_cold_warm_and_uncached_builds_are_identical_and_warm_does_not_tokenise(
    tmp_path, tokenised, partition):
  path = _corpus(tmp_path / 'c.jsonl')
  kw = {'partition': partition, 'partition_key': 'url_domain'}
  plain = build_federated_data(_cfg(path, **kw), num_clients=2, seed=3)
  assert len(tokenised) == 1
  cold = build_federated_data(_cfg(path, tmp_path / 'cache', **kw), num_clients=2, seed=3)
  assert len(tokenised) == 2
  warm = build_federated_data(_cfg(path, tmp_path / 'cache', **kw), num_clients=2, seed=3)
  assert len(tokenised) == 2  # the second build with the cache tokenises nothing
  _assert_same(plain, cold)
  _assert_same(plain, warm)
  # The exact data position: an iterator's state from an uncached build resumes in a cached one.
  it = plain.client_iterator(1)
  next(it)
  resumed = warm.client_iterator(1)
  resumed.set_state(it.get_state())
  assert np.array_equal(next(it), next(resumed))
  # One entry serves every partition and seed: only the arrays are cached.
  other = build_federated_data(_cfg(path, tmp_path / 'cache', **kw), num_clients=3, seed=4)
  assert len(tokenised) == 2
  _assert_same(other, build_federated_data(_cfg(path, **kw), num_clients=3, seed=4))


def test_same_size_content_change_and_tokenizer_change_invalidate(tmp_path, tokenised):
  path = _corpus(tmp_path / 'c.jsonl', letter='a')
  cache = tmp_path / 'cache'
  build_federated_data(_cfg(path, cache), num_clients=2, seed=0)
  stat = path.stat()
  _corpus(path, letter='b')  # the same size, and the same mtime below
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  assert path.stat().st_size == stat.st_size
  changed = build_federated_data(_cfg(path, cache), num_clients=2, seed=0)
  assert len(tokenised) == 2
  assert all(t.endswith('b') for t in tokenised[-1])  # the new text, not the cached tokens
  _assert_same(changed, build_federated_data(_cfg(path), num_clients=2, seed=0))
  if not NEOX.exists():
    pytest.skip(f'{NEOX} is absent: the tokenizer change is not checked')
  neox = build_federated_data(_cfg(path, cache, tokenizer=str(NEOX)), num_clients=2, seed=0)
  assert len(tokenised) == 4  # + the plain build above, + the new tokenizer
  _assert_same(neox, build_federated_data(_cfg(path, tokenizer=str(NEOX)), num_clients=2, seed=0))
  assert len(os.listdir(cache)) == 4  # digests.json and an entry per (content, tokenizer)


def test_options_that_change_the_documents_are_part_of_the_key(tmp_path, tokenised):
  path = _corpus(tmp_path / 'c.jsonl')
  cache = tmp_path / 'cache'
  full = build_federated_data(_cfg(path, cache), num_clients=2, seed=0)
  fewer = build_federated_data(_cfg(path, cache, max_documents=30), num_clients=2, seed=0)
  assert len(tokenised) == 2 and len(tokenised[1]) == 30
  assert sum(map(len, _windows(fewer)[0])) < sum(map(len, _windows(full)[0]))


@pytest.mark.parametrize('damage', ['truncate', 'manifest', 'foreign'])
def test_a_damaged_entry_is_rebuilt_with_one_warning(tmp_path, tokenised, caplog, damage):
  path = _corpus(tmp_path / 'c.jsonl')
  cache = tmp_path / 'cache'
  first = build_federated_data(_cfg(path, cache), num_clients=2, seed=0)
  entry, = [p for p in cache.iterdir() if p.name.startswith('corpus-')]
  if damage == 'truncate':
    ids = entry / 'ids.npy'
    ids.write_bytes(ids.read_bytes()[:-40])
  elif damage == 'manifest':
    (entry / 'manifest.json').write_text('{"key": ')
  else:
    manifest = json.loads((entry / 'manifest.json').read_text())
    manifest['key']['max_documents'] = 7
    (entry / 'manifest.json').write_text(json.dumps(manifest))
  again = build_federated_data(_cfg(path, cache), num_clients=2, seed=0)
  assert len(tokenised) == 2
  warnings = [r for r in caplog.records if 'data.cache_dir' in r.getMessage()]
  assert len(warnings) == 1 and 'tokenising the corpus again' in warnings[0].getMessage()
  _assert_same(first, again)
  build_federated_data(_cfg(path, cache), num_clients=2, seed=0)
  assert len(tokenised) == 2  # the rebuilt entry is good


def test_a_killed_writer_leaves_no_entry(tmp_path, tokenised, monkeypatch):
  path = _corpus(tmp_path / 'c.jsonl')
  cache = tmp_path / 'cache'

  def killed(*args, **kw):
    raise KeyboardInterrupt

  with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
    patch.setattr(token_cache.os, 'rename', killed)  # killed between its arrays and the rename
    build_federated_data(_cfg(path, cache), num_clients=2, seed=0)
  assert not [p for p in cache.iterdir() if p.name.startswith('corpus-')]
  build_federated_data(_cfg(path, cache), num_clients=2, seed=0)
  assert len(tokenised) == 2


def test_a_cache_that_cannot_be_written_costs_only_the_cache(tmp_path, tokenised, monkeypatch,
                                                            caplog):
  path = _corpus(tmp_path / 'c.jsonl')
  cache = tmp_path / 'cache'

  def full(*args, **kw):
    raise OSError(28, 'No space left on device')

  with monkeypatch.context() as patch:
    patch.setattr(token_cache.np, 'save', full)
    data = build_federated_data(_cfg(path, cache), num_clients=2, seed=0)
  _assert_same(data, build_federated_data(_cfg(path), num_clients=2, seed=0))
  assert 'could not keep the tokenised corpus' in caplog.text and 'No space left' in caplog.text
  assert not list(cache.glob('corpus-*')) and not list(cache.glob('.tmp-*'))


def test_a_cache_dir_that_is_a_file_or_cannot_be_made_is_one_line(tmp_path):
  path = _corpus(tmp_path / 'c.jsonl')
  with pytest.raises(ValueError, match=r"^data.cache_dir='.*c.jsonl' is a file, not a directory"):
    build_federated_data(_cfg(path, path), num_clients=2, seed=0)
  with pytest.raises(ValueError, match=r'^data.cache_dir=.*: cannot create the cache directory'):
    build_federated_data(_cfg(path, path / 'sub'), num_clients=2, seed=0)
  with pytest.raises(ValueError, match=r"data.source='tfds' is not cached"):
    DataConfig.from_config({'source': 'tfds', 'path': 'c4/en', 'cache_dir': str(tmp_path)})


def test_a_settled_file_is_hashed_once_a_fresh_one_every_time(tmp_path, monkeypatch):
  path = _corpus(tmp_path / 'c.jsonl')
  memo_path = str(tmp_path / 'digests.json')
  memo = fingerprint.DigestMemo(memo_path)
  first = memo.digest(str(path))
  memo.digest(str(path))
  assert memo.hashed == 2  # just written: its stat could still hide a same-tick change
  monkeypatch.setattr(fingerprint, '_SETTLED_NS', -10**12)
  memo.digest(str(path))
  memo.save()
  memo = fingerprint.DigestMemo(memo_path)
  assert memo.digest(str(path)) == first and memo.hashed == 0  # remembered across processes
  time.sleep(0.05)  # past the timestamp tick of the first write (the settle rule is off here)
  _corpus(path, letter='b')  # any write changes the inode change time, which no one can set
  assert memo.digest(str(path)) != first and memo.hashed == 1


def test_uncached_corpus_matches_the_tokenizer(tmp_path):
  path = _corpus(tmp_path / 'c.jsonl', n=3)
  corpus = corpus_lib.tokenise(_cfg(path), BytesTokenizer())
  text = ''.join(json.loads(line)['text'] for line in path.read_text().splitlines())
  assert corpus.ids.tolist() == list(text.encode()) and corpus.num_documents == 3
