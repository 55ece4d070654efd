"""Norms, bytes and writers against hand-computed values."""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pt import metrics
from fedjax_pt import optimizers
from fedjax_pt import reporting

TREE = {'wte': {'embedding': jnp.array([[3.0, 0.0], [0.0, 4.0]])},  # norm 5
        'block_0': {'scale': jnp.array([1.0, 2.0, 2.0])}}  # norm 3


def test_l2_norm_and_per_module_norms():
  np.testing.assert_allclose(metrics.l2_norm(TREE), math.sqrt(25 + 9), rtol=1e-6)
  norms = metrics.per_module_norms(TREE)
  np.testing.assert_allclose([norms['wte'], norms['block_0']], [5.0, 3.0], rtol=1e-6)


def test_distance_is_norm_of_difference():
  other = {'wte': {'embedding': jnp.array([[3.0, 1.0], [0.0, 4.0]])},
           'block_0': {'scale': jnp.array([1.0, 2.0, 0.0])}}
  np.testing.assert_allclose(metrics.distance(TREE, other), math.sqrt(1 + 4), rtol=1e-6)


def test_tree_bytes_for_known_parameter_count():
  # 4 + 3 = 7 float32 values = 28 bytes; a 1.31B-parameter model is 5.26 GB each way.
  assert metrics.tree_bytes(TREE) == 28
  assert metrics.tree_bytes({'a': jnp.zeros((10, 10), jnp.bfloat16)}) == 200


@pytest.mark.parametrize('name, expected', [('nesterov', 5.0), ('sgd', 5.0), ('adam', 0.5)])
def test_outer_momentum_norm(name, expected):
  params = {'w': jnp.zeros(2)}
  tx = optimizers.outer_optimizer(name, lr=1.0, momentum=0.9)
  state = tx.init(params)
  _, state = tx.update({'w': jnp.array([3.0, 4.0])}, state, params)
  # After one step the first moment is g (SGD trace) or (1 - b1) g = 0.1 g (Adam mu).
  np.testing.assert_allclose(metrics.outer_momentum_norm(state), expected, rtol=1e-6)
  assert metrics.outer_momentum_norm(optimizers.outer_optimizer(
      'sgd', 1.0, 0.0).init(params)) == 0.0


def test_perplexity_does_not_overflow():
  assert metrics.perplexity(1.0) == pytest.approx(math.e)
  assert math.isfinite(metrics.perplexity(1e6))


def test_writer_writes_parseable_json_and_tensorboard(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write({'kind': 'round', 'round': 1, 'tokens': 10, 'val_loss': float('nan'),
                'val_ppl': None, 'client_train_loss': {3: np.float32(1.5)}, 'clients': [3]})
  writer.write({'kind': 'step', 'round': 1, 'client': 3, 'step': 2, 'local_step': 2, 'loss': 1.0,
                'grad_norm': 2.0, 'update_norm': 0.1, 'lr': 1e-3})
  writer.close()
  with open(tmp_path / 'metrics.jsonl', encoding='utf-8') as f:
    lines = [json.loads(line) for line in f]  # strict JSON: NaN is written as null
  assert lines[0]['val_loss'] is None and lines[0]['client_train_loss'] == {'3': 1.5}
  events = os.listdir(tmp_path / 'tensorboard')
  assert len(events) == 1 and os.path.getsize(tmp_path / 'tensorboard' / events[0]) > 0


def test_read_jsonl_skips_a_torn_last_line(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"kind": "round", "round": 1}\n{"kind": "ro')
  assert metrics.read_jsonl(str(path)) == [{'kind': 'round', 'round': 1}]


def test_summary_table():
  rounds = [{'round': 1, 'val_ppl': 30.0, 'tokens': 100, 'bytes_sent': 2e6, 'bytes_received': 2e6},
            {'round': 2, 'val_ppl': 20.0, 'tokens': 200, 'bytes_sent': 4e6, 'bytes_received': 4e6},
            {'round': 3, 'val_ppl': None, 'tokens': 300, 'bytes_sent': 6e6, 'bytes_received': 6e6}]
  table = reporting.summary_table(rounds, 12.0)
  assert 'best val_ppl                        20.000 (round 2)' in table
  assert '6.00 MB' in table and '300' in table
