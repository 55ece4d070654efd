"""The tokenised corpus: what the pipeline needs of the documents once their text is tokenised.

Partitioning, the train/validation split and packing read only the token ids, each document's
data.path pattern and, for the key-based partitions, each document's partition key; so this is
all a tokenised cache (`token_cache`) has to keep, and a cached corpus is never read as text.
"""

import dataclasses

import numpy as np

from fedjax_pt.data import partition as partition_lib
from fedjax_pt.data.config import DataConfig
from fedjax_pt.data.sources import load_documents
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
