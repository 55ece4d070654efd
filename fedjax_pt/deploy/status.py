"""`python -m fedjax_pt.deploy.status --workdir=RUN`: a deployed run as its operator needs it —
each seat with the key bound to it, the node holding it (online, or offline since when), the
rounds it trained and its last failure; the nodes refused a seat and why; the run's last round.
Read from the server's workdir (`federation.json`, which the ServerApp keeps current, and
`metrics.jsonl`), so it works while the run goes on, after it ended, and on a copy.

  --json            the same as one JSON object
  --release=SEAT    unbinds a seat (client-k) from its key, e.g. after an organisation changed
                    machines: the next key that claims it is bound (a running server too)
"""

import dataclasses
import json
import os
import time
from typing import Any

from fedjax_pt import records
from fedjax_pt.deploy import seats as seats_lib


@dataclasses.dataclass
class SeatStatus:
  key: str | None = None
  node: int | None = None
  online: bool = False
  since: float | None = None
  rounds_trained: int = 0
  last_round: int | None = None
  last_failure: str | None = None  # 'round r: why'


def summarize(workdir: str) -> dict[str, Any]:
  """The run's status as JSON-able data; ValueError when `workdir` holds no deployed run."""
  state = seats_lib.FederationState.load(workdir)
  if state is None:
    raise ValueError(f'{os.path.join(workdir, seats_lib.FILE)} does not exist: --workdir holds '
                     'no deployed run (the ServerApp writes it when the run starts)')
  path = os.path.join(workdir, 'metrics.jsonl')
  rounds = ([r for r in records.read_records(path).rounds if r.round > 0]
            if os.path.isfile(path) else [])
  names = set(state.seats) | {v['seat'] for v in state.nodes.values()
                              if v.get('seat') and not v.get('refused')}
  names |= {seats_lib.seat_name(k) for r in rounds for k in r.clients or []}
  table = {name: SeatStatus(key=state.seats.get(name)) for name in names}
  for node_id, view in sorted(state.nodes.items(), key=lambda item: int(item[0])):
    if view.get('refused') or view.get('seat') not in table:
      continue
    seat = table[view['seat']]
    if seat.node is None or view.get('online'):
      seat.node, seat.online, seat.since = int(node_id), bool(view.get('online')), view.get('since')
  for r in rounds:
    for k in r.client_local_steps or {}:
      seat = table.setdefault(seats_lib.seat_name(k), SeatStatus())
      seat.rounds_trained += 1
      seat.last_round = r.round
    for k, why in (r.failed_clients or {}).items():
      table.setdefault(seats_lib.seat_name(int(k)), SeatStatus()).last_failure = (
          f'round {r.round}: {why}')
  refused = {node_id: view for node_id, view in state.nodes.items() if view.get('refused')}
  last = rounds[-1] if rounds else None
  return {
      'run_id': state.run_id, 'workdir': workdir,
      'nodes_as_of': os.path.getmtime(os.path.join(workdir, seats_lib.FILE)),
      'last_round': None if last is None else last.round,
      'val_ppl': None if last is None else last.val_ppl,
      'tokens_per_s': None if last is None else last.tokens_per_s,
      'seats': {name: dataclasses.asdict(table[name])
                for name in sorted(table, key=lambda n: int(n.split('-')[1]))},
      'refused_nodes': refused}


def _when(since: float | None) -> str:
  return time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since)) if since else '?'


def render(status: dict[str, Any]) -> str:
  """The status as lines for a terminal."""
  ppl = status['val_ppl']
  lines = [f'run {status["run_id"]} in {status["workdir"]}: '
           + ('no round yet' if status['last_round'] is None else
              f'last round {status["last_round"]}'
              + (f', val_ppl {ppl:.2f}' if isinstance(ppl, float) else '')
              + (f', {status["tokens_per_s"]:.0f} tokens/s (all clients)'
                 if isinstance(status['tokens_per_s'], (int, float)) else ''))
           + f'; nodes as the ServerApp last saw them, at {_when(status["nodes_as_of"])}']
  for name, seat in status['seats'].items():
    node = ('no node seen' if seat['node'] is None else
            f'node {seat["node"]} {"online" if seat["online"] else "offline"} since '
            f'{_when(seat["since"])}')
    trained = (f'trained {seat["rounds_trained"]} rounds, last round {seat["last_round"]}'
               if seat['rounds_trained'] else 'trained no round')
    failure = f'; last failure {seat["last_failure"]}' if seat['last_failure'] else ''
    lines.append(f'{name:<10} key {seat["key"] or "(unbound)":<16}  {node}; {trained}{failure}')
  for node_id, view in sorted(status['refused_nodes'].items(), key=lambda item: int(item[0])):
    lines.append(f'node {node_id} refused ({"online" if view.get("online") else "offline"}, key '
                 f'{view.get("key") or "none"}): {view["refused"]}')
  return '\n'.join(lines)


def _cli() -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  from fedjax_pt import cli  # pylint: disable=g-import-not-at-top
  workdir = flags.DEFINE_string('workdir', '', "The ServerApp's run directory (run config "
                                'workdir).')
  as_json = flags.DEFINE_bool('json', False, 'Print one JSON object.')
  release = flags.DEFINE_string('release', '', 'Unbind this seat (client-k) from its key.')
  program = 'fedjax_pt.deploy.status'

  def main(argv) -> None:
    if len(argv) > 1:
      cli.fail(f'unexpected arguments: {" ".join(argv[1:])}', program=program)
    if not workdir.value:
      cli.fail('--workdir is required', program=program)
    try:
      if release.value:
        if not seats_lib.SEAT.fullmatch(release.value):
          cli.fail(f'--release={release.value!r} names no seat (client-<k>)', program=program)
        key = seats_lib.release(workdir.value, release.value)
        print(f'{release.value} released (was bound to key {key})' if key else
              f'{release.value} was not bound to a key')
        return
      status = summarize(workdir.value)
    except (OSError, ValueError) as e:
      cli.fail(e, program=program)
    print(json.dumps(status, indent=1) if as_json.value else render(status))

  app.run(main)


if __name__ == '__main__':
  _cli()
