"""What a person watching a run sees: the progress bar, one line per round, the final summary."""

from typing import Any

import tqdm


def format_tokens(n: float) -> str:
  for unit, scale in (('B', 1e9), ('M', 1e6), ('k', 1e3)):
    if n >= scale:
      return f'{n / scale:.2f}{unit}'
  return str(int(n))


class Progress:
  """tqdm bar over all local steps of the run, with the current round/client, ETA and latest loss."""

  def __init__(self, total_steps: int, enabled: bool, initial: int = 0):
    self._bar = tqdm.tqdm(total=total_steps, initial=initial, unit='step', disable=not enabled,
                          mininterval=1.0, dynamic_ncols=True, smoothing=0.1)

  def describe(self, text: str) -> None:
    self._bar.set_description(text, refresh=False)

  def advance(self, _=None) -> None:
    self._bar.update(1)

  def loss(self, value: float) -> None:
    self._bar.set_postfix(loss=f'{value:.3f}', refresh=False)

  def write(self, text: str) -> None:
    # Printed even when the bar is disabled: with log.progress=False a run shows one line per round.
    self._bar.write(text)

  def close(self) -> None:
    self._bar.close()


def round_line(record: dict[str, Any], rounds: int) -> str:
  def value(key, fmt):
    return 'n/a' if record.get(key) is None else format(record[key], fmt)

  line = (f"round {record['round']}/{rounds} | val_loss {value('val_loss', '.4f')} | "
          f"val_ppl {value('val_ppl', '.2f')} | train_loss {value('train_loss', '.4f')} | "
          f"tokens {format_tokens(record['tokens'])} | {record['round_time_s']:.1f}s "
          f"({format_tokens(record['tokens_per_s'])} tok/s)")
  if record.get('pseudo_grad_norm') is not None:
    line += f" | |Δ| {record['pseudo_grad_norm']:.3g}"
  if record.get('failed_clients'):
    line += f" | {len(record['failed_clients'])} client faults"
  if record.get('skipped'):
    line += ' | SKIPPED (too few clients)'
  return line


def _human_bytes(n: float) -> str:
  for unit, scale in (('TB', 1e12), ('GB', 1e9), ('MB', 1e6), ('kB', 1e3)):
    if n >= scale:
      return f'{n / scale:.2f} {unit}'
  return f'{int(n)} B'


def summary_table(rounds: list[dict[str, Any]], total_time_s: float) -> str:
  """The end-of-run summary: best and final val_ppl, tokens, time, bytes communicated."""
  evaluated = [r for r in rounds if r.get('val_ppl') is not None]
  best = min(evaluated, key=lambda r: r['val_ppl']) if evaluated else None
  last = rounds[-1]
  rows = [
      ('rounds', str(last['round'])),
      ('final val_ppl', f"{last['val_ppl']:.3f}" if last.get('val_ppl') is not None else 'n/a'),
      ('best val_ppl', f"{best['val_ppl']:.3f} (round {best['round']})" if best else 'n/a'),
      ('tokens', f"{last['tokens']:,}"),
      ('wall time', f'{total_time_s:.1f} s'),
      ('bytes sent (server -> clients)', _human_bytes(last.get('bytes_sent', 0))),
      ('bytes received (clients -> server)', _human_bytes(last.get('bytes_received', 0))),
  ]
  width = max(len(k) for k, _ in rows)
  return '\n'.join(f'{k.ljust(width)}  {v}' for k, v in rows)
