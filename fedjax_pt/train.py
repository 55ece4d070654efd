"""The round loop: the only module with side effects (files, progress bar, logs).

`run(config, workdir)` trains federated (outer optimizer over client rounds) or centralized (the
baseline: the same local recipe on the union of the clients' data, logged every `local_steps`).
"""

import dataclasses
import json
import math
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import tqdm

from fedjax_pt import client as client_lib
from fedjax_pt import data as data_lib
from fedjax_pt import metrics as metrics_lib
from fedjax_pt import model as model_lib
from fedjax_pt import optimizers
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
  log_every_steps: int
  progress: bool

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
               eval_every_rounds=config.eval.every_rounds, log_every_steps=config.log.every_steps,
               progress=config.log.progress)


def _format_tokens(n: float) -> str:
  for unit, scale in (('B', 1e9), ('M', 1e6), ('k', 1e3)):
    if n >= scale:
      return f'{n / scale:.2f}{unit}'
  return str(int(n))


def _fresh_copy(tree):
  # The train step donates its state; the global parameters must survive every client's round.
  return jax.tree.map(jnp.copy, tree)


class _Progress:
  """tqdm bar over all local steps of the run, with the current round/client and latest loss."""

  def __init__(self, total_steps: int, enabled: bool):
    self._bar = tqdm.tqdm(total=total_steps, unit='step', disable=not enabled, mininterval=1.0,
                          dynamic_ncols=True, smoothing=0.1)

  def describe(self, text: str) -> None:
    self._bar.set_description(text, refresh=False)

  def advance(self, _=None) -> None:
    self._bar.update(1)

  def loss(self, value: float) -> None:
    self._bar.set_postfix(loss=f'{value:.3f}', refresh=False)

  def write(self, line: str) -> None:
    self._bar.write(line)

  def close(self) -> None:
    self._bar.close()


def _round_line(record: dict[str, Any], rounds: int) -> str:
  return (f"round {record['round']}/{rounds} | val_loss {record['val_loss']:.4f} | "
          f"val_ppl {record['val_ppl']:.2f} | train_loss {record['train_loss']:.4f} | "
          f"tokens {_format_tokens(record['tokens'])} | {record['round_time_s']:.1f}s")


@dataclasses.dataclass
class RunResult:
  params: Any
  last_round: dict[str, Any]


def run(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
  """Trains as `config` says, writing metrics.jsonl and config.json into `workdir`.

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
  train_step = client_lib.make_train_step(model_cfg, spec.opt, spec.data.micro_batch_size)
  eval_step = metrics_lib.make_eval_step(model_cfg)
  val_batches = data.val_batches(spec.eval_batch_size, spec.eval_max_batches)
  writer = metrics_lib.JsonlWriter(workdir)
  loop = _federated_rounds if spec.mode == 'federated' else _centralized_rounds
  try:
    return loop(spec, data, params, train_step, eval_step, val_batches, writer)
  finally:
    writer.close()


def _evaluate_round(spec, round_idx, eval_step, params, val_batches) -> dict[str, float]:
  if round_idx % spec.eval_every_rounds and round_idx != spec.fl.rounds:
    return {'val_loss': math.nan, 'val_ppl': math.nan}
  result = metrics_lib.evaluate(eval_step, params, val_batches)
  return {'val_loss': result['loss'], 'val_ppl': result['ppl']}


def _step_records(result: client_lib.ClientResult, round_idx: int, client: int,
                  local_steps: int) -> list[dict[str, Any]]:
  return [{'kind': 'step', 'round': round_idx, 'client': client,
           'step': (round_idx - 1) * local_steps + m['local_step'], **m}
          for m in result.step_metrics]


def _federated_rounds(spec, data, params, train_step, eval_step, val_batches, writer):
  fl = spec.fl
  outer_tx = optimizers.outer_optimizer(fl.outer_optimizer, fl.outer_lr, fl.outer_momentum,
                                        fl.outer_b2)
  server_update = server_lib.make_server_update(outer_tx)
  state = server_lib.init_server_state(params, outer_tx)
  iterators = [data.client_iterator(k) for k in range(fl.num_clients)]
  kept_opt_states: dict[int, Any] = {}  # per-client Adam moments when fl.reset_optimizer=False
  expected_tokens = fl.local_steps * spec.data.batch_size * spec.data.seq_len
  progress = _Progress(fl.rounds * fl.clients_per_round * fl.local_steps, spec.progress)
  tokens_so_far, record = 0, {}
  for round_idx in range(1, fl.rounds + 1):
    start = time.perf_counter()
    clients = server_lib.sample_clients(fl.num_clients, fl.clients_per_round, spec.seed, round_idx)
    average = server_lib.RunningAverage()
    client_losses = {}
    first_step = (round_idx - 1) * fl.local_steps
    for k in clients:
      k = int(k)
      progress.describe(f'round {round_idx}/{fl.rounds} client {k}')
      local = client_lib.init_local_state(_fresh_copy(state.params), spec.opt, first_step)
      if not fl.reset_optimizer and k in kept_opt_states:
        local = local.replace(opt_state=kept_opt_states[k])
      result = client_lib.client_update(train_step, local, iterators[k],
                                        fl.local_steps, spec.log_every_steps, progress.advance)
      if not fl.reset_optimizer:
        kept_opt_states[k] = result.state.opt_state
      weight = result.num_tokens / expected_tokens if fl.weighting == 'tokens' else 1.0
      average.add(result.state.params, weight / len(clients))
      client_losses[k] = result.mean_loss
      tokens_so_far += result.num_tokens
      progress.loss(result.last_loss)
      for step_record in _step_records(result, round_idx, k, fl.local_steps):
        writer.write(step_record)
    state, outer_metrics = server_update(state, average.result())
    record = {
        'kind': 'round', 'round': round_idx, 'tokens': tokens_so_far,
        **_evaluate_round(spec, round_idx, eval_step, state.params, val_batches),
        'train_loss': sum(client_losses.values()) / len(client_losses),
        'client_train_loss': {str(k): v for k, v in client_losses.items()},
        'clients': [int(k) for k in clients],
        **{k: float(v) for k, v in outer_metrics.items()},
        'round_time_s': time.perf_counter() - start,
    }
    writer.write(record)
    progress.write(_round_line(record, fl.rounds))
  progress.close()
  return RunResult(state.params, record)


def _centralized_rounds(spec, data, params, train_step, eval_step, val_batches, writer):
  fl = spec.fl
  state = client_lib.init_local_state(params, spec.opt, 0)
  batches = data.centralized_iterator()
  progress = _Progress(fl.rounds * fl.local_steps, spec.progress)
  tokens_so_far, record = 0, {}
  for round_idx in range(1, fl.rounds + 1):
    start = time.perf_counter()
    progress.describe(f'round {round_idx}/{fl.rounds} centralized')
    result = client_lib.client_update(train_step, state, batches, fl.local_steps,
                                      spec.log_every_steps, progress.advance)
    state = result.state
    tokens_so_far += result.num_tokens
    progress.loss(result.last_loss)
    for step_record in _step_records(result, round_idx, -1, fl.local_steps):
      writer.write(step_record)
    record = {
        'kind': 'round', 'round': round_idx, 'tokens': tokens_so_far,
        **_evaluate_round(spec, round_idx, eval_step, state.params, val_batches),
        'train_loss': result.mean_loss,
        'round_time_s': time.perf_counter() - start,
    }
    writer.write(record)
    progress.write(_round_line(record, fl.rounds))
  progress.close()
  return RunResult(state.params, record)
