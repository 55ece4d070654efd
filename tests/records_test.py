"""Records: typed round and step records to JSON and TensorBoard and back, summaries, crossings."""

import json
import os

import numpy as np
import pytest

from fedjax_pt import records
from fedjax_pt import summaries
from fedjax_pt import reporting


def test_writer_writes_parseable_json_and_tensorboard(tmp_path):
  writer = records.RecordWriter(str(tmp_path))
  writer.write(records.RoundRecord(round=1, tokens=10, val_loss=float('nan'),
                                   client_train_loss={3: np.float32(1.5)}, clients=[3]))
  writer.write(records.StepRecord(round=1, client=3, step=2, local_step=2, loss=1.0,
                                  grad_norm=2.0, update_norm=0.1, lr=1e-3))
  writer.close()
  with open(tmp_path / 'metrics.jsonl', encoding='utf-8') as f:
    lines = [json.loads(line) for line in f]  # strict JSON: no bare NaN
  assert lines[0]['kind'] == 'round' and lines[1]['kind'] == 'step'
  # A diverged value is the string "nan"; a value not measured (val_ppl here) is null.
  assert lines[0]['val_loss'] == 'nan' and lines[0]['val_ppl'] is None
  assert lines[0]['client_train_loss'] == {'3': 1.5}
  # Keys of the other mode are absent, not null.
  assert 'grad_norm' not in lines[0]
  rounds_events = [f for f in os.listdir(tmp_path / 'tensorboard') if f.startswith('events')]
  steps_events = os.listdir(tmp_path / 'tensorboard' / 'steps')
  assert len(rounds_events) == 1 and len(steps_events) == 1
  assert os.path.getsize(tmp_path / 'tensorboard' / rounds_events[0]) > 0


def test_non_finite_values_round_trip_and_stay_apart_from_missing_ones(tmp_path):
  writer = records.RecordWriter(str(tmp_path), tensorboard=False)
  writer.write(records.RoundRecord(round=1, tokens=1, val_loss=float('inf'), train_loss=None,
                                   client_train_loss={0: float('-inf'), 1: float('nan')}))
  writer.close()
  record = records.read_records(str(tmp_path)).rounds[0]
  assert record.val_loss == float('inf') and record.train_loss is None
  assert record.client_train_loss['0'] == float('-inf') and np.isnan(record.client_train_loss['1'])


def test_records_round_trip(tmp_path):
  record = records.RoundRecord(round=2, tokens=20, val_ppl=3.5, clients=[0, 1],
                               client_norm={0: 1.0, 1: 2.0}, failed_clients={'1@1': 'late'})
  step = records.StepRecord(round=2, client=-1, step=7, local_step=3, loss=1.5, grad_norm=0.5,
                            update_norm=0.25, lr=1e-3)
  writer = records.RecordWriter(str(tmp_path), tensorboard=False)
  writer.write(step)
  writer.write(record)
  writer.close()
  read = records.read_records(str(tmp_path))
  assert read.steps == [step]
  assert read.rounds[0].val_ppl == 3.5 and read.rounds[0].client_norm == {'0': 1.0, '1': 2.0}
  assert read.rounds[0].grad_norm is None


def test_reader_skips_a_torn_last_line_and_unknown_keys(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"kind": "round", "round": 1, "tokens": 5, "future_key": 1}\n{"kind": "ro')
  read = records.read_records(str(path))
  assert [(r.round, r.tokens) for r in read.rounds] == [(1, 5)] and not read.steps


def _rounds(ppls):
  return [records.RoundRecord(round=i + 1, tokens=100 * (i + 1), val_ppl=p, round_time_s=2.0,
                              bytes_sent=2_000_000 * (i + 1), bytes_received=2_000_000 * (i + 1))
          for i, p in enumerate(ppls)]


def test_summarize_and_summary_table():
  rounds = _rounds([30.0, 20.0, None])
  summary = summaries.summarize(rounds)
  assert (summary.rounds, summary.final_val_ppl, summary.best_val_ppl, summary.best_round) == (
      3, 20.0, 20.0, 2)
  assert summary.tokens == 300 and summary.bytes_communicated == 12_000_000
  assert summary.train_time_s == 6.0
  table = reporting.summary_table(rounds, 12.0)
  assert 'best val_ppl                        20.000 (round 2)' in table
  assert '6.00 MB' in table and '300' in table
  empty = summaries.summarize([])
  assert empty.rounds is None and empty.bytes_communicated is None


@pytest.mark.parametrize('a, b, text', [
    ([1, 1, 1], [2, 2, 2], 'below at every evaluation (from step 1; last -50.0%)'),
    ([3, 3, 3], [2, 2, 2], 'above at every evaluation, up to step 3 (last +50.0%)'),
    ([3, 1, 1], [2, 2, 2], 'crosses below between step 1 and step 2 and stays below'),
    ([1, 3, 3], [2, 2, 2], 'below at step 1 only, above from step 2 on (last +50.0%)'),
])
def test_crossing(a, b, text):
  curve_a = summaries.curve(_rounds(a))
  curve_b = summaries.curve(_rounds(b))
  assert summaries.crossing(curve_a, curve_b).describe('step ') == text


def test_curve_scales_x_and_skips_missing_values():
  assert summaries.curve(_rounds([5.0, None, 4.0]), scale=50) == [(50, 5.0), (150, 4.0)]
  assert summaries.crossing([(1, 1.0)], [(2, 1.0)]).describe() == 'no common evaluation'


def test_a_crossing_over_seeds_holds_only_where_every_seed_is_below():
  b = [(1, 10.0), (2, 10.0), (3, 10.0)]
  seed0 = [(1, 9.0), (2, 9.0), (3, 9.0)]  # below everywhere
  seed1 = [(1, 11.0), (2, 9.5), (3, 9.0)]  # above at 1
  seed2 = [(1, 9.0), (2, 10.5), (3, 9.5)]  # above at 2
  both = summaries.crossing_over_seeds([(seed0, b), (seed1, b)])
  assert both.below == (False, True, True)
  # Last gaps -10% and -10%: mean -10.0%, std 0.0%.
  assert both.describe('step ') == 'below for all 2 seeds from step 2 on (last -10.0% ± 0.0%)'
  three = summaries.crossing_over_seeds([(seed0, b), (seed1, b), (seed2, b)])
  assert three.below == (False, False, True)
  # -10%, -10%, -5%: mean -8.33%, sample std 2.89%.
  assert three.describe('step ') == 'below for all 3 seeds from step 3 on (last -8.3% ± 2.9%)'
  # b over seed0 is above everywhere. Last gaps 10/9 - 1 = +11.1% and -10%: mean +0.6%, sample
  # std 21.1% / sqrt(2) = 14.9%.
  never = summaries.crossing_over_seeds([(b, seed0), (seed1, b)])
  assert never.describe() == ('not below for all 2 seeds at any evaluation, up to 3 '
                              '(last +0.6% ± 14.9%)')
  one = summaries.crossing_over_seeds([(seed1, b)])
  assert one.describe('step ') == 'below for its seed from step 2 on (last -10.0%)'
  assert summaries.crossing_over_seeds([(seed0, [(7, 1.0)])]).describe() == 'no common evaluation'


def test_spread_and_seed_names():
  s = summaries.spread([12.0, 10.0, 14.0, float('nan'), None])
  assert (s.mean, s.std, s.min, s.max, s.n) == (12.0, 2.0, 10.0, 14.0, 3)
  assert s.describe() == '12.00 ± 2.00 (10.00–14.00)'
  assert summaries.spread([3.0]).describe('.1f') == '3.0' and summaries.spread([None]) is None
  assert summaries.without_seed('d_model=64,fedavg,seed=12') == 'd_model=64,fedavg'
  assert summaries.without_seed('seed=3,tau=50') == 'tau=50'
  assert summaries.without_seed('myseed=3') == 'myseed=3' and summaries.seed_of('a,seed=4,b') == 4
