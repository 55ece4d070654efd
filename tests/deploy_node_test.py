"""Tests of fedjax_pt.deploy.node's config and set-up: a node prepares its data once, not every
round."""

import pytest

from fedjax_pt import build
from fedjax_pt.configs import tiny
from fedjax_pt.data import corpus as corpus_lib
from fedjax_pt.deploy import client_app
from fedjax_pt.deploy import node as node_lib
from fedjax_pt.deploy import protocol


def _request(round_idx: int, **data) -> protocol.TrainRequest:
  config = tiny.get_config('test')
  config.fl.num_clients = config.fl.clients_per_round = 2
  config.data.update(data)
  return protocol.TrainRequest(
      round=round_idx, attempt=0, client=1, run_key='run', config_json=config.to_json(),
      vocab_size=build.model_config(config).vocab_size, transport='inline', shared_dir='',
      keep_snapshots=2, received=-1, sync_fragment=0, sync_start=0,
      sync_steps=config.fl.local_steps)


@pytest.fixture
def tokenised(monkeypatch):
  calls = []
  real = corpus_lib.tokenize_corpus

  def counted(*args, **kw):
    calls.append(1)
    return real(*args, **kw)

  monkeypatch.setattr(corpus_lib, 'tokenize_corpus', counted)
  return calls


def _windows(setup):
  return setup.data._train[1]  # pylint: disable=protected-access


def test_consecutive_rounds_of_a_node_tokenise_its_corpus_once(tmp_path, tokenised):
  node = node_lib.NodeConfig.parse({'partition-id': 1, 'num-partitions': 2,
                                    'state-dir': str(tmp_path / 'node')})
  # Every round is a new setup from the message, as in a fresh ClientApp process.
  first = node_lib._setup(_request(1), node)  # pylint: disable=protected-access
  second = node_lib._setup(_request(2), node)  # pylint: disable=protected-access
  assert len(tokenised) == 1
  assert [p.name[:7] for p in (tmp_path / 'node' / 'data-cache').iterdir()] == ['corpus-']
  assert (_windows(first) == _windows(second)).all()
  # Off: every round tokenises again (what a node did before the cache).
  off = node_lib.NodeConfig.parse({'partition-id': 1, 'num-partitions': 2, 'cache-dir': '',
                                   'state-dir': str(tmp_path / 'other')})
  node_lib._setup(_request(3), off)  # pylint: disable=protected-access
  assert len(tokenised) == 2 and not (tmp_path / 'other' / 'data-cache').exists()


def test_the_server_cache_dir_is_not_the_nodes(tmp_path, tokenised):
  node = node_lib.NodeConfig.parse({'partition-id': 1, 'num-partitions': 2,
                                    'cache-dir': str(tmp_path / 'mine')})
  node_lib._setup(_request(1, cache_dir=str(tmp_path / 'server')), node)  # pylint: disable=protected-access
  assert (tmp_path / 'mine').is_dir() and not (tmp_path / 'server').exists()


def test_a_bad_cache_dir_is_one_line_naming_the_node_key(tmp_path):
  afile = tmp_path / 'f'
  afile.write_text('')
  node = node_lib.NodeConfig.parse({'partition-id': 1, 'num-partitions': 2,
                                    'cache-dir': str(afile)})
  with pytest.raises(ValueError, match=r"^node config cache-dir='.*/f' is a file, not a dir"):
    node_lib._setup(_request(1), node)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r"node config key 'data.cache_dir'.*is its cache-dir"):
    node_lib.NodeConfig.parse({'partition-id': 1, 'data.cache_dir': '/x'})
  tfds = node_lib.NodeConfig.parse({'partition-id': 1, 'cache-dir': str(tmp_path)})
  with pytest.raises(ValueError, match=r"cache-dir=.*data.source='tfds' has no tokenised cache"):
    tfds.data_cache_dir('tfds')
  assert node_lib.NodeConfig.parse({'partition-id': 1}).data_cache_dir('tfds') == ''


def test_the_process_age_is_reported_only_from_a_flwr_clientapp_process():
  # Under pytest one process serves every message: its age says nothing of a round's cost.
  assert client_app.process_age_s() is None


def test_the_client_app_imports_no_server_only_library():
  """Flower starts a fresh ClientApp process for every message, so its imports are paid every
  round: the server's privacy accounting (dp_accounting, about 1 s with scipy) stays out."""
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, '-c', 'import sys, fedjax_pt.deploy.client_app; '
       'print(sorted({m.split(".")[0] for m in sys.modules} & {"dp_accounting", "scipy", '
       '"tensorboardX", "matplotlib", "transformers", "torch", "tensorflow"}))'],
      cwd=repo, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == '[]'
