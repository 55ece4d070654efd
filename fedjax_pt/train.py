"""The round loop: the only module with side effects (files, progress bar, logs).

`run(config, workdir)` trains federated (outer optimizer over client rounds) or centralized (the
baseline: the same local recipe on the union of the clients' data, logged every `local_steps`).
"""

import collections
import dataclasses
import json
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from fedjax_pt import client as client_lib
from fedjax_pt import data as data_lib
from fedjax_pt import metrics as metrics_lib
from fedjax_pt import model as model_lib
from fedjax_pt import optimizers
from fedjax_pt import reporting
from fedjax_pt import server as server_lib


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """The typed, validated view of a config, built before any data is read or code compiled."""
  mode: str
  seed: int
  fl: server_lib.FLConfig
  opt: optimizers.OptConfig
  data: data_lib.DataConfig
  eval_batch_size: int
  eval_max_batches: int
  eval_every_rounds: int
  eval_per_client: bool
  log_every_steps: int
  progress: bool
  tensorboard: bool
  per_layer_norms: bool

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'RunSpec':
    if config.mode not in ('federated', 'centralized'):
      raise ValueError(f"mode must be 'federated' or 'centralized', got {config.mode!r}")
    data = data_lib.DataConfig.from_config(config.data)
    for key in ('batch_size', 'every_rounds'):
      if config.eval[key] <= 0:
        raise ValueError(f'eval.{key} must be positive, got {config.eval[key]}')
    if config.log.every_steps < 0:
      raise ValueError(f'log.every_steps must be >= 0, got {config.log.every_steps}')
    return cls(mode=config.mode, seed=config.seed, fl=server_lib.FLConfig.from_config(config.fl),
               opt=optimizers.OptConfig.from_config(config.opt), data=data,
               eval_batch_size=config.eval.batch_size, eval_max_batches=config.eval.max_batches,
               eval_every_rounds=config.eval.every_rounds, eval_per_client=config.eval.per_client,
               log_every_steps=config.log.every_steps, progress=config.log.progress,
               tensorboard=config.log.tensorboard, per_layer_norms=config.log.per_layer_norms)


def _fresh_copy(tree):
  # The train step donates its state; the global parameters must survive every client's round.
  return jax.tree.map(jnp.copy, tree)


@dataclasses.dataclass
class RunResult:
  params: Any
  last_round: dict[str, Any]
  rounds: list[dict[str, Any]]


def run(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
  """Trains as `config` says, writing metrics.jsonl, TensorBoard events and config.json.

  Returns the final parameters and the last round record.
  """
  spec = RunSpec.from_config(config)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(metrics_path):
    raise FileExistsError(f'--workdir={workdir} already holds a run ({metrics_path}); '
                          'choose a new --workdir')

  data = data_lib.build_federated_data(spec.data, num_clients=spec.fl.num_clients, seed=spec.seed)
  vocab_size = data_lib.padded_vocab_size(data.tokenizer.vocab_size)
  model_cfg = model_lib.ModelConfig.from_config(config.model, vocab_size=vocab_size,
                                                seq_len=spec.data.seq_len)
  logging.info('model: %s parameters (%s)', f'{model_lib.param_count(model_cfg):,}', model_cfg)
  logging.info('data: %d clients, tokenizer %s (vocab %d, model vocab %d)', data.num_clients,
               data.tokenizer.name, data.tokenizer.vocab_size, model_cfg.vocab_size)

  os.makedirs(workdir, exist_ok=True)
  resolved = config.to_dict()
  resolved['model'] = dataclasses.asdict(model_cfg)
  with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(resolved, f, indent=2, sort_keys=True)

  params = model_lib.init_params(model_cfg, jax.random.key(spec.seed))
  per_client = spec.eval_per_client and spec.mode == 'federated'
  ctx = _Context(
      spec=spec, data=data,
      train_step=client_lib.make_train_step(model_cfg, spec.opt, spec.data.micro_batch_size),
      eval_step=metrics_lib.make_eval_step(model_cfg),
      val_batches=data.val_batches(spec.eval_batch_size, spec.eval_max_batches),
      client_val_batches=[data.val_batches(spec.eval_batch_size, spec.eval_max_batches, client=k)
                          for k in range(data.num_clients)] if per_client else [],
      writer=metrics_lib.MetricWriter(workdir, tensorboard=spec.tensorboard),
      lr_schedule=optimizers.lr_schedule(spec.opt))
  loop = _federated_rounds if spec.mode == 'federated' else _centralized_rounds
  start = time.perf_counter()
  try:
    result = loop(ctx, params)
  finally:
    ctx.writer.close()
  summary = reporting.summary_table(result.rounds, time.perf_counter() - start)
  if spec.progress:
    print(summary)
  else:
    logging.info('summary of %s:\n%s', workdir, summary)
  return result


@dataclasses.dataclass
class _Context:
  """Everything the round loops share, built once per run."""
  spec: RunSpec
  data: Any
  train_step: Any
  eval_step: Any
  val_batches: list
  client_val_batches: list
  writer: metrics_lib.MetricWriter
  lr_schedule: Any


def _evaluate(ctx: _Context, round_idx: int, params) -> dict[str, Any]:
  """Held-out loss of `params` (the server model), globally and, if asked, on each client's set."""
  if round_idx % ctx.spec.eval_every_rounds and round_idx != ctx.spec.fl.rounds:
    return {'val_loss': None, 'val_ppl': None}
  result = metrics_lib.evaluate(ctx.eval_step, params, ctx.val_batches)
  record = {'val_loss': result['loss'], 'val_ppl': result['ppl']}
  if ctx.client_val_batches:
    per_client = [metrics_lib.evaluate(ctx.eval_step, params, b) for b in ctx.client_val_batches]
    record['client_val_loss'] = {k: r['loss'] for k, r in enumerate(per_client)}
    record['client_val_ppl'] = {k: r['ppl'] for k, r in enumerate(per_client)}
  return record


def _step_records(result: client_lib.ClientResult, round_idx: int, client: int,
                  local_steps: int) -> list[dict[str, Any]]:
  return [{'kind': 'step', 'round': round_idx, 'client': client,
           'step': (round_idx - 1) * local_steps + m['local_step'], **m}
          for m in result.step_metrics]


def _timing(start: float, round_tokens: int) -> dict[str, float]:
  elapsed = time.perf_counter() - start
  return {'round_time_s': elapsed, 'tokens_per_s': round_tokens / elapsed}


def _finish_round(ctx: _Context, progress: reporting.Progress, record: dict[str, Any]) -> None:
  ctx.writer.write(record)
  progress.write(reporting.round_line(record, ctx.spec.fl.rounds))


def _federated_rounds(ctx: _Context, params) -> RunResult:
  fl = ctx.spec.fl
  outer_tx = optimizers.outer_optimizer(fl.outer_optimizer, fl.outer_lr, fl.outer_momentum,
                                        fl.outer_b2)
  server_update = server_lib.make_server_update(outer_tx)
  state = server_lib.init_server_state(params, outer_tx)
  iterators = [ctx.data.client_iterator(k) for k in range(fl.num_clients)]
  kept_opt_states: dict[int, Any] = {}  # per-client Adam moments when fl.reset_optimizer=False
  model_bytes = metrics_lib.tree_bytes(params)
  progress = reporting.Progress(fl.rounds * fl.clients_per_round * fl.local_steps,
                                ctx.spec.progress)
  totals = {'tokens': 0, 'bytes_sent': 0, 'bytes_received': 0}
  rounds = []
  for round_idx in range(1, fl.rounds + 1):
    start = time.perf_counter()
    clients = [int(k) for k in server_lib.sample_clients(
        fl.num_clients, fl.clients_per_round, ctx.spec.seed, round_idx)]
    average = server_lib.RunningAverage()
    per_client = collections.defaultdict(dict)
    round_tokens = 0
    expected_tokens = fl.local_steps * ctx.spec.data.batch_size * ctx.spec.data.seq_len
    for k in clients:
      progress.describe(f'round {round_idx}/{fl.rounds} client {k}')
      local = client_lib.init_local_state(_fresh_copy(state.params), ctx.spec.opt,
                                          (round_idx - 1) * fl.local_steps)
      if not fl.reset_optimizer and k in kept_opt_states:
        local = local.replace(opt_state=kept_opt_states[k])
      result = client_lib.client_update(ctx.train_step, local, iterators[k], fl.local_steps,
                                        ctx.spec.log_every_steps, progress.advance)
      if not fl.reset_optimizer:
        kept_opt_states[k] = result.state.opt_state
      weight = result.num_tokens / expected_tokens if fl.weighting == 'tokens' else 1.0
      average.add(result.state.params, weight / len(clients))
      round_tokens += result.num_tokens
      per_client['client_train_loss'][k] = result.mean_loss
      per_client['client_grad_norm'][k] = result.mean_grad_norm
      per_client['client_update_norm'][k] = result.mean_update_norm
      per_client['client_norm'][k] = float(metrics_lib.l2_norm(result.state.params))
      per_client['client_delta_norm'][k] = float(
          metrics_lib.distance(state.params, result.state.params))
      progress.loss(result.last_loss)
      for step_record in _step_records(result, round_idx, k, fl.local_steps):
        ctx.writer.write(step_record)
    mean_params = average.result()
    per_layer = {}
    if ctx.spec.per_layer_norms:
      per_layer['pseudo_grad_norm_per_module'] = metrics_lib.per_module_norms(
          server_lib.pseudo_gradient(state.params, mean_params))
    state, outer_metrics = server_update(state, mean_params)
    if ctx.spec.per_layer_norms:
      per_layer['global_norm_per_module'] = metrics_lib.per_module_norms(state.params)
    train_loss = sum(per_client['client_train_loss'].values()) / len(clients)
    totals['tokens'] += round_tokens
    totals['bytes_sent'] += model_bytes * len(clients)  # the global model, to every client
    totals['bytes_received'] += model_bytes * len(clients)  # each client's model, back
    record = {
        'kind': 'round', 'round': round_idx, **totals,
        **_evaluate(ctx, round_idx, state.params),
        'train_loss': train_loss, 'train_ppl': metrics_lib.perplexity(train_loss),
        'clients': clients,
        **per_client,
        'client_download_bytes': {k: model_bytes for k in clients},
        'client_upload_bytes': {k: model_bytes for k in clients},
        'global_norm': float(metrics_lib.l2_norm(state.params)),
        'mean_client_norm': float(metrics_lib.l2_norm(mean_params)),
        **{k: float(v) for k, v in outer_metrics.items()},
        'outer_momentum_norm': metrics_lib.outer_momentum_norm(state.opt_state),
        'lr': float(ctx.lr_schedule(round_idx * fl.local_steps - 1)),
        **per_layer,
        **_timing(start, round_tokens),
    }
    _finish_round(ctx, progress, record)
    rounds.append(record)
  progress.close()
  return RunResult(state.params, rounds[-1], rounds)


def _centralized_rounds(ctx: _Context, params) -> RunResult:
  fl = ctx.spec.fl
  state = client_lib.init_local_state(params, ctx.spec.opt, 0)
  batches = ctx.data.centralized_iterator()
  progress = reporting.Progress(fl.rounds * fl.local_steps, ctx.spec.progress)
  tokens_so_far, rounds = 0, []
  for round_idx in range(1, fl.rounds + 1):
    start = time.perf_counter()
    progress.describe(f'round {round_idx}/{fl.rounds} centralized')
    result = client_lib.client_update(ctx.train_step, state, batches, fl.local_steps,
                                      ctx.spec.log_every_steps, progress.advance)
    state = result.state
    tokens_so_far += result.num_tokens
    progress.loss(result.last_loss)
    for step_record in _step_records(result, round_idx, -1, fl.local_steps):
      ctx.writer.write(step_record)
    per_layer = ({'global_norm_per_module': metrics_lib.per_module_norms(state.params)}
                 if ctx.spec.per_layer_norms else {})
    record = {
        'kind': 'round', 'round': round_idx, 'tokens': tokens_so_far,
        'bytes_sent': 0, 'bytes_received': 0,
        **_evaluate(ctx, round_idx, state.params),
        'train_loss': result.mean_loss, 'train_ppl': metrics_lib.perplexity(result.mean_loss),
        'grad_norm': result.mean_grad_norm, 'update_norm': result.mean_update_norm,
        'global_norm': float(metrics_lib.l2_norm(state.params)),
        'lr': float(ctx.lr_schedule(round_idx * fl.local_steps - 1)),
        **per_layer,
        **_timing(start, result.num_tokens),
    }
    _finish_round(ctx, progress, record)
    rounds.append(record)
  progress.close()
  return RunResult(state.params, rounds[-1], rounds)
