"""Tests of packing, DataConfig and the FederatedData pipeline (iterators, validation, errors)."""

import json
import re
from pathlib import Path

import grain
import ml_collections
import numpy as np
import pytest

from fedjax_pt.data import DataConfig, build_federated_data
from fedjax_pt.data import packing
from fedjax_pt.data.tokenizers import tokenize_corpus

SHARED = Path(__file__).resolve().parents[2] / 'shared'
C4 = SHARED / 'data' / 'c4' / 'c4_sample.jsonl'
NEOX = SHARED / 'data' / 'tokenizers' / 'gpt-neox-20b' / 'tokenizer.json'


def _corpus(tmp_path: Path, n: int = 60, name: str = 'c.jsonl') -> Path:
  rng = np.random.default_rng(0)
  records = [{'text': f'document {i}: ' + 'abcdefgh'[: i % 8] * int(rng.integers(1, 9)),
              'url': f'http://site{i % 5}.com/{i}'} for i in range(n)]
  path = tmp_path / name
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return path


def _cfg(**kw) -> DataConfig:
  return DataConfig.from_config(kw)


def _take(it, n):
  return [next(it) for _ in range(n)]


# --- packing ---------------------------------------------------------------------------------

def test_pack_appends_eot_to_every_document():
  docs = [np.array([1, 2, 3], np.int32), np.array([], np.int32), np.array([4, 5], np.int32)]
  stream = packing.pack(docs, eot_id=9)
  assert stream.dtype == np.int32
  assert stream.tolist() == [1, 2, 3, 9, 9, 4, 5, 9]
  assert len(stream) == sum(len(d) for d in docs) + len(docs)
  assert packing.pack([], 9).tolist() == []


def test_windows_overlap_by_one_token_hand_computed():
  stream = np.array([1, 2, 3, 9, 4, 5, 9], np.int32)
  assert packing.windows(stream, 2).tolist() == [[1, 2, 3], [3, 9, 4], [4, 5, 9]]
  # 6 targets, seq_len 4: one full window; the partial one (2 targets) is dropped.
  assert packing.windows(stream, 4).tolist() == [[1, 2, 3, 9, 4]]
  assert packing.windows(stream, 6).tolist() == [[1, 2, 3, 9, 4, 5, 9]]
  assert packing.windows(stream, 7).shape == (0, 8)
  assert [packing.num_windows(t, 4) for t in (0, 1, 4, 5, 9, 10)] == [0, 0, 0, 1, 2, 2]


def test_windows_cover_every_target_once():
  stream = np.arange(1001, dtype=np.int32)
  w = packing.windows(stream, 10)
  assert w.shape == (100, 11) and not w.flags.writeable  # a view, not a copy
  assert (w[1:, 0] == w[:-1, -1]).all()
  assert w[:, 1:].ravel().tolist() == list(range(1, 1001))


# --- config ----------------------------------------------------------------------------------

def test_config_from_config_dict_defaults_and_patterns():
  cfg = DataConfig.from_config(ml_collections.ConfigDict({'seq_len': 64}))
  assert cfg == DataConfig(seq_len=64)
  assert _cfg(source='jsonl', path=' a.jsonl , b/*.txt,').patterns == ['a.jsonl', 'b/*.txt']
  assert _cfg(batch_size=16, micro_batch_size=4).micro_batch_size == 4


@pytest.mark.parametrize('kw,key', [
    ({'source': 'hub'}, 'data.source'),
    ({'path': 'x.jsonl'}, 'data.path'),
    ({'source': 'jsonl'}, 'data.path'),
    ({'tokenizer': 'gpt2'}, 'data.tokenizer'),
    ({'seq_len': 0}, 'data.seq_len'),
    ({'batch_size': -1}, 'data.batch_size'),
    ({'micro_batch_size': 5}, 'data.micro_batch_size'),
    ({'micro_batch_size': -1}, 'data.micro_batch_size'),
    ({'partition': 'random'}, 'data.partition'),
    ({'partition': 'by_source'}, 'data.partition'),
    ({'partition': 'dirichlet', 'partition_key': ''}, 'data.partition_key'),
    ({'dirichlet_alpha': 0.0}, 'data.dirichlet_alpha'),
    ({'partition': 'mapping'}, 'data.mapping_file'),
    ({'val_fraction': 0.0}, 'data.val_fraction'),
    ({'val_fraction': 1.0}, 'data.val_fraction'),
    ({'max_documents': -1}, 'data.max_documents'),
    ({'max_bad_lines': -1}, 'data.max_bad_lines'),
    ({'shuffle': 1}, 'data.shuffle'),
    ({'text_field': ''}, 'data.text_field'),
    ({'seqlen': 5}, 'data.seqlen'),
])
def test_config_errors_name_the_key(kw, key):
  with pytest.raises(ValueError, match=re.escape(key)) as e:
    _cfg(**kw)
  assert '\n' not in str(e.value)


# --- pipeline --------------------------------------------------------------------------------

def test_builtin_defaults_for_eight_clients():
  data = build_federated_data(_cfg(), num_clients=8, seed=0)
  assert (data.num_clients, data.seq_len, data.batch_size) == (8, 128, 16)
  assert data.tokenizer.vocab_size == 257
  assert all(data.client_num_tokens(k) >= 16 * 128 for k in range(8))
  batch = next(data.client_iterator(7))
  assert batch.shape == (16, 129) and batch.dtype == np.int32
  assert isinstance(data.client_iterator(0), grain.DatasetIterator)


def test_no_token_lost_with_seq_len_one(tmp_path):
  # seq_len=1 windows are bigrams with stride 1, so the packed streams can be rebuilt exactly.
  path = _corpus(tmp_path, n=40)
  cfg = _cfg(source='jsonl', path=str(path), seq_len=1, batch_size=4, shuffle=False,
             val_fraction=0.2)
  data = build_federated_data(cfg, num_clients=3, seed=0)
  tok = data.tokenizer
  texts = []
  for k in range(3):
    n = data.client_num_tokens(k)
    train = np.concatenate(_take(data.client_iterator(k), -(-n // 4)))[:n]
    val = np.concatenate(data.val_batches(5, client=k))
    for wins in (train, val):
      stream = np.concatenate([wins[:, 0], wins[-1:, 1]])
      assert stream[-1] == tok.eot_id
      texts += tok.decode(stream).split('<|endoftext|>')[:-1]
  expected = [json.loads(line)['text'] for line in path.read_text().splitlines()]
  assert sorted(texts) == sorted(expected)


def test_without_hold_out_every_document_trains_and_nothing_is_held_out(tmp_path):
  """A Flower node whose corpus is all its own (num-partitions=1) trains on all of it."""
  path = _corpus(tmp_path)
  cfg = _cfg(source='jsonl', path=str(path), seq_len=8, batch_size=4)
  split = build_federated_data(cfg, num_clients=1, seed=0)
  whole = build_federated_data(cfg, num_clients=1, seed=0, hold_out=False)
  texts = [json.loads(line)['text'] for line in path.read_text().splitlines()]
  ids, offsets = tokenize_corpus(whole.tokenizer, texts)
  every_document = packing.pack(packing.select(ids, offsets, np.arange(len(texts))),
                                whole.tokenizer.eot_id)
  assert whole.client_num_tokens(0) == len(packing.windows(every_document, 8)) * 8
  assert split.client_num_tokens(0) < whole.client_num_tokens(0)
  assert not whole.val_batches(4) and split.val_batches(4)


def test_iterator_is_infinite_covers_each_epoch_and_reshuffles(tmp_path):
  data = build_federated_data(_cfg(source='jsonl', path=str(_corpus(tmp_path)), seq_len=8,
                                   batch_size=4), num_clients=2, seed=1)
  n = data.client_num_tokens(0) // 8
  rows = np.concatenate(_take(data.client_iterator(0), (2 * n) // 4 + 1))
  epoch1, epoch2 = rows[:n], rows[n:2 * n]
  as_set = lambda a: sorted(map(tuple, a.tolist()))
  assert as_set(epoch1) == as_set(epoch2)
  assert len(set(map(tuple, epoch1.tolist()))) > n // 2
  assert not (epoch1 == epoch2).all()
  again = np.concatenate(_take(data.client_iterator(0), 3))
  assert (again == rows[:12]).all()  # deterministic for a seed
  other = np.concatenate(_take(data.client_iterator(1), 3))
  assert other.shape == again.shape and not (other == again).all()


def test_no_shuffle_reads_windows_in_order(tmp_path):
  data = build_federated_data(_cfg(source='jsonl', path=str(_corpus(tmp_path)), seq_len=8,
                                   batch_size=4, shuffle=False), num_clients=1, seed=0)
  a, b = _take(data.client_iterator(0), 2)
  assert (a[1:, 0] == a[:-1, -1]).all() and a[-1, -1] == b[0, 0]


def test_centralized_equals_client_zero_for_one_client(tmp_path):
  data = build_federated_data(_cfg(source='jsonl', path=str(_corpus(tmp_path)), seq_len=8,
                                   batch_size=4), num_clients=1, seed=5)
  steps = 2 * data.client_num_tokens(0) // (8 * 4) + 3  # past two epochs
  for a, b in zip(_take(data.client_iterator(0), steps), _take(data.centralized_iterator(), steps)):
    np.testing.assert_array_equal(a, b)


def test_centralized_is_the_union_of_clients(tmp_path):
  data = build_federated_data(_cfg(source='jsonl', path=str(_corpus(tmp_path)), seq_len=8,
                                   batch_size=2), num_clients=3, seed=0)
  n = sum(data.client_num_tokens(k) for k in range(3)) // 8
  central = np.concatenate(_take(data.centralized_iterator(), n // 2))[:n - n % 2]
  per_client = set()
  for k in range(3):
    m = data.client_num_tokens(k) // 8
    per_client |= set(map(tuple, np.concatenate(_take(data.client_iterator(k), m)).tolist()))
  assert set(map(tuple, central.tolist())) <= per_client


def test_only_client_trains_that_shard_alone_and_keeps_global_validation(tmp_path):
  cfg = dict(source='jsonl', path=str(_corpus(tmp_path)), seq_len=8, batch_size=2)
  everyone = build_federated_data(_cfg(**cfg), num_clients=3, seed=1)
  solo = build_federated_data(_cfg(**cfg, only_client=2), num_clients=3, seed=1)
  for a, b in zip(_take(everyone.client_iterator(2), 30), _take(solo.centralized_iterator(), 30)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(everyone.val_batches(4), solo.val_batches(4)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match=r'data.only_client=2 trains that client alone'):
    solo.client_iterator(0)
  with pytest.raises(ValueError, match=r'data.only_client=3 names no client of 3'):
    build_federated_data(_cfg(**cfg, only_client=3), num_clients=3, seed=1)
  with pytest.raises(ValueError, match=r'data.only_client must be a client id or -1'):
    _cfg(**cfg, only_client=-2)


def test_iterator_state_round_trips_mid_stream(tmp_path):
  data = build_federated_data(_cfg(source='jsonl', path=str(_corpus(tmp_path)), seq_len=8,
                                   batch_size=4), num_clients=2, seed=0)
  for make in (lambda: data.client_iterator(1), data.centralized_iterator):
    it = make()
    _take(it, 7)
    state = it.get_state()
    expected = _take(it, 40)  # crosses an epoch boundary
    restored = make()
    restored.set_state(state)
    for a, b in zip(expected, _take(restored, 40)):
      np.testing.assert_array_equal(a, b)


def test_val_batches(tmp_path):
  data = build_federated_data(_cfg(source='jsonl', path=str(_corpus(tmp_path)), seq_len=4,
                                   batch_size=2, val_fraction=0.2), num_clients=3, seed=0)
  per_client = [np.concatenate(data.val_batches(1000, client=k)) for k in range(3)]
  everything = np.concatenate(per_client)
  batches = data.val_batches(7)
  assert all(b.dtype == np.int32 and b.shape[1] == 5 for b in batches)
  assert [len(b) for b in batches] == [7] * (len(everything) // 7) + (
      [len(everything) % 7] if len(everything) % 7 else [])
  # The same windows, interleaved client by client: any prefix covers every client.
  assert sorted(map(tuple, np.concatenate(batches))) == sorted(map(tuple, everything))
  first = np.concatenate(batches)[:3]
  np.testing.assert_array_equal(first, np.stack([p[0] for p in per_client]))
  assert len(data.val_batches(7, max_batches=2)) == 2
  np.testing.assert_array_equal(data.val_batches(7)[0], batches[0])
  with pytest.raises(ValueError, match=r'client must be in \[0, 3\)'):
    data.val_batches(7, client=3)


def test_validation_is_held_out_per_client_and_disjoint_from_training(tmp_path):
  data = build_federated_data(_cfg(source='jsonl', path=str(_corpus(tmp_path)), seq_len=1,
                                   batch_size=1, shuffle=False, val_fraction=0.3),
                              num_clients=2, seed=0)
  tok = data.tokenizer
  for k in range(2):
    n = data.client_num_tokens(k)
    train = np.concatenate(_take(data.client_iterator(k), n))
    val = np.concatenate(data.val_batches(1, client=k))
    train_docs = set(tok.decode(train[:, 0]).split('<|endoftext|>')[:-1])
    val_docs = set(tok.decode(val[:, 0]).split('<|endoftext|>')[:-1])
    assert val_docs and not train_docs & val_docs


def test_too_small_client_names_client_and_tokens(tmp_path):
  cfg = _cfg(source='jsonl', path=str(_corpus(tmp_path)), seq_len=64, batch_size=32)
  message = (r'^client 0 has \d+ training tokens \(\d+ documents in all\) = \d+ windows .*'
             r'lower data.seq_len, data.batch_size or fl.num_clients')
  with pytest.raises(ValueError, match=message):
    build_federated_data(cfg, num_clients=4, seed=0)


def test_empty_validation_set_names_client(tmp_path):
  path = tmp_path / 'one.jsonl'  # a single document cannot be split into train and validation
  path.write_text('{"text": "a long enough training document"}\n')
  cfg = _cfg(source='jsonl', path=str(path), seq_len=4, batch_size=1)
  with pytest.raises(ValueError, match=r'^client 0 has an empty validation set \(\d+ held-out'):
    build_federated_data(cfg, num_clients=1, seed=0)


def test_empty_corpus_names_the_path(tmp_path):
  path = tmp_path / 'blank.txt'
  path.write_text('\n\n \n')
  with pytest.raises(ValueError, match=re.escape(str(path))):
    build_federated_data(_cfg(source='text', path=str(path)), num_clients=1, seed=0)


def test_by_source_mixes_formats_one_client_each(tmp_path):
  play = '\n\n'.join(f'ACT {i}\nTo be or not to be.' for i in range(30))
  (tmp_path / 'play.txt').write_text(play)
  cfg = _cfg(source='text', path=f'{_corpus(tmp_path)},{tmp_path}/play.txt', seq_len=8,
             batch_size=2, partition='by_source')
  data = build_federated_data(cfg, num_clients=2, seed=0)
  text = [data.tokenizer.decode(np.concatenate(data.val_batches(100, client=k)).ravel())
          for k in range(2)]
  assert 'document' in text[0] and 'ACT' not in text[0]
  assert 'ACT' in text[1] and 'document' not in text[1]


@pytest.mark.skipif(not (C4.exists() and NEOX.exists()), reason=f'{SHARED}/data is absent')
def test_real_c4_sample_with_neox_dirichlet_by_domain():
  cfg = _cfg(source='jsonl', path=str(C4), tokenizer=str(NEOX), seq_len=256, batch_size=8,
             partition='dirichlet', max_documents=400)
  data = build_federated_data(cfg, num_clients=4, seed=0)
  batch = next(data.client_iterator(3))
  assert batch.shape == (8, 257) and batch.max() < data.tokenizer.vocab_size


def test_processes_load_their_blocks_of_the_same_batches(tmp_path):
  """Two processes (`fedjax_pt.distributed`) each read half the rows of every batch: stacked in
  process order they are one process's batches, through two epochs, and the iterators' positions
  (what a checkpoint saves) are the same on both and on one process."""
  cfg = _cfg(source='jsonl', path=str(_corpus(tmp_path)), seq_len=8, batch_size=4)
  whole = build_federated_data(cfg, num_clients=2, seed=3)
  halves = [build_federated_data(cfg, num_clients=2, seed=3, process_rows=(i, 2))
            for i in range(2)]
  steps = 2 * whole.client_num_tokens(1) // (8 * 4) + 3  # past two epochs
  for make in (lambda d: d.client_iterator(1), lambda d: d.centralized_iterator(),
               lambda d: d.client_iterator(0, batch_size=2)):
    one, parts = make(whole), [make(h) for h in halves]
    for _ in range(steps):
      rows = [next(p) for p in parts]
      assert rows[0].shape[0] == rows[1].shape[0] > 0
      np.testing.assert_array_equal(np.concatenate(rows), next(one))
    assert parts[0].get_state() == parts[1].get_state() == one.get_state()
