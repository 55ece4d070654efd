"""The round loop: the only module with side effects (files, checkpoints, progress bar, logs).

`run(config, workdir)` trains federated (outer optimizer over client rounds) or centralized (the
baseline: the same local recipe on the union of the clients' data, logged every `local_steps`).
Re-running the same command on the same workdir resumes from the latest good checkpoint.
"""

import collections
import dataclasses
import itertools
import time
from typing import Any

from absl import logging
import ml_collections
import numpy as np

from fedjax_pt import checkpoint as checkpoint_lib
from fedjax_pt import client as client_lib
from fedjax_pt import faults
from fedjax_pt import metrics as metrics_lib
from fedjax_pt import optimizers
from fedjax_pt import reporting
from fedjax_pt import server as server_lib
from fedjax_pt import workdir as workdir_lib
from fedjax_pt.run_spec import RunSpec


@dataclasses.dataclass
class RunResult:
  params: Any
  last_round: dict[str, Any]
  rounds: list[dict[str, Any]]


def run(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
  """Trains as `config` says, writing metrics.jsonl, TensorBoard events, config.json, checkpoints.

  Returns the final parameters and the round records (of this and, when resumed, earlier sessions).
  """
  spec = RunSpec.from_config(config)
  setup = workdir_lib.prepare(config, spec, workdir)
  loop = _federated_rounds if spec.mode == 'federated' else _centralized_rounds
  start = time.perf_counter()
  try:
    result = loop(setup)
  finally:
    setup.writer.close()
    setup.checkpointer.close()
  summary = reporting.summary_table(result.rounds, time.perf_counter() - start)
  if spec.progress:
    print(summary)
  else:
    logging.info('summary of %s:\n%s', workdir, summary)
  return result


def _evaluate(setup: workdir_lib.Setup, round_idx: int, params) -> dict[str, Any]:
  """Held-out loss of `params` (the server model), globally and, if asked, on each client's set."""
  spec = setup.spec
  if round_idx % spec.eval_every_rounds and round_idx != spec.fl.rounds:
    return {'val_loss': None, 'val_ppl': None}
  result = metrics_lib.evaluate(setup.eval_step, params, setup.val_batches)
  record = {'val_loss': result['loss'], 'val_ppl': result['ppl']}
  if setup.client_val_batches:
    per_client = [metrics_lib.evaluate(setup.eval_step, params, b)
                  for b in setup.client_val_batches]
    record['client_val_loss'] = {k: r['loss'] for k, r in enumerate(per_client)}
    record['client_val_ppl'] = {k: r['ppl'] for k, r in enumerate(per_client)}
  return record


def _write_steps(setup, result: client_lib.ClientResult, round_idx: int, client: int) -> None:
  tau = setup.spec.fl.local_steps
  for m in result.step_metrics:
    setup.writer.write({'kind': 'step', 'round': round_idx, 'client': client,
                        'step': (round_idx - 1) * tau + m['local_step'], **m})


def _finish_round(setup, progress, record: dict[str, Any], start: float, round_tokens: int,
                  rounds: list[dict[str, Any]], checkpoint_state, checkpoint_meta) -> None:
  """Times, writes and prints the round record, then checkpoints the state after the round."""
  elapsed = time.perf_counter() - start
  record.update(round_time_s=elapsed, tokens_per_s=round_tokens / elapsed)
  setup.writer.write(record)
  rounds.append(record)
  progress.write(reporting.round_line(record, setup.spec.fl.rounds))
  round_idx = record['round']
  if setup.checkpointer.should_save(round_idx, setup.spec.fl.rounds):
    checkpoint_meta['metrics_bytes'] = setup.writer.tell()
    save_start = time.perf_counter()
    setup.checkpointer.save(round_idx, checkpoint_state, checkpoint_meta)
    logging.info('checkpoint of round %d started (%.2fs blocking)', round_idx,
                 time.perf_counter() - save_start)


@dataclasses.dataclass
class _ClientOutcome:
  result: client_lib.ClientResult | None
  failure: str | None
  uploaded: bool  # whether the server received parameters (NaN and late clients do send them)
  injected: bool


def _run_group(setup, state, group: list[int], round_idx: int, attempt: int, iterators, kept,
               progress) -> dict[int, _ClientOutcome]:
  """The round of a group of mesh.clients clients, trained at the same time, with the server's view
  of each one's faults."""
  spec = setup.spec
  fault = {k: faults.injected_fault(spec.faults, spec.seed, round_idx, k, attempt) for k in group}
  outcomes = {}
  for k in group:
    if fault[k] == 'fail':
      e = faults.InjectedFailure('injected failure (fl.fault.failure_prob)')
      logging.warning('round %d: client %d raised %s: %s; left out of the average', round_idx, k,
                      type(e).__name__, e)
      outcomes[k] = _ClientOutcome(None, f'raised {type(e).__name__}: {e}', False, True)
  if len(outcomes) == len(group):
    return outcomes
  # A crashed client of a parallel group trains on zeros and is dropped: its own data stream stays
  # where it would be had it crashed alone.
  idle = itertools.repeat(np.zeros((spec.data.batch_size, spec.data.seq_len + 1), np.int32))
  batches = [idle if k in outcomes else iterators[k] for k in group]
  opt_states = [None if spec.fl.reset_optimizer else kept.get(k) for k in group]
  start = time.perf_counter()
  try:
    results = setup.trainer.train(state.params, (round_idx - 1) * spec.fl.local_steps, batches,
                                  opt_states, spec.fl.local_steps, spec.log_every_steps,
                                  progress.advance)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('round %d: clients %s raised %s: %s; left out of the average', round_idx,
                    group, type(e).__name__, e)
    return {k: outcomes.get(k) or _ClientOutcome(None, f'raised {type(e).__name__}: {e}', False,
                                                 False) for k in group}
  elapsed = time.perf_counter() - start
  for k, result in zip(group, results):
    if k in outcomes:
      continue
    if fault[k] == 'nan':
      result.state = result.state.replace(params=faults.poisoned(result.state.params))
    failure = None
    if not bool(faults.all_finite(result.state.params)):
      failure = 'non-finite parameters'
    elif spec.faults.round_timeout_s and elapsed > spec.faults.round_timeout_s:
      failure = f'late: {elapsed:.1f}s > fl.round_timeout_s={spec.faults.round_timeout_s:g}'
    if failure:
      logging.warning('round %d: client %d %s; left out of the average', round_idx, k, failure)
    outcomes[k] = _ClientOutcome(result, failure, True, fault[k] == 'nan')
  return {k: outcomes[k] for k in group}


def _absorb(setup, state, round_idx: int, k: int, outcome: _ClientOutcome, average, per_client,
            kept, progress) -> int:
  """Adds a usable client's model to the round's average and its metrics; returns its tokens."""
  result = outcome.result
  if result is None:
    return 0
  _write_steps(setup, result, round_idx, k)
  if outcome.failure:
    return result.num_tokens
  fl = setup.spec.fl
  if not fl.reset_optimizer:
    kept[k] = result.state.opt_state
  # Normalised by a full client's tokens, so equal clients add with weight exactly 1.
  full_client_tokens = fl.local_steps * setup.spec.data.batch_size * setup.spec.data.seq_len
  weight = result.num_tokens / full_client_tokens if fl.weighting == 'tokens' else 1.0
  average.add(result.state.params, weight)
  per_client['client_train_loss'][k] = result.mean_loss
  per_client['client_grad_norm'][k] = result.mean_grad_norm
  per_client['client_update_norm'][k] = result.mean_update_norm
  per_client['client_norm'][k] = float(metrics_lib.l2_norm(result.state.params))
  per_client['client_delta_norm'][k] = float(
      metrics_lib.distance(state.params, result.state.params))
  progress.loss(result.last_loss)
  return result.num_tokens


def _federated_rounds(setup: workdir_lib.Setup) -> RunResult:
  spec, fl = setup.spec, setup.spec.fl
  outer_tx = optimizers.outer_optimizer(fl.outer_optimizer, fl.outer_lr, fl.outer_momentum,
                                        fl.outer_b2)
  state = server_lib.init_server_state(setup.params, outer_tx, setup.param_shardings)
  server_update = server_lib.make_server_update(outer_tx, like=state)
  iterators = [setup.data.client_iterator(k) for k in range(fl.num_clients)]
  kept: dict[int, Any] = {}  # per-client Adam moments when fl.reset_optimizer=False
  totals = {'tokens': 0, 'bytes_sent': 0, 'bytes_received': 0}
  model_bytes = metrics_lib.tree_bytes(setup.params)
  def abstract_state(meta):
    local_opt = optimizers.local_optimizer(spec.opt).init(setup.params)
    return {'params': state.params, 'opt_state': state.opt_state,
            'kept': {str(k): local_opt for k in meta['kept_clients']}}

  restored = workdir_lib.resume(setup, abstract_state)
  first_round = 1
  if restored is not None:
    for it, it_state in zip(iterators, restored.meta['iterators']):
      it.set_state(it_state)
    kept = {int(k): v for k, v in restored.state['kept'].items()}
    state = server_lib.ServerState(params=restored.state['params'],
                                   opt_state=restored.state['opt_state'], round=restored.round)
    totals, first_round = dict(restored.meta['totals']), restored.round + 1
  progress = reporting.Progress(fl.rounds * fl.clients_per_round * fl.local_steps, spec.progress,
                                initial=(first_round - 1) * fl.clients_per_round * fl.local_steps)
  rounds = list(setup.previous_rounds)
  for round_idx in range(first_round, fl.rounds + 1):
    start = time.perf_counter()
    average, per_client, failed = server_lib.RunningAverage(), collections.defaultdict(dict), {}
    round_tokens, attempt = 0, 0
    while True:
      clients = [int(k) for k in server_lib.sample_clients(
          fl.num_clients, fl.clients_per_round, spec.seed, round_idx, attempt)]
      outcomes = {}
      for group in server_lib.client_groups(clients, setup.trainer.parallel):
        progress.describe(f'round {round_idx}/{fl.rounds} client {",".join(map(str, group))}')
        for k, outcome in _run_group(setup, state, group, round_idx, attempt, iterators, kept,
                                     progress).items():
          round_tokens += _absorb(setup, state, round_idx, k, outcome, average, per_client, kept,
                                  progress)
          if outcome.failure:
            failed[k if not attempt else f'{k}@{attempt}'] = outcome.failure
          # Only the verdict is kept: a client's parameters and moments are freed as soon as they
          # are in the running average, so memory does not grow with the number of clients.
          outcome.result = None
          outcomes[k] = outcome
      totals['bytes_sent'] += model_bytes * len(clients)
      totals['bytes_received'] += model_bytes * sum(o.uploaded for o in outcomes.values())
      enough = average.count >= spec.faults.min_clients
      systematic = outcomes and all(o.failure and not o.injected and not o.uploaded
                                    for o in outcomes.values())
      if systematic:
        # Every client raised on its own: a bug or a broken setup, not a fault to tolerate.
        raise RuntimeError(f'round {round_idx}: every client failed: '
                           f'{next(iter(outcomes.values())).failure}')
      if enough or spec.faults.on_too_few_clients == 'skip' or (
          attempt >= spec.faults.max_round_retries):
        break
      attempt += 1
      logging.warning('round %d: %d of %d clients usable (< fl.min_clients=%d); retry %d', round_idx,
                      average.count, len(clients), spec.faults.min_clients, attempt)
    totals['tokens'] += round_tokens
    record = {'kind': 'round', 'round': round_idx, **totals}
    if enough:
      mean_params = average.result()
      if spec.per_layer_norms:
        record['pseudo_grad_norm_per_module'] = metrics_lib.per_module_norms(
            server_lib.pseudo_gradient(state.params, mean_params))
      state, outer_metrics = server_update(state, mean_params)
      record.update({k: float(v) for k, v in outer_metrics.items()},
                    mean_client_norm=float(metrics_lib.l2_norm(mean_params)))
    else:
      logging.warning('round %d skipped: %d usable clients < fl.min_clients=%d; the global model '
                      'is unchanged', round_idx, average.count, spec.faults.min_clients)
    record.update(_evaluate(setup, round_idx, state.params))
    losses = per_client['client_train_loss'].values()
    train_loss = sum(losses) / len(losses) if losses else None
    record.update(
        train_loss=train_loss,
        train_ppl=metrics_lib.perplexity(train_loss) if losses else None,
        clients=clients, num_aggregated=average.count, skipped=not enough, retries=attempt,
        failed_clients=failed, **per_client,
        client_download_bytes={k: model_bytes for k in clients},
        client_upload_bytes={k: model_bytes for k, o in outcomes.items() if o.uploaded},
        global_norm=float(metrics_lib.l2_norm(state.params)),
        outer_momentum_norm=metrics_lib.outer_momentum_norm(state.opt_state),
        lr=float(setup.lr_schedule(round_idx * fl.local_steps - 1)))
    if spec.per_layer_norms:
      record['global_norm_per_module'] = metrics_lib.per_module_norms(state.params)
    checkpoint_state = {'params': state.params, 'opt_state': state.opt_state,
                        'kept': {str(k): v for k, v in kept.items()}}
    checkpoint_meta = {'round': round_idx, 'totals': dict(totals), 'kept_clients': sorted(kept),
                       'iterators': [it.get_state() for it in iterators]}
    _finish_round(setup, progress, record, start, round_tokens, rounds, checkpoint_state,
                  checkpoint_meta)
  progress.close()
  return RunResult(state.params, rounds[-1], rounds)


def _centralized_rounds(setup: workdir_lib.Setup) -> RunResult:
  spec, fl = setup.spec, setup.spec.fl
  state = setup.trainer.init(setup.params, 0)
  batches = setup.data.centralized_iterator()
  tokens_so_far, first_round = 0, 1
  restored = workdir_lib.resume(setup, lambda meta: {
      'params': state.params, 'opt_state': state.opt_state, 'step': state.step})
  if restored is not None:
    state = client_lib.LocalState(restored.state['params'], restored.state['opt_state'],
                                  restored.state['step'])
    batches.set_state(restored.meta['iterators'][0])
    tokens_so_far, first_round = restored.meta['totals']['tokens'], restored.round + 1
  progress = reporting.Progress(fl.rounds * fl.local_steps, spec.progress,
                                initial=(first_round - 1) * fl.local_steps)
  rounds = list(setup.previous_rounds)
  for round_idx in range(first_round, fl.rounds + 1):
    start = time.perf_counter()
    progress.describe(f'round {round_idx}/{fl.rounds} centralized')
    result = client_lib.client_update(setup.trainer.train_step, state, batches, fl.local_steps,
                                      spec.log_every_steps, progress.advance)
    state = result.state
    tokens_so_far += result.num_tokens
    progress.loss(result.last_loss)
    _write_steps(setup, result, round_idx, -1)
    record = {
        'kind': 'round', 'round': round_idx, 'tokens': tokens_so_far,
        'bytes_sent': 0, 'bytes_received': 0,
        **_evaluate(setup, round_idx, state.params),
        'train_loss': result.mean_loss, 'train_ppl': metrics_lib.perplexity(result.mean_loss),
        'grad_norm': result.mean_grad_norm, 'update_norm': result.mean_update_norm,
        'global_norm': float(metrics_lib.l2_norm(state.params)),
        'lr': float(setup.lr_schedule(round_idx * fl.local_steps - 1)),
    }
    if spec.per_layer_norms:
      record['global_norm_per_module'] = metrics_lib.per_module_norms(state.params)
    checkpoint_state = {'params': state.params, 'opt_state': state.opt_state, 'step': state.step}
    checkpoint_meta = {'round': round_idx, 'totals': {'tokens': tokens_so_far},
                       'iterators': [batches.get_state()]}
    _finish_round(setup, progress, record, start, result.num_tokens, rounds, checkpoint_state,
                  checkpoint_meta)
  progress.close()
  return RunResult(state.params, rounds[-1], rounds)
