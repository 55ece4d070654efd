"""A node's side of a round: client k's local update on the node's own data, as the simulation
runs it, from the message to the reply. `client_app.py` wraps this in a Flower ClientApp.

Flower starts a fresh ClientApp process for every message, so each round rebuilds what it needs
from the request and the node config: the config, the data pipeline, the compiled train step
(from JAX's persistent compilation cache after the first round) and the node's state snapshot.

Node config (`flower-supernode --node-config "..."`, TOML values):
  partition-id    the client id this node trains as (required)
  num-partitions  1 (default): the node's corpus is all its own. N > 1: the node partitions its
                  corpus into N shards as the simulation does and trains shard partition-id; with
                  the server's data config and N = fl.num_clients this is the simulation's client
                  k exactly (the one-machine set-up, and the equivalence test)
  state-dir       node-local directory for its state snapshots (default ~/.cache/fedjax_pt/node)
  jax-cache       JAX persistent compilation cache (default <state-dir>/jax-cache)
  shared-dir      where this node reaches the `shared` transport's root, if not at the
                  server's path
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
import jax.numpy as jnp
import ml_collections

from fedjax_pt import build
from fedjax_pt import local_training
from fedjax_pt.federated import compression
from fedjax_pt import data as data_lib
from fedjax_pt.federated import faults
from fedjax_pt import model as model_lib
from fedjax_pt.federated import privacy
from fedjax_pt import sharding
from fedjax_pt.deploy import node_state
from fedjax_pt.deploy import protocol
from fedjax_pt.deploy import secure
from fedjax_pt.deploy import transport as transport_lib
from fedjax_pt.run_spec import RunSpec

_KEYS = ('partition-id', 'num-partitions', 'state-dir', 'jax-cache', 'shared-dir')
# The recipe (model, optimizer, steps, batch shape) is the server's; these are the node's.
_OVERRIDABLE = ('data.', 'mesh.')
_RECIPE_DATA_KEYS = ('data.seq_len', 'data.batch_size')


@dataclasses.dataclass(frozen=True)
class NodeConfig:
  partition_id: int
  num_partitions: int = 1
  state_dir: str = os.path.join('~', '.cache', 'fedjax_pt', 'node')
  jax_cache: str = ''
  shared_dir: str = ''
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
    if 'partition-id' not in node_config:
      raise ValueError('node config needs partition-id (the client id this node trains as)')
    cfg = cls(partition_id=int(node_config['partition-id']),
              num_partitions=int(node_config.get('num-partitions', 1)),
              state_dir=os.path.expanduser(str(node_config.get('state-dir', cls.state_dir))),
              jax_cache=str(node_config.get('jax-cache', '')),
              shared_dir=str(node_config.get('shared-dir', '')),
              overrides=tuple(sorted((k, v) for k, v in node_config.items()
                                     if k.startswith(_OVERRIDABLE))))
    if cfg.num_partitions < 1 or cfg.partition_id < 0:
      raise ValueError(f'partition-id={cfg.partition_id} and num-partitions={cfg.num_partitions} '
                       'must be >= 0 and >= 1')
    if cfg.num_partitions > 1 and cfg.partition_id >= cfg.num_partitions:
      raise ValueError(f'partition-id={cfg.partition_id} names no shard of num-partitions='
                       f'{cfg.num_partitions}')
    return cfg

  @property
  def shard(self) -> int:
    """The shard of the node's own corpus that it trains on."""
    return self.partition_id if self.num_partitions > 1 else 0


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
  # Flower runs one message per process, so this builds once per round; a process that serves
  # several (the in-process test grid) reuses the compiled steps, as the simulation does.
  return local_training.Trainer(model_cfg, opt_cfg, sharding.Layout.create(mesh_cfg),
                            micro_batch_size)


@dataclasses.dataclass
class _Setup:
  """What a node builds for a round from the request: its config, data, trainer and codecs."""
  request: protocol.TrainRequest
  spec: RunSpec
  data: Any
  trainer: local_training.Trainer
  download: compression.Codec
  upload: compression.Codec
  payload_like: Any  # the broadcast's payload, as abstract arrays


def _setup(request: protocol.TrainRequest, node: NodeConfig) -> _Setup:
  if request.client != node.partition_id:
    raise ValueError(f'the server asked for client {request.client}, this node is partition-id='
                     f'{node.partition_id}')
  config = node_run_config(request, node)
  spec = RunSpec.from_config(config)
  model_cfg = build.model_config(config)
  if model_cfg.vocab_size != request.vocab_size:
    raise ValueError(f'data.tokenizer={spec.data.tokenizer!r} gives a model vocabulary of '
                     f'{model_cfg.vocab_size}, the server model has {request.vocab_size}')
  data = data_lib.build_federated_data(spec.data, num_clients=node.num_partitions, seed=spec.seed)
  trainer = _trainer(model_cfg, spec.opt, spec.mesh, spec.data.micro_batch_size)
  comp = spec.fl.compression
  like = jax.eval_shape(lambda: model_lib.init_params(model_cfg, jax.random.key(0)))
  payload_like = jax.eval_shape(lambda p: compression.encode(p, comp.download, comp.block_size),
                                like)
  download, upload = _codecs(trainer, comp)
  return _Setup(request, spec, data, trainer, download, upload, payload_like)


def train(content, node: NodeConfig) -> Any:
  """The reply content to a train message: client k's round from the global model."""
  started = time.perf_counter()
  setup = _setup(protocol.TrainRequest.from_record(content['config']), node)
  request = setup.request
  move = transport_lib.make(request.transport, node.shared_dir or request.shared_dir)
  ready = time.perf_counter()
  # The global model as this client holds it, as a simulated client receives it.
  params = setup.download.decode(move.get(content, setup.payload_like))
  fetched = time.perf_counter()
  reply, update = local_round(setup, params, node)
  if update is None:
    return reply.to_content()
  trained = time.perf_counter()
  model = move.put(jax.device_get(update), protocol.storage_name(
      request.run_key, request.round, request.attempt, f'client-{request.client}'))
  reply.timings = {'build': ready - started, 'fetch': fetched - ready, 'train': trained - fetched,
                   'send': time.perf_counter() - trained}
  return reply.to_content(model)


def train_secure(content, node: NodeConfig) -> Any:
  """The FitRes content of a secure-aggregation round (fl.secagg; `secure.py`), which Flower's
  `secaggplus_mod` masks before it leaves the node. A failure raises: the node drops out of the
  protocol, and the server reads Flower's error."""
  started = time.perf_counter()
  request, leaves = secure.request_of(content)
  setup = _setup(request, node)
  payload = jax.tree.unflatten(jax.tree.structure(setup.payload_like), [
      x.reshape(like.shape) for x, like in zip(leaves, jax.tree.leaves(setup.payload_like))])
  params = setup.download.decode(payload)
  fetched = time.perf_counter()
  reply, update = local_round(setup, params, node)
  if update is None:
    raise RuntimeError(reply.failure)
  timings = {'fetch': fetched - started, 'train': time.perf_counter() - fetched}
  return secure.reply_content(reply, update, setup.spec.fl.secagg.clip_range, timings)


def local_round(setup: _Setup, params, node: NodeConfig) -> tuple[protocol.TrainReply, Any]:
  """Client k trains from `params` as the simulation's client k does; its reply and its encoded
  delta (None when an injected failure stops it first). Saves the node's state snapshot."""
  request, spec = setup.request, setup.spec
  comp = spec.fl.compression
  k, r, attempt = request.client, request.round, request.attempt
  reply = protocol.TrainReply(client=k, num_examples=setup.data.client_num_tokens(node.shard))
  fault = faults.injected_fault(spec.faults, spec.seed, r, k, attempt)
  if fault == 'fail':  # as the simulation: the client crashes before it trains
    reply.failure = 'raised InjectedFailure: injected failure (fl.fault.failure_prob)'
    reply.injected = True
    return reply, None
  state = node_state.NodeState(os.path.join(node.state_dir, 'runs', request.run_key,
                                            f'client-{k}'))
  snapshot = state.start(r, attempt, setup.trainer.opt_state_shapes(),
                         setup.trainer.param_shapes())
  plan = spec.client_plan(k)  # its batch and local steps, as the simulation's client k
  iterator = setup.data.client_iterator(node.shard, plan.batch_size)
  if snapshot.iterator is not None:
    iterator.set_state(snapshot.iterator)
  kept = None if spec.fl.reset_optimizer else snapshot.opt_state
  result, = setup.trainer.train(params, (r - 1) * spec.fl.local_steps, [iterator], [kept],
                                plan.local_steps, spec.log_every_steps)
  if fault == 'nan':
    result.state = result.state.replace(params=faults.poisoned(result.state.params))
    reply.injected = True
  finite = bool(faults.all_finite(result.state.params))
  if not spec.fl.reset_optimizer and finite:
    kept = result.state.opt_state  # the simulation's rule: only a finite round's moments are kept
  noise = privacy.client_noise(spec.fl.dp, spec.fl.clients_per_round)
  privatize = {} if noise is None else dict(privatize=noise,
                                            key=privacy.noise_key(spec.seed, r, k, attempt))
  update, residual = _message(setup.upload, result.state.params, params, snapshot.residual,
                              comp.error_feedback, finite, privatize)
  state.save(r, attempt, node_state.Snapshot(iterator.get_state(), kept, residual),
             request.keep_snapshots)
  reply.num_tokens, reply.steps = result.num_tokens, result.step_metrics
  reply.local_steps = plan.local_steps
  reply.mean_loss, reply.last_loss = result.mean_loss, result.last_loss
  reply.mean_grad_norm, reply.mean_update_norm = result.mean_grad_norm, result.mean_update_norm
  return reply, update


@functools.lru_cache(maxsize=2)
def _codecs(trainer: local_training.Trainer, comp: compression.CompressionConfig
            ) -> tuple[compression.Codec, compression.Codec]:
  """The download and upload codecs, jitted for the parameters' layout on this node: the programs
  the simulation's clients run, so the decoded model and the encoded delta are theirs bit for bit."""
  like = trainer.param_shapes()
  return (compression.Codec(comp.download, comp.block_size, like),
          compression.Codec(comp.upload, comp.block_size, like))


def _message(upload: compression.Codec, local, received, residual, error_feedback: bool,
             finite: bool, privatize: dict[str, Any]):
  """The client's encoded delta and the residual it keeps, as `SimulatedClients` computes them
  (clipped and noised first with fl.dp.noise_at='clients'): with error feedback the residual
  starts at zero and a diverged client drops it."""
  if not error_feedback:
    return upload.compress_delta(local, received, None, **privatize)[0], None
  if residual is None:
    residual = jax.tree.map(jnp.zeros_like, local)
  update, residual = upload.compress_delta(local, received, residual, **privatize)
  return update, residual if finite else None
