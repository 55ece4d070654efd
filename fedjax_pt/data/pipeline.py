"""The federated dataset: per-client grain iterators over packed windows, and validation batches.

`build_federated_data` does all the work once, up front (read, tokenize, partition, split, pack);
corpora here are at most a few hundred MB, so every client's windows live in memory as views of
its token stream and iterators are cheap, exactly checkpointable grain pipelines. With
`data.cache_dir` the read and tokenize steps run once per corpus and tokenizer (`token_cache`).
"""

import grain
import numpy as np
from absl import logging

from fedjax_pt.data import packing
from fedjax_pt.data import partition as partition_lib
from fedjax_pt.data import token_cache
from fedjax_pt.data.config import DataConfig
from fedjax_pt.data.tokenizers import Tokenizer, load_tokenizer

# The windows are already in memory: reader threads would only contend for the GIL (grain's own
# advice), and a prefetch buffer of large batches per client would multiply host memory.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


class FederatedData:
  """Each client's training windows and held-out validation windows, [n, seq_len + 1] int32."""

  def __init__(self, tokenizer: Tokenizer, seq_len: int, batch_size: int,
               train_windows: list[np.ndarray], val_windows: list[np.ndarray], seed: int,
               shuffle: bool = True, only_client: int = -1,
               process_rows: tuple[int, int] = (0, 1)):
    if not -1 <= only_client < len(train_windows):
      raise ValueError(f'data.only_client={only_client} names no client of '
                       f'{len(train_windows)} (fl.num_clients); -1 turns it off')
    self.tokenizer = tokenizer
    self.num_clients = len(train_windows)
    self.seq_len = seq_len
    self.batch_size = batch_size
    self._train = train_windows
    self._val = val_windows
    self._seed = seed
    self._shuffle = shuffle
    self.only_client = only_client
    # (i, n): with n processes (`fedjax_pt.distributed`) this one loads block i of n of every
    # batch's rows; the n blocks together are exactly the batch one process would load.
    self.process_rows = process_rows

  def client_num_tokens(self, k: int) -> int:
    """Training target tokens of client k: its windows times seq_len."""
    return len(self._train[self._check_client(k)]) * self.seq_len

  def client_iterator(self, k: int, batch_size: int | None = None) -> grain.DatasetIterator:
    """Infinite [batch_size, seq_len + 1] int32 batches of client k, reshuffled every epoch
    (batches of its own size for a client whose profile says so: `fedjax_pt.federated.profiles`)."""
    k = self._check_client(k)
    if self.only_client >= 0 and k != self.only_client:
      # A federated run asks every client for its data: fail at once rather than silently
      # ignoring a key that is meant for the centralized solo baseline.
      raise ValueError(f'data.only_client={self.only_client} trains that client alone (with '
                       'mode=centralized); a federated run needs every client: set it to -1')
    return self._iterator(self._train[k], k, batch_size)

  def centralized_iterator(self) -> grain.DatasetIterator:
    """The same over the union of all clients' training windows.

    It shuffles with client 0's seed, so with a single client it yields exactly the batches of
    client_iterator(0) and a centralized run is comparable step for step. With `only_client=k`
    it yields exactly client_iterator(k): one client training alone on its own shard, while
    validation stays the global set, so its curve overlays the federated run's.
    """
    if self.only_client >= 0:
      return self.client_iterator(self.only_client)
    return self._iterator(np.concatenate(self._train), 0)

  def val_batches(self, batch_size: int, max_batches: int = 0,
                  client: int | None = None) -> list[np.ndarray]:
    """Validation windows in fixed order, batched; the last batch may be smaller.

    client=None is the global set: every client's held-out windows, interleaved client by client
    so that a truncated set (max_batches) still covers every client's distribution. 0 batches
    means all of them.
    """
    wins = _interleave(self._val) if client is None else self._val[self._check_client(client)]
    return eval_batches(wins, batch_size, max_batches)

  def _iterator(self, windows: np.ndarray, stream_id: int,
                batch_size: int | None = None) -> grain.DatasetIterator:
    ds = grain.MapDataset.source(windows)
    if self._shuffle:
      seed = np.random.SeedSequence([self._seed, partition_lib.SHUFFLE_STREAM, stream_id])
      ds = ds.shuffle(seed=int(seed.generate_state(1)[0]))
    # repeat() reseeds the shuffle every epoch; batching after it lets a batch span two epochs, so
    # no window is ever skipped.
    block, blocks = self.process_rows
    ds = ds.repeat().batch((batch_size or self.batch_size) // blocks, drop_remainder=True)
    if blocks > 1:
      # Global batch t is sub-batches t*n .. t*n+n-1; this process reads its own, the i-th: the
      # iterator's position (t) is then the same on every process, and in the checkpoint.
      ds = ds[block::blocks]
    return iter(ds.to_iter_dataset(_READ_OPTIONS))

  def _check_client(self, k: int) -> int:
    if not 0 <= k < self.num_clients:
      raise ValueError(f'client must be in [0, {self.num_clients}), got {k}')
    return k


def eval_batches(windows: np.ndarray, batch_size: int, max_batches: int = 0) -> list[np.ndarray]:
  """The first `max_batches` (0: all) batches of `windows` in order; the last may be smaller."""
  if batch_size < 1 or max_batches < 0:
    raise ValueError(f'batch_size must be >= 1 and max_batches >= 0, got {batch_size}, '
                     f'{max_batches}')
  stops = range(0, len(windows), batch_size)
  if max_batches:
    stops = stops[:max_batches]
  return [np.array(windows[i:i + batch_size], dtype=np.int32) for i in stops]


def _interleave(parts: list[np.ndarray]) -> np.ndarray:
  """Rows of `parts` in round-robin order: part 0 row 0, part 1 row 0, ..., part 0 row 1, ..."""
  longest = max(len(p) for p in parts)
  if not longest:  # nothing held out (build_federated_data without hold_out)
    return np.concatenate(parts)
  return np.stack([p[i] for i in range(longest) for p in parts if i < len(p)])


def build_federated_data(cfg: DataConfig, num_clients: int, seed: int,
                         process_rows: tuple[int, int] = (0, 1),
                         hold_out: bool = True) -> FederatedData:
  """Reads, tokenizes, partitions, splits and packs the corpus of `cfg` for `num_clients`; the
  training batches are this process's block of rows (`FederatedData.process_rows`). Without
  `hold_out` every document trains and there is no validation set (a Flower node whose corpus
  is all its own: nobody would evaluate what it held out).

  `seed` orders the batches; `cfg.split_seed(seed)` partitions the documents and holds out the
  validation set, so runs of several seeds with one `data.seed` are scored on the same documents.
  """
  if seed < 0:
    raise ValueError(f'seed must be >= 0, got {seed}')
  split_seed = cfg.split_seed(seed)
  tokenizer = load_tokenizer(cfg.tokenizer)
  corpus = token_cache.load(cfg, tokenizer)
  ids, offsets = corpus.ids, corpus.offsets
  packed_lengths = np.diff(offsets) + 1  # + end-of-text
  parts = corpus.partition(cfg, num_clients, split_seed)
  train, val = [], []
  for k, part in enumerate(parts):
    train_docs, val_docs = partition_lib.split_train_val(
        part, packed_lengths[part], cfg.val_fraction, cfg.seq_len + 1,
        partition_lib.rng_for(split_seed, partition_lib.VAL_STREAM, k)) if hold_out else (
            part, part[:0])
    train_stream = packing.pack(packing.select(ids, offsets, train_docs), tokenizer.eot_id)
    val_stream = packing.pack(packing.select(ids, offsets, val_docs), tokenizer.eot_id)
    train.append(packing.windows(train_stream, cfg.seq_len))
    val.append(packing.windows(val_stream, cfg.seq_len))
    _check_sizes(k, cfg, len(part), len(train_stream), len(train[-1]), len(val_stream),
                 len(val[-1]) if hold_out else None)
    logging.info('Client %d: %d train documents, %d tokens, %d windows; %d val documents, '
                 '%d tokens, %d windows', k, len(train_docs), len(train_stream), len(train[-1]),
                 len(val_docs), len(val_stream), len(val[-1]))
  return FederatedData(tokenizer, cfg.seq_len, cfg.batch_size, train, val, seed, cfg.shuffle,
                       cfg.only_client, process_rows)


def _check_sizes(k: int, cfg: DataConfig, num_docs: int, train_tokens: int, train_windows: int,
                 val_tokens: int, val_windows: int | None) -> None:
  hint = 'lower data.seq_len, data.batch_size or fl.num_clients'
  if train_windows < cfg.batch_size:
    raise ValueError(f'client {k} has {train_tokens} training tokens ({num_docs} documents in all) '
                     f'= {train_windows} windows of seq_len+1={cfg.seq_len + 1}, fewer than '
                     f'data.batch_size={cfg.batch_size}; {hint}')
  if val_windows == 0:
    raise ValueError(f'client {k} has an empty validation set ({val_tokens} held-out tokens of '
                     f'{num_docs} documents, under one window of seq_len+1={cfg.seq_len + 1}); '
                     f'{hint}, or raise data.val_fraction')
