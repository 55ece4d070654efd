"""Communication accounting: records carry the encoded sizes, and the data-parallel comparison."""

import jax
import jax.numpy as jnp
import pytest

import oracles
from fedjax_pt.configs import tiny
from fedjax_pt.federated import communication
from fedjax_pt.federated import compression
from fedjax_pt import metrics
from fedjax_pt import records
from fedjax_pt import reporting
from fedjax_pt import train


def test_ddp_equivalent_bytes_by_hand():
  # 4 workers, a 1 MB model, 1,000 tokens per worker-step; 12,000 tokens are 3 steps. Ring
  # all-reduce: each worker sends 2 * 3 / 4 MB a step, the four together 6 MB; 3 steps: 18 MB.
  assert communication.ddp_equivalent_bytes(10**6, 4, 1000, 12_000) == 18 * 10**6
  assert communication.ddp_equivalent_bytes(10**6, 1, 1000, 12_000) == 0  # nothing to reduce
  assert communication.ddp_ratio(18 * 10**6, 2 * 10**6) == 9.0
  assert communication.ddp_ratio(0, 10) is None and communication.ddp_ratio(5, 0) is None


def test_summary_says_how_much_less_than_ddp():
  rounds = [records.RoundRecord(round=1, tokens=100, bytes_sent=1_000_000,
                                bytes_received=1_000_000, ddp_equivalent_bytes=90_000_000)]
  table = reporting.summary_table(rounds, 1.0)
  assert '45.0x less communication than DDP (90.00 MB)' in table


def test_records_carry_the_wire_sizes_of_the_messages(tmp_path):
  config = tiny.get_config('test')
  config.fl.compression.upload, config.fl.compression.download = 'int8', 'bf16'
  result = train.run(config, str(tmp_path))
  zeros = jax.tree.map(jnp.zeros_like, result.params)
  upload = len(oracles.to_bytes(compression.encode(zeros, 'int8', 64)))
  download = len(oracles.to_bytes(compression.encode(zeros, 'bf16')))
  k = config.fl.clients_per_round
  assert result.rounds[0].round == 0 and result.rounds[0].bytes_sent == 0  # the initial model
  for r in result.rounds[1:]:
    assert r.client_upload_bytes == {c: upload for c in range(k)}
    assert r.client_download_bytes == {c: download for c in range(k)}
    assert r.peak_sync_bytes == k * (upload + download)
    raw = metrics.tree_bytes(result.params)
    assert r.compression_ratio == pytest.approx(2 * raw / (upload + download), rel=1e-12)
    # Data-parallel: 2 (K - 1) model-sized messages a step, tau steps a round.
    assert r.ddp_equivalent_bytes == 2 * (k - 1) * raw * config.fl.local_steps * r.round
  last = result.last_round
  assert last.bytes_sent == 2 * k * download and last.bytes_received == 2 * k * upload
