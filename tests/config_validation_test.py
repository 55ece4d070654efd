"""Every inconsistent config is reported in one line naming the key, before data or compilation."""

import time

import pytest

from fedjax_pt.configs import tiny
from fedjax_pt import train


def _set(config, dotted, value):
  *groups, name = dotted.split('.')
  node = config
  for group in groups:
    node = node[group]
  node[name] = value


@pytest.mark.parametrize('key, value, message', [
    ('data.micro_batch_size', 5, 'data.batch_size=16 is not divisible by data.micro_batch_size=5'),
    ('model.max_seq_len', 64, 'data.seq_len=128 exceeds model.max_seq_len=64'),
    ('fl.clients_per_round', 5, 'fl.clients_per_round=5 exceeds fl.num_clients=4'),
    ('fl.num_clients', 0, 'fl.num_clients must be positive'),
    ('fl.local_steps', -1, 'fl.local_steps must be positive'),
    ('fl.rounds', 0, 'fl.rounds must be positive'),
    ('data.batch_size', 0, 'data.batch_size must be a positive integer'),
    ('data.seq_len', -8, 'data.seq_len must be a positive integer'),
    ('model.num_layers', 0, 'model.num_layers must be positive'),
    ('model.num_heads', 3, 'model.d_model=128 is not divisible by model.num_heads=3'),
    ('opt.lr', -1.0, 'opt.lr must be positive'),
    ('opt.warmup_steps', 300, 'opt.warmup_steps=300 must be smaller than opt.schedule_steps=250'),
    ('eval.batch_size', 0, 'eval.batch_size must be positive'),
    ('ckpt.keep', 0, 'ckpt.keep must be positive'),
    ('mode', 'fedavg', "mode must be 'federated' or 'centralized'"),
    ('fl.compression.upload', 'fp8', "fl.compression.upload must be one of ('none', 'bf16', "),
    ('fl.compression.block_size', 7, 'fl.compression.block_size must be an even integer'),
    ('fl.fragments', 26, 'fl.fragments=26 exceeds fl.local_steps=25'),
    ('fl.fragment_mixing', 1.0, 'fl.fragment_mixing must be in [0, 1)'),
    ('data.tokenizer', 'missing/tokenizer.json', 'missing/tokenizer.json'),
    # `x <= 0` is False for NaN: every key is checked for finiteness first.
    ('opt.lr', float('nan'), 'opt.lr must be a finite number, got nan'),
    ('opt.lr', float('inf'), 'opt.lr must be a finite number, got inf'),
    ('fl.outer_lr', float('nan'), 'fl.outer_lr must be a finite number, got nan'),
    ('fl.round_timeout_s', float('-inf'), 'fl.round_timeout_s must be a finite number, got -inf'),
    ('mesh.num_processes', -1, 'mesh.num_processes must be an integer >= 0, got -1'),
    ('mesh.num_processes', 2, 'mesh.num_processes=2 needs mesh.coordinator'),
    ('mesh.process_id', 1, 'mesh.process_id=1 / mesh.coordinator=\'\' join a multi-process run'),
    ('mesh.coordinator', 'localhost', "mesh.coordinator must be 'host:port', got 'localhost'"),
    ('mesh.heartbeat_timeout_s', 0, 'mesh.heartbeat_timeout_s must be a positive integer'),
    ('opt.b2', 1.0, 'opt.b2 must be in [0, 1)'),
    ('opt.eps', -1e-8, 'opt.eps must be positive'),
    ('opt.weight_decay', -0.1, 'opt.weight_decay must be >= 0'),
    ('opt.grad_clip', -1.0, 'opt.grad_clip must be >= 0 (0: no clipping)'),
    ('init.step', 2**32, 'init.step=4294967296: the run would end past step 2**31'),
    ('fl.profiles', '[{"time_budget_s": 1e300, "tokens_per_s": 1e300}]',
     'time_budget_s x tokens_per_s = 1e+300 x 1e+300 overflows'),
    # Keys that the rest of the config switches off are refused, not silently ignored.
    ('fl.dp.noise_multiplier', 0.5, 'fl.dp.noise_multiplier is set but fl.dp.enabled=False'),
    ('fl.secagg.clip_range', 2.0, 'fl.secagg.clip_range is set but fl.secagg.enabled=False'),
    ('fl.compression.block_size', 128, 'fl.compression.block_size=128 is set, but only the int8'),
    ('fl.compression.error_feedback', True, "with fl.compression.upload='none'"),
    ('fl.aggregation_trim', 2.0, "fl.aggregation_trim=2.0 is set but fl.aggregation='mean'"),
    ('fl.aggregation_clip', 3.0, "fl.aggregation_clip=3.0 is set but fl.aggregation='mean'"),
    ('fl.fault.poison_clients', (0,), "fl.fault.poison_clients=(0,) is set but fl.fault.poison="),
    # Robust aggregation and poisoned clients (fedjax_pt/federated/robust.py).
    ('fl.aggregation', 'median', "fl.aggregation='median' counts each client once"),
    ('fl.fault.poison', 'scale', "fl.fault.poison='scale' names no client"),
    ('fl.fault.poison', 'flip', "fl.fault.poison must be one of ('none', 'scale'"),
    ('opt.muon_lr', 0.01, "opt.muon_lr=0.01 is set but opt.optimizer='adamw', which ignores it"),
    ('opt.optimizer', 'lion', "opt.optimizer must be one of ('adamw', 'muon'), got 'lion'"),
])
def test_config_error_is_one_line_and_immediate(tmp_path, key, value, message):
  config = tiny.get_config()
  _set(config, key, value)
  start = time.perf_counter()
  with pytest.raises((ValueError, FileNotFoundError)) as info:
    train.run(config, str(tmp_path / 'run'))
  assert message in str(info.value) and '\n' not in str(info.value)
  assert time.perf_counter() - start < 5.0  # nothing was tokenized or compiled
  assert not (tmp_path / 'run').exists()


def test_per_client_evaluation_of_a_centralized_run_is_refused(tmp_path):
  config = tiny.get_config()
  config.mode, config.eval.per_client = 'centralized', True
  with pytest.raises(ValueError, match="eval.per_client=True evaluates the global model on each"):
    train.run(config, str(tmp_path / 'run'))


def test_a_block_larger_than_every_array_is_refused(tmp_path):
  """2**33 values a block: every array would be padded to 32 GiB of messages."""
  config = tiny.get_config()
  config.fl.compression.upload, config.fl.compression.block_size = 'int8', 2**33
  with pytest.raises(ValueError, match=r'fl.compression.block_size=8589934592 exceeds the largest '
                                       r'parameter array \(block_0.mlp.down_proj.kernel, 65536 '
                                       r'values\)'):
    train.run(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('overrides, message', [
    ({'fl.aggregation': 'median', 'fl.weighting': 'uniform', 'fl.secagg.enabled': True},
     "fl.aggregation='median' cannot be used with fl.secagg: it shows the server only the"),
    ({'fl.aggregation': 'norm_clipped', 'fl.dp.enabled': True},
     "fl.aggregation='norm_clipped' cannot be used with fl.dp: it calibrates its noise"),
    ({'fl.aggregation': 'trimmed_mean', 'fl.weighting': 'uniform', 'fl.aggregation_trim': 2.0},
     'fl.aggregation_trim=2.0 trims 2 of fl.clients_per_round=4 clients from each end'),
    ({'fl.fault.poison': 'sign_flip', 'fl.fault.poison_clients': (4,)},
     'fl.fault.poison_clients=(4,) must name distinct clients in 0..3'),
    ({'fl.fault.poison': 'noise', 'fl.fault.poison_clients': (0,), 'fl.fault.poison_scale': 2.0},
     "fl.fault.poison_scale=2.0 is set but fl.fault.poison='noise' ignores it"),
])
def test_robust_combinations_that_cannot_work_are_one_line(tmp_path, overrides, message):
  config = tiny.get_config()
  for key, value in overrides.items():
    _set(config, key, value)
  with pytest.raises(ValueError) as info:
    train.run(config, str(tmp_path / 'run'))
  assert message in str(info.value) and '\n' not in str(info.value)
  assert not (tmp_path / 'run').exists()
