"""Tests of fedjax_pt.data.token_cache and fingerprint: the tokenised corpus kept on disk."""

import json
import logging
import os
import re
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
  # A corpus entry per tokenizer (the edit superseded the first one) and a file's entry per
  # (content, tokenizer), the one no corpus entry uses kept for the hour after it was written.
  assert sorted(p.name.split('-')[0] for p in cache.iterdir()) == [
      'corpus', 'corpus', 'digests.json', 'file', 'file', 'file']


def test_options_that_change_the_documents_are_part_of_the_key(tmp_path, tokenised):
  path = _corpus(tmp_path / 'c.jsonl')
  cache = tmp_path / 'cache'
  full = build_federated_data(_cfg(path, cache), num_clients=2, seed=0)
  fewer = build_federated_data(_cfg(path, cache, max_documents=30), num_clients=2, seed=0)
  assert len(tokenised) == 1  # a new corpus entry, cut from the file's entry
  _assert_same(fewer, build_federated_data(_cfg(path, max_documents=30), num_clients=2, seed=0))
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
  assert len(tokenised) == 1  # rebuilt from the file's entry
  warnings = [r for r in caplog.records if 'data.cache_dir' in r.getMessage()]
  assert len(warnings) == 1 and 'building it again' in warnings[0].getMessage()
  _assert_same(first, again)
  build_federated_data(_cfg(path, cache), num_clients=2, seed=0)
  assert len(tokenised) == 1  # the rebuilt entry is good


def test_a_killed_writer_leaves_no_entry(tmp_path, tokenised, monkeypatch):
  path = _corpus(tmp_path / 'c.jsonl')
  cache = tmp_path / 'cache'

  def killed(*args, **kw):
    raise KeyboardInterrupt

  with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
    patch.setattr(token_cache.os, 'rename', killed)  # killed between its arrays and the rename
    build_federated_data(_cfg(path, cache), num_clients=2, seed=0)
  assert not [p for p in cache.iterdir() if p.name.startswith(('corpus-', 'file-'))]
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
  assert not list(cache.glob('corpus-*')) and not list(cache.glob('file-*'))
  assert not list(cache.glob('.tmp-*'))


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


def _jsonl(path: Path, texts: list[str], bad_after: tuple[int, ...] = ()) -> None:
  """`texts` as JSON lines, a malformed line after the first i of them for each i in
  `bad_after`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  lines = []
  for i, text in enumerate(texts + ['']):
    lines += ['{"text": oops\n'] * bad_after.count(i)
    if i < len(texts):
      lines.append(json.dumps({'text': text, 'file': f'f{len(text) % 3}'}) + '\n')
  path.write_text(''.join(lines))


def _assert_same_corpus(a: corpus_lib.TokenisedCorpus, b: corpus_lib.TokenisedCorpus) -> None:
  assert a.ids.dtype == b.ids.dtype and np.array_equal(a.ids, b.ids)
  assert a.offsets.dtype == b.offsets.dtype and np.array_equal(a.offsets, b.offsets)
  assert a.groups.dtype == b.groups.dtype and np.array_equal(a.groups, b.groups)
  assert a.keys == b.keys


def _incremental(tmp_path: Path, tokenised, **kw):
  """token_cache.load of the corpus under tmp_path/a and /b, checked against corpus.tokenise,
  and the texts the load tokenised; or the error both raise, the same."""
  kw = {'max_bad_lines': 2, 'partition': 'dirichlet', 'partition_key': 'file', **kw}
  cfg = _cfg(f'{tmp_path}/a/*.jsonl,{tmp_path}/b/*.txt', tmp_path / 'cache', **kw)
  return _load_as_uncached(cfg, tokenised)


def _load_as_uncached(cfg: DataConfig, tokenised):
  try:
    uncached = corpus_lib.tokenise(cfg, BytesTokenizer())
  except ValueError as e:
    with pytest.raises(ValueError) as cached:
      token_cache.load(cfg, BytesTokenizer())
    assert str(cached.value) == str(e)
    return e, None
  before = len(tokenised)
  cached = token_cache.load(cfg, BytesTokenizer())
  _assert_same_corpus(cached, uncached)
  return cached, [t for call in tokenised[before:] for t in call]


def test_only_new_and_edited_files_are_tokenised_and_the_corpus_is_as_uncached(tmp_path,
                                                                                tokenised):
  _jsonl(tmp_path / 'a' / '1.jsonl', ['one a', 'one b', '  ', 'one c'], bad_after=(2,))
  _jsonl(tmp_path / 'a' / '2.jsonl', ['two a', 'two b'])
  _jsonl(tmp_path / 'a' / '3.jsonl', ['three a', 'three b', 'three c'])
  (tmp_path / 'b').mkdir()
  (tmp_path / 'b' / '1.txt').write_text('text a\n\ntext b\nmore\n\n\ntext c\n')
  corpus, texts = _incremental(tmp_path, tokenised)
  assert len(texts) == 11 and corpus.num_documents == 11
  assert corpus.groups.tolist() == [0] * 8 + [1] * 3
  _, texts = _incremental(tmp_path, tokenised)
  assert not texts  # the corpus entry
  _jsonl(tmp_path / 'a' / '2b.jsonl', ['new a', 'new b'])  # added between 2 and 3
  _jsonl(tmp_path / 'a' / '3.jsonl', ['three A', 'three b', 'three c'])  # edited
  (tmp_path / 'a' / '2.jsonl').unlink()  # removed
  corpus, texts = _incremental(tmp_path, tokenised)
  assert texts == ['new a', 'new b', 'three A', 'three b', 'three c']
  assert corpus.num_documents == 11
  # data.max_documents cuts inside a file, or at its end: nothing is tokenised again.
  for cut in (1, 3, 4, 8, 9):
    corpus, texts = _incremental(tmp_path, tokenised, max_documents=cut)
    assert not texts and corpus.num_documents == cut
  # Bad lines count over the corpus up to its last kept document, as the uncached read counts
  # them: 1.jsonl has one, 3.jsonl now one after its first document and one after its last.
  _jsonl(tmp_path / 'a' / '3.jsonl', ['three A', 'three b', 'three c'], bad_after=(1, 3))
  error, _ = _incremental(tmp_path, tokenised)  # 3 bad lines > 2
  assert '3.jsonl:5' in str(error)
  corpus, texts = _incremental(tmp_path, tokenised, max_documents=8)  # 3.jsonl's last document
  assert not texts and corpus.num_documents == 8  # the failed load kept 3.jsonl's entry
  error, _ = _incremental(tmp_path, tokenised, max_documents=8, max_bad_lines=1)
  assert '3.jsonl:2' in str(error)
  corpus, texts = _incremental(tmp_path, tokenised, max_documents=5, max_bad_lines=1)
  assert not texts and corpus.num_documents == 5


def test_a_file_past_the_cut_is_never_read(tmp_path, tokenised):
  _jsonl(tmp_path / 'x' / '1.jsonl', ['a', 'b', 'c'], bad_after=(3, 3))
  (tmp_path / 'x' / '2.csv').write_text('not a corpus file')
  pattern = f'{tmp_path}/x/*'
  # 1.jsonl's two bad lines lie past its last kept document, and 2.csv past the cut: the
  # uncached read reads neither, nor does the cache (1.jsonl cannot be kept on its own).
  corpus, _ = _load_as_uncached(_cfg(pattern, tmp_path / 'cache', max_documents=3), tokenised)
  assert corpus.num_documents == 3
  error, _ = _load_as_uncached(_cfg(pattern, tmp_path / 'cache', max_bad_lines=2), tokenised)
  assert '2.csv: unsupported file type' in str(error)
  corpus, texts = _load_as_uncached(
      _cfg(pattern, tmp_path / 'cache', max_documents=3, max_bad_lines=2), tokenised)
  assert corpus.num_documents == 3 and not texts  # 1.jsonl's entry, kept by the failed load


def _three_files(tmp_path: Path) -> DataConfig:
  for i in range(3):
    _jsonl(tmp_path / 'c' / f'{i}.jsonl', [f'file {i} doc {j}' for j in range(4)])
  return _cfg(f'{tmp_path}/c/*.jsonl', tmp_path / 'cache')


@pytest.mark.parametrize('damage', ['truncate', 'bad_lines', 'missing'])
def test_a_damaged_file_entry_is_tokenised_again_with_one_warning(tmp_path, tokenised, caplog,
                                                                  damage):
  caplog.set_level(logging.INFO)
  cfg = _three_files(tmp_path)
  first = token_cache.load(cfg, BytesTokenizer())
  cache = tmp_path / 'cache'
  corpus_entry, = cache.glob('corpus-*')
  manifest = json.loads((corpus_entry / 'manifest.json').read_text())
  entry = cache / manifest['files'][1]  # 1.jsonl's
  if damage == 'truncate':
    (entry / 'ids.npy').write_bytes((entry / 'ids.npy').read_bytes()[:-8])
  elif damage == 'bad_lines':
    file_manifest = json.loads((entry / 'manifest.json').read_text())
    file_manifest['bad_lines'] = [99]
    (entry / 'manifest.json').write_text(json.dumps(file_manifest))
  else:
    (entry / 'offsets.npy').unlink()
  _jsonl(tmp_path / 'c' / '3.jsonl', ['a new file'])  # the corpus entry misses
  before = len(tokenised)
  again = token_cache.load(cfg, BytesTokenizer())
  assert [t for call in tokenised[before:] for t in call] == (
      [f'file 1 doc {j}' for j in range(4)] + ['a new file'])
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert len(warnings) == 1 and 'tokenising its file again' in warnings[0]
  built, = [r.getMessage() for r in caplog.records if 'files in' in r.getMessage()][-1:]
  assert re.fullmatch(r'Tokenised corpus from 4 files in [\d.]+ s: 2 tokenised in [\d.]+ s '
                      r'\(1.jsonl, 3.jsonl\), 2 from the cache \(data.cache_dir\)', built)
  _assert_same_corpus(again, corpus_lib.tokenise(cfg, BytesTokenizer()))
  assert first.num_documents + 1 == again.num_documents


def test_a_process_that_builds_the_same_entries_at_once_is_harmless(tmp_path, tokenised,
                                                                    monkeypatch):
  cfg = _three_files(tmp_path)
  real = os.rename
  raced = []

  def rename(src, dst):
    if not raced:  # another process builds everything between our arrays and our rename
      raced.append(dst)
      token_cache.load(cfg, BytesTokenizer())
    real(src, dst)

  monkeypatch.setattr(token_cache.os, 'rename', rename)
  ours = token_cache.load(cfg, BytesTokenizer())
  assert os.path.basename(raced[0]).startswith('file-')
  _assert_same_corpus(ours, corpus_lib.tokenise(cfg, BytesTokenizer()))
  monkeypatch.setattr(token_cache.os, 'rename', real)
  before = len(tokenised)
  _assert_same_corpus(token_cache.load(cfg, BytesTokenizer()), ours)
  assert len(tokenised) == before
  assert not list((tmp_path / 'cache').glob('.tmp-*'))


def test_superseded_entries_and_unused_file_entries_are_removed(tmp_path, monkeypatch):
  cfg = _three_files(tmp_path)
  cache = tmp_path / 'cache'
  token_cache.load(cfg, BytesTokenizer())
  # Another lineage (other options) with its own corpus entry: kept, and the files it uses.
  token_cache.load(_cfg(f'{tmp_path}/c/0.jsonl', cache, max_documents=2), BytesTokenizer())
  (tmp_path / 'c' / '1.jsonl').unlink()
  _jsonl(tmp_path / 'c' / '2.jsonl', ['edited'])
  monkeypatch.setattr(token_cache, '_PRUNE_AFTER_S', 10**9)
  token_cache.load(cfg, BytesTokenizer())
  assert len(list(cache.glob('corpus-*'))) == 2  # the first corpus entry is superseded
  assert len(list(cache.glob('file-*'))) == 4  # the unused ones are too new to remove
  monkeypatch.setattr(token_cache, '_PRUNE_AFTER_S', -1)
  _jsonl(tmp_path / 'c' / '4.jsonl', ['added'])
  corpus = token_cache.load(cfg, BytesTokenizer())
  used = set()
  for entry in cache.glob('corpus-*'):
    used.update(json.loads((entry / 'manifest.json').read_text())['files'])
  assert len(list(cache.glob('corpus-*'))) == 2 and len(used) == 3  # 0, 2 (edited), 4
  assert {p.name for p in cache.glob('file-*')} == used
  _assert_same_corpus(corpus, corpus_lib.tokenise(cfg, BytesTokenizer()))
