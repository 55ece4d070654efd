"""Tests of fedjax_pt.data.partition: iid, by_source, dirichlet, mapping, train/val split."""

import json

import numpy as np
import pytest

from fedjax_pt.data import partition as partition_lib
from fedjax_pt.data.config import DataConfig
from fedjax_pt.data.sources import Document


def _docs(n: int, domains=None, groups=None) -> list[Document]:
  domains = domains or [f'd{i % 7}.com' for i in range(n)]
  return [Document(f'text {i}', f'f.jsonl:{i + 1}', groups[i] if groups else 0,
                   {'url': f'https://{domains[i]}/page{i}', 'lang': 'en' if i % 2 else 'fr'})
          for i in range(n)]


def _cfg(**kw) -> DataConfig:
  kw.setdefault('source', 'jsonl')
  kw.setdefault('path', 'a.jsonl')
  return DataConfig.from_config(kw)


def _check_is_partition(parts, n):
  everything = np.concatenate(parts)
  assert sorted(everything.tolist()) == list(range(n))  # disjoint and covering
  for p in parts:
    assert p.dtype == np.int64 and (np.diff(p) > 0).all()  # corpus order kept


def test_iid_is_equal_contiguous_shards():
  parts = partition_lib.partition(_docs(10), _cfg(), 3, seed=0)
  assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_by_source_one_client_per_pattern():
  docs = _docs(6, groups=[0, 1, 1, 0, 2, 1])
  parts = partition_lib.partition(docs, _cfg(path='a,b,c', partition='by_source'), 3, seed=0)
  assert [p.tolist() for p in parts] == [[0, 3], [1, 2, 5], [4]]
  with pytest.raises(ValueError, match='3 pattern.* but fl.num_clients=2'):
    partition_lib.partition(docs, _cfg(path='a,b,c', partition='by_source'), 2, seed=0)


def test_key_of_url_domain_and_fields():
  doc = Document('t', 'x.jsonl:3', 0, {'url': 'HTTPS://WWW.Example.org:8080/a?b', 'n': 5,
                                       'b': b'raw'})
  assert partition_lib.key_of(doc, 'url_domain') == 'example.org'
  assert partition_lib.key_of(doc, 'n') == '5'
  assert partition_lib.key_of(doc, 'b') == 'raw'
  with pytest.raises(ValueError, match=r"^x.jsonl:3: no field 'lang' for data.partition_key"):
    partition_lib.key_of(doc, 'lang')
  with pytest.raises(ValueError, match=r"^x.jsonl:3: no field 'url'.*'url_domain'"):
    partition_lib.key_of(Document('t', 'x.jsonl:3'), 'url_domain')


def test_dirichlet_is_a_seeded_partition():
  docs = _docs(400)
  cfg = _cfg(partition='dirichlet', dirichlet_alpha=1.0)
  parts = partition_lib.partition(docs, cfg, 4, seed=3)
  _check_is_partition(parts, 400)
  again = partition_lib.partition(docs, cfg, 4, seed=3)
  assert all((a == b).all() for a, b in zip(parts, again))
  other = partition_lib.partition(docs, cfg, 4, seed=4)
  assert any(len(a) != len(b) or (a != b).any() for a, b in zip(parts, other))


def test_dirichlet_alpha_controls_skew():
  keys = [f'domain{i % 10}' for i in range(5000)]

  def mean_top_share(alpha):
    parts = partition_lib.dirichlet(keys, 4, alpha, np.random.default_rng(0))
    client = np.empty(len(keys), int)
    for k, p in enumerate(parts):
      client[p] = k
    shares = [np.bincount(client[g::10], minlength=4).max() / 500 for g in range(10)]
    return np.mean(shares)

  assert mean_top_share(0.01) > 0.95  # each domain lives on (almost) one client
  assert mean_top_share(1000.0) < 0.35  # each domain spread evenly over the 4 clients


def test_dirichlet_singleton_groups_spread_over_clients():
  # One document per domain (most of C4): must not all land on one client.
  keys = [f'd{i}' for i in range(200)]
  sizes = [len(p) for p in partition_lib.dirichlet(keys, 4, 1.0, np.random.default_rng(0))]
  assert min(sizes) > 20


def test_dirichlet_with_a_field_key():
  cfg = _cfg(partition='dirichlet', partition_key='lang')
  _check_is_partition(partition_lib.partition(_docs(50), cfg, 2, seed=0), 50)


def test_empty_client_is_an_error_naming_it():
  with pytest.raises(ValueError, match=r'client 2 gets no documents of 2 under .*iid'):
    partition_lib.partition(_docs(2), _cfg(), 3, seed=0)
  docs = _docs(40, domains=['one.com'] * 40)
  with pytest.raises(ValueError, match='raise data.dirichlet_alpha'):
    partition_lib.partition(docs, _cfg(partition='dirichlet', dirichlet_alpha=1e-4), 4, seed=0)


def test_mapping(tmp_path):
  path = tmp_path / 'map.json'
  path.write_text(json.dumps({'d0.com': 1, 'd1.com': 0, 'd2.com': 1}))
  cfg = _cfg(partition='mapping', mapping_file=str(path))
  parts = partition_lib.partition(_docs(14), cfg, 2, seed=0)
  assert [p.tolist() for p in parts] == [[1, 8], [0, 2, 7, 9]]  # d3..d6.com unmapped: dropped


@pytest.mark.parametrize('content,message', [
    ('{"d0.com": 2}', r"client id of 'd0.com' must be an int in \[0, 2\)"),
    ('{"d0.com": "0"}', r"client id of 'd0.com' must be an int.*got '0'"),
    ('[1, 2]', 'expected a JSON object'),
    ('{oops', 'not valid JSON'),
    ('{"nowhere.com": 0}', 'no document key is in the mapping'),
])
def test_bad_mapping_file_is_named(tmp_path, content, message):
  path = tmp_path / 'map.json'
  path.write_text(content)
  with pytest.raises(ValueError, match=rf'^{path}: {message}'):
    partition_lib.partition(_docs(7), _cfg(partition='mapping', mapping_file=str(path)), 2, 0)


def test_missing_mapping_file_and_unmapped_client(tmp_path):
  with pytest.raises(FileNotFoundError, match=f'mapping_file not found: {tmp_path}/no.json'):
    partition_lib.partition(_docs(7), _cfg(partition='mapping',
                                           mapping_file=str(tmp_path / 'no.json')), 2, 0)
  path = tmp_path / 'map.json'
  path.write_text('{"d0.com": 0}')
  with pytest.raises(ValueError, match='client 1 gets no documents'):
    partition_lib.partition(_docs(7), _cfg(partition='mapping', mapping_file=str(path)), 2, 0)


def test_split_train_val_fraction_order_and_seed():
  idx = np.arange(100, 200)
  tokens = np.full(100, 50)
  train, val = partition_lib.split_train_val(idx, tokens, 0.1, 10, np.random.default_rng(0))
  assert len(val) == 10 and len(train) == 90
  assert sorted(np.concatenate([train, val]).tolist()) == idx.tolist()
  assert (np.diff(train) > 0).all() and (np.diff(val) > 0).all()
  train2, val2 = partition_lib.split_train_val(idx, tokens, 0.1, 10, np.random.default_rng(0))
  assert (val == val2).all() and (train == train2).all()
  _, val3 = partition_lib.split_train_val(idx, tokens, 0.1, 10, np.random.default_rng(1))
  assert (val != val3).any()


def test_split_train_val_holds_out_at_least_one_window_but_keeps_training_data():
  idx = np.arange(10)
  tokens = np.full(10, 5)
  # 0.01 * 10 rounds to 0 documents: still one, then more until 12 tokens (3 documents).
  _, val = partition_lib.split_train_val(idx, tokens, 0.01, 12, np.random.default_rng(0))
  assert len(val) == 3
  train, val = partition_lib.split_train_val(idx, tokens, 0.01, 10_000, np.random.default_rng(0))
  assert (len(train), len(val)) == (1, 9)
  train, val = partition_lib.split_train_val(idx[:1], tokens[:1], 0.5, 1, np.random.default_rng(0))
  assert (train.tolist(), val.tolist()) == ([0], [])  # the pipeline reports the empty val set
