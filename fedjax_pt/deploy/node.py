"""A node's part of a synchronisation, from the message to the reply: client k's side of it
(`federated.client_round`) around its local training on the node's own data. `client_app.py`
wraps this in a Flower ClientApp.

Flower starts a fresh ClientApp process for every message, so each round rebuilds what it needs
from the request and the node config: the config, the data pipeline (from the node's tokenised
corpus cache after the first round), the compiled train step (from JAX's persistent compilation
cache after the first round) and the node's state snapshot.

Node config (`flower-supernode --node-config "..."`, TOML values):
  partition-id    the client id this node trains as (required)
  num-partitions  1 (default): the node's corpus is all its own, and all of it trains (no held-out
                  split: the server evaluates on its own data). N > 1: the node partitions its
                  corpus into N shards (`data.build_federated_data`) and trains shard
                  partition-id; with the server's data config and N = fl.num_clients that is
                  the data of `fedjax_pt.main`'s client k (the one-machine set-up, and the
                  equivalence tests)
  state-dir       node-local directory for its state snapshots (default ~/.cache/fedjax_pt/node)
  jax-cache       JAX persistent compilation cache (default <state-dir>/jax-cache)
  cache-dir       the node's tokenised corpus (`data.token_cache`; default <state-dir>/data-cache,
                  none for data.source='tfds'; '' turns it off): the node reads and tokenises
                  its corpus once, not every round
  shared-dir      where this node reaches the `shared` transport's root, if not at the
                  server's path
  reset-state     true: when the snapshot the server expects this client to continue from is
                  missing (a lost state-dir), start the client afresh instead of refusing
  data.*, mesh.*  config overrides that are the node's business: where its data lives
                  (data.source, data.path, data.tokenizer, ...) and how its devices are used
"""

import dataclasses
import functools
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from fedjax_pt import build
from fedjax_pt import data as data_lib
from fedjax_pt import local_training
from fedjax_pt import model as model_lib
from fedjax_pt import sharding
from fedjax_pt.data import token_cache
from fedjax_pt.deploy import node_state
from fedjax_pt.deploy import protocol
from fedjax_pt.deploy import secure
from fedjax_pt.deploy import transport as transport_lib
from fedjax_pt.federated import client_round
from fedjax_pt.federated import compression
from fedjax_pt.federated.messages import ClientReport
from fedjax_pt.run_spec import RunSpec

_KEYS = ('partition-id', 'num-partitions', 'state-dir', 'jax-cache', 'cache-dir', 'shared-dir',
         'reset-state')
# The recipe (model, optimizer, steps, batch shape) is the server's; these are the node's.
_OVERRIDABLE = ('data.', 'mesh.')
_RECIPE_DATA_KEYS = ('data.seq_len', 'data.batch_size')


@dataclasses.dataclass(frozen=True)
class NodeConfig:
  partition_id: int
  num_partitions: int = 1
  state_dir: str = os.path.join('~', '.cache', 'fedjax_pt', 'node')
  jax_cache: str = ''
  cache_dir: str | None = None  # None: the default, <state-dir>/data-cache
  shared_dir: str = ''
  reset_state: bool = False
  overrides: tuple[tuple[str, Any], ...] = ()

  @classmethod
  def parse(cls, node_config: Mapping[str, Any]) -> 'NodeConfig':
    """Raises ValueError naming the first bad key."""
    unknown = [k for k in node_config if k not in _KEYS and not k.startswith(_OVERRIDABLE)]
    if unknown:
      raise ValueError(f'unknown node config key {unknown[0]!r}: use {", ".join(_KEYS)} or '
                       'data.* / mesh.* overrides')
    recipe = [k for k in node_config if k in _RECIPE_DATA_KEYS]
    if recipe:
      raise ValueError(f'node config key {recipe[0]!r} is part of the recipe: the server sets it')
    if 'data.cache_dir' in node_config:
      raise ValueError("node config key 'data.cache_dir': a node's tokenised corpus cache is its "
                       'cache-dir')
    if 'partition-id' not in node_config:
      raise ValueError('node config needs partition-id (the client id this node trains as)')
    cfg = cls(partition_id=int(node_config['partition-id']),
              num_partitions=int(node_config.get('num-partitions', 1)),
              state_dir=os.path.expanduser(str(node_config.get('state-dir', cls.state_dir))),
              jax_cache=str(node_config.get('jax-cache', '')),
              cache_dir=(os.path.expanduser(str(node_config['cache-dir']))
                         if 'cache-dir' in node_config else None),
              shared_dir=str(node_config.get('shared-dir', '')),
              reset_state=_bool('reset-state', node_config.get('reset-state', False)),
              overrides=tuple(sorted((k, v) for k, v in node_config.items()
                                     if k.startswith(_OVERRIDABLE))))
    if cfg.num_partitions < 1 or cfg.partition_id < 0:
      raise ValueError(f'partition-id={cfg.partition_id} and num-partitions={cfg.num_partitions} '
                       'must be >= 0 and >= 1')
    if cfg.num_partitions > 1 and cfg.partition_id >= cfg.num_partitions:
      raise ValueError(f'partition-id={cfg.partition_id} names no shard of num-partitions='
                       f'{cfg.num_partitions}')
    return cfg

  def data_cache_dir(self, source: str) -> str:
    """The node's data.cache_dir for a corpus of data.source `source` ('': none)."""
    if self.cache_dir is None:  # the default: every source the cache keeps
      return '' if source == 'tfds' else os.path.join(self.state_dir, 'data-cache')
    if self.cache_dir and source == 'tfds':
      raise ValueError(f"node config cache-dir={self.cache_dir!r}: data.source='tfds' has no "
                       "tokenised cache; set cache-dir=''")
    return self.cache_dir

  @property
  def shard(self) -> int:
    """The shard of the node's own corpus that it trains on."""
    return self.partition_id if self.num_partitions > 1 else 0


def _bool(key: str, value: Any) -> bool:
  if isinstance(value, bool):
    return value
  if str(value).lower() in ('true', 'false'):
    return str(value).lower() == 'true'
  raise ValueError(f'node config {key}={value!r} must be true or false')


def use_compilation_cache(node: NodeConfig) -> None:
  """Every round is a new process: without the on-disk cache it would recompile every step."""
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return  # the operator chose one
  jax.config.update('jax_compilation_cache_dir',
                    node.jax_cache or os.path.join(node.state_dir, 'jax-cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


def node_run_config(request: protocol.TrainRequest,
                    node: NodeConfig) -> ml_collections.ConfigDict:
  """The server's config with the node's data and mesh overrides; one client per node."""
  config = ml_collections.ConfigDict(json.loads(request.config_json))
  for key, value in node.overrides:
    group, name = key.split('.', 1)
    if name not in config[group]:
      raise ValueError(f'node config key {key!r} names no config key')
    config[group][name] = value
  config.mesh.clients = 1  # the node's devices all train its one client
  # The server's cache directory is a path on the server; the node keeps its own.
  config.data.cache_dir = node.data_cache_dir(config.data.source)
  if dict(node.overrides).get('mesh.num_processes', 1) != 1:
    # Flower starts a ClientApp process per message: it cannot hold a jax.distributed group.
    raise ValueError('a Flower node trains in one process on its own devices; mesh.num_processes '
                     'must be 1 (several hosts per client: fedjax_pt.main with mesh.num_processes)')
  # The server's own processes (if it ran on several) are not the node's.
  config.mesh.num_processes, config.mesh.process_id, config.mesh.coordinator = 1, 0, ''
  return config


@functools.lru_cache(maxsize=2)
def _trainer(model_cfg: model_lib.ModelConfig, opt_cfg, mesh_cfg: sharding.MeshConfig,
             micro_batch_size: int) -> local_training.Trainer:
  # Flower runs one message per process, so this builds once per message; a process that serves
  # several (the in-process test grid) reuses the compiled steps.
  return local_training.Trainer(model_cfg, opt_cfg, sharding.Layout.create(mesh_cfg),
                                micro_batch_size)


@functools.lru_cache(maxsize=2)
def _rule(spec: RunSpec, trainer: local_training.Trainer) -> client_round.ClientRule:
  # Its codecs are jitted for the parameters' layout on this node: the programs the simulation's
  # clients run, so the decoded model and the encoded delta are theirs bit for bit.
  return client_round.ClientRule(spec.fl, spec.faults, spec.seed, trainer.param_shapes())


@dataclasses.dataclass
class _Setup:
  """What a node builds for a message from the request: its config, data, trainer and rule."""
  request: protocol.TrainRequest
  spec: RunSpec
  data: Any
  trainer: local_training.Trainer
  rule: client_round.ClientRule
  payload_like: Any  # the broadcast's payload it receives, as abstract arrays


def _setup(request: protocol.TrainRequest, node: NodeConfig) -> _Setup:
  if request.code_version and request.code_version != protocol.code_version():
    raise ValueError(f'the server runs fedjax_pt {request.code_version}, this node '
                     f'{protocol.code_version()} (version+source digest): install the same '
                     'fedjax_pt on both')
  if request.client != node.partition_id:
    raise ValueError(f'the server asked for client {request.client}, this node is partition-id='
                     f'{node.partition_id}')
  config = node_run_config(request, node)
  spec = RunSpec.from_config(config)
  model_cfg = build.model_config(config)
  if model_cfg.vocab_size != request.vocab_size:
    raise ValueError(f'data.tokenizer={spec.data.tokenizer!r} gives a model vocabulary of '
                     f'{model_cfg.vocab_size}, the server model has {request.vocab_size}')
  if spec.data.cache_dir:
    token_cache.check_dir(spec.data.cache_dir, 'node config cache-dir')
  # A corpus that is all the node's own trains whole: its held-out split would go unevaluated
  # (the server evaluates on its own data). Shards of a shared corpus hold out what the
  # simulation holds out, so the server's validation set is theirs.
  data = data_lib.build_federated_data(spec.data, num_clients=node.num_partitions, seed=spec.seed,
                                       hold_out=node.num_partitions > 1)
  trainer = _trainer(model_cfg, spec.opt, spec.mesh, spec.data.micro_batch_size)
  rule = _rule(spec, trainer)
  comp = spec.fl.compression
  like = jax.eval_shape(lambda: model_lib.init_params(model_cfg, jax.random.key(0)))
  payload_like = jax.eval_shape(lambda p: compression.encode(p, comp.download, comp.block_size),
                                like)
  if request.received_fragment is not None:
    payload_like = rule.fragment(payload_like, request.received_fragment)
  return _Setup(request, spec, data, trainer, rule, payload_like)


def train(content, node: NodeConfig, timings: dict[str, float] | None = None) -> Any:
  """The reply content to a train message: client k's part of a synchronisation; `timings` (the
  ClientApp's own, e.g. its process's start) go into the reply with the node's phases."""
  started = time.perf_counter()
  setup = _setup(protocol.TrainRequest.from_record(content['config']), node)
  request = setup.request
  move = transport_lib.make(request.transport, node.shared_dir or request.shared_dir)
  ready = time.perf_counter()
  received = setup.rule.decode(move.get(content, setup.payload_like), request.received_fragment)
  fetched = time.perf_counter()
  report, message = local_round(setup, received, node)
  if message is None:
    return protocol.reply_content(report)
  trained = time.perf_counter()
  model = move.put(jax.device_get(message), protocol.storage_name(
      request.run_key, request.round, request.attempt, f'client-{request.client}',
      request.sync_start))
  timings = {**(timings or {}), 'build': ready - started, 'fetch': fetched - ready,
             'train': report.compute_s, 'send': time.perf_counter() - trained}
  return protocol.reply_content(report, timings, model)


def train_secure(content, node: NodeConfig) -> Any:
  """The FitRes content of a secure-aggregation round (fl.secagg; `secure.py`), which Flower's
  `secaggplus_mod` masks before it leaves the node. A failure raises: the node drops out of the
  protocol, and the server reads Flower's error."""
  started = time.perf_counter()
  request, leaves = secure.request_of(content)
  setup = _setup(request, node)
  payload = jax.tree.unflatten(jax.tree.structure(setup.payload_like), [
      x.reshape(like.shape) for x, like in zip(leaves, jax.tree.leaves(setup.payload_like))])
  received = setup.rule.decode(payload, None)
  fetched = time.perf_counter()
  report, message = local_round(setup, received, node)
  if message is None:
    raise RuntimeError(report.failure)
  timings = {'fetch': fetched - started, 'train': report.compute_s}
  return secure.reply_content(report, message, setup.spec.fl.secagg.clip_range, timings)


def local_round(setup: _Setup, received, node: NodeConfig) -> tuple[ClientReport, Any]:
  """Client k's part of the synchronisation from what it `received` (`client_round`): its report
  and its encoded delta (None when it could not train). Saves the node's snapshot of what it
  keeps."""
  request, spec, rule = setup.request, setup.spec, setup.rule
  k, r, attempt, segment = request.client, request.round, request.attempt, request.segment
  num_examples = setup.data.client_num_tokens(node.shard)
  fault = rule.fault(k, r, attempt, segment)
  if fault == 'fail':  # it crashes before training
    return rule.crashed(k, num_examples), None
  state = node_state.NodeState(os.path.join(node.state_dir, 'runs', request.run_key,
                                            f'client-{k}'))
  key = (r, segment.start, attempt)
  snapshot = state.start(key, {'opt_state': setup.trainer.opt_state_shapes(),
                               **{name: setup.trainer.param_shapes()
                                  for name in ('residual', 'model', 'anchor')}},
                         request.expected_snapshot, node.reset_state)
  try:
    start, memory = rule.receive(snapshot.memory, received, request.received_fragment, r, segment)
  except client_round.NoModel as e:
    return rule.no_model(k, num_examples, e), None
  plan = spec.client_plan(k)  # its batch and local steps (`fl.profiles`)
  steps = rule.local_steps(plan.local_steps, segment)
  iterator = setup.data.client_iterator(node.shard, plan.batch_size)
  if snapshot.iterator is not None:
    iterator.set_state(snapshot.iterator)
  training_start = time.perf_counter()
  result, = setup.trainer.train(start.params, rule.first_step(r, segment), [iterator],
                                [rule.opt_state(memory, segment)], steps, spec.log_every_steps)
  compute_s = time.perf_counter() - training_start
  message, memory, report = rule.finish(k, memory, start, result, fault, segment, r, attempt,
                                        steps, num_examples)
  report.compute_s = compute_s
  state.save(key, node_state.Snapshot(iterator.get_state(), memory), request.keep_snapshots)
  return report, message
