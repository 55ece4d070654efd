"""The run: build, resume, loop over rounds, write records, checkpoint. The one module with side
effects (files, checkpoints, progress bar, logs); the round itself is
`fedjax_pt.federated.algorithm`.

`run(config, workdir)` trains federated (outer optimizer over client rounds) or centralized (the
baseline: the same local recipe on the union of the clients' data, logged every `local_steps`).
Re-running the same command on the same workdir resumes from the latest good checkpoint.
"""

import dataclasses
import os
import sys
import time
from typing import Any

from absl import logging
import jax
import ml_collections

from fedjax_pt import accounting
from fedjax_pt import build
from fedjax_pt import checkpoint as checkpoint_lib
from fedjax_pt import distributed
from fedjax_pt import errors
from fedjax_pt import hf_import
from fedjax_pt import model as model_lib
from fedjax_pt import records
from fedjax_pt import reporting
from fedjax_pt import run_state
from fedjax_pt import utilization
from fedjax_pt import workdir as workdir_lib
from fedjax_pt.federated import compression
from fedjax_pt.federated import faults
from fedjax_pt.planning import memory
from fedjax_pt.run_spec import RunSpec


@dataclasses.dataclass
class RunResult:
  params: Any  # the final global model
  rounds: list[records.RoundRecord]  # of this and, when resumed, earlier sessions

  @property
  def last_round(self) -> records.RoundRecord:
    return self.rounds[-1]


def run(config: ml_collections.ConfigDict, workdir: str, make_clients=None) -> RunResult:
  """Trains as `config` says, writing metrics.jsonl, TensorBoard events, config.json, checkpoints.

  Every check that can fail on bad input runs before anything is written to `workdir`. Raises
  `errors.TrainingFailed` when the global model diverges (no checkpoint of it is written) or no
  round could aggregate an update, and `errors.Interrupted` on KeyboardInterrupt.
  `make_clients(parts)`, if given, makes the clients that the federated rounds drive in place of
  the in-process simulation: the nodes of a Flower deployment (`fedjax_pt.deploy.server_app`).
  """
  # Before JAX touches a device: with several processes, the devices are all of theirs.
  processes = distributed.ProcessConfig.from_config(config.mesh)
  distributed.initialize(processes)
  spec = RunSpec.from_config(config)
  if spec.fl.secagg.enabled and make_clients is None and spec.mode == 'federated':
    raise ValueError('fl.secagg.enabled=True runs in a Flower deployment (python -m '
                     'fedjax_pt.deploy.local, or a ServerApp): in the simulation the server holds '
                     'every client, there is no one to hide an update from')
  model_cfg = build.model_config(config)
  compression.check_block_size(spec.fl.compression, model_lib.param_shapes(model_cfg))
  if spec.mesh.memory_check:
    memory.check_fits(memory.estimate(spec, model_cfg))
  run_dir = workdir_lib.Workdir(workdir, spec, build.resolved_config(config, model_cfg))
  with run_dir.lock():
    run_dir.check()
    warm_start = _warm_start(spec, model_cfg) if not run_dir.holds_run() else None
    if not distributed.is_primary():
      distributed.log_to_file(os.path.join(workdir, 'logs', f'process_{jax.process_index()}.log'))
    try:
      parts = build.build(spec, model_cfg)
      return _train(spec, parts, run_dir, make_clients, warm_start)
    except Exception as e:  # pylint: disable=broad-except
      lost = distributed.lost_peer(e)
      if lost is None:
        raise
      raise errors.TrainingFailed(f'{lost}; once every process is restarted, the same commands '
                                  'resume from the last checkpoint') from e


WarmStart = checkpoint_lib.WarmStart | hf_import.HFWarmStart


def _warm_start(spec: RunSpec, model_cfg) -> WarmStart | None:
  """The checkpoint of `init.from_checkpoint` or the Hugging Face directory of `init.from_hf`,
  its shapes checked now, before the data is read."""
  if spec.init_from_hf:
    return hf_import.find(spec.init_from_hf, model_cfg)
  if not spec.init_from:
    return None
  warm_start = checkpoint_lib.find_warm_start(spec.init_from)
  writer = (workdir_lib.writer_of(os.path.dirname(warm_start.directory))
            if warm_start.latest else None)
  if writer:  # its latest checkpoint is not its last: which one it is would be a race
    raise checkpoint_lib.WarmStartError(
        f'init.from_checkpoint={spec.init_from}: a run is still writing there ({writer}); '
        'start from it once it has finished, or name one checkpoint (checkpoints/N)')
  checkpoint_lib.check_warm_start(warm_start, model_lib.param_shapes(model_cfg))
  return warm_start


def _load_warm_start(start: WarmStart, model_cfg, abstract_params):
  if isinstance(start, hf_import.HFWarmStart):
    return hf_import.load(start, model_cfg, abstract_params)
  return checkpoint_lib.load_warm_start(start, abstract_params)


def _train(spec: RunSpec, parts: build.Parts, run_dir: workdir_lib.Workdir,
           make_clients=None, warm_start: WarmStart | None = None) -> RunResult:
  fl = spec.fl
  primary = distributed.is_primary()  # process 0 of several shows the progress and the summary
  steps_per_round = reporting.steps_per_round(spec)
  progress = reporting.Progress(fl.rounds * steps_per_round, spec.progress and primary)
  algorithm, clients = build.round_object(parts, progress, make_clients)
  initial = state = algorithm.init(parts.model.params)
  session = run_dir.open(lambda meta: run_state.abstract(algorithm, initial, clients, meta))
  start, round_idx, interrupted = time.perf_counter(), 0, False
  try:
    totals, first_round = accounting.Totals(), 1
    rounds = list(session.previous_rounds)
    if session.restored is not None:
      state, totals = run_state.restore(algorithm, initial, clients, session.restored,
                                        fl.compression)
      first_round = session.restored.round + 1
    else:
      if warm_start is not None:  # fresh outer and client states around the loaded parameters
        state = algorithm.init(_load_warm_start(
            warm_start, parts.model.cfg, checkpoint_lib.abstract(parts.model.params)))
        progress.write(f'warm start: the parameters of {warm_start.path} (fresh optimizer '
                       f'states; lr schedule from local step {spec.opt.step_offset})')
      rounds.append(accounting.initial_record(state.params,
                                              parts.evaluator(state.params, 0, force=True)))
      session.writer.write(rounds[-1])
      progress.write(reporting.round_line(rounds[-1], fl.rounds))
    progress.begin(done=(first_round - 1) * steps_per_round)
    # A round's time runs from the end of the previous round's record, so that it holds the
    # blocking part of that round's checkpoint (written after the record), in both clocks.
    round_start, saving_s = time.perf_counter(), 0.0
    for round_idx in range(first_round, fl.rounds + 1):
      if errors.STOP_REQUESTED.is_set():
        raise KeyboardInterrupt  # a Ctrl-C whose exception was swallowed on the way
      state, result = algorithm.apply(state, round_idx, clients)
      session.checkpointer.check()  # the previous round's save, if it failed, ends the run here
      eval_start = time.perf_counter()
      evaluation = parts.evaluator(state.params, round_idx)
      result = accounting.with_server_work(result, time.perf_counter() - eval_start + saving_s)
      totals = accounting.add(totals, result, spec)
      record = accounting.round_record(
          spec, round_idx, state.params, result, totals, evaluation,
          float(parts.lr_schedule(round_idx * fl.local_steps - 1)))
      elapsed = time.perf_counter() - round_start
      record.round_time_s, record.tokens_per_s = elapsed, result.tokens / elapsed
      utilization.add_to(record, measured=getattr(clients, 'trains_in_parallel', False))
      for step in result.steps:
        session.writer.write(step)
      session.writer.write(record)
      rounds.append(record)
      progress.write(reporting.round_line(record, fl.rounds))
      diverged = accounting.divergence(record, bool(faults.all_finite(state.params)))
      if diverged:
        saved = session.checkpointer.steps()
        raise errors.TrainingFailed(
            f'{diverged} after round {round_idx}: training diverged (lower opt.lr or '
            'fl.outer_lr); this round is not checkpointed, ' +
            (f'the last checkpoint is round {saved[-1]}' if saved else 'and no earlier one was'))
      round_start, saving_s = time.perf_counter(), 0.0
      if session.checkpointer.should_save(round_idx, fl.rounds):
        arrays, meta = run_state.save_items(algorithm, state, clients, round_idx, totals,
                                            session.writer.tell())
        session.checkpointer.save(round_idx, arrays, meta.to_json())
        saving_s = time.perf_counter() - round_start
        logging.debug('checkpoint of round %d started (%.2fs blocking)', round_idx, saving_s)
  except KeyboardInterrupt:
    interrupted = True
  finally:
    progress.close()
    session.close(failing=sys.exc_info()[0] is not None)
  if interrupted:
    saved = session.checkpointer.steps()
    raise errors.Interrupted(
        f'interrupted at round {round_idx}; re-run the same command to resume ' +
        (f'(from the checkpoint of round {saved[-1]})' if saved else '(no round was checkpointed '
         'yet: it starts over)'))
  if primary:  # the others know only this session's rounds
    summary = reporting.summary_table(rounds, time.perf_counter() - start)
    if spec.progress:
      print(summary)
    else:
      logging.info('summary of %s:\n%s', run_dir.path, summary)
  trained = [r for r in rounds if r.round > 0]
  if spec.mode == 'federated' and trained and all(r.skipped for r in trained):
    raise errors.TrainingFailed(
        f'no round aggregated a client update: all {len(trained)} rounds were skipped (too few '
        f'usable clients; see failed_clients in {run_dir.path}/metrics.jsonl)')
  return RunResult(state.params, rounds)
