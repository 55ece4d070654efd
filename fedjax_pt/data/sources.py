"""Document sources: the builtin offline corpus, local JSONL/text files, TFDS.

Every source yields `Document`s in a deterministic order. Local files are read by format of their
extension, so 'jsonl' and 'text' are the same reader and one run may mix C4 JSONL with plain-text
books (with partition='by_source', one genre per client):
  * `.jsonl`, `.json` (JSON Lines, as C4's `.json.gz` shards), optionally gzipped: one document per
    line, its text in `text_field`, the other fields kept for partitioning (e.g. `url`).
  * `.txt`, optionally gzipped: documents are separated by blank lines. A whole file as one
    document would make a one-file corpus (tinyshakespeare) impossible to shard across clients or
    to split into train/validation, both of which work on whole documents.
Malformed lines are skipped and counted up to `max_bad_lines`; other bad input raises at once.
"""

import dataclasses
import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator, Mapping
from typing import IO, Any, Callable

from absl import logging

from fedjax_pt.data.config import DataConfig

_JSON_SUFFIXES = ('.jsonl', '.json')
_TEXT_SUFFIXES = ('.txt',)


@dataclasses.dataclass(frozen=True)
class Document:
  text: str
  origin: str  # 'file:line', 'dataset[split]#index' or 'pydoc_data.topics:name': for messages
  group: int = 0  # index of the data.path pattern it came from (partition='by_source')
  fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # the record minus its text


class BadLines:
  """Counts skipped malformed lines; the one past `limit` is an error naming file and line."""

  def __init__(self, limit: int):
    self.limit = limit
    self.count = 0

  def skip(self, where: str, why: str) -> None:
    self.count += 1
    if self.count > self.limit:
      raise ValueError(f'{where}: {why} (bad lines beyond data.max_bad_lines={self.limit})')
    logging.warning('Skipping %s: %s (%d/%d bad lines allowed)', where, why, self.count,
                    self.limit)


def load_documents(cfg: DataConfig) -> list[Document]:
  """The first `cfg.max_documents` (0 = all) non-blank documents of the configured source."""
  bad = BadLines(cfg.max_bad_lines)
  if cfg.source == 'builtin':
    docs, where = _builtin_documents(), 'the builtin corpus'
  elif cfg.source == 'tfds':
    docs, where = _tfds_documents(cfg, bad), f'tfds:{cfg.path}[{cfg.tfds_split}]'
  else:
    docs, where = _file_documents(cfg, bad), f'data.path={cfg.path!r}'
  out, blank = [], 0
  for doc in docs:
    if not doc.text.strip():
      blank += 1
      continue
    out.append(doc)
    if len(out) == cfg.max_documents:
      break
  if not out:
    raise ValueError(f'no documents with text in {where}')
  logging.info('Read %d documents from %s (%d blank skipped, %d bad lines skipped)', len(out),
               where, blank, bad.count)
  return out


def _builtin_documents() -> Iterator[Document]:
  # pydoc's help topics ship with every CPython: ~465 KB of English prose and code, no download.
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  for name in sorted(topics):
    yield Document(topics[name], f'pydoc_data.topics:{name}', 0, {'topic': name})


def expand_patterns(patterns: list[str]) -> list[list[str]]:
  """The sorted files of each glob pattern; a pattern without a file is an error naming it."""
  seen: dict[str, str] = {}
  out = []
  for pattern in patterns:
    files = sorted(f for f in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(f))
    if not files:
      raise FileNotFoundError(f'data.path pattern {pattern!r} matches no file')
    for f in files:
      if f in seen:
        raise ValueError(f'{f} is matched by both data.path patterns {seen[f]!r} and {pattern!r}')
      seen[f] = pattern
    out.append(files)
  return out


def _file_documents(cfg: DataConfig, bad: BadLines) -> Iterator[Document]:
  for group, files in enumerate(expand_patterns(cfg.patterns)):
    for path in files:
      yield from read_file(path, cfg.text_field, bad, group)


def file_format(path: str) -> str:
  """How `read_file` reads `path`, from its extension: 'json' or 'text', '.gz' appended when
  gzipped."""
  gz = path.endswith('.gz')
  base = path[:-3] if gz else path
  if base.endswith(_JSON_SUFFIXES):
    kind = 'json'
  elif base.endswith(_TEXT_SUFFIXES):
    kind = 'text'
  else:
    raise ValueError(f'{path}: unsupported file type; expected .jsonl, .json or .txt '
                     '(optionally .gz)')
  return kind + ('.gz' if gz else '')


def read_file(path: str, text_field: str, bad: BadLines, group: int = 0) -> Iterator[Document]:
  """Documents of one local file, its format chosen by extension (see the module docstring)."""
  kind = file_format(path)
  parse: Callable[..., Iterator[Document]]
  parse = _json_documents if kind.startswith('json') else _text_documents
  opener = gzip.open if kind.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      yield from parse(path, f, text_field, bad, group)
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise ValueError(f'{path}: truncated or corrupt gzip file ({e})') from e


def _decoded_lines(path: str, f: IO[bytes], bad: BadLines) -> Iterator[tuple[int, str]]:
  """(line number, text) of each line; an empty file is an error, bad UTF-8 a skipped line."""
  empty = True
  for lineno, raw in enumerate(f, 1):
    empty = empty and not raw.strip()
    try:
      yield lineno, raw.decode('utf-8')
    except UnicodeDecodeError as e:
      bad.skip(f'{path}:{lineno}', f'not valid UTF-8 ({e.reason} at byte {e.start})')
  if empty:
    raise ValueError(f'{path}: empty file')


def _json_documents(path: str, f: IO[bytes], text_field: str, bad: BadLines,
                    group: int) -> Iterator[Document]:
  for lineno, line in _decoded_lines(path, f, bad):
    if not line.strip():
      continue
    where = f'{path}:{lineno}'
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      bad.skip(where, f'malformed JSON ({e.msg} at column {e.colno})')
      continue
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
      bad.skip(where, f'no string field {text_field!r} (data.text_field)')
      continue
    text = record.pop(text_field)
    yield Document(text, where, group, record)


def _text_documents(path: str, f: IO[bytes], text_field: str, bad: BadLines,
                    group: int) -> Iterator[Document]:
  del text_field  # plain text has no fields
  lines, first = [], 0
  for lineno, line in _decoded_lines(path, f, bad):
    if line.strip():
      lines.append(line)
      first = first or lineno
    elif lines:
      yield Document(''.join(lines).rstrip('\n'), f'{path}:{first}', group, {'file': path})
      lines, first = [], 0
  if lines:
    yield Document(''.join(lines).rstrip('\n'), f'{path}:{first}', group, {'file': path})


def _tfds_documents(cfg: DataConfig, bad: BadLines) -> Iterator[Document]:
  """Random-access reads through `tfds.data_source` (ArrayRecord, no TensorFlow graph)."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("data.source='tfds' needs tensorflow-datasets: "
                      'pip install fedjax_pt[tfds]') from e
  name = f'tfds:{cfg.path}[{cfg.tfds_split}]'
  try:
    source = tfds.data_source(cfg.path, split=cfg.tfds_split, data_dir=cfg.tfds_data_dir or None)
  except Exception as e:  # tfds raises many types (not found, no split, not prepared)
    raise ValueError(f'{name}: cannot open TFDS dataset ({_first_line(e)})') from e
  for i in range(len(source)):  # lazily: load_documents stops at data.max_documents
    record = dict(source[i])
    if cfg.text_field not in record:
      raise ValueError(f'{name}: no field {cfg.text_field!r} (data.text_field); fields: '
                       f'{sorted(record)}')
    text = record.pop(cfg.text_field)
    if isinstance(text, bytes):
      try:
        text = text.decode('utf-8')
      except UnicodeDecodeError as e:
        bad.skip(f'{name}#{i}', f'not valid UTF-8 ({e.reason} at byte {e.start})')
        continue
    yield Document(str(text), f'{name}#{i}', 0, record)


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__
