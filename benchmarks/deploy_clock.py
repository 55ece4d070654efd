r"""The simulated clock against measured Flower rounds: calibrate `fl.clock` on one setting, check
its predictions on others.

  python -m benchmarks.deploy_clock --calibrate [--out=runs/deploy_clock]    # root; ~8 min
  python -m benchmarks.deploy_clock --check [--out=runs/deploy_clock]        # root; ~14 min
  python -m benchmarks.deploy_clock --report [--out=runs/deploy_clock]       # the tables again

Every run is `python -m fedjax_pt.deploy.local --nodes=2` (SuperLink, 2 SuperNodes, TLS, a fresh
ClientApp process per message) on `configs/tiny.py:test` with a decoder of d_model 512 and L
layers (byte vocabulary: L=2 is 27 MB a message, L=4 52 MB, L=8 102 MB; `tiny` is the test config
itself, 0.15 MB), 2 local steps a round, 4 rounds; round 1 compiles and is left out. A deployment
writes both clocks into its metrics.jsonl: `round_time_s`, measured by the server, and
`sim_round_time_s`, the simulated clock of the same round (the nodes' measured training time, the
links of `--link`, the server's measured work, and `fl.clock`).

--calibrate runs `tiny` and L=2 on unshaped links, and L=2 behind --link=50mbit,200mbit and
--link=100mbit (root: network namespaces and tbf), with `fl.clock` at 0, and fits

    round_time_s - sim_round_time_s = round_trip_s + 8 x bytes / transport_mbps

(bytes: the largest download + upload of a client in the round) by least squares over their
rounds: what Flower adds to a round trip on this machine. It writes `calibration.json` and prints
the `--config.fl.clock.*` overrides.

--check (root) runs the other sizes, L=4 and L=8, behind the same links with those overrides,
plus L=4 with the shared transport, and prints per setting the clock's error against the
measured rounds, and the rate a client's model moved at against its link's (inline: through the
SuperLink; shared: by disk, past the shaped link). Calibration and check share no model size.
"""

import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

from fedjax_pt.deploy.local import links as links_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
_CALIBRATE = flags.DEFINE_bool('calibrate', False, 'Measure fl.clock on unshaped links.')
_CHECK = flags.DEFINE_bool('check', False, 'Check the calibrated clock on shaped links (root).')
_OUT = flags.DEFINE_string('out', 'runs/deploy_clock', 'Where the runs and results go.')
_ROUNDS = flags.DEFINE_integer('rounds', 4, 'Rounds a run; the first (compiling) is left out.')
_REPORT = flags.DEFINE_bool('report', False, 'Print the tables of the runs already in --out.')
_ONLY = flags.DEFINE_list('only', [], 'Run only these settings (names as printed).')

_REPLY = re.compile(r'round (\d+): client (\d+) \(node \d+\) replied after ([\d.]+)s, read in '
                    r'([\d.]+)s; node: (.*)')

# name: (layers or None for the tiny config, --link, transport)
CALIBRATION = {'tiny': (None, '', 'inline'), 'L2': (2, '', 'inline'),
               'L2 50/200': (2, '50mbit,200mbit', 'inline'), 'L2 100': (2, '100mbit', 'inline')}
CHECKS = {'L4 50/200': (4, '50mbit,200mbit', 'inline'), 'L4 100': (4, '100mbit', 'inline'),
          'L8 50/200': (8, '50mbit,200mbit', 'inline'), 'L8 100': (8, '100mbit', 'inline'),
          'L4 50/200 shared': (4, '50mbit,200mbit', 'shared')}


def command(workdir: pathlib.Path, layers: int | None, link: str, transport: str,
            clock: dict[str, float], rounds: int) -> list[str]:
  args = [sys.executable, '-m', 'fedjax_pt.deploy.local', '--nodes=2',
          '--config=configs/tiny.py:test', f'--workdir={workdir}', f'--transport={transport}',
          f'--config.fl.rounds={rounds}', '--config.fl.local_steps=2',
          ]
  if layers:
    args += ['--config.model.d_model=512', f'--config.model.num_layers={layers}',
             '--config.model.num_heads=8', '--config.eval.max_batches=1',
             '--config.eval.batch_size=4']
  if link:
    args.append(f'--link={link}')
  args += [f'--config.fl.clock.{key}={value:.6g}' for key, value in clock.items()]
  return args


def run(out: pathlib.Path, name: str, setting: tuple, clock: dict[str, float],
        rounds: int) -> dict:
  """One deployment; its rounds after the first and the replies of the server's log."""
  workdir = out / re.sub(r'\W+', '_', name)
  if workdir.exists():
    subprocess.run(['rm', '-rf', str(workdir)], check=True)
  args = command(workdir, *setting, clock, rounds)
  print(f'[{name}] {" ".join(args[1:])}', flush=True)
  start = time.perf_counter()
  done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  if done.returncode != 0:
    raise RuntimeError(f'{name}: exit {done.returncode}: {done.stderr[-2000:]}')
  with open(workdir / 'metrics.jsonl', encoding='utf-8') as f:
    rounds_ = [r for r in map(json.loads, f) if r['kind'] == 'round' and r['round'] >= 2]
  replies = []
  with open(workdir / 'deploy' / 'logs' / 'run.log', encoding='utf-8') as f:
    for m in _REPLY.finditer(f.read()):
      if int(m[1]) >= 2:
        timings = dict((p, float(s.rstrip('s'))) for p, s in
                       (part.split() for part in m[5].split(', ')))
        replies.append({'round': int(m[1]), 'client': int(m[2]), 'reply_s': float(m[3]),
                        'read_s': float(m[4]), **timings})
  print(f'[{name}] {wall:.0f} s', flush=True)
  return {'name': name, 'setting': setting, 'clock': clock, 'wall_s': wall, 'replies': replies,
          'rounds': [{k: r.get(k) for k in ('round', 'round_time_s', 'sim_round_time_s',
                                           'server_time_s', 'client_download_bytes',
                                           'client_upload_bytes', 'client_sim_time_s')}
                     for r in rounds_]}


def round_bytes(record: dict) -> int:
  """The largest download + upload of one client in the round."""
  down, up = record['client_download_bytes'], record['client_upload_bytes']
  return max(down.get(k, 0) + up.get(k, 0) for k in set(down) | set(up))


def fit(runs: list[dict]) -> dict[str, float]:
  """Least squares of (measured - simulated) round time on 8 x bytes: intercept round_trip_s,
  slope 1 / transport_mbps (a slope <= 0: the transport costs no time of its own)."""
  xs = [8 * round_bytes(r) / 1e6 for run_ in runs for r in run_['rounds']]
  ys = [r['round_time_s'] - r['sim_round_time_s'] for run_ in runs for r in run_['rounds']]
  mx, my = statistics.fmean(xs), statistics.fmean(ys)
  sxx = sum((x - mx) ** 2 for x in xs)
  slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
  if slope <= 0:
    return {'round_trip_s': max(0.0, my), 'transport_mbps': 0.0}
  return {'round_trip_s': max(0.0, my - slope * mx), 'transport_mbps': 1 / slope}


def rates(setting: tuple) -> list[float]:
  link = setting[1]
  if not link:
    return []
  parts = [float(p.removesuffix('mbit')) for p in link.split(',')]
  return parts * 2 if len(parts) == 1 else parts


def report(run_: dict, tiny_outside_s: float | None) -> str:
  """A table row: the clock's error over the run's rounds, and the achieved transfer rates."""
  measured = [r['round_time_s'] for r in run_['rounds']]
  simulated = [r['sim_round_time_s'] for r in run_['rounds']]
  errors = [s / m - 1 for s, m in zip(simulated, measured)]
  ideal = [s / m - 1 for s, m in zip(ideal_transport_round_s(run_), measured)]
  mb = statistics.fmean(round_bytes(r) for r in run_['rounds']) / 1e6
  achieved = ''
  if tiny_outside_s is not None and run_['replies']:
    per_client = {}
    for reply in run_['replies']:
      moved = reply['reply_s'] - reply.get('train', 0.0) - tiny_outside_s
      per_client.setdefault(reply['client'], []).append(8 * mb / moved if moved > 0 else None)
    achieved = ', '.join(
        f'client {k}: {statistics.fmean(v):.0f}' if all(v) else f'client {k}: -'
        for k, v in sorted(per_client.items()))
  clients = []
  for k in sorted({reply['client'] for reply in run_['replies']}):
    replies = {r['round']: r['reply_s'] for r in run_['replies'] if r['client'] == k}
    sims = {r['round']: r['client_sim_time_s'][str(k)] for r in run_['rounds']
            if str(k) in (r['client_sim_time_s'] or {})}
    both = sorted(set(replies) & set(sims))
    if both:
      clients.append(f'{k}: {statistics.fmean(replies[r] for r in both):.1f} / '
                     f'{statistics.fmean(sims[r] for r in both):.1f}')
  return (f'| {run_["name"]} | {mb:.1f} | {statistics.fmean(measured):.1f} | '
          f'{statistics.fmean(simulated):.1f} | {100 * statistics.fmean(ideal):+.1f}% | '
          f'{100 * statistics.fmean(errors):+.1f}% | '
          f'{100 * min(errors):+.1f}% to {100 * max(errors):+.1f}% | '
          f'{", ".join(f"{r:g}" for r in rates(run_["setting"])) or "-"} | '
          f'{"; ".join(clients) or "-"} | {achieved or "-"} |')


HEADER = ('| setting | MB a client a round (down + up) | measured round (s) | '
          'simulated round (s) | error at fl.clock = 0 | clock error (mean) | '
          'range over rounds | links (Mbit/s) | '
          'client: measured / simulated reply (s) | achieved Mbit/s (model both ways) |\n'
          '|---|---|---|---|---|---|---|---|---|---|')


def ideal_transport_round_s(run_: dict) -> list[float]:
  """The run's simulated rounds with fl.clock at 0 (an ideal transport): each client's simulated
  time less what the clock charged it, the slowest of them plus the server's time."""
  clock = run_['clock'] or {}
  rounds = []
  for r in run_['rounds']:
    down, up = r['client_download_bytes'], r['client_upload_bytes']
    slowest = max(t - clock.get('round_trip_s', 0.0) - (
        8 * (down.get(k, 0) + up.get(k, 0)) / (clock['transport_mbps'] * 1e6)
        if clock.get('transport_mbps') else 0.0) for k, t in r['client_sim_time_s'].items())
    rounds.append(slowest + r['server_time_s'])
  return rounds


def tiny_outside(runs: list[dict]) -> float | None:
  """A round trip's time beyond training with a negligible model: the fixed part of a reply."""
  tiny = [r for run_ in runs if run_['name'] == 'tiny' for r in run_['replies']]
  return statistics.fmean(r['reply_s'] - r.get('train', 0.0) for r in tiny) if tiny else None


def print_report(out: pathlib.Path) -> None:
  for name in ('calibration.json', 'check.json'):
    if not (out / name).exists():
      print(f'{out / name}: not written yet')
      continue
    with open(out / name, encoding='utf-8') as f:
      result = json.load(f)
    print(f'{name} (commit {result["commit"]}): fl.clock {result["clock"]}')
    print(HEADER)
    tiny_s = (result.get('tiny_outside_s') if name == 'calibration.json' else None)
    if name == 'check.json':
      with open(out / 'calibration.json', encoding='utf-8') as f:
        tiny_s = json.load(f).get('tiny_outside_s')
    for run_ in result['runs']:
      print(report(run_, tiny_s if run_['setting'][1] else None))


def main(argv) -> None:
  del argv
  if _CALIBRATE.value + _CHECK.value + _REPORT.value != 1:
    raise app.UsageError('give one of --calibrate, --check or --report')
  out = (REPO / _OUT.value).resolve()
  if _REPORT.value:
    print_report(out)
    return
  out.mkdir(parents=True, exist_ok=True)
  calibration_file = out / 'calibration.json'
  commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True,
                          text=True, check=False).stdout.strip()
  settings = CALIBRATION if _CALIBRATE.value else CHECKS
  unknown = sorted(set(_ONLY.value) - set(settings))
  if unknown:
    raise app.UsageError(f'--only={",".join(unknown)}: no such setting; '
                         f'{"--calibrate" if _CALIBRATE.value else "--check"} has '
                         f'{", ".join(settings)}')
  settings = {k: v for k, v in settings.items() if not _ONLY.value or k in _ONLY.value}
  shaped = [name for name, (_, link, _) in settings.items() if link]
  if shaped:
    try:
      links_lib.check_available()
    except links_lib.LinkError as e:
      raise app.UsageError(f'{e}: the settings {", ".join(shaped)} run behind --link (--only '
                           'picks others)') from None
  if _CALIBRATE.value:
    runs = [run(out, name, setting, {}, _ROUNDS.value) for name, setting in settings.items()]
    clock = fit(runs)
    with open(calibration_file, 'w', encoding='utf-8') as f:
      json.dump({'clock': clock, 'commit': commit, 'cpus': os.cpu_count(),
                 'tiny_outside_s': tiny_outside(runs), 'runs': runs}, f, indent=1)
    print(HEADER)
    for run_ in runs:
      print(report(run_, None))
    print(f'fl.clock fitted on {sum(len(r["rounds"]) for r in runs)} rounds (commit {commit}): '
          + ' '.join(f'--config.fl.clock.{k}={v:.3g}' for k, v in clock.items()))
    print(f'written: {calibration_file}')
    return
  if not calibration_file.exists():
    raise app.UsageError(f'{calibration_file} does not exist: run --calibrate first')
  with open(calibration_file, encoding='utf-8') as f:
    calibration = json.load(f)
  runs = [run(out, name, setting, calibration['clock'], _ROUNDS.value)
          for name, setting in settings.items()]
  with open(out / 'check.json', 'w', encoding='utf-8') as f:
    json.dump({'clock': calibration['clock'], 'commit': commit, 'runs': runs}, f, indent=1)
  print(f'fl.clock from {calibration_file}: {calibration["clock"]}')
  print(HEADER)
  for run_ in runs:
    print(report(run_, calibration.get('tiny_outside_s')))


if __name__ == '__main__':
  app.run(main)
