"""The deployment's server and node code in one process, over a fake Flower Grid (`fake_grid`):
who is which client, what each fault becomes, and node state across a server restart. The same
code across real processes and sockets is tested in deploy_local_test.py."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import Key, RECORD_KEY_CONFIGS, Stage

from fake_grid import FakeGrid, FakeNode
import scripted
from fedjax_pt.configs import tiny
from fedjax_pt.federated import compression
from fedjax_pt.federated import faults
from fedjax_pt.federated import algorithm as federation
from fedjax_pt import records
from fedjax_pt.federated.config import FLConfig
from fedjax_pt.federated.messages import ClientReport
from fedjax_pt import train
from fedjax_pt.deploy import client_app
from fedjax_pt.deploy import fleet
from fedjax_pt.deploy import node as node_lib
from fedjax_pt.deploy import protocol
from fedjax_pt.deploy import server_app
from fedjax_pt.deploy import transport


# --- scripted nodes: the server side alone --------------------------------------------------------

_LIKE = {'w': jax.ShapeDtypeStruct((1,), jnp.float32)}
_PAYLOAD_LIKE = jax.eval_shape(lambda p: compression.encode(p, 'none'), _LIKE)


def _scripted(client, value):
  """A node that is `client`, "trains" to {'w': [value]} on 10 tokens and sends its delta (or
  raises `value`)."""

  def handle(message: Message, context: Context) -> Message:
    del context
    if message.metadata.message_type == protocol.QUERY:
      return Message(protocol.identity_reply(client), reply_to=message)
    if isinstance(value, Exception):
      report = ClientReport(client, None, failure=f'raised {type(value).__name__}: {value}')
      return Message(protocol.reply_content(report), reply_to=message)
    received = compression.decode(transport.Inline().get(message.content, _PAYLOAD_LIKE))
    delta = {'w': np.array([value], np.float32) - received['w']}
    model = transport.Inline().put(compression.encode(delta, 'none'), 'unused')
    report = scripted.trained(client, delta, tokens=10, examples=10, loss=1.0)
    return Message(protocol.reply_content(report, model=model), reply_to=message)

  return handle


def _clients(grid, num_clients, timeout_s=0.0):
  run = fleet.RunInfo(run_key='run', config_json='{}', vocab_size=1, shared_dir='',
                      keep_snapshots=2, num_clients=num_clients, round_timeout_s=timeout_s,
                      compression=compression.CompressionConfig())
  return fleet.FlowerClients(grid, run, transport.Inline(), like=_LIKE, poll_s=0.01)


def _fedavg(num_clients, timeout_s=0.0):
  fl = FLConfig(num_clients=num_clients, clients_per_round=num_clients, rounds=3,
                       local_steps=1, outer_optimizer='sgd', outer_lr=1.0, outer_momentum=0.0,
                       weighting='tokens')
  return federation.FederatedAlgorithm(fl, faults.FaultConfig(round_timeout_s=timeout_s), seed=0)


def test_nodes_are_named_by_registration_or_asked_once():
  grid = FakeGrid({11: FakeNode({}, name='client-1', handler=_scripted(1, 1.0)),
                   12: FakeNode({}, handler=_scripted(0, 2.0))})
  clients = _clients(grid, num_clients=2)
  clients.wait_for_nodes(timeout_s=5)
  assert clients.unavailable() == {}
  assert grid.log == [(12, protocol.QUERY, '')]  # only the unnamed node was asked, once


def test_every_fault_is_named_with_its_node_and_the_round_goes_on():
  grid = FakeGrid({
      10: FakeNode({}, name='client-0', handler=_scripted(0, 3.0)),
      11: FakeNode({}, name='client-1', gone=True),  # killed: Flower's NODE_UNAVAILABLE
      12: FakeNode({}, name='client-2', handler=_scripted(2, ValueError('no file data/x.jsonl'))),
      13: FakeNode({}, name='client-3', silent=True),  # never replies
      14: FakeNode({}, name='client-4', online=False),  # not connected: not sampled
  })
  algorithm = _fedavg(num_clients=5, timeout_s=0.5)
  state = algorithm.init({'w': jnp.zeros((1,), jnp.float32)})
  state, result = algorithm.apply(state, 1, _clients(grid, num_clients=5, timeout_s=0.5))
  assert float(state.params['w'][0]) == 3.0  # client 0 alone
  assert result.stats.clients == [0, 1, 2, 3] and result.stats.num_aggregated == 1
  failed = result.stats.failed_clients
  assert failed[1].startswith('unavailable: Error: Node Unavailable') and '(node 11)' in failed[1]
  assert failed[2] == 'raised ValueError: no file data/x.jsonl (node 12)'
  assert failed[3] == 'late: no reply within fl.round_timeout_s=0.5 (node 13)'


def test_a_node_that_comes_back_is_sampled_again():
  grid = FakeGrid({10: FakeNode({}, name='client-0', handler=_scripted(0, 1.0)),
                   11: FakeNode({}, name='client-1', handler=_scripted(1, 3.0), online=False)})
  algorithm, clients = _fedavg(num_clients=2), _clients(grid, num_clients=2)
  state = algorithm.init({'w': jnp.zeros((1,), jnp.float32)})
  state, first = algorithm.apply(state, 1, clients)
  grid.nodes[11].online = True
  state, second = algorithm.apply(state, 2, clients)
  assert first.stats.clients == [0] and second.stats.clients == [0, 1]
  assert float(state.params['w'][0]) == 2.0


def test_every_node_lost_skips_the_round_but_every_node_raising_ends_the_run():
  algorithm = federation.FederatedAlgorithm(
      FLConfig(num_clients=1, clients_per_round=1, rounds=1, local_steps=1),
      faults.FaultConfig(max_round_retries=0), seed=0)
  state = algorithm.init({'w': jnp.zeros((1,), jnp.float32)})
  gone = FakeGrid({10: FakeNode({}, name='client-0', gone=True)})
  _, result = algorithm.apply(state, 1, _clients(gone, num_clients=1))
  assert result.stats.skipped
  broken = FakeGrid({10: FakeNode({}, name='client-0', handler=_scripted(0, OSError('disk')))})
  with pytest.raises(RuntimeError, match=r'every client failed: raised OSError: disk \(node 10\)'):
    algorithm.apply(state, 1, _clients(broken, num_clients=1))


# --- the real ClientApp in this process -----------------------------------------------------------

@pytest.fixture(autouse=True)
def _no_compilation_cache(monkeypatch):
  # A node sets JAX's persistent cache for its process; here that process is the test's.
  monkeypatch.setattr(node_lib, 'use_compilation_cache', lambda node: None)


def _config(**fl):
  config = tiny.get_config('test')
  config.fl.num_clients = config.fl.clients_per_round = 2
  for key, value in fl.items():
    config.fl[key] = value
  return config


def _run_config(workdir, overrides):
  return {'config': 'configs/tiny.py:test', 'workdir': str(workdir), 'transport': 'inline',
          'shared-dir': '', 'wait-for-nodes-s': 5.0,
          'overrides': '--config.fl.num_clients=2 --config.fl.clients_per_round=2 ' + overrides}


def _nodes(tmp_path):
  return {100 + k: FakeNode({'partition-id': k, 'num-partitions': 2,
                             'state-dir': str(tmp_path / f'node{k}')}) for k in range(2)}


def _val_losses(result):
  return [r.val_loss for r in result.rounds]


def test_kept_adam_states_on_nodes_match_the_simulation_across_a_server_restart(tmp_path):
  """fl.reset_optimizer=False: the nodes keep their moments and data positions on their disks.
  The server then loses its round-2 checkpoint and replays round 2 from round 1's: the nodes
  must start from their round-1 state, not the round-2 state they already have."""
  simulated = train.run(_config(reset_optimizer=False), str(tmp_path / 'sim'))
  grid = FakeGrid(_nodes(tmp_path))
  run_config = _run_config(tmp_path / 'dep', '--config.fl.reset_optimizer=False')
  deployed = server_app.serve(grid, run_config)
  assert _val_losses(deployed) == _val_losses(simulated)  # bit for bit
  shutil.rmtree(tmp_path / 'dep' / 'checkpoints' / '2')
  resumed = server_app.serve(grid, run_config)
  assert _val_losses(resumed) == _val_losses(simulated)
  assert [g for _, kind, g in grid.log if kind == protocol.TRAIN] == ['1', '1', '2', '2', '2', '2']


def test_kept_muon_states_on_nodes_match_the_simulation_across_a_server_restart(tmp_path):
  """The same with opt.optimizer='muon': the nodes' snapshots hold Muon's partitioned state
  (momenta of the matrices, AdamW moments of the rest) and restore it."""
  config = _config(reset_optimizer=False)
  config.opt.optimizer = 'muon'
  simulated = train.run(config, str(tmp_path / 'sim'))
  grid = FakeGrid(_nodes(tmp_path))
  run_config = _run_config(tmp_path / 'dep',
                           '--config.fl.reset_optimizer=False --config.opt.optimizer=muon')
  deployed = server_app.serve(grid, run_config)
  assert _val_losses(deployed) == _val_losses(simulated)  # bit for bit
  shutil.rmtree(tmp_path / 'dep' / 'checkpoints' / '2')
  resumed = server_app.serve(grid, run_config)
  assert _val_losses(resumed) == _val_losses(simulated)
  assert [g for _, kind, g in grid.log if kind == protocol.TRAIN] == ['1', '1', '2', '2', '2', '2']


def test_overlapped_rounds_on_nodes_match_the_simulation_across_a_server_restart(tmp_path):
  """fl.overlap: each node trains on from its own model (kept in its snapshot with the global
  model it rebases onto), bit for bit as the simulation, also when the server replays round 2."""
  simulated = train.run(_config(overlap=True), str(tmp_path / 'sim'))
  grid = FakeGrid(_nodes(tmp_path))
  run_config = _run_config(tmp_path / 'dep', '--config.fl.overlap=True')
  deployed = server_app.serve(grid, run_config)
  assert _val_losses(deployed) == _val_losses(simulated)  # bit for bit
  shutil.rmtree(tmp_path / 'dep' / 'checkpoints' / '2')
  resumed = server_app.serve(grid, run_config)
  assert _val_losses(resumed) == _val_losses(simulated)


def test_streaming_fragments_with_overlap_match_the_simulation(tmp_path):
  """fl.fragments=2 with fl.overlap: a node trains each segment on without the fragment synced
  last, and merges it when it has trained (within the same message), bit for bit as the
  simulation; it is not the run without overlap."""
  simulated = train.run(_config(fragments=2, fragment_mixing=0.5, overlap=True),
                        str(tmp_path / 'sim'))
  deployed = server_app.serve(FakeGrid(_nodes(tmp_path)), _run_config(
      tmp_path / 'dep', '--config.fl.fragments=2 --config.fl.fragment_mixing=0.5 '
      '--config.fl.overlap=True'))
  assert _val_losses(deployed) == _val_losses(simulated)  # bit for bit
  plain = train.run(_config(fragments=2, fragment_mixing=0.5), str(tmp_path / 'plain'))
  assert _val_losses(plain)[2:] != _val_losses(simulated)[2:]


def test_quorum_rounds_match_the_simulation_across_a_server_restart(tmp_path):
  """fl.quorum=1 with a 2.5x slower node (profiles' throughputs: a fixed arrival order on the
  simulated clock, which decides in both): the same late and stale updates and the same models,
  also when the server replays round 3 from round 2's checkpoint, which holds a late update."""
  table = '[{"tokens_per_s":400},{"tokens_per_s":160}]'
  simulated = train.run(_config(quorum=1, profiles=table, rounds=4), str(tmp_path / 'sim'))
  grid = FakeGrid(_nodes(tmp_path))
  run_config = _run_config(tmp_path / 'dep', f"--config.fl.quorum=1 --config.fl.rounds=4 "
                                             f"--config.fl.profiles='{table}'")
  deployed = server_app.serve(grid, run_config)
  assert _val_losses(deployed) == _val_losses(simulated)  # bit for bit
  assert ([(r.late_clients, r.stale_clients) for r in deployed.rounds[1:]] ==
          [(r.late_clients, r.stale_clients) for r in simulated.rounds[1:]])
  assert [r.stale_clients for r in deployed.rounds[1:]] == [{}, {}, {1: 2}, {0: 1}]
  shutil.rmtree(tmp_path / 'dep' / 'checkpoints' / '4')
  shutil.rmtree(tmp_path / 'dep' / 'checkpoints' / '3')
  resumed = server_app.serve(grid, run_config)
  assert _val_losses(resumed) == _val_losses(simulated)


def test_compressed_messages_and_node_residuals_match_the_simulation(tmp_path):
  """int8 deltas with error feedback (the residual kept in the node's snapshots) and a bf16
  broadcast: the same losses and the same bytes on the wire as the simulation, bit for bit."""
  codecs = dict(upload='int8', download='bf16', error_feedback=True)
  config = _config()
  config.fl.compression.update(codecs)
  simulated = train.run(config, str(tmp_path / 'sim'))
  grid = FakeGrid(_nodes(tmp_path))
  deployed = server_app.serve(grid, _run_config(
      tmp_path / 'dep', ' '.join(f'--config.fl.compression.{k}={v}' for k, v in codecs.items())))
  assert _val_losses(deployed) == _val_losses(simulated)

  def wire(result):
    return [(r.bytes_sent, r.bytes_received, r.compression_ratio) for r in result.rounds]

  assert wire(deployed) == wire(simulated)
  assert deployed.rounds[-1].compression_ratio > 2.5  # int8 up (~3.8x), bf16 down (2x)
  snapshots = sorted((tmp_path / 'node0' / 'runs').glob('*/client-0/r*'))
  assert snapshots and (snapshots[-1] / 'residual').is_dir()


def test_topk_messages_and_node_residuals_match_the_simulation(tmp_path):
  """SparseLoCo's recipe: top-k 1/16 at 4 bits with error feedback, no outer momentum. The same
  losses and bytes as the simulation, bit for bit, and the node keeps its residual."""
  codecs = dict(upload='topk', topk_fraction=0.0625, topk_bits=4, error_feedback=True)
  config = _config(outer_momentum=0.0)
  config.fl.compression.update(codecs)
  simulated = train.run(config, str(tmp_path / 'sim'))
  deployed = server_app.serve(FakeGrid(_nodes(tmp_path)), _run_config(
      tmp_path / 'dep', '--config.fl.outer_momentum=0.0 ' + ' '.join(
          f'--config.fl.compression.{k}={v}' for k, v in codecs.items())))
  assert _val_losses(deployed) == _val_losses(simulated)
  wire = [(r.bytes_sent, r.bytes_received, r.compression_ratio) for r in deployed.rounds]
  assert wire == [(r.bytes_sent, r.bytes_received, r.compression_ratio) for r in simulated.rounds]
  assert deployed.rounds[-1].bytes_sent > 20 * deployed.rounds[-1].bytes_received
  snapshots = sorted((tmp_path / 'node0' / 'runs').glob('*/client-0/r*'))
  assert snapshots and (snapshots[-1] / 'residual').is_dir()


def test_a_warm_start_with_an_outer_warmup_matches_the_simulation(tmp_path):
  """The server loads the parameters (nodes never read init.from_checkpoint: the path is the
  server's); the nodes continue the lr schedule from init.step; the outer lr ramps on the server.
  Bit for bit what the simulation computes."""
  train.run(_config(), str(tmp_path / 'pre'))
  keys = {'init.from_checkpoint': str(tmp_path / 'pre'), 'init.step': 6,
          'fl.outer_lr_warmup_rounds': 2}
  config = _config(outer_lr_warmup_rounds=2)
  config.init.from_checkpoint, config.init.step = str(tmp_path / 'pre'), 6
  simulated = train.run(config, str(tmp_path / 'sim'))
  deployed = server_app.serve(FakeGrid(_nodes(tmp_path)), _run_config(
      tmp_path / 'dep', ' '.join(f'--config.{k}={v}' for k, v in keys.items())))
  assert _val_losses(deployed) == _val_losses(simulated)
  pretrained = records.read_records(str(tmp_path / 'pre')).rounds[-1]
  assert deployed.rounds[0].val_loss == pretrained.val_loss


_STREAMING = {'fragments': 3, 'fragment_mixing': 0.5, 'reset_optimizer': False, 'rounds': 3,
              'compression.upload': 'int4', 'compression.download': 'int8',
              'compression.error_feedback': True}


def test_streaming_fragments_match_the_simulation_across_a_server_restart(tmp_path):
  """fl.fragments=3, mixing 0.5, int4 deltas with error feedback, kept Adam states: each node
  keeps its own model, the global model as it received it, its residual and its moments on its
  disk between messages, and after the first synchronisation it is sent only the fragment
  synchronised last. Bit for bit what the simulation computes, bytes included, also after the
  server loses its last checkpoint and replays round 3."""
  config = _config()
  for key, value in _STREAMING.items():
    group, _, name = key.rpartition('.')
    (config.fl[group] if group else config.fl)[name] = value
  simulated = train.run(config, str(tmp_path / 'sim'))
  grid = FakeGrid(_nodes(tmp_path))
  run_config = _run_config(tmp_path / 'dep', ' '.join(
      f'--config.fl.{k}={v}' for k, v in _STREAMING.items()))
  deployed = server_app.serve(grid, run_config)

  def wire(result):  # client keys as in metrics.jsonl, where a resumed run reads earlier rounds
    return [(r.bytes_sent, r.bytes_received,
             {str(k): v for k, v in (r.client_download_bytes or {}).items()})
            for r in result.rounds]

  assert _val_losses(deployed) == _val_losses(simulated)
  assert wire(deployed) == wire(simulated)
  # Round 1 sends the whole model once to each client, then two fragments; later rounds three
  # fragments, which together are the whole model.
  sent = [sum(r.client_download_bytes.values()) for r in deployed.rounds[1:]]
  assert sent[1] == sent[2] < sent[0]
  shutil.rmtree(tmp_path / 'dep' / 'checkpoints' / '3')
  resumed = server_app.serve(grid, run_config)
  assert _val_losses(resumed) == _val_losses(simulated)
  assert wire(resumed) == wire(simulated)
  trains = [g for _, kind, g in grid.log if kind == protocol.TRAIN]
  assert trains == ['1'] * 6 + ['2'] * 6 + ['3'] * 6 + ['3'] * 6  # 3 syncs x 2 nodes a round


def test_a_destroyed_model_ends_a_deployed_run(tmp_path):
  """Huge but finite parameters (outer lr 1e25): divergence, as in the simulation."""
  with pytest.raises(train.errors.TrainingFailed, match='after round 1: training diverged'):
    server_app.serve(FakeGrid(_nodes(tmp_path)), _run_config(
        tmp_path / 'run', '--config.fl.outer_lr=1e25 --config.fl.outer_momentum=0 '
        '--config.fl.rounds=1'))
  assert not (tmp_path / 'run' / 'checkpoints' / '1').exists()


def test_a_simulated_run_is_not_continued_by_a_deployment(tmp_path):
  """Its clients' Adam states are in its checkpoint, not on any node: refused, nothing moved."""
  train.run(_config(reset_optimizer=False, rounds=1), str(tmp_path / 'run'))
  before = sorted(p.name for p in (tmp_path / 'run' / 'checkpoints').iterdir())
  with pytest.raises(train.errors.WorkdirRefused, match='state of simulated clients'):
    server_app.serve(FakeGrid(_nodes(tmp_path)), _run_config(
        tmp_path / 'run', '--config.fl.reset_optimizer=False --config.fl.rounds=1'))
  assert sorted(p.name for p in (tmp_path / 'run' / 'checkpoints').iterdir()) == before


def test_client_profiles_and_the_simulated_deadline_match_the_simulation(tmp_path):
  """Time budgets: each node plans its own batch and steps from the server's config, as the
  simulated client does; the server times the replies under the profiles and leaves out the
  same late client (1 s of compute + 2 x 2 s of latency > 4.5 s)."""
  table = ('[{"tokens_per_s":128,"time_budget_s":4},'
           '{"tokens_per_s":128,"time_budget_s":1,"latency_ms":2000}]')
  simulated = train.run(_config(profiles=table, round_deadline_s=4.5), str(tmp_path / 'sim'))
  deployed = server_app.serve(FakeGrid(_nodes(tmp_path)), _run_config(
      tmp_path / 'dep', f"--config.fl.profiles='{table}' --config.fl.round_deadline_s=4.5"))
  assert _val_losses(deployed) == _val_losses(simulated)
  for dep, sim in zip(deployed.rounds[1:], simulated.rounds[1:]):
    assert dep.client_local_steps == sim.client_local_steps == {0: 4, 1: 1}
    assert dep.failed_clients == sim.failed_clients == {
        1: 'late: simulated 5.0s > fl.round_deadline_s=4.5'}
    assert dep.client_sim_time_s == pytest.approx(sim.client_sim_time_s)
    # Compute utilisation: the same simulated compute (the profiles' throughput) in both; only
    # the deployment's clients train on hosts of their own, so only it measures one.
    assert dep.client_sim_compute_s == pytest.approx(sim.client_sim_compute_s)
    assert sim.compute_utilization is None
    assert dep.compute_utilization == pytest.approx(
        sum(dep.client_compute_s.values()) / (2 * dep.round_time_s))
    assert 0 < dep.compute_utilization < 1


def test_median_with_a_poisoned_node_matches_the_simulation(tmp_path):
  """fl.aggregation='median' over 3 nodes, node 2 sending seeded noise (fl.fault.poison, applied
  by `client_round` on the node): the same models and the same trimmed values, bit for bit."""
  keys = {'num_clients': 3, 'clients_per_round': 3, 'aggregation': 'median',
          'weighting': 'uniform'}
  config = _config(**keys)
  config.fl.fault.poison, config.fl.fault.poison_clients = 'noise', (2,)
  simulated = train.run(config, str(tmp_path / 'sim'))
  nodes = {100 + k: FakeNode({'partition-id': k, 'num-partitions': 3,
                              'state-dir': str(tmp_path / f'node{k}')}) for k in range(3)}
  run_config = _run_config(tmp_path / 'dep', ' '.join(
      [f'--config.fl.{k}={v}' for k, v in keys.items()] +
      ["--config.fl.fault.poison=noise", "'--config.fl.fault.poison_clients=(2,)'"]))
  deployed = server_app.serve(FakeGrid(nodes), run_config)
  assert _val_losses(deployed) == _val_losses(simulated)
  trimmed = [r.robust_trimmed_values for r in deployed.rounds[1:]]
  assert trimmed == [r.robust_trimmed_values for r in simulated.rounds[1:]]
  assert all(set(t) == {0, 1, 2} for t in trimmed)  # each client is dropped somewhere


# --- secure aggregation (fl.secagg) ---------------------------------------------------------------

_FEDAVG = ('--config.fl.outer_optimizer=sgd --config.fl.outer_lr=1.0 '
           '--config.fl.outer_momentum=0.0 --config.fl.rounds=1')


def test_secure_aggregation_server_sees_only_the_sum_within_the_stated_bound(tmp_path,
                                                                              monkeypatch):
  """SecAgg+ over two nodes, one FedAvg round: every reply the server receives carries no
  array (the masked deltas are integers mod 2**32, the clear metrics no update), the round
  object is handed one secure sum and never a client's delta, and the new global model equals
  the plain deployment's within the stated bound: 2 * clip_range / 2**bits per value for the
  mean, plus float32 rounding of theta + mean (half an ulp of the result, twice)."""
  plain = server_app.serve(FakeGrid(_nodes(tmp_path / 'plain')),
                           _run_config(tmp_path / 'plain_run', _FEDAVG))
  absorbed = []
  real_absorb = federation.FederatedAlgorithm._absorb

  def spy(self, state, broadcast, round_idx, report, *args):
    absorbed.append(report)
    return real_absorb(self, state, broadcast, round_idx, report, *args)

  monkeypatch.setattr(federation.FederatedAlgorithm, '_absorb', spy)
  grid = FakeGrid(_nodes(tmp_path / 'secure'))
  secure = server_app.serve(grid, _run_config(tmp_path / 'secure_run',
                                              _FEDAVG + ' --config.fl.secagg.enabled=True'))
  assert absorbed == []  # no ClientReport: the only update was the secure sum
  assert grid.replies and all(not r.has_error() for r in grid.replies)
  for reply in grid.replies:
    assert all(len(array.data) == 0 for record in reply.content.array_records.values()
               for array in record.values())
  bound = 2 * 1.0 / 2 ** 22
  for a, b in zip(jax.tree.leaves(secure.params), jax.tree.leaves(plain.params)):
    a, b = np.asarray(a), np.asarray(b)
    assert np.all(np.abs(a - b) <= bound + np.spacing(np.abs(b)))
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(secure.params),
                                                       jax.tree.leaves(plain.params)))
  last = secure.rounds[-1]
  assert last.num_aggregated == 2 and last.secagg_clipped_values == 0
  assert not last.client_train_loss and not last.client_delta_norm  # nothing per client
  assert last.tokens == plain.rounds[-1].tokens
  # The mean loss travels in the sum too, scaled by clip_range / 32 nats: same bound, scaled.
  assert abs(last.train_loss - plain.rounds[-1].train_loss) <= bound * 32 + 1e-6
  # The masked upload (int64 values mod 2**32) is about twice the float32 delta.
  assert 1.8 < last.bytes_received / plain.rounds[-1].bytes_received < 2.5


def _drops_out_before_sending_its_delta(message, context):
  """Answers the first two SecAgg+ stages (its key shares reach the others), then is gone."""
  configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
  if configs is not None and configs.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS:
    return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason='Error: Node Unavailable'),
                   reply_to=message)
  return client_app.app(message=message, context=context)


def test_secure_aggregation_with_distributed_dp_survives_a_node_that_drops_out(tmp_path):
  """Three nodes with client-side noise under SecAgg+; node 2 drops out after the key exchange,
  so the server unmasks the sum of the other two with its key shares (threshold 2 of 3). With
  one node left, nothing is sent at all: the sum of one node is its update."""
  nodes = {100 + k: FakeNode({'partition-id': k, 'num-partitions': 3,
                              'state-dir': str(tmp_path / f'node{k}')}) for k in range(3)}
  nodes[102].handler = _drops_out_before_sending_its_delta
  overrides = (_FEDAVG + ' --config.fl.num_clients=3 --config.fl.clients_per_round=3 '
               '--config.fl.secagg.enabled=True --config.fl.dp.enabled=True '
               '--config.fl.dp.noise_at=clients --config.fl.dp.noise_multiplier=0.1')
  result = server_app.serve(FakeGrid(nodes), _run_config(tmp_path / 'run', overrides))
  last = result.rounds[-1]
  assert not last.skipped and last.num_aggregated == 2 and last.dp_epsilon > 0
  assert list(last.failed_clients) == [2] and 'unavailable' in last.failed_clients[2]
  for k in (1, 2):
    nodes[100 + k].online = False
  with pytest.raises(train.errors.TrainingFailed, match='no round aggregated'):
    server_app.serve(FakeGrid(nodes), _run_config(tmp_path / 'alone', overrides))
  failed = records.read_records(str(tmp_path / 'alone')).rounds[-1].failed_clients
  assert failed['0'] == 'secure aggregation needs 2 or more nodes online, 1 is (node 100)'
