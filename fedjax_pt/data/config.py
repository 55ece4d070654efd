"""Typed, validated view of the `data` group of the experiment config.

The ml_collections ConfigDict stops at this boundary: library code only sees the frozen
`DataConfig`, so a bad value fails here, once, with a one-line message that names the `data.*` key.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

SOURCES = ('builtin', 'jsonl', 'text', 'tfds')
PARTITIONS = ('iid', 'by_source', 'dirichlet', 'mapping')
TOKENIZER_SUFFIXES = ('.json', '.model')


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the text comes from, how it is tokenized, split into clients and batched.

  See `configs/base.py` for the meaning of each field; `from_config` documents the accepted values.
  """

  source: str = 'builtin'
  path: str = ''
  tfds_split: str = 'train'
  tfds_data_dir: str = ''
  text_field: str = 'text'
  tokenizer: str = 'bytes'
  seq_len: int = 128
  batch_size: int = 16
  micro_batch_size: int = 0  # for the client's gradient accumulation; batches stay batch_size
  partition: str = 'iid'
  partition_key: str = 'url_domain'
  dirichlet_alpha: float = 1.0
  mapping_file: str = ''
  val_fraction: float = 0.05
  max_documents: int = 0
  max_bad_lines: int = 0
  shuffle: bool = True
  only_client: int = -1  # >= 0: mode=centralized trains client k's shard alone (a solo baseline)
  seed: int = -1  # the partition and held-out split; -1: the run's `seed` (as before it existed)
  cache_dir: str = ''  # the tokenised corpus kept here across runs (`token_cache`); '': off

  def split_seed(self, run_seed: int) -> int:
    """The seed of the partition and the held-out split: `data.seed`, or the run's seed."""
    return self.seed if self.seed >= 0 else run_seed

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> 'DataConfig':
    """Builds and validates a DataConfig from `config.data` (a ConfigDict or any mapping).

    Keys missing from `config` take the defaults above; unknown keys are an error, so a key added
    to the config but not here is noticed instead of being silently ignored.
    """
    values = dict(config.items())
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f'unknown data config key(s): {", ".join("data." + k for k in unknown)}')
    cfg = cls(**values)
    cfg.validate()
    return cfg

  @property
  def patterns(self) -> list[str]:
    """The comma-separated glob patterns of `path` (for the file sources), in order."""
    return [p.strip() for p in self.path.split(',') if p.strip()]

  def validate(self) -> None:
    """Raises ValueError naming the first offending `data.*` key."""
    _check(self.source in SOURCES, f'data.source must be one of {SOURCES}, got {self.source!r}')
    if self.source == 'builtin':
      _check(not self.path, f"data.path={self.path!r} is set but data.source='builtin' ignores it; "
             "set data.source to 'jsonl', 'text' or 'tfds'")
    else:
      _check(bool(self.patterns), f'data.path is required for data.source={self.source!r}')
    _check(bool(self.text_field), 'data.text_field must not be empty')
    _check(self.tokenizer == 'bytes' or self.tokenizer.endswith(TOKENIZER_SUFFIXES),
           "data.tokenizer must be 'bytes', a HuggingFace tokenizer.json or a SentencePiece "
           f'.model file, got {self.tokenizer!r}')
    _check(_is_int(self.seq_len) and self.seq_len >= 1,
           f'data.seq_len must be a positive integer, got {self.seq_len!r}')
    _check(_is_int(self.batch_size) and self.batch_size >= 1,
           f'data.batch_size must be a positive integer, got {self.batch_size!r}')
    _check(_is_int(self.micro_batch_size) and self.micro_batch_size >= 0 and
           (not self.micro_batch_size or self.batch_size % self.micro_batch_size == 0),
           f'data.batch_size={self.batch_size} is not divisible by '
           f'data.micro_batch_size={self.micro_batch_size} (0 = no gradient accumulation)')
    _check(_is_int(self.seed) and self.seed >= -1,
           f'data.seed must be an integer >= 0 (or -1: the run\'s seed), got {self.seed!r}')
    _check(self.partition in PARTITIONS,
           f'data.partition must be one of {PARTITIONS}, got {self.partition!r}')
    _check(self.partition != 'by_source' or self.source in ('jsonl', 'text'),
           "data.partition='by_source' needs data.source 'jsonl' or 'text' (one client per "
           f'data.path pattern), got {self.source!r}')
    _check(self.partition not in ('dirichlet', 'mapping') or bool(self.partition_key),
           f'data.partition_key is required for data.partition={self.partition!r}')
    _check(not isinstance(self.dirichlet_alpha, bool) and
           isinstance(self.dirichlet_alpha, (int, float)) and self.dirichlet_alpha > 0,
           f'data.dirichlet_alpha must be > 0, got {self.dirichlet_alpha!r}')
    _check(self.partition != 'mapping' or bool(self.mapping_file),
           "data.mapping_file is required for data.partition='mapping'")
    # Every client must hold out some text: the global validation set is the union of the clients'.
    _check(isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1,
           f'data.val_fraction must be in (0, 1), got {self.val_fraction!r}')
    _check(_is_int(self.max_documents) and self.max_documents >= 0,
           f'data.max_documents must be >= 0 (0 = all), got {self.max_documents!r}')
    _check(_is_int(self.max_bad_lines) and self.max_bad_lines >= 0,
           f'data.max_bad_lines must be >= 0, got {self.max_bad_lines!r}')
    _check(isinstance(self.shuffle, bool), f'data.shuffle must be a bool, got {self.shuffle!r}')
    _check(_is_int(self.only_client) and self.only_client >= -1,
           f'data.only_client must be a client id or -1 (off), got {self.only_client!r}')
    _check(isinstance(self.cache_dir, str),
           f'data.cache_dir must be a directory path or empty (off), got {self.cache_dir!r}')
    # A TFDS dataset's content has no cheap sound fingerprint here (it is prepared and versioned
    # by tfds), and its ArrayRecord files are already random-access on disk.
    _check(not (self.cache_dir and self.source == 'tfds'),
           f"data.cache_dir={self.cache_dir!r} caches local files and the builtin corpus; "
           "data.source='tfds' is not cached: set data.cache_dir=''")


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)
