"""Partitioning documents into clients, and each client's documents into train / validation.

All functions are pure: they take document metadata and a seed and return sorted index arrays, so
a client keeps its documents in corpus order and a partition is reproducible from (config, seed).
"""

import json
import os
import urllib.parse
from collections.abc import Sequence

import numpy as np
from absl import logging

from fedjax_pt.data.config import DataConfig
from fedjax_pt.data.sources import Document

# Separate random streams per purpose, so e.g. changing val_fraction leaves the partition alone.
PARTITION_STREAM, VAL_STREAM, SHUFFLE_STREAM = 0, 1, 2


def rng_for(seed: int, stream: int, client: int = 0) -> np.random.Generator:
  return np.random.default_rng([seed, stream, client])


def needs_keys(cfg: DataConfig) -> bool:
  """Whether `cfg.partition` reads each document's `cfg.partition_key` (`key_of`)."""
  return cfg.partition in ('dirichlet', 'mapping')


def partition(docs: Sequence[Document], cfg: DataConfig, num_clients: int,
              seed: int) -> list[np.ndarray]:
  """Sorted document indices of each client under `cfg.partition`; every client gets some."""
  keys = [key_of(d, cfg.partition_key) for d in docs] if needs_keys(cfg) else None
  return assign(len(docs), np.array([d.group for d in docs]), keys, cfg, num_clients, seed)


def assign(num_docs: int, groups: np.ndarray, keys: Sequence[str] | None, cfg: DataConfig,
           num_clients: int, seed: int) -> list[np.ndarray]:
  """`partition` from what it reads of the documents: their number, each one's data.path pattern
  (`Document.group`) and, where `needs_keys`, each one's partition key. A tokenised cache keeps
  these, so a cached corpus is partitioned without reading its text again."""
  if num_clients < 1:
    raise ValueError(f'num_clients must be >= 1, got {num_clients}')
  if cfg.partition == 'iid':
    # The paper's C4 split: equal contiguous shards of the document stream.
    parts = np.array_split(np.arange(num_docs), num_clients)
  elif cfg.partition == 'by_source':
    parts = _by_source(groups, len(cfg.patterns), num_clients)
  elif cfg.partition == 'dirichlet':
    parts = dirichlet(keys, num_clients, cfg.dirichlet_alpha, rng_for(seed, PARTITION_STREAM))
  else:
    parts = _by_mapping(keys, load_mapping(cfg.mapping_file, num_clients), num_clients,
                        cfg.mapping_file)
  for k, part in enumerate(parts):
    if not len(part):
      raise ValueError(f'client {k} gets no documents of {num_docs} under '
                       f'data.partition={cfg.partition!r}; lower fl.num_clients'
                       + (' or raise data.dirichlet_alpha' if cfg.partition == 'dirichlet' else ''))
  return [np.asarray(p, dtype=np.int64) for p in parts]


def key_of(doc: Document, key: str) -> str:
  """The partition key of a document: 'url_domain' (host of `url`, no 'www.'), 'url_tld' (its
  last label: 'com', 'org', 'uk', ...; C4's domains are nearly all distinct, its TLDs are not) or
  a field."""
  name = 'url' if key in ('url_domain', 'url_tld') else key
  if name not in doc.fields:
    raise ValueError(f'{doc.origin}: no field {name!r} for data.partition_key={key!r}; fields: '
                     f'{sorted(doc.fields)}')
  value = doc.fields[name]
  value = value.decode('utf-8', errors='replace') if isinstance(value, bytes) else str(value)
  if key == 'url_domain':
    host = (urllib.parse.urlsplit(value).hostname or '').lower()
    return host[4:] if host.startswith('www.') else host
  if key == 'url_tld':
    return (urllib.parse.urlsplit(value).hostname or '').lower().rsplit('.', 1)[-1]
  return value


def _by_source(groups: np.ndarray, num_patterns: int, num_clients: int) -> list[np.ndarray]:
  if num_patterns != num_clients:
    raise ValueError(f"data.partition='by_source' makes one client per data.path pattern: "
                     f'{num_patterns} pattern(s) but fl.num_clients={num_clients}')
  return [np.flatnonzero(groups == k) for k in range(num_clients)]


def dirichlet(keys: Sequence[str], num_clients: int, alpha: float,
              rng: np.random.Generator) -> list[np.ndarray]:
  """Label-skew split (Hsu et al. 2019): each key group spreads over clients by p ~ Dir(alpha).

  Each document goes to a client drawn from its group's proportions. Sampling documents rather
  than cutting the group at cumulative proportions keeps a one-document group (most C4 domains)
  from always landing on the same client.
  """
  groups, group_of_doc = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
  cdf = np.cumsum(rng.dirichlet(np.full(num_clients, alpha), size=len(groups)), axis=1)
  u = rng.random(len(keys))
  client = (u[:, None] > cdf[group_of_doc]).sum(axis=1).clip(max=num_clients - 1)
  logging.info('Dirichlet(%g) partition of %d key groups over %d clients', alpha, len(groups),
               num_clients)
  return [np.flatnonzero(client == k) for k in range(num_clients)]


def load_mapping(path: str, num_clients: int) -> dict[str, int]:
  """A JSON object {key value: client id}; ids must lie in [0, num_clients)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'data.mapping_file not found: {path}')
  try:
    with open(path, encoding='utf-8') as f:
      mapping = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from e
  if not isinstance(mapping, dict):
    raise ValueError(f'{path}: expected a JSON object {{key: client id}}')
  for key, client in mapping.items():
    if isinstance(client, bool) or not isinstance(client, int) or not 0 <= client < num_clients:
      raise ValueError(f'{path}: client id of {key!r} must be an int in [0, {num_clients}), '
                       f'got {client!r}')
  return mapping


def _by_mapping(keys: Sequence[str], mapping: dict[str, int], num_clients: int,
                path: str) -> list[np.ndarray]:
  # Unmapped documents are dropped, not an error: a mapping typically names a few organisations'
  # domains out of the thousands in a web crawl.
  client = np.array([mapping.get(k, -1) for k in keys], dtype=np.int64)
  dropped = int((client < 0).sum())
  if dropped == len(keys):
    raise ValueError(f'{path}: no document key is in the mapping (data.partition_key); '
                     f'e.g. {keys[0]!r}')
  logging.info('Mapping %s: %d documents mapped, %d unmapped dropped', path,
               len(keys) - dropped, dropped)
  return [np.flatnonzero(client == k) for k in range(num_clients)]


def split_train_val(doc_indices: np.ndarray, doc_tokens: np.ndarray, val_fraction: float,
                    min_val_tokens: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Holds out a seeded random val_fraction of a client's documents (at least one).

  If those documents hold fewer than `min_val_tokens` tokens (one window), more are held out in
  the same random order, as long as one document stays for training. `doc_tokens[i]` is the
  packed length of doc_indices[i]. Returns (train, val), each in corpus order.
  """
  n = len(doc_indices)
  order = rng.permutation(n)
  held_out_tokens = np.cumsum(doc_tokens[order])
  enough = int(np.searchsorted(held_out_tokens, min_val_tokens)) + 1
  n_val = min(max(1, round(val_fraction * n), enough), n - 1)
  return np.sort(doc_indices[order[n_val:]]), np.sort(doc_indices[order[:n_val]])
