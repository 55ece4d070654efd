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

An entry is written in a temporary directory and renamed into place, so a writer killed midway
leaves no entry; an entry that does not match its manifest (truncated, edited, from another
version of this format) is rebuilt with one warning, never used.
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

from fedjax_pt.data import fingerprint
from fedjax_pt.data import partition as partition_lib
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
  """The tokenised corpus of `cfg`: from `cfg.cache_dir` when it holds it, else tokenised (and
  kept there, when `cfg.cache_dir` is set)."""
  if not cfg.cache_dir:
    return tokenise(cfg, tokenizer)
  root = check_dir(cfg.cache_dir, 'data.cache_dir')
  _remove_stale_tmp(root)
  memo = fingerprint.DigestMemo(os.path.join(root, 'digests.json'))
  key = _key(cfg, memo)
  memo.save()
  name = 'corpus-' + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
  entry = os.path.join(root, name)
  if os.path.isdir(entry):
    try:
      corpus = _read(entry, key)
      logging.info('Tokenised corpus from %s: %d documents, %d tokens', entry,
                   corpus.num_documents, len(corpus.ids))
      return corpus
    except _Corrupt as e:
      logging.warning('data.cache_dir: %s is unusable (%s); tokenising the corpus again', entry, e)
      shutil.rmtree(entry, ignore_errors=True)
  corpus = tokenise(cfg, tokenizer)
  _write(root, entry, key, corpus)
  return corpus


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


def _read(entry: str, key: dict[str, Any]) -> TokenisedCorpus:
  try:
    with open(os.path.join(entry, _MANIFEST), encoding='utf-8') as f:
      manifest = json.load(f)
    if manifest.get('key') != key:
      raise _Corrupt('its manifest is for other data')
    num_docs, num_tokens = int(manifest['num_documents']), int(manifest['num_tokens'])
    ids = _array(entry, 'ids', np.int32, (num_tokens,), mmap=num_tokens > 0)
    offsets = _array(entry, 'offsets', np.int64, (num_docs + 1,))
    groups = _array(entry, 'groups', np.int32, (num_docs,))
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
  return TokenisedCorpus(ids, offsets, groups, keys)


def _array(entry: str, name: str, dtype, shape: tuple[int, ...], mmap: bool = False) -> np.ndarray:
  array = np.load(os.path.join(entry, f'{name}.npy'), mmap_mode='r' if mmap else None,
                  allow_pickle=False)
  if array.dtype != dtype or array.shape != shape:
    raise _Corrupt(f'{name}.npy holds {array.dtype}{list(array.shape)}, its manifest says '
                   f'{np.dtype(dtype)}{list(shape)}')
  return np.asarray(array)  # a plain ndarray view of the map: downstream sees no np.memmap


def _write(root: str, entry: str, key: dict[str, Any], corpus: TokenisedCorpus) -> None:
  """Saves `corpus` as `entry`, atomically; a failure to save (disk full) costs only the cache."""
  tmp = ''
  try:
    tmp = tempfile.mkdtemp(dir=root, prefix=_TMP_PREFIX)
    np.save(os.path.join(tmp, 'ids.npy'), np.asarray(corpus.ids, np.int32))
    np.save(os.path.join(tmp, 'offsets.npy'), np.asarray(corpus.offsets, np.int64))
    np.save(os.path.join(tmp, 'groups.npy'), np.asarray(corpus.groups, np.int32))
    if corpus.keys is not None:
      with open(os.path.join(tmp, 'keys.json'), 'w', encoding='utf-8') as f:
        json.dump(corpus.keys, f)
    with open(os.path.join(tmp, _MANIFEST), 'w', encoding='utf-8') as f:
      json.dump({'key': key, 'num_documents': corpus.num_documents,
                 'num_tokens': len(corpus.ids)}, f, indent=1)
    os.rename(tmp, entry)  # fails if another process renamed its (identical) entry first
    logging.info('Tokenised corpus kept in %s', entry)
  except OSError as e:
    if not os.path.isdir(entry):
      logging.warning('data.cache_dir: could not keep the tokenised corpus in %s (%s)', entry, e)
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_tmp(root: str) -> None:
  now = time.time()
  for name in os.listdir(root):
    path = os.path.join(root, name)
    try:
      if name.startswith(_TMP_PREFIX) and now - os.path.getmtime(path) > _STALE_TMP_S:
        shutil.rmtree(path, ignore_errors=True)
    except OSError:
      pass  # another process removed it first
