"""What a person watching a run sees: the progress bar, one line per round, the final summary."""

import logging as std_logging
import math
import sys

from absl import logging
import jax
import tqdm

from fedjax_pt.federated import communication
from fedjax_pt import records
from fedjax_pt import summaries


def format_tokens(n: float) -> str:
  for unit, scale in (('B', 1e9), ('M', 1e6), ('k', 1e3)):
    if n >= scale:
      return f'{n / scale:.2f}{unit}'
  return str(int(n))


def steps_per_round(spec) -> int:
  """The local steps the progress bar counts per round: all of a round's clients' together
  (`fl.profiles` may give them different numbers), the mean client's times clients_per_round."""
  fl = spec.fl
  if spec.mode != 'federated':
    return fl.local_steps
  return round(fl.clients_per_round * sum(
      spec.client_plan(k).local_steps for k in range(fl.num_clients)) / fl.num_clients)


class Progress:
  """tqdm bar over all local steps of the run, with the current round/client, ETA and latest loss.

  The bar appears at `begin`, once the run knows how many steps an earlier session already did.
  While it is shown, log lines are printed above it instead of through it. It counts steps even
  when it is not shown (log.progress=False).
  """

  def __init__(self, total_steps: int, enabled: bool):
    self.total, self.done, self._enabled = total_steps, 0, enabled
    self._bar = None
    self._handler = None

  def begin(self, done: int = 0) -> None:
    self.done = done
    self._bar = tqdm.tqdm(total=self.total, initial=done, unit='step', disable=not self._enabled,
                          mininterval=1.0, dynamic_ncols=True, smoothing=0.1)
    if self._enabled:
      self._handler = _AboveTheBar(logging.get_absl_handler())
      std_logging.getLogger().addHandler(self._handler)
      std_logging.getLogger().removeHandler(logging.get_absl_handler())

  def describe(self, text: str) -> None:
    if self._bar is not None:
      self._bar.set_description(text, refresh=False)

  def advance(self, steps: int = 1) -> None:
    self.done += steps
    if self._bar is not None:
      self._bar.update(steps)

  def add_total(self, steps: int) -> None:
    """More steps than planned (a retried round): the bar's total and ETA follow."""
    self.total += steps
    if self._bar is not None:
      self._bar.total = self.total
      self._bar.refresh()

  def loss(self, value: float) -> None:
    if self._bar is not None:
      self._bar.set_postfix(loss=f'{value:.3f}', refresh=False)

  def write(self, text: str) -> None:
    # Printed even when the bar is disabled: with log.progress=False a run shows one line per round.
    # A process other than 0 of a multi-process run logs it: process 0 prints the run's lines.
    if jax.process_index():
      logging.info('%s', text)
    else:
      tqdm.tqdm.write(text)

  def close(self) -> None:
    if self._handler is not None:
      std_logging.getLogger().addHandler(self._handler.absl_handler)
      std_logging.getLogger().removeHandler(self._handler)
      self._handler = None
    if self._bar is not None:
      self._bar.close()


class _AboveTheBar(std_logging.Handler):
  """absl's log lines, formatted as absl formats them, written with tqdm.write so that they land
  above the progress bar instead of being glued to it."""

  def __init__(self, absl_handler: std_logging.Handler):
    super().__init__(absl_handler.level)
    self.absl_handler = absl_handler
    self.filters = absl_handler.filters

  def emit(self, record: std_logging.LogRecord) -> None:
    try:
      tqdm.tqdm.write(self.absl_handler.format(record), file=sys.stderr)
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


def number(value: float | None, fmt: str) -> str:
  """`value` in `fmt`, or in 3 significant digits when it is too large for it to be read (a
  diverging perplexity of 1e304 would print 305 digits)."""
  if value is None:
    return 'n/a'
  return format(value, '.3g' if abs(value) >= 1e6 else fmt)


def round_line(record: records.RoundRecord, rounds: int) -> str:
  """One line a round: the model's quality, the round's work and time; `simulated` is the
  round's time on the clients' own hardware (`federated/sim_clock.py`), `pseudo-grad` the norm
  of the server's pseudo-gradient."""
  line = (f'round {record.round}/{rounds} | val_loss {number(record.val_loss, ".4f")} | '
          f'val_ppl {number(record.val_ppl, ".2f")}')
  if record.round == 0:
    return line + ' | the initial model'
  line += (f' | train_loss {number(record.train_loss, ".4f")} | '
           f'tokens {format_tokens(record.tokens)} | {record.round_time_s:.1f}s '
           f'({format_tokens(record.tokens_per_s)} tok/s)')
  if record.sim_round_time_s is not None and record.clients is not None:
    line += f' | simulated {record.sim_round_time_s:.1f}s'
  if record.pseudo_grad_norm is not None:
    line += f' | pseudo-grad {record.pseudo_grad_norm:.3g}'
  if record.dp_epsilon is not None:
    line += f' | ε {record.dp_epsilon:.3g}'
  if record.failed_clients:
    line += f' | {len(record.failed_clients)} client faults'
  if record.skipped:
    line += ' | SKIPPED (too few clients)'
  return line


def _human_bytes(n: float) -> str:
  for unit, scale in (('TB', 1e12), ('GB', 1e9), ('MB', 1e6), ('kB', 1e3)):
    if n >= scale:
      return f'{n / scale:.2f} {unit}'
  return f'{int(n)} B'


def _never_aggregated(rounds: list[records.RoundRecord]) -> dict[int, str]:
  """Clients that failed in every round that sampled them (a node with a wrong data path), with
  their last reason; a run that goes on without them must say so."""
  sampled: dict[int, int] = {}
  failed: dict[int, list[str]] = {}
  for r in rounds:
    for k in r.clients or ():
      sampled[int(k)] = sampled.get(int(k), 0) + 1
    per_round: dict[int, str] = {}
    for key, reason in (r.failed_clients or {}).items():
      per_round[int(str(key).split('@')[0].split('#')[0])] = reason  # k, k@attempt, k#fragment
    for k, reason in per_round.items():
      failed.setdefault(k, []).append(reason)
  return {k: reasons[-1] for k, reasons in sorted(failed.items())
          if sampled.get(k) and len(reasons) >= sampled[k]}


def summary_table(rounds: list[records.RoundRecord], total_time_s: float) -> str:
  """The end-of-run summary: best and final val_ppl, tokens, time, bytes communicated."""
  s = summaries.summarize(rounds)
  rows = [
      ('rounds', str(s.rounds)),
      ('final val_ppl', number(s.final_val_ppl, '.3f')),
      ('best val_ppl', 'n/a' if s.best_val_ppl is None else
       f'{number(s.best_val_ppl, ".3f")} (round {s.best_round})'),
      *((f'final extra_val_ppl/{name}', number(ppl, '.3f'))
        for name, ppl in (s.final_extra_val_ppl or {}).items()),
      ('tokens', f'{s.tokens:,}'),
      ('wall time', f'{total_time_s:.1f} s'),
      ('bytes sent (server -> clients)', _human_bytes(s.bytes_sent or 0)),
      ('bytes received (clients -> server)', _human_bytes(s.bytes_received or 0)),
  ]
  sim = rounds[-1].sim_wall_time_s if rounds else None
  if sim is not None and rounds[-1].clients is not None:
    rows.insert([k for k, _ in rows].index('wall time') + 1, (
        'simulated wall time',
        f'{sim:.1f} s (clients training at once, fedjax_pt/federated/sim_clock.py)'))
  for key, value, clock in (('compute utilisation (simulated)', s.sim_compute_utilization,
                             'clients\' training time / their simulated wall time'),
                            ('compute utilisation (measured)', s.compute_utilization,
                             'clients\' training time on their hosts / round time')):
    if value is not None:
      rows.append((key, f'{value:.1%} ({clock}, fedjax_pt/utilization.py)'))
  ratio = communication.ddp_ratio(s.ddp_equivalent_bytes, s.bytes_communicated)
  if ratio is not None:
    how = f'{ratio:,.1f}x less' if ratio >= 1 else f'{1 / ratio:,.1f}x more'
    rows.append(('vs data-parallel (ring all-reduce)',
                 f'{how} communication than DDP ({_human_bytes(s.ddp_equivalent_bytes)})'))
  for client, reason in _never_aggregated(rounds).items():
    rows.append((f'client {client}', f'failed in every round it was sampled: {reason}'))
  last = rounds[-1] if rounds else None
  if last is not None and last.dp_epsilon is not None:
    rows.append(('differential privacy', 'none: epsilon = inf (fl.dp without noise clips only)'
                 if math.isinf(last.dp_epsilon) else
                 f'({last.dp_epsilon:.3g}, {last.dp_delta:g})-DP for each client (fl.dp)'))
  width = max(len(k) for k, _ in rows)
  return '\n'.join(f'{k.ljust(width)}  {v}' for k, v in rows)
