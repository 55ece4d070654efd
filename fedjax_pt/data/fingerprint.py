"""What a tokenised corpus depends on, as JSON-able values: its files' content and the tokenizer.

The content is a SHA-256 of each file's bytes. Size and modification time alone are not sound: a
rewrite of the same size within the filesystem's timestamp tick, or a copy that keeps the mtime
(`cp -p`, rsync), leaves both unchanged. Hashing runs at about 1 GB/s, far faster than tokenising
(about 1 MB/s), but for tens of GB that is still tens of seconds per round; so a file's digest is
remembered (`DigestMemo`) with its stat, including the inode change time that no user can set, and
reused while the stat is unchanged. As in git's "racy clean" rule, a digest is remembered only once
the file's last change is `_SETTLED_NS` old: a file changed again within the same timestamp tick as
the version that was hashed would otherwise show the same stat.
"""

import hashlib
import json
import os
import tempfile
import time
from importlib import metadata
from typing import Any

from absl import logging

from fedjax_pt.data.config import DataConfig
from fedjax_pt.data.sources import expand_patterns

# Longer than any filesystem's timestamp granularity (FAT: 2 s; ext4, xfs, tmpfs: a clock tick).
_SETTLED_NS = 3 * 10**9


def _stat_key(st: os.stat_result) -> list[int]:
  return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class DigestMemo:
  """SHA-256 digests of files, remembered across processes in a small JSON file at `path`."""

  def __init__(self, path: str):
    self.path = path
    self.hashed = 0  # files read in full by this memo: what the tests and benchmark count
    try:
      with open(path, encoding='utf-8') as f:
        self._entries = dict(json.load(f))
    except (OSError, ValueError, TypeError):
      self._entries = {}  # absent or unreadable: every file is hashed again, never trusted
    self._dirty = False

  def digest(self, path: str) -> str:
    real = os.path.realpath(path)
    before = os.stat(real)
    entry = self._entries.get(real)
    if isinstance(entry, dict) and entry.get('stat') == _stat_key(before):
      return entry['sha256']
    digest = _sha256(real)
    self.hashed += 1
    settled = time.time_ns() - max(before.st_mtime_ns, before.st_ctime_ns) > _SETTLED_NS
    if settled and _stat_key(os.stat(real)) == _stat_key(before):
      self._entries[real] = {'stat': _stat_key(before), 'sha256': digest}
      self._dirty = True
    return digest

  def save(self) -> None:
    """Writes the memo atomically; processes racing on it lose entries, never corrupt them, and a
    memo that cannot be written (a full disk) only costs hashing again."""
    if not self._dirty:
      return
    tmp = ''
    try:
      fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix='.digests-')
      with os.fdopen(fd, 'w', encoding='utf-8') as f:
        json.dump(self._entries, f)
      os.replace(tmp, self.path)
      tmp = ''
      self._dirty = False
    except OSError as e:
      logging.warning('data.cache_dir: could not remember file digests in %s (%s)', self.path, e)
    finally:
      if tmp:
        os.unlink(tmp)


def _sha256(path: str) -> str:
  h = hashlib.sha256()  # hashlib.file_digest is Python 3.11+; this package supports 3.10
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 20):
      h.update(chunk)
  return h.hexdigest()


def corpus(cfg: DataConfig, memo: DigestMemo) -> dict[str, Any]:
  """The documents' identity: each data.path pattern's files (path and content), or the builtin
  corpus's text (that of this Python's pydoc_data)."""
  if cfg.source == 'builtin':
    from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
    h = hashlib.sha256()
    for name in sorted(topics):
      h.update(json.dumps([name, topics[name]]).encode('utf-8'))
    return {'builtin': h.hexdigest()}
  if cfg.source == 'tfds':
    raise ValueError("data.source='tfds' has no tokenised cache; set data.cache_dir=''")
  # The path is part of it: a document's origin and a text file's 'file' field (a possible
  # data.partition_key) name it.
  return {'files': [[[path, memo.digest(path)] for path in group]
                    for group in expand_patterns(cfg.patterns)]}


def tokenizer(spec: str, memo: DigestMemo) -> dict[str, Any]:
  """The tokenizer's identity: its file's content and the library (and version) that reads it."""
  if spec == 'bytes':
    return {'tokenizer': 'bytes'}
  library = 'tokenizers' if spec.endswith('.json') else 'sentencepiece'
  return {'tokenizer': memo.digest(os.path.expanduser(spec)),
          'library': f'{library} {metadata.version(library)}'}
