"""What a person watching a run sees: the progress bar's count, round lines."""

import math
import re

from fedjax_pt.configs import tiny
from fedjax_pt import build
from fedjax_pt import records
from fedjax_pt import reporting
from fedjax_pt.run_spec import RunSpec


def test_the_bar_counts_every_step_of_retried_rounds_and_parallel_groups():
  """The progress total follows retries, and crashed or empty slots of a parallel group count
  once: after every round the bar is exactly full."""
  config = tiny.get_config('test')
  config.fl.fault.failure_prob, config.fl.min_clients = 0.5, 4
  config.fl.max_round_retries = 4
  config.mesh.clients, config.mesh.fsdp = 2, 1
  spec = RunSpec.from_config(config)
  parts = build.build(spec, build.model_config(config))
  progress = reporting.Progress(spec.fl.rounds * 4 * spec.fl.local_steps, enabled=False)
  algorithm, clients = build.round_object(parts, progress)
  state = algorithm.init(parts.model.params)
  progress.begin()
  retries = 0
  for round_idx in range(1, spec.fl.rounds + 1):
    state, result = algorithm.apply(state, round_idx, clients)
    retries += result.stats.retries
  assert retries > 0  # seed 0 at failure_prob 0.5 retries: the case under test happened
  assert progress.done == progress.total > spec.fl.rounds * 4 * spec.fl.local_steps


def test_round_line():
  record = records.RoundRecord(round=3, tokens=12_345, val_loss=2.0, val_ppl=7.389,
                               train_loss=2.5, round_time_s=1.5, tokens_per_s=8230.0,
                               pseudo_grad_norm=0.25, failed_clients={1: 'late'}, skipped=False)
  line = reporting.round_line(record, 10)
  assert line == ('round 3/10 | val_loss 2.0000 | val_ppl 7.39 | train_loss 2.5000 | tokens '
                  '12.35k | 1.5s (8.23k tok/s) | pseudo-grad 0.25 | 1 client faults')


def test_the_initial_model_and_a_destroyed_one_read_well():
  initial = records.RoundRecord(round=0, tokens=0, val_loss=5.888, val_ppl=360.73)
  assert reporting.round_line(initial, 10) == ('round 0/10 | val_loss 5.8880 | val_ppl 360.73 | '
                                                'the initial model')
  destroyed = records.RoundRecord(round=1, tokens=10, val_loss=700.0, val_ppl=1.01e304,
                                  round_time_s=1.0, tokens_per_s=10.0)
  assert 'val_ppl 1.01e+304 |' in reporting.round_line(destroyed, 10)
  assert 'final val_ppl                       1.01e+304' in reporting.summary_table([destroyed], 1)


def test_more_bytes_than_data_parallel_training_is_said_so():
  rounds = [records.RoundRecord(round=1, tokens=100, bytes_sent=1_000_000,
                                bytes_received=1_000_000, ddp_equivalent_bytes=500_000)]
  assert '4.0x more communication than DDP (500.00 kB)' in reporting.summary_table(rounds, 1.0)


def test_privacy_in_the_round_line_and_the_summary():
  record = records.RoundRecord(round=2, tokens=10, val_loss=2.0, val_ppl=7.389, round_time_s=1.0,
                               tokens_per_s=10.0, dp_epsilon=7.9412, dp_delta=1e-5)
  assert reporting.round_line(record, 2).endswith('| ε 7.94')
  assert '(7.94, 1e-05)-DP for each client (fl.dp)' in reporting.summary_table([record], 1.0)
  record.dp_epsilon = math.inf
  assert 'none: epsilon = inf' in reporting.summary_table([record], 1.0)


def test_a_client_that_failed_in_every_round_is_named_in_the_summary():
  rounds = [records.RoundRecord(round=r, tokens=10 * r, clients=[0, 1],
                                failed_clients={1: 'raised ValueError: no file /data/x (node 7)'},
                                round_time_s=1.0) for r in (1, 2)]
  rounds[0].failed_clients[0] = 'late: no reply'  # client 0 failed once, then trained
  table = reporting.summary_table(rounds, 2.0)
  assert re.search(r'\nclient 1 +failed in every round it was sampled: raised ValueError: no file '
                   r'/data/x \(node 7\)$', table)
  assert 'client 0' not in table
