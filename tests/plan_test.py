"""The planner: its memory formula against XLA's compiled figure, its time model and break-even
bandwidth against hand-computed numbers, every paper config planned in bounded time without
allocating the model, and one-line errors for bad flags."""

import dataclasses
import importlib
import math
import os
import resource
import subprocess
import sys
import time

import jax
import pytest

from fedjax_pt.configs import tiny
from fedjax_pt.planning import devices
from fedjax_pt.planning import memory
from fedjax_pt.planning import planner as plan
from fedjax_pt import sharding
from fedjax_pt.planning import wallclock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_formula_is_within_20_percent_of_xla_for_the_tiny_config():
  spec, model_cfg = plan.one_client_spec(tiny.get_config())
  assert spec.mesh.fsdp == 8  # conftest's 8 devices: the default mesh shards over all of them
  est = memory.estimate(spec, model_cfg, 'cpu')
  xla = memory.xla_analysis(spec, model_cfg)
  assert xla.compiled_layers == (2,)  # compiled whole: nothing extrapolated
  assert 0.8 <= est.local / xla.total <= 1.2, (est.local, xla.total)  # measured 1.02


def test_xla_figures_extrapolated_from_1_and_2_layers_match_a_full_compile():
  config = tiny.get_config()
  config.model.num_layers = 3
  spec, model_cfg = plan.one_client_spec(config)
  extrapolated = memory.xla_analysis(spec, model_cfg)
  assert extrapolated.compiled_layers == (1, 2)
  full = memory._analysis(memory._lower(spec, model_cfg, sharding.Layout.create(spec.mesh)))
  argument, output, alias, temp = (int(x) for x in full)
  # Parameters and Adam moments grow by exactly one block's per layer.
  assert (extrapolated.argument, extrapolated.output, extrapolated.alias) == (argument, output,
                                                                                alias)
  assert extrapolated.temp == pytest.approx(temp, rel=0.01)  # measured 0.3% at 3 layers


# 2 clients of 2 devices, 1000 tokens a step at 1e9 FLOPs each, 1e12 FLOP/s x MFU 0.5 per device:
# a local step computes for 1000 x 1e9 / (2 x 1e12 x 0.5) = 1 s. Links of 8 Mbit/s (1 MB/s) with
# 10 ms per message.
_WORK = wallclock.Workload(tokens_per_step=1000, flops_per_token=1e9, local_steps=10, clients=2,
                           rounds=3, upload_bytes=1_000_000, download_bytes=2_000_000,
                           gradient_bytes=4_000_000)
_HW = wallclock.Hardware(peak_flops=1e12, devices_per_client=2, mfu=0.5, bandwidth_bps=8e6,
                         latency_s=0.01)


def test_the_time_model_against_hand_computed_numbers():
  p = wallclock.predict(_WORK, _HW)
  assert p.step_compute_s == pytest.approx(1.0)
  # Federated: 2 MB down + 1 MB up at 1 MB/s, one message each way; tau = 10 steps of compute.
  assert p.federated_comm_s == pytest.approx(3.02)
  assert p.federated_round_s == pytest.approx(13.02)
  assert p.federated_run_s == pytest.approx(39.06)
  assert p.federated_bytes == 3 * 2 * 3_000_000  # rounds x clients x (up + down)
  # DDP: ring all-reduce of 4 MB over 2 workers, 2 (K - 1) / K x 4 MB = 4 MB a worker in
  # 2 (K - 1) = 2 messages: 4.02 s, of which the backward pass (2/3 s) hides 2/3 s.
  assert p.ddp_comm_s == pytest.approx(4.02)
  assert p.ddp_step_s == pytest.approx(1 + 4.02 - 2 / 3)
  assert p.ddp_run_s == pytest.approx(30 * (1 + 4.02 - 2 / 3))  # the same tokens: 3 x 10 steps
  assert p.ddp_bytes == 2 * 1 * 4_000_000 * 30  # 2 (K - 1) x M x steps, all workers
  assert p.communication_ratio == pytest.approx(240 / 18)


def test_break_even_bandwidth_by_hand():
  # Per token, DDP sends 2 (K - 1) / K x M - (U + D) / tau = 4e6 - 3e5 bytes a step more, and
  # the slack is 2/3 C + 2 latency / tau - 2 (K - 1) latency = 2/3 + 0.002 - 0.02 s.
  expected = 8 * 3.7e6 / (2 / 3 + 0.002 - 0.02)
  assert wallclock.break_even_bps(_WORK, _HW) == pytest.approx(expected)
  assert expected == pytest.approx(45.63e6, rel=1e-3)
  # At that bandwidth the two take the same time per token; slower links favour federated.
  at = lambda bps: wallclock.predict(_WORK, dataclasses.replace(_HW, bandwidth_bps=bps))
  even = at(expected)
  assert even.federated_round_s == pytest.approx(even.ddp_round_s)
  assert at(expected / 2).federated_round_s < at(expected / 2).ddp_round_s
  assert at(expected * 2).federated_round_s > at(expected * 2).ddp_round_s
  assert wallclock.faster_at_every_bandwidth(_WORK, _HW) is None
  # Half a second per message: DDP's 2 messages a step cost more than its overlap can hide.
  slow = dataclasses.replace(_HW, latency_s=0.5)
  assert wallclock.break_even_bps(_WORK, slow) is None
  assert wallclock.faster_at_every_bandwidth(_WORK, slow) == 'federated'
  # tau = 1 with float32 both ways: a client sends 2 M a step, more than DDP's 2 (K - 1) / K M.
  every_step = dataclasses.replace(_WORK, local_steps=1, upload_bytes=4_000_000,
                                   download_bytes=4_000_000)
  assert wallclock.break_even_bps(every_step, _HW) is None
  assert wallclock.faster_at_every_bandwidth(every_step, _HW) == 'DDP'


def test_the_smallest_and_largest_paper_configs_are_planned_without_allocating_the_model():
  hardware = wallclock.Hardware(peak_flops=989e12, devices_per_client=8, mfu=0.4,
                                bandwidth_bps=1e9, latency_s=0.01)
  rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  # 125m and 350m lie between (their parameter counts: tests/model_test.py).
  for name, params in (('75m', '74,954,880'), ('1p3b', '1,315,407,872')):
    start = time.perf_counter()
    report = plan.full_plan(importlib.import_module(f'fedjax_pt.configs.{name}').get_config(),
                            devices.accelerator('h100'), hardware)
    seconds = time.perf_counter() - start
    assert seconds < 60, (name, seconds)  # 10-15 s each on 2 busy cores
    assert f'model: {params}' in report and 'memory per device, XLA: ' in report
    assert 'break-even bandwidth: ' in report
  assert sum(x.nbytes for x in jax.live_arrays()) < 2**20
  # Allocating 1p3b's float32 parameters alone would take 5.3 GB.
  assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before < 4e9


def test_a_cudnn_config_is_planned_on_a_host_without_cudnn():
  """cuDNN's attention cannot be traced or compiled here: the shapes come from the XLA path (the
  parameters are the same), XLA's analysis is skipped with a reason, the formula counts no
  [L, L] attention probabilities."""
  config = tiny.get_config()
  config.model.attention = 'cudnn'
  config.mesh.fsdp = 1
  hardware = wallclock.Hardware(peak_flops=989e12, devices_per_client=1, mfu=0.4,
                                bandwidth_bps=1e9, latency_s=0.01)
  report = plan.full_plan(config, devices.accelerator('h100'), hardware)
  assert 'memory per device, XLA: not analysed: model.attention=cudnn compiles only' in report
  xla_path = config.copy_and_resolve_references()
  xla_path.model.attention = 'xla'
  spec, cudnn_cfg = plan.one_client_spec(config)
  _, xla_cfg = plan.one_client_spec(xla_path)
  assert (memory.estimate(spec, cudnn_cfg, 'gpu').activations <
          memory.estimate(spec, xla_cfg, 'gpu').activations)


def test_a_measured_throughput_and_the_transport_clock_by_hand():
  # 1000 tokens a step at a measured 250 tokens/s: 4 s a step, whatever the MFU; at 1e9 FLOPs a
  # token on 2 x 1e12 FLOP/s that is MFU 1000 x 1e9 / (4 x 2e12) = 0.125.
  measured = dataclasses.replace(_HW, tokens_per_s=250.0)
  assert wallclock.step_compute_s(_WORK, measured) == pytest.approx(4.0)
  assert wallclock.implied_mfu(_WORK, measured) == pytest.approx(0.125)
  assert wallclock.implied_mfu(_WORK, _HW) == pytest.approx(0.5)
  # fl.clock: 5 s a round trip and 3 MB at 12 Mbit/s (2 s) on top of the link's 3.02 s.
  clock = wallclock.ClockConfig(round_trip_s=5.0, transport_mbps=12.0)
  p = wallclock.predict(_WORK, dataclasses.replace(_HW, clock=clock))
  assert p.federated_comm_s == pytest.approx(3.02 + 5.0 + 2.0)
  assert p.federated_round_s == pytest.approx(10.0 + 10.02)
  assert p.ddp_step_s == pytest.approx(1 + 4.02 - 2 / 3)  # DDP's collectives pay no fl.clock
  # Break-even: the slack gains the transport's 7 s a round over tau = 10 steps.
  expected = 8 * 3.7e6 / (2 / 3 + 0.002 + 0.7 - 0.02)
  hw = dataclasses.replace(_HW, clock=clock)
  assert wallclock.break_even_bps(_WORK, hw) == pytest.approx(expected)
  even = wallclock.predict(_WORK, dataclasses.replace(hw, bandwidth_bps=expected))
  assert even.federated_round_s == pytest.approx(even.ddp_round_s)


def test_the_overlapped_round_by_hand():
  """fl.overlap in steady state: 10 s of compute and 3.02 s of communication a round: hidden,
  10 s; with fl.clock's 7 s more it is 10.02 s of communication: (10 + 10.02) / 2."""
  assert wallclock.predict(_WORK, _HW).overlapped_round_s == pytest.approx(10.0)
  clock = wallclock.ClockConfig(round_trip_s=5.0, transport_mbps=12.0)
  p = wallclock.predict(_WORK, dataclasses.replace(_HW, clock=clock))
  assert p.overlapped_round_s == pytest.approx((10.0 + 10.02) / 2)
  config = tiny.get_config()
  config.fl.overlap = True
  text = plan.full_plan(config, devices.accelerator('h100'),
                        dataclasses.replace(_HW, devices_per_client=8))
  assert 'fl.overlap: a round ' in text and 'comparisons below are for synchronous' in text


def test_the_plan_prints_the_measured_throughput_and_the_clock():
  config = tiny.get_config()
  config.fl.clock.round_trip_s, config.fl.clock.transport_mbps = 9.5, 400.0
  hardware = wallclock.Hardware(peak_flops=1e12, devices_per_client=8, mfu=0.4, bandwidth_bps=1e9,
                                latency_s=0.01, tokens_per_s=2048.0)
  text = plan.full_plan(config, devices.accelerator('h100'), hardware)
  assert 'compute: 2,048 tokens / 2,048 tokens/s = 1 s per local step [measured' in text
  assert 'transport: 9.5 s a round trip, and moves the bytes at 400 Mbit/s' in text
  assert 'MFU 0.4 assumed' not in text
  text = plan.full_plan(tiny.get_config(), devices.accelerator('h100'),
                        dataclasses.replace(hardware, tokens_per_s=None))
  assert 'MFU 0.4 assumed' in text and 'transport: ideal' in text


@pytest.mark.parametrize('flags, message', [
    (('h100', 8, 0.4, 1000, 10, -1.0), '--tokens_per_s must be a finite number >= 0'),
    (('v100', 8, 0.4, 1000, 10), '--gpu must be one of h100, h200, a100, l4, cpu'),
    (('h100', 0, 0.4, 1000, 10), '--gpus_per_client must be in'),
    (('h100', 8, 0.0, 1000, 10), '--mfu must be in (0, 1]'),
    (('h100', 8, 1.5, 1000, 10), '--mfu must be in (0, 1]'),
    (('h100', 8, 0.4, -5, 10), '--bandwidth_mbps must be positive'),
    (('h100', 8, 0.4, math.inf, 10), '--bandwidth_mbps must be a finite number, got inf'),
    (('h100', 8, 0.4, 1000, math.nan), '--latency_ms must be a finite number, got nan'),
])
def test_bad_flags_name_the_flag(flags, message):
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(']', r'\]')):
    plan.check_flags(*flags)


def test_too_many_devices_per_client_are_refused_before_xla_makes_them():
  """100,000 CPU devices would take XLA minutes to make: the flag is checked first."""
  result = subprocess.run(
      [sys.executable, '-m', 'fedjax_pt.plan', '--config=configs/tiny.py',
       '--gpus_per_client=100000'], cwd=REPO, capture_output=True, text=True, timeout=120,
      check=False, env={**os.environ, 'PYTHONPATH': REPO})
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      'fedjax_pt: error: --gpus_per_client must be in [1, 1024] (XLA compiles the step on as '
      'many CPU devices), got 100000')


def test_the_cli_reports_a_bad_flag_in_one_line_with_exit_2():
  result = subprocess.run(
      [sys.executable, '-m', 'fedjax_pt.plan', '--config=configs/tiny.py', '--mfu=1.5'],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
      env={**os.environ, 'PYTHONPATH': REPO})
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith('fedjax_pt: error:')]
  assert lines == ['fedjax_pt: error: --mfu must be in (0, 1], got 1.5'], result.stderr[-2000:]
  assert result.stdout == ''
