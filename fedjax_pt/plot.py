r"""The paper's figures (Sani et al., Figures 2-4) from one or several runs' metrics.jsonl.

  python -m fedjax_pt.plot --workdir=runs/fed --workdir=runs/central --out=plots \
      [--x=tokens|rounds|sim_time]

--x=sim_time puts runs on their simulated wall clock (`sim_wall_time_s`: clients training at the
same time on the hardware and links of their profiles, fedjax_pt/federated/sim_clock.py).

Writes perplexity.png (server model, clients and the centralized baseline's train and test
perplexity), norms.png (L2 norms of the global model, the client models and their average) and
gradients.png (pseudo-gradient, outer update, client gradients and applied client updates).
"""

from collections.abc import Sequence
import dataclasses
import json
import os
from typing import Any

from absl import app
from absl import flags
import matplotlib

matplotlib.use('Agg')  # files only: works on headless nodes and in tests
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import ticker  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

# pylint: disable=g-import-not-at-top,wrong-import-position
from fedjax_pt import cli
from fedjax_pt import records as records_lib


@dataclasses.dataclass
class Run:
  workdir: str
  label: str
  config: dict[str, Any]
  rounds: list[records_lib.RoundRecord]
  steps: list[records_lib.StepRecord]

  @property
  def federated(self) -> bool:
    return self.config.get('mode', 'federated') == 'federated'

  @property
  def tokens_per_local_step(self) -> int:
    """Tokens all clients of a round process per local step (they run side by side)."""
    data, fl = self.config['data'], self.config['fl']
    clients = fl['clients_per_round'] if self.federated else 1
    return data['batch_size'] * data['seq_len'] * clients


def run_label(config: dict[str, Any]) -> str:
  """A short name that says what differs between the usual runs of a study."""
  fl, model = config['fl'], config['model']
  size = f"d{model['d_model']}x{model['num_layers']}"
  init = config.get('init') or {}
  warm = ' warm-started' if init.get('from_checkpoint') or init.get('from_hf') else ''
  if config.get('mode') == 'centralized':
    return f'centralized {size}{warm}'
  ramps = ''.join(f' {name} warmup {fl[key]}' for name, key in (
      ('lr', 'outer_lr_warmup_rounds'), ('mu', 'outer_momentum_warmup_rounds')) if fl.get(key))
  return (f"{fl['outer_optimizer']} lr={fl['outer_lr']:g} mu={fl['outer_momentum']:g}{ramps} "
          f"K={fl['clients_per_round']}/{fl['num_clients']} tau={fl['local_steps']} {size}{warm}")


def load_run(workdir: str, label: str | None = None) -> Run:
  """Reads `workdir/metrics.jsonl` and `workdir/config.json`; one-line errors when missing."""
  paths = [os.path.join(workdir, name) for name in ('metrics.jsonl', 'config.json')]
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path} not found: is --workdir={workdir} a fedjax_pt run?')
  records = records_lib.read_records(paths[0])
  with open(paths[1], encoding='utf-8') as f:
    config = json.load(f)
  if not records.rounds:
    raise ValueError(f'{paths[0]} has no round record yet')
  return Run(workdir, label or run_label(config), config, records.rounds, records.steps)


def _unique_labels(runs: Sequence[Run]) -> None:
  labels = [r.label for r in runs]
  for run in runs:
    if labels.count(run.label) > 1:
      run.label = f'{run.label} ({os.path.basename(os.path.normpath(run.workdir))})'


X_AXES = ('tokens', 'rounds', 'sim_time')
_X_LABELS = {'tokens': 'tokens (all clients)', 'rounds': 'round',
             'sim_time': 'simulated wall time (s)'}


def _round_x(run: Run, x: str) -> np.ndarray:
  if x == 'sim_time':
    return _series(run.rounds, 'sim_wall_time_s')
  return np.array([r.tokens if x == 'tokens' else r.round for r in run.rounds], float)


def _step_x(run: Run, steps: list[records_lib.StepRecord], x: str) -> np.ndarray:
  """Step records on the round axis: round r, local step t sits at r - 1 + t / tau (on the
  simulated clock, as far through the round's time)."""
  tau = run.config['fl']['local_steps']
  position = np.array([s.round - 1 + s.local_step / tau for s in steps], float)
  if x == 'sim_time':
    rounds = np.array([r.round for r in run.rounds], float)
    return np.interp(position, rounds, _round_x(run, x))
  return position * tau * run.tokens_per_local_step if x == 'tokens' else position


def _series(records: Sequence[Any], key: str) -> np.ndarray:
  return np.array([np.nan if getattr(r, key) is None else getattr(r, key) for r in records], float)


def _per_client(run: Run, key: str) -> dict[str, np.ndarray]:
  """{client: values over rounds} for a per-client dict-valued key (NaN where not sampled)."""
  clients = sorted({c for r in run.rounds for c in getattr(r, key) or {}}, key=int)
  return {c: np.array([(getattr(r, key) or {}).get(c, np.nan) for r in run.rounds], float)
          for c in clients}


def _steps_by_client(run: Run) -> dict[int, list[records_lib.StepRecord]]:
  by_client: dict[int, list[records_lib.StepRecord]] = {}
  for s in run.steps:
    by_client.setdefault(s.client, []).append(s)
  return by_client


def _finish(ax, x: str, title: str, ylabel: str, log: bool = True) -> None:
  ax.set_xlabel(_X_LABELS[x])
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if log:
    ax.set_yscale('log')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(fontsize=7)


def perplexity_axis(ax, xlabel: str, log_x: bool = False) -> None:
  """Validation perplexity on a log scale with plain-number ticks (20, 30, not 2x10^1)."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel('validation perplexity (bytes)')
  if log_x:
    ax.set_xscale('log')
  ax.set_yscale('log')
  ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
  ax.yaxis.set_minor_formatter(ticker.ScalarFormatter())
  ax.grid(True, which='both', alpha=0.3)


def save(fig, path: str, dpi: int = 120) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path


def plot_perplexity(runs: Sequence[Run], x: str, path: str) -> None:
  """Figure 2: server model vs centralized (train and test) perplexity, and the clients'."""
  fig, ax = plt.subplots(figsize=(8, 5))
  for i, run in enumerate(runs):
    color = f'C{i}'
    rx = _round_x(run, x)
    if run.federated:
      ax.plot(rx, _series(run.rounds, 'val_ppl'), 'o-', color=color, lw=2,
              label=f'{run.label}: server model (test)')
      # Like the centralized run's train curve: the round's mean training loss (of the clients).
      ax.plot(rx, _series(run.rounds, 'train_ppl'), 'o--', color=color, lw=1.2,
              label=f'{run.label}: clients, mean over the round (train)')
      for j, (client, steps) in enumerate(sorted(_steps_by_client(run).items())):
        ax.plot(_step_x(run, steps, x), np.exp(_series(steps, 'loss')), color=color, lw=0.6,
                alpha=0.35, label=f'{run.label}: clients (train)' if j == 0 else None)
      for j, values in enumerate(_per_client(run, 'client_val_ppl').values()):
        ax.plot(rx, values, ':', color=color, lw=1,
                label=f"{run.label}: server model on each client's test set" if j == 0 else None)
    else:
      ax.plot(rx, _series(run.rounds, 'val_ppl'), 's-', color=color, lw=2,
              label=f'{run.label} (test)')
      ax.plot(rx, _series(run.rounds, 'train_ppl'), 's--', color=color, lw=1.2,
              label=f'{run.label} (train)')
  _finish(ax, x, 'Perplexity', 'perplexity')
  save(fig, path)


def plot_norms(runs: Sequence[Run], x: str, path: str) -> None:
  """Figure 3: L2 norms of the global model, each client model and the clients' average."""
  fig, ax = plt.subplots(figsize=(8, 5))
  for i, run in enumerate(runs):
    color = f'C{i}'
    rx = _round_x(run, x)
    ax.plot(rx, _series(run.rounds, 'global_norm'), 'o-', color=color, lw=2,
            label=f'{run.label}: global model')
    if run.federated:
      ax.plot(rx, _series(run.rounds, 'mean_client_norm'), '^--', color=color, lw=1.2,
              label=f'{run.label}: average of clients')
      for j, values in enumerate(_per_client(run, 'client_norm').values()):
        ax.plot(rx, values, color=color, lw=0.6, alpha=0.4,
                label=f'{run.label}: client models' if j == 0 else None)
  _finish(ax, x, 'Model L2 norms', 'L2 norm', log=False)
  save(fig, path)


def plot_gradients(runs: Sequence[Run], x: str, path: str) -> None:
  """Figure 4: pseudo-gradient and outer update norms; client gradients and applied updates."""
  fig, (ax_server, ax_client) = plt.subplots(1, 2, figsize=(13, 5))
  for i, run in enumerate(runs):
    color = f'C{i}'
    rx = _round_x(run, x)
    if run.federated:
      ax_server.plot(rx, _series(run.rounds, 'pseudo_grad_norm'), 'o-', color=color,
                     label=f'{run.label}: pseudo-gradient')
      ax_server.plot(rx, _series(run.rounds, 'outer_update_norm'), '^--', color=color,
                     label=f'{run.label}: outer update')
      ax_server.plot(rx, _series(run.rounds, 'outer_momentum_norm'), ':', color=color,
                     label=f'{run.label}: outer momentum')
    for j, (client, steps) in enumerate(sorted(_steps_by_client(run).items())):
      sx = _step_x(run, steps, x)
      first = j == 0
      ax_client.plot(sx, _series(steps, 'grad_norm'), color=color, lw=0.7, alpha=0.6,
                     label=f'{run.label}: gradient' if first else None)
      ax_client.plot(sx, _series(steps, 'update_norm'), '--', color=color, lw=0.7, alpha=0.6,
                     label=f'{run.label}: applied update' if first else None)
  _finish(ax_server, x, 'Server: pseudo-gradient and outer update', 'L2 norm')
  _finish(ax_client, x, 'Clients: local gradient and applied update', 'L2 norm')
  save(fig, path)


def make_figures(runs: Sequence[Run], out_dir: str, x: str = 'tokens') -> list[str]:
  """Writes the three figures for `runs` into `out_dir`; returns their paths."""
  if x not in X_AXES:
    raise ValueError(f'x must be one of {X_AXES}, got {x!r}')
  if x == 'sim_time':
    for run in runs:
      if any(r.sim_wall_time_s is None for r in run.rounds):
        raise ValueError(f'{run.workdir} has rounds without sim_wall_time_s (written by '
                         'fedjax_pt since heterogeneous clients; re-run it): use --x=tokens')
  os.makedirs(out_dir, exist_ok=True)
  _unique_labels(runs)
  paths = []
  for name, draw in (('perplexity', plot_perplexity), ('norms', plot_norms),
                     ('gradients', plot_gradients)):
    path = os.path.join(out_dir, f'{name}.png')
    draw(runs, x, path)
    paths.append(path)
  return paths


def _cli() -> None:
  # Flags are defined here, not at import, so importing this module (from a notebook, or next to
  # fedjax_pt.main, which also has --workdir) defines nothing.
  workdirs = flags.DEFINE_multi_string('workdir', [], 'Run directory (repeat for several runs).')
  out = flags.DEFINE_string('out', 'plots', 'Directory for the PNG files.')
  x = flags.DEFINE_enum('x', 'tokens', list(X_AXES), 'Horizontal axis.')

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    if not workdirs.value:
      cli.fail('give at least one --workdir=RUN', program='fedjax_pt.plot')
    if os.path.exists(out.value) and not os.path.isdir(out.value):
      cli.fail(f'--out={out.value} is a file, not a directory', program='fedjax_pt.plot')
    try:
      paths = make_figures([load_run(w) for w in workdirs.value], out.value, x.value)
    except (OSError, ValueError) as e:
      cli.fail(e, program='fedjax_pt.plot')
    for path in paths:
      print(path)

  app.run(main)


if __name__ == '__main__':
  _cli()
