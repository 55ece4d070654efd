"""Everything a run builds before its first step, and what resuming in an existing workdir means.

A workdir holds config.json, metrics.jsonl, tensorboard/ and checkpoints/. Re-running the same
command resumes from the latest good checkpoint: metrics.jsonl is cut back to the length it had
at that checkpoint, so its records are exactly those of an uninterrupted run. Nothing is deleted: a
metrics file with no checkpoint to continue from is renamed, and unreadable checkpoints moved aside.
"""

import dataclasses
import json
import os
from typing import Any

from absl import logging
import jax
import ml_collections

from fedjax_pt import checkpoint as checkpoint_lib
from fedjax_pt import client as client_lib
from fedjax_pt import data as data_lib
from fedjax_pt import metrics as metrics_lib
from fedjax_pt import model as model_lib
from fedjax_pt import optimizers
from fedjax_pt import sharding
from fedjax_pt.run_spec import RunSpec

# Keys that may change between the sessions of one run: training longer, checkpointing or logging
# differently, or on other devices (the mesh places arrays, it does not change the results).
# Anything else would silently mix two experiments in one metrics.jsonl.
_RESUMABLE_CHANGES = ('fl.rounds', 'ckpt.', 'log.', 'mesh.')


@dataclasses.dataclass
class Setup:
  spec: RunSpec
  workdir: str
  data: Any
  model_cfg: model_lib.ModelConfig
  params: Any
  param_shardings: Any
  trainer: client_lib.Trainer
  eval_step: Any
  val_batches: list
  client_val_batches: list
  lr_schedule: Any
  checkpointer: checkpoint_lib.Checkpointer
  existing_run: bool
  writer: metrics_lib.MetricWriter | None = None
  previous_rounds: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _check_same_experiment(resolved: dict[str, Any], path: str) -> None:
  with open(path, encoding='utf-8') as f:
    saved = _flatten(json.load(f))
  current = _flatten(resolved)
  changed = sorted(k for k in saved.keys() | current.keys()
                   if saved.get(k) != current.get(k) and not k.startswith(_RESUMABLE_CHANGES))
  if changed:
    details = ', '.join(f'{k}: {saved.get(k)!r} -> {current.get(k)!r}' for k in changed[:4])
    raise ValueError(f'{path} was written by a different experiment ({details}); resume with the '
                     'same config or choose a new --workdir')


def prepare(config: ml_collections.ConfigDict, spec: RunSpec, workdir: str) -> Setup:
  """Validates against the workdir, reads the data, builds the model and its compiled steps."""
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  existing = os.path.exists(metrics_path) or os.path.isdir(os.path.join(workdir, 'checkpoints'))
  if existing and not spec.ckpt.restore:
    raise FileExistsError(f'--workdir={workdir} already holds a run and ckpt.restore=False refuses '
                          'to overwrite it; choose a new --workdir')

  # The tokenizer alone fixes the model's shape: check the model before reading any data.
  tokenizer = data_lib.load_tokenizer(spec.data.tokenizer)
  model_cfg = model_lib.ModelConfig.from_config(
      config.model, vocab_size=data_lib.padded_vocab_size(tokenizer.vocab_size),
      seq_len=spec.data.seq_len)
  resolved = config.to_dict()
  resolved['model'] = dataclasses.asdict(model_cfg)
  config_path = os.path.join(workdir, 'config.json')
  if existing and os.path.exists(config_path):
    _check_same_experiment(resolved, config_path)

  data = data_lib.build_federated_data(spec.data, num_clients=spec.fl.num_clients, seed=spec.seed)
  logging.info('model: %s parameters (%s)', f'{model_lib.param_count(model_cfg):,}', model_cfg)
  logging.info('data: %d clients, tokenizer %s (vocab %d, model vocab %d)', data.num_clients,
               tokenizer.name, tokenizer.vocab_size, model_cfg.vocab_size)

  os.makedirs(workdir, exist_ok=True)
  with open(config_path, 'w', encoding='utf-8') as f:
    json.dump(resolved, f, indent=2, sort_keys=True)

  per_client = spec.eval_per_client and spec.mode == 'federated'
  layout = sharding.Layout.create(spec.mesh)
  logging.info('mesh: %s', dict(layout.mesh.shape))
  return Setup(
      spec=spec, workdir=workdir, data=data, model_cfg=model_cfg,
      params=sharding.init_params(model_cfg, jax.random.key(spec.seed), layout),
      param_shardings=layout.params(model_cfg),
      trainer=client_lib.Trainer(model_cfg, spec.opt, layout, spec.data.micro_batch_size),
      eval_step=metrics_lib.make_eval_step(model_cfg),
      val_batches=data.val_batches(spec.eval_batch_size, spec.eval_max_batches),
      client_val_batches=[data.val_batches(spec.eval_batch_size, spec.eval_max_batches, client=k)
                          for k in range(data.num_clients)] if per_client else [],
      lr_schedule=optimizers.lr_schedule(spec.opt),
      checkpointer=checkpoint_lib.Checkpointer(workdir, spec.ckpt),
      existing_run=existing)


def _set_aside(path: str) -> str:
  n = 1
  while os.path.exists(f'{path}.stale-{n}'):
    n += 1
  os.rename(path, f'{path}.stale-{n}')
  return f'{path}.stale-{n}'


def resume(setup: Setup, abstract_state) -> checkpoint_lib.Restored | None:
  """Restores the latest good checkpoint (if any) and opens the metrics writer to continue it."""
  restored = setup.checkpointer.restore_latest(abstract_state) if setup.existing_run else None
  metrics_path = os.path.join(setup.workdir, 'metrics.jsonl')
  if restored is not None:
    size = os.path.getsize(metrics_path) if os.path.exists(metrics_path) else 0
    keep = restored.meta['metrics_bytes']
    if size < keep:
      logging.warning('%s is shorter (%d bytes) than at the checkpoint of round %d (%d bytes)',
                      metrics_path, size, restored.round, keep)
    elif size > keep:
      # Records written after that checkpoint will be written again, identically.
      os.truncate(metrics_path, keep)
    setup.previous_rounds = [r for r in metrics_lib.read_jsonl(metrics_path)
                             if r.get('kind') == 'round'] if size else []
    logging.info('resuming %s from the checkpoint of round %d', setup.workdir, restored.round)
  elif os.path.exists(metrics_path):
    aside = _set_aside(metrics_path)
    logging.warning('%s has no usable checkpoint: starting over; its old metrics are in %s',
                    setup.workdir, aside)
  setup.writer = metrics_lib.MetricWriter(setup.workdir, tensorboard=setup.spec.tensorboard)
  return restored
