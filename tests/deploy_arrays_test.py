"""Pytrees through Flower ArrayRecords and through both transports: the same bits come back."""

import jax
import ml_dtypes
import numpy as np
import pytest

from fedjax_pt.deploy import arrays
from fedjax_pt.deploy import transport


def _tree():
  rng = np.random.default_rng(0)
  # Keys out of order on purpose: the record follows the tree's own (sorted) order.
  return {'z_last': {'w': rng.standard_normal((3, 5)).astype(np.float32)},
          'emb': rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16),
          'a_first': {'count': np.array(7, np.int32), 'nan': np.array([np.nan, 1.0], np.float32)}}


def _assert_same_bits(a, b):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape, path
    assert x.tobytes() == y.tobytes(), path


def test_record_round_trip_keeps_keys_dtypes_and_bits():
  tree = _tree()
  record = arrays.to_record(tree)
  assert sorted(record.keys()) == ['a_first/count', 'a_first/nan', 'emb', 'z_last/w']
  back = arrays.from_record(record, arrays.abstract(tree))
  assert back['emb'].dtype == ml_dtypes.bfloat16  # np.save alone would give raw '|V2'
  _assert_same_bits(tree, back)


def test_a_record_that_does_not_fit_the_model_is_refused():
  tree = _tree()
  record = arrays.to_record(tree)
  like = arrays.abstract(tree)
  like['z_last']['w'] = jax.ShapeDtypeStruct((5, 3), np.float32)
  with pytest.raises(ValueError, match=r'z_last/w: got float32\[3, 5\], the model has'):
    arrays.from_record(record, like)
  del like['emb']
  with pytest.raises(ValueError, match=r"unexpected \['emb'\]"):
    arrays.from_record(record, like)


def test_digest_changes_with_any_bit():
  tree = _tree()
  assert arrays.digest(tree) == arrays.digest(jax.tree.map(np.copy, tree))
  tree['z_last']['w'][1, 2] = np.nextafter(tree['z_last']['w'][1, 2], np.float32(np.inf))
  assert arrays.digest(tree) != arrays.digest(_tree())


@pytest.mark.parametrize('kind', transport.TRANSPORTS)
def test_both_transports_deliver_the_same_bits(kind, tmp_path):
  tree = _tree()
  move = transport.make(kind, str(tmp_path / 'shared'))
  content = move.put(tree, 'run/round-1/attempt-0/global')
  _assert_same_bits(tree, move.get(content, arrays.abstract(tree)))
  move.discard('run/round-1')
  assert not (tmp_path / 'shared' / 'run' / 'round-1').exists()


def test_shared_transport_refuses_arrays_that_are_not_what_was_sent(tmp_path):
  move = transport.make('shared', str(tmp_path))
  content = move.put(_tree(), 'x')
  other = _tree()
  other['a_first']['count'] = np.array(8, np.int32)
  content['ref']['sha256'] = arrays.digest(other)
  with pytest.raises(ValueError, match='SHA-256 differs'):
    move.get(content, arrays.abstract(other))
  with pytest.raises(ValueError, match="'shared' transport needs a directory"):
    transport.make('shared', '')
