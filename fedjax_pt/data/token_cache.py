"""A tokenised corpus kept on disk (`data.cache_dir`), so a corpus is tokenised once, not per run.

A Flower node starts a fresh process for every message; without this it would read and tokenise
its whole corpus every round (about 1 MB/s: hours per round at an organisation's tens of GB).

An entry is a directory `corpus-<digest>` of plain `.npy` files (`np.load(mmap_mode='r')`: the
token ids are mapped, not read, so opening an entry costs the same whatever the corpus size) and a
`manifest.json`. The digest is over everything the tokens depend on (`_key`): the content of the
corpus files and of the tokenizer (`fingerprint`), the tokenizer library's version and the data
options that select or cut the documents; change any of them and a new entry is made. Flat arrays
rather than grain's ArrayRecord: the pipeline slices one token array by document offsets, which a
memory map does with no decoding and no extra dependency; ArrayRecord would store one record per
document, to be decoded one by one.

A corpus of files (data.source 'jsonl' or 'text') is also kept per file, as `file-<digest>` entries
keyed by the file's content, its reader (from its extension), the tokenizer, and the
data.text_field and data.partition_key that change its tokens and keys; not by its path (save a
text file's, whose 'file' field may be a partition key), nor by data.max_documents or
data.max_bad_lines, which cut the corpus, not a file. When the corpus entry misses (a file added,
edited or removed; other options), it is put together from the files' entries in the corpus's
order, tokenising only the files without one (`corpus.concatenate`: cut and bad lines counted
exactly as `corpus.tokenise` does), and written as one entry again. So a new file costs its own
tokenisation plus copying the corpus's token ids into the new entry (about 0.3 s per 10M tokens on
a 2-core VM), not tokenising the corpus again (about 50 s per 10M tokens there; BENCHMARKS.md); a
first preparation that is killed keeps the files it finished. The price is disk: each token id is
kept twice (4 bytes in its file's entry, 4 in the corpus entry). Writing a corpus entry removes the
one it supersedes (same data.path, tokenizer and options) and the files' entries that no corpus
entry uses once they are an hour old, so the cache holds one corpus entry per data.path, tokenizer
and options and the files' entries these use, not a copy per round of a growing corpus. The builtin
corpus is kept as one entry only.

An entry is written in a temporary directory and renamed into place, so a writer killed midway
leaves no entry and two processes building the same entry at once both succeed (the second
rename fails and leaves the first entry in place); an entry that does not match its manifest
(truncated, edited, from another version of this format) is rebuilt with one warning, never used.
"""

import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
from absl import logging

from fedjax_pt.data import corpus as corpus_lib
from fedjax_pt.data import fingerprint
from fedjax_pt.data import partition as partition_lib
from fedjax_pt.data import sources
from fedjax_pt.data.config import DataConfig
from fedjax_pt.data.corpus import TokenisedCorpus, tokenise
from fedjax_pt.data.tokenizers import Tokenizer

# Bump when the layout of an entry or the meaning of its arrays changes: old entries then miss.
FORMAT = 1
_MANIFEST = 'manifest.json'
_TMP_PREFIX = '.tmp-'
# A writer's temporary directory lives only while it saves its arrays (seconds, after the slow
# tokenisation); one this old was left by a writer that was killed.
_STALE_TMP_S = 3600
_CORPUS, _FILE = 'corpus-', 'file-'
_FILE_SOURCES = ('jsonl', 'text')
# A file's entry that no corpus entry uses is kept this long after it was written: the process
# that wrote it may still be tokenising the corpus's other files.
_PRUNE_AFTER_S = 3600


class _Corrupt(Exception):
  """An entry that is not what its manifest says."""


def check_dir(path: str, key: str) -> str:
  """`path` (created if absent) as a usable cache directory; else a ValueError naming `key`."""
  path = os.path.expanduser(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f'{key}={path!r} is a file, not a directory (the tokenised corpus cache)')
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ValueError(f'{key}={path!r}: cannot create the cache directory ({e.strerror})') from e
  if not os.access(path, os.W_OK | os.X_OK):
    raise ValueError(f'{key}={path!r}: the cache directory is not writable')
  return path


def load(cfg: DataConfig, tokenizer: Tokenizer) -> TokenisedCorpus:
  """The tokenised corpus of `cfg`: from `cfg.cache_dir` when it holds it, else built (from the
  files' entries where it can, see the module docstring) and kept there, when `cfg.cache_dir` is
  set."""
  if not cfg.cache_dir:
    return tokenise(cfg, tokenizer)
  root = check_dir(cfg.cache_dir, 'data.cache_dir')
  _remove_stale_tmp(root)
  memo = fingerprint.DigestMemo(os.path.join(root, 'digests.json'))
  key = _key(cfg, memo)
  memo.save()
  entry = os.path.join(root, _name(_CORPUS, key))
  if os.path.isdir(entry):
    try:
      corpus, _ = _read(entry, key)
      logging.info('Tokenised corpus from %s: %d documents, %d tokens', entry,
                   corpus.num_documents, len(corpus.ids))
      return corpus
    except _Corrupt as e:
      logging.warning('data.cache_dir: %s is unusable (%s); building it again', entry, e)
      shutil.rmtree(entry, ignore_errors=True)
  corpus, files = None, []
  if cfg.source in _FILE_SOURCES:
    corpus, files = _from_files(root, cfg, tokenizer, key)
  if corpus is None:
    corpus = tokenise(cfg, tokenizer)
  lineage = _lineage(cfg, key)
  if _write(root, entry, {'key': key, 'lineage': lineage, 'files': files}, corpus):
    logging.info('Tokenised corpus kept in %s', entry)
    _prune(root, entry, lineage)
  return corpus


def _from_files(root: str, cfg: DataConfig, tokenizer: Tokenizer,
                key: dict[str, Any]) -> tuple[TokenisedCorpus | None, list[str]]:
  """The corpus put together from its files' entries, tokenising (and keeping) only the files
  without one, and the names of the entries it used; (None, []) where the corpus can only be
  read whole (`corpus.concatenate`, `corpus.tokenise_file`)."""
  start = time.perf_counter()
  tokenise_s, parts, names, tokenised = 0.0, [], [], []
  taken = 0
  for group, path, digest in [(g, p, d) for g, files in enumerate(key['corpus']['files'])
                              for p, d in files]:
    if cfg.max_documents and taken >= cfg.max_documents:
      break  # as `tokenise`, which reads no file past the last document it keeps
    try:
      file_key = _file_key(cfg, key, path, digest)
      entry = os.path.join(root, _name(_FILE, file_key))
      part = _read_file(entry, file_key)
      if part is None:
        begin = time.perf_counter()
        part = corpus_lib.tokenise_file(cfg, tokenizer, path)
        tokenise_s += time.perf_counter() - begin
        tokenised.append(path)
        _write(root, entry, {'key': file_key, 'bad_lines': part.bad_lines.tolist()},
               part.corpus)
    except (ValueError, OSError) as e:
      logging.info('data.cache_dir: %s cannot be tokenised on its own (%s); tokenising the '
                   'corpus whole', path, e)
      return None, []
    parts.append((group, part))
    names.append(os.path.basename(entry))
    taken += part.corpus.num_documents
  corpus = corpus_lib.concatenate(cfg, parts)
  if corpus is None:
    logging.info('data.cache_dir: the corpus has more bad lines than data.max_bad_lines or no '
                 'document; tokenising it whole')
    return None, []
  shown = ', '.join(os.path.basename(p) for p in tokenised[:3])
  logging.info('Tokenised corpus from %d files in %.2f s: %d tokenised in %.2f s (%s), %d from '
               'the cache (data.cache_dir)', len(parts), time.perf_counter() - start,
               len(tokenised), tokenise_s, shown + (', ...' if len(tokenised) > 3 else ''),
               len(parts) - len(tokenised))
  return corpus, names


def _name(prefix: str, key: dict[str, Any]) -> str:
  return prefix + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _key(cfg: DataConfig, memo: fingerprint.DigestMemo) -> dict[str, Any]:
  """Everything the cached arrays depend on (not the partition, split or packing: they are
  computed from the arrays every time, so one entry serves every fl.num_clients and seed)."""
  return {
      'format': FORMAT,
      'corpus': fingerprint.corpus(cfg, memo),
      'tokenizer': fingerprint.tokenizer(cfg.tokenizer, memo),
      # Which documents are read and how (max_bad_lines decides whether reading fails at all).
      'source': cfg.source, 'text_field': cfg.text_field, 'max_documents': cfg.max_documents,
      'max_bad_lines': cfg.max_bad_lines,
      'partition_key': cfg.partition_key if partition_lib.needs_keys(cfg) else None,
  }


def _file_key(cfg: DataConfig, key: dict[str, Any], path: str, digest: str) -> dict[str, Any]:
  """What one file's entry depends on: not its path (a renamed or copied file is not tokenised
  again) nor data.source (a file's reader follows its extension), save for a text file's
  partition keys (its 'file' field is its path)."""
  reader = sources.file_format(path)
  keys = partition_lib.needs_keys(cfg)
  return {
      'format': FORMAT, 'sha256': digest, 'reader': reader, 'tokenizer': key['tokenizer'],
      'text_field': cfg.text_field if reader.startswith('json') else None,
      'partition_key': cfg.partition_key if keys else None,
      'path': path if keys and reader.startswith('text') else None,
  }


def _lineage(cfg: DataConfig, key: dict[str, Any]) -> str:
  """The corpus entries that one of `cfg` supersedes: those of the same data.path, tokenizer and
  options, whatever the files' content."""
  same = {**{k: v for k, v in key.items() if k != 'corpus'}, 'path': cfg.path}
  return hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()


def _read(entry: str, key: dict[str, Any], groups: bool = True
          ) -> tuple[TokenisedCorpus, dict[str, Any]]:
  try:
    with open(os.path.join(entry, _MANIFEST), encoding='utf-8') as f:
      manifest = json.load(f)
    if manifest.get('key') != key:
      raise _Corrupt('its manifest is for other data')
    num_docs, num_tokens = int(manifest['num_documents']), int(manifest['num_tokens'])
    ids = _array(entry, 'ids', np.int32, (num_tokens,), mmap=num_tokens > 0)
    offsets = _array(entry, 'offsets', np.int64, (num_docs + 1,))
    doc_groups = (_array(entry, 'groups', np.int32, (num_docs,)) if groups
                  else np.zeros(num_docs, np.int32))
    keys = None
    if key['partition_key'] is not None:
      with open(os.path.join(entry, 'keys.json'), encoding='utf-8') as f:
        keys = json.load(f)
      if not (isinstance(keys, list) and len(keys) == num_docs and
              all(isinstance(k, str) for k in keys)):
        raise _Corrupt(f'keys.json is not {num_docs} strings')
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    # np.load of a truncated file raises ValueError, a missing file OSError, a bad manifest the
    # others.
    raise _Corrupt(f'{type(e).__name__}: {e}') from e
  if offsets[0] != 0 or offsets[-1] != num_tokens or np.any(np.diff(offsets) < 0):
    raise _Corrupt('its document offsets do not cover its token ids')
  return TokenisedCorpus(ids, offsets, doc_groups, keys), manifest


def _read_file(entry: str, key: dict[str, Any]) -> corpus_lib.TokenisedFile | None:
  """A file's entry; None when there is none or it is unusable (then removed, with a warning)."""
  if not os.path.isdir(entry):
    return None
  try:
    corpus, manifest = _read(entry, key, groups=False)
    bad = manifest.get('bad_lines')
    if not (isinstance(bad, list) and all(isinstance(b, int) for b in bad)):
      raise _Corrupt('its bad_lines is not a list of document counts')
    bad_lines = np.array(bad, np.int64)
    if np.any(np.diff(bad_lines) < 0) or np.any(bad_lines < 0) or np.any(
        bad_lines > corpus.num_documents):
      raise _Corrupt('its bad_lines are not positions among its documents')
    return corpus_lib.TokenisedFile(corpus, bad_lines)
  except _Corrupt as e:
    logging.warning('data.cache_dir: %s is unusable (%s); tokenising its file again', entry, e)
    shutil.rmtree(entry, ignore_errors=True)
    return None


def _array(entry: str, name: str, dtype, shape: tuple[int, ...], mmap: bool = False) -> np.ndarray:
  array = np.load(os.path.join(entry, f'{name}.npy'), mmap_mode='r' if mmap else None,
                  allow_pickle=False)
  if array.dtype != dtype or array.shape != shape:
    raise _Corrupt(f'{name}.npy holds {array.dtype}{list(array.shape)}, its manifest says '
                   f'{np.dtype(dtype)}{list(shape)}')
  return np.asarray(array)  # a plain ndarray view of the map: downstream sees no np.memmap


def _write(root: str, entry: str, manifest: dict[str, Any], corpus: TokenisedCorpus) -> bool:
  """Saves `corpus` as `entry`, atomically; a failure to save (disk full) costs only the cache.
  A file's entry has no groups.npy: a file's data.path pattern is the corpus's business. Whether
  this call made the entry."""
  tmp = ''
  try:
    tmp = tempfile.mkdtemp(dir=root, prefix=_TMP_PREFIX)
    np.save(os.path.join(tmp, 'ids.npy'), np.asarray(corpus.ids, np.int32))
    np.save(os.path.join(tmp, 'offsets.npy'), np.asarray(corpus.offsets, np.int64))
    if os.path.basename(entry).startswith(_CORPUS):
      np.save(os.path.join(tmp, 'groups.npy'), np.asarray(corpus.groups, np.int32))
    if corpus.keys is not None:
      with open(os.path.join(tmp, 'keys.json'), 'w', encoding='utf-8') as f:
        json.dump(corpus.keys, f)
    with open(os.path.join(tmp, _MANIFEST), 'w', encoding='utf-8') as f:
      json.dump({**manifest, 'num_documents': corpus.num_documents,
                 'num_tokens': len(corpus.ids)}, f, indent=1)
    os.rename(tmp, entry)  # fails if another process renamed its (identical) entry first
    return True
  except OSError as e:
    if not os.path.isdir(entry):
      logging.warning('data.cache_dir: could not keep the tokenised corpus in %s (%s)', entry, e)
    return False
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)


def _prune(root: str, entry: str, lineage: str) -> None:
  """Removes the corpus entries that `entry` supersedes (same lineage) and the files' entries
  that no corpus entry uses any more, unless written in the last `_PRUNE_AFTER_S` (another
  process may be building from them). So the cache holds one corpus entry per data.path,
  tokenizer and options, and the files' entries these use: a corpus that grows by a file every
  round does not leave a full copy of itself behind every round."""
  used, files = set(), []
  for name in os.listdir(root):
    path = os.path.join(root, name)
    if name.startswith(_FILE):
      files.append(name)
      continue
    if not name.startswith(_CORPUS):
      continue
    try:
      with open(os.path.join(path, _MANIFEST), encoding='utf-8') as f:
        manifest = json.load(f)
      superseded = path != entry and manifest.get('lineage') == lineage
      if superseded:
        shutil.rmtree(path, ignore_errors=True)
      else:
        used.update(manifest.get('files', []))
    except (OSError, ValueError, TypeError, AttributeError):
      continue  # being removed by another process, or not an entry this version reads
  now = time.time()
  for name in files:
    path = os.path.join(root, name)
    try:
      if name not in used and now - os.path.getmtime(path) > _PRUNE_AFTER_S:
        shutil.rmtree(path, ignore_errors=True)
    except OSError:
      pass  # another process removed it first


def _remove_stale_tmp(root: str) -> None:
  now = time.time()
  for name in os.listdir(root):
    path = os.path.join(root, name)
    try:
      if name.startswith(_TMP_PREFIX) and now - os.path.getmtime(path) > _STALE_TMP_S:
        shutil.rmtree(path, ignore_errors=True)
    except OSError:
      pass  # another process removed it first
