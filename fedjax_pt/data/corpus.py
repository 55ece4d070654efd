"""The tokenised corpus: what the pipeline needs of the documents once their text is tokenised.

Partitioning, the train/validation split and packing read only the token ids, each document's
data.path pattern and, for the key-based partitions, each document's partition key; so this is
all a tokenised cache (`token_cache`) has to keep, and a cached corpus is never read as text.

A corpus of files can also be tokenised one file at a time (`tokenise_file`, which a cache keeps
per file) and put together (`concatenate`) into exactly what `tokenise` returns.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

from fedjax_pt.data import partition as partition_lib
from fedjax_pt.data.config import DataConfig
from fedjax_pt.data.sources import BadLines, load_documents, read_file
from fedjax_pt.data.tokenizers import Tokenizer, tokenize_corpus


@dataclasses.dataclass(frozen=True)
class TokenisedCorpus:
  """Document i is ids[offsets[i]:offsets[i + 1]], without end-of-text."""

  ids: np.ndarray  # [num_tokens] int32 (a read-only memory map when it comes from a cache)
  offsets: np.ndarray  # [num_documents + 1] int64
  groups: np.ndarray  # [num_documents] int32: the data.path pattern of each document
  keys: list[str] | None  # each document's partition key, where the partition reads one

  @property
  def num_documents(self) -> int:
    return len(self.offsets) - 1

  def partition(self, cfg: DataConfig, num_clients: int, seed: int) -> list[np.ndarray]:
    """`partition.partition` of these documents."""
    return partition_lib.assign(self.num_documents, self.groups, self.keys, cfg, num_clients,
                                seed)


def tokenise(cfg: DataConfig, tokenizer: Tokenizer) -> TokenisedCorpus:
  """Reads the documents of `cfg` and tokenises all of them: the work a cache saves."""
  docs = load_documents(cfg)
  ids, offsets = tokenize_corpus(tokenizer, [d.text for d in docs])
  keys = ([partition_lib.key_of(d, cfg.partition_key) for d in docs]
          if partition_lib.needs_keys(cfg) else None)
  return TokenisedCorpus(ids, offsets, np.array([d.group for d in docs], np.int32), keys)


@dataclasses.dataclass(frozen=True)
class TokenisedFile:
  """One corpus file tokenised whole: its non-blank documents (`corpus.groups` all 0) and where
  its malformed lines were, which `concatenate` needs to count them as `tokenise` does."""

  corpus: TokenisedCorpus
  bad_lines: np.ndarray  # [skipped lines] int64: for each, how many documents precede it


class _Positions(BadLines):
  """`BadLines` that also notes how many documents were read before each skipped line."""

  def __init__(self, limit: int):
    super().__init__(limit)
    self.documents = 0
    self.before: list[int] = []

  def skip(self, where: str, why: str) -> None:
    super().skip(where, why)
    self.before.append(self.documents)


def tokenise_file(cfg: DataConfig, tokenizer: Tokenizer, path: str) -> TokenisedFile:
  """Reads and tokenises one file of `cfg`'s corpus, all of it (whatever data.max_documents).

  Raises as `load_documents` would on bad input, and also on more than data.max_bad_lines in
  this one file: such a file can only be read as part of the whole corpus (`tokenise`), where
  data.max_documents may stop before the lines that fail.
  """
  bad = _Positions(cfg.max_bad_lines)
  docs = []
  for doc in read_file(path, cfg.text_field, bad):
    if doc.text.strip():
      docs.append(doc)
      bad.documents = len(docs)
  ids, offsets = tokenize_corpus(tokenizer, [d.text for d in docs])
  keys = ([partition_lib.key_of(d, cfg.partition_key) for d in docs]
          if partition_lib.needs_keys(cfg) else None)
  return TokenisedFile(TokenisedCorpus(ids, offsets, np.zeros(len(docs), np.int32), keys),
                       np.array(bad.before, np.int64))


def concatenate(cfg: DataConfig, files: Sequence[tuple[int, TokenisedFile]]
                ) -> TokenisedCorpus | None:
  """What `tokenise` returns for a corpus of these (data.path pattern, file) in its order: the
  first data.max_documents documents, the malformed lines read before the last of them counted
  against data.max_bad_lines. None where `tokenise` fails (too many bad lines, no document),
  which is then left to fail with its own message: naming the file and line that failed.
  """
  ids, offsets, groups, keys = [], [np.zeros(1, np.int64)], [], []
  taken = bad = tokens = 0
  for group, file in files:
    n = file.corpus.num_documents
    if cfg.max_documents and taken + n >= cfg.max_documents:
      n = cfg.max_documents - taken  # tokenise stops right after the last document it keeps
      bad += int(np.sum(file.bad_lines < n))
    else:
      bad += len(file.bad_lines)
    file_offsets = np.asarray(file.corpus.offsets[:n + 1], np.int64)
    ids.append(file.corpus.ids[:file_offsets[-1]])
    offsets.append(file_offsets[1:] + tokens)
    groups.append(np.full(n, group, np.int32))
    if file.corpus.keys is not None:
      keys.extend(file.corpus.keys[:n])
    taken, tokens = taken + n, tokens + int(file_offsets[-1])
    if cfg.max_documents and taken == cfg.max_documents:
      break
  if bad > cfg.max_bad_lines or not taken:
    return None
  return TokenisedCorpus(np.concatenate(ids).astype(np.int32, copy=False),
                         np.concatenate(offsets), np.concatenate(groups),
                         keys if partition_lib.needs_keys(cfg) else None)
