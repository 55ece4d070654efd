"""The ServerApp: `fedjax_pt.train.run`, the run of `python -m fedjax_pt.main`, over the SuperNodes.

The round object, evaluation, metrics.jsonl, TensorBoard, checkpoints and resuming are those of
the simulation; only the clients differ (`fleet.FlowerClients`). The server evaluates the global
model on the held-out split of the data in its own config, which it must be allowed to read (in
the one-machine set-up, the nodes' corpus: then the validation set is the simulation's).

Run config (`flwr run APP CONNECTION --run-config "key=value ..."`; app/pyproject.toml declares
the keys and their defaults):
  config            config file, as --config of fedjax_pt.main (`configs/tiny.py:test` too);
                    absolute, or relative to the SuperLink's working directory
  overrides         '--config.KEY=VALUE ...', as on fedjax_pt.main's command line
  workdir           the run's directory, absolute; re-running on it resumes
  transport         'inline' (arrays in the messages) or 'shared' (orbax checkpoints under
                    shared-dir, default <workdir>/shared; see `transport.py`)
  wait-for-nodes-s  how long the first round waits for every client's node to be online

A bad config or a round that cannot go on ends the run with one line, `fedjax_pt: error: ...`,
and Flower's status `finished:failed`.
"""

import logging as std_logging
import os
import shlex

from absl import flags
from absl import logging
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
import ml_collections

from fedjax_pt import cli
from fedjax_pt import train
from fedjax_pt import workdir as workdir_lib
from fedjax_pt.deploy import arrays
from fedjax_pt.deploy import fleet
from fedjax_pt.deploy import protocol
from fedjax_pt.deploy import seats as seats_lib
from fedjax_pt.deploy import transport as transport_lib
from fedjax_pt.federated import profiles

app = ServerApp()


class RunFailed(Exception):
  """The run stopped for a reason already printed in one line."""


class _NoTraceback(std_logging.Filter):
  """Flower logs a ServerApp's exception with its traceback; ours was said in one line."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.exc_info and isinstance(record.exc_info[1], RunFailed):
      record.exc_info, record.exc_text = None, None
    return True


def load_config(path: str, overrides: str) -> ml_collections.ConfigDict:
  """The config of `fedjax_pt.main --config=PATH OVERRIDES`; ValueError names a bad one."""
  if not path:
    raise ValueError("run config 'config' is empty: name a config file, e.g. "
                     "config='/abs/path/configs/tiny.py'")
  try:
    return cli.load_config(path, shlex.split(overrides))
  except ValueError as e:
    raise ValueError(f'run config: {e}') from None


def check_config(config: ml_collections.ConfigDict, transport: str = 'inline') -> None:
  """What a deployment refuses that the simulation accepts."""
  if config.fl.secagg.enabled and transport != 'inline':
    raise ValueError(f"fl.secagg sends the masked deltas in Flower's messages: run config "
                     f"transport must be 'inline', got {transport!r}")
  if config.mode != 'federated':
    raise ValueError(f"a deployment trains mode='federated', got {config.mode!r}")
  if config.eval.per_client:
    raise ValueError('eval.per_client=True is not supported by the deployment (the server has '
                     "no client's held-out data); set it to False")
  if config.mesh.num_processes != 1:
    raise ValueError(f'mesh.num_processes={config.mesh.num_processes}: the ServerApp runs in one '
                     'process (it averages; the nodes train); set it to 1')


def serve(grid: Grid, run_config: dict) -> train.RunResult:
  """The run that `run_config` describes, its clients the nodes that `grid` reaches."""
  config = load_config(str(run_config['config']), str(run_config['overrides']))
  workdir = str(run_config['workdir'])
  if not os.path.isabs(workdir):
    raise ValueError(f'run config workdir={workdir!r} must be an absolute path')
  check_config(config, str(run_config['transport']))
  # Nodes get the profiles inline: a profiles file is on the server's disk, not theirs.
  config.fl.profiles = profiles.canonical(config.fl.profiles, config.fl.num_clients)
  config.log.progress = False  # the run's log is a stream: one line per round, no bar
  shared_dir = str(run_config['shared-dir']) or os.path.join(workdir, 'shared')
  move = transport_lib.make(str(run_config['transport']), shared_dir)
  if config.fl.secagg.enabled:
    logging.info('fl.secagg: the server receives only the sum of the clients\' deltas (SecAgg+, '
                 'decoded mean within %.3g of the plain mean per value) and of their losses; '
                 'per-client losses, norms and step records describe one client\'s update and '
                 'are not reported',
                 config.fl.secagg.clip_range * 2 / 2 ** config.fl.secagg.quantization_bits)
  made = []

  def make_clients(parts):
    # Inside the run's lock and after its checks: a refused run writes no federation.json.
    federation = seats_lib.FederationState.open(workdir, workdir_lib.has_checkpoint(workdir))
    made.append(federation.run_id)
    spec = parts.spec
    ckpt = spec.ckpt
    # A node keeps the snapshots of every synchronisation back to the oldest checkpoint the
    # server may restart from.
    keep = (ckpt.keep * max(ckpt.every_rounds, 1) + 1) * spec.fl.fragments
    run = fleet.RunInfo(
        run_key=federation.run_id, config_json=config.to_json(),
        vocab_size=parts.model.cfg.vocab_size, shared_dir=shared_dir, keep_snapshots=keep,
        num_clients=spec.fl.num_clients,
        round_timeout_s=spec.faults.round_timeout_s,
        compression=spec.fl.compression, secagg=spec.fl.secagg, fragments=spec.fl.fragments,
        code_version=protocol.code_version())
    clients = fleet.FlowerClients(
        grid, run, move, arrays.abstract(parts.model.params),
        seats=seats_lib.Seats(workdir, federation, spec.fl.num_clients))
    clients.wait_for_nodes(float(run_config['wait-for-nodes-s']))
    return clients

  result = train.run(config, workdir, make_clients)
  for run_id in made:
    move.discard(run_id)
  return result


@app.main()
def main(grid: Grid, context: Context) -> None:
  flags.FLAGS.mark_as_parsed()  # no flags here; absl would warn that logging precedes them
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  cli.quiet_logs()
  std_logging.getLogger('httpx').setLevel(std_logging.WARNING)  # a line per Flower request
  flwr_logger = std_logging.getLogger('flwr')
  flwr_logger.addFilter(_NoTraceback())
  flwr_logger.propagate = False  # it prints its own lines; the root's handler would repeat them
  try:
    result = serve(grid, dict(context.run_config))
  except (ValueError, OSError, ImportError, RuntimeError) as e:
    message = ' '.join(str(e).split())
    print(f'fedjax_pt: error: {message}', flush=True)  # the run's log, which Flower streams
    raise RunFailed(message) from None
  last = result.last_round
  print(f'done: {last.round} rounds, val_ppl {last.val_ppl:.2f}, results in '
        f'{context.run_config["workdir"]}', flush=True)
