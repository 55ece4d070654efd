"""Assembly: everything a run, a benchmark or a notebook builds from a config, and nothing else.

No function here touches a workdir: `fedjax_pt.workdir` decides what a directory means for a run,
`fedjax_pt.train` wires the two together.

    spec = RunSpec.from_config(config)
    model_cfg = build.model_config(config)         # reads only the tokenizer
    parts = build.build(spec, model_cfg)           # reads the data, creates the sharded model
"""

import dataclasses
from typing import Any

from absl import logging
import jax
import ml_collections

from fedjax_pt import centralized
from fedjax_pt import data as data_lib
from fedjax_pt import local_training
from fedjax_pt import metrics
from fedjax_pt import model as model_lib
from fedjax_pt import optimizers
from fedjax_pt import sharding
from fedjax_pt import simulation
from fedjax_pt.data import extra_files
from fedjax_pt.data import pipeline
from fedjax_pt.federated import algorithm
from fedjax_pt.federated import profiles
from fedjax_pt.run_spec import RunSpec


def model_config(config: ml_collections.ConfigDict) -> model_lib.ModelConfig:
  """The model of `config`, its vocabulary and positions derived from the tokenizer and data."""
  tokenizer = data_lib.load_tokenizer(config.data.tokenizer)
  return model_lib.ModelConfig.from_config(
      config.model, vocab_size=tokenizer.vocab_size, seq_len=config.data.seq_len,
      default_vocab_size=data_lib.padded_vocab_size(tokenizer.vocab_size))


def resolved_config(config: ml_collections.ConfigDict,
                    model_cfg: model_lib.ModelConfig) -> dict[str, Any]:
  """The config as a run records it (config.json): with the model's derived values."""
  resolved = config.to_dict()
  resolved['model'] = dataclasses.asdict(model_cfg)
  # The profiles themselves, not the path of a file that may change between sessions.
  resolved['fl']['profiles'] = profiles.canonical(config.fl.profiles, config.fl.num_clients)
  return resolved


@dataclasses.dataclass
class Model:
  """The model on the devices: mesh layout, sharded initial parameters, compiled local training."""
  cfg: model_lib.ModelConfig
  layout: sharding.Layout
  params: Any
  param_shardings: Any
  trainer: local_training.Trainer


def build_model(model_cfg: model_lib.ModelConfig, opt_cfg: optimizers.OptConfig,
                mesh_cfg: sharding.MeshConfig, micro_batch_size: int = 0, seed: int = 0,
                layout: sharding.Layout | None = None) -> Model:
  layout = layout or sharding.Layout.create(mesh_cfg)
  logging.info('mesh: %s', dict(layout.mesh.shape))
  return Model(
      cfg=model_cfg, layout=layout,
      params=sharding.init_params(model_cfg, jax.random.key(seed), layout),
      param_shardings=layout.params(model_cfg),
      trainer=local_training.Trainer(model_cfg, opt_cfg, layout, micro_batch_size))


@dataclasses.dataclass
class Parts:
  spec: RunSpec
  model: Model
  data: data_lib.FederatedData
  evaluator: metrics.Evaluator
  lr_schedule: Any


def build(spec: RunSpec, model_cfg: model_lib.ModelConfig) -> Parts:
  """Reads, tokenizes and partitions the data, then builds the model and its compiled steps."""
  layout = sharding.Layout.create(spec.mesh)
  # Before the corpus: a bad extra file fails in a second, not after the corpus is tokenised.
  extra = extra_files.load(spec.eval_extra_files, data_lib.load_tokenizer(spec.data.tokenizer),
                           spec.data.seq_len, spec.data.text_field)
  # With several processes each loads only its rows of every batch (`fedjax_pt.distributed`).
  data = data_lib.build_federated_data(spec.data, num_clients=spec.fl.num_clients, seed=spec.seed,
                                       process_rows=layout.process_rows(spec.data.batch_size))
  logging.info('model: %s parameters (%s)', f'{model_lib.param_count(model_cfg):,}', model_cfg)
  logging.info('data: %d clients, tokenizer %s (vocab %d, model vocab %d)', data.num_clients,
               data.tokenizer.name, data.tokenizer.vocab_size, model_cfg.vocab_size)
  model = build_model(model_cfg, spec.opt, spec.mesh, spec.data.micro_batch_size, spec.seed,
                      layout)
  ways = spec.mesh.data * spec.mesh.fsdp

  def eval_set(batches, min_size=0):
    return [_global_eval_batch(layout, tokens, mask)
            for tokens, mask in metrics.padded(batches, ways, min_size)]

  def val_set(client=None):
    return eval_set(data.val_batches(spec.eval_batch_size, spec.eval_max_batches, client))

  def extra_set(windows):
    # Padded to the validation batches' size, so the same compiled step evaluates them.
    return eval_set(pipeline.eval_batches(windows, spec.eval_batch_size, spec.eval_max_batches),
                    len(validation[0][0]))

  for name, windows in extra.items():
    logging.info('%s: %s, %d windows of %d tokens', extra_files.KEY, name, len(windows),
                 spec.data.seq_len + 1)
  per_client = spec.eval_per_client and spec.mode == 'federated'
  validation = val_set()
  evaluator = metrics.Evaluator(
      metrics.make_eval_step(model_cfg, model.layout), validation,
      [val_set(k) for k in range(data.num_clients)] if per_client else [],
      spec.eval_every_rounds, spec.fl.rounds,
      {name: extra_set(windows) for name, windows in extra.items()})
  return Parts(spec, model, data, evaluator, optimizers.lr_schedule(spec.opt))


def _global_eval_batch(layout: sharding.Layout, tokens, mask) -> metrics.EvalBatch:
  """With several processes, a validation batch as global arrays that each process fills with
  its own rows (the same batch, as it is, for one process)."""
  if jax.process_count() == 1:
    return tokens, mask
  block, blocks = layout.process_rows(len(tokens))
  rows = slice(block * len(tokens) // blocks, (block + 1) * len(tokens) // blocks)
  return (layout.global_batch(tokens[rows]),
          layout.global_batch(mask[rows], layout.named(('batch',))))


def round_object(parts: Parts, progress, make_clients=None) -> tuple[Any, Any]:
  """The run's algorithm and the clients it drives: federated over simulated clients (or over
  `make_clients(parts)`, e.g. the nodes of a Flower federation), or the centralized baseline over
  the union of their data."""
  spec, model = parts.spec, parts.model
  if spec.mode == 'centralized':
    return (centralized.CentralizedAlgorithm(model.trainer),
            centralized.CentralizedLearner(spec, model.trainer, parts.data, progress))
  if spec.fl.keeps_client_models and model.trainer.parallel > 1:
    raise ValueError(f'{spec.fl.own_models_keys()} gives every client a model of its own: it '
                     f'needs mesh.clients=1, got {model.trainer.parallel}')
  federated = algorithm.FederatedAlgorithm(spec.fl, spec.faults, spec.seed,
                                           model.param_shardings, spec.per_layer_norms)
  if make_clients is not None:
    return federated, make_clients(parts)
  return federated, simulation.SimulatedClients(spec, model.trainer, parts.data, progress)
