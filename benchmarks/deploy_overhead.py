r"""What the Flower deployment adds to a round, against the in-process simulation, and how fast
each transport moves a model.

  python -m benchmarks.deploy_overhead [--model=tiny|100mb] [--rounds=3]

Runs one config three ways on this machine: the simulation (`fedjax_pt.train.run`), and the
deployment with 2 SuperNodes (`fedjax_pt.deploy.local.federation.LocalFederation`: TLS, node
authentication, a ClientApp process per message, the JAX compilation cache warm) with each
transport. Rounds after the first (which compiles) are compared:

  round         mean `round_time_s` of metrics.jsonl (sampling to evaluation included)
  overhead      deployment round minus simulation round
  reply         server-observed time from sending a client the model to having its reply
  on node       the node's own handler time (build, fetch, train, send; from the reply)
  outside       reply minus on node: Flower's polling, the ClientApp process start, the
                messages' transfer through the SuperLink
  put / read    the server writing the global model / reading a client's (shared: orbax)
  fetch / send  the node reading the global model / writing its own

`100mb` is a 25.3M-parameter decoder (d_model 512, 8 layers; 101 MB of float32) trained one local
step per round, so the round is mostly moving the model; `tiny` is configs/tiny.py:test.
"""

import os
import pathlib
import re
import statistics
import tempfile

from absl import app
from absl import flags

from fedjax_pt.configs import tiny
from fedjax_pt import records
from fedjax_pt import train
from fedjax_pt.deploy.local import federation as launcher

_MODEL = flags.DEFINE_enum('model', 'tiny', ['tiny', '100mb'], 'Model size.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Rounds per run; the first is left out.')
_WORKDIR = flags.DEFINE_string('workdir', '', 'Where the runs go (default: a temporary dir).')

REPO = pathlib.Path(__file__).resolve().parents[1]
_REPLY = re.compile(r'round (\d+): client (\d+) \(node \d+\) replied after ([\d.]+)s, read in '
                    r'([\d.]+)s; node: build ([\d.]+)s, fetch ([\d.]+)s, train ([\d.]+)s, send '
                    r'([\d.]+)s')
_PUT = re.compile(r'round (\d+): the model \(([\d.]+) MB\) put for \d+ clients \((\w+)\) in '
                  r'([\d.]+)s')


def _overrides(model: str, rounds: int) -> list[str]:
  flags_ = ['--config.fl.num_clients=2', '--config.fl.clients_per_round=2',
            f'--config.fl.rounds={rounds}', '--config.ckpt.every_rounds=0']
  if model == '100mb':
    flags_ += ['--config.model.d_model=512', '--config.model.num_layers=8',
               '--config.model.num_heads=8', '--config.fl.local_steps=1',
               '--config.eval.max_batches=1', '--config.eval.batch_size=4']
  return flags_


def _config(overrides: list[str]):
  config = tiny.get_config('test')
  for flag in overrides:
    key, value = flag[len('--config.'):].split('=')
    group, name = key.split('.')
    config[group][name] = type(config[group][name])(value)
  return config


def _mean_round(workdir: pathlib.Path) -> float:
  rounds = records.read_records(str(workdir)).rounds[1:]
  return statistics.mean(r.round_time_s for r in rounds)


def _deploy(root: pathlib.Path, transport: str, overrides: list[str]) -> dict[str, float]:
  workdir = root / f'deploy-{transport}'
  federation = launcher.LocalFederation(workdir / 'deploy')
  try:
    federation.start_superlink()
    for i in range(2):
      federation.add_node(f'client-{i}', f"partition-id={i} num-partitions=2 "
                          f"state-dir='{workdir}/deploy/nodes/{i}'")
    federation.wait_online(2)
    status, error = federation.run({
        'config': f'{REPO}/configs/tiny.py:test', 'workdir': str(workdir),
        'overrides': ' '.join(overrides), 'transport': transport})
  finally:
    federation.stop()
  if status != 'finished:completed':
    raise RuntimeError(f'{transport}: {status} {error}')
  log = (workdir / 'deploy' / 'logs' / 'run.log').read_text()
  replies = [tuple(map(float, m.groups())) for m in _REPLY.finditer(log)]
  replies = [r for r in replies if r[0] > 1]
  puts = [float(m[4]) for m in _PUT.finditer(log) if int(m[1]) > 1]
  mean = lambda i: statistics.mean(r[i] for r in replies)
  on_node = statistics.mean(sum(r[4:8]) for r in replies)
  return {'round': _mean_round(workdir), 'reply': mean(2), 'on node': on_node,
          'outside': mean(2) - on_node, 'put': statistics.mean(puts), 'read': mean(3),
          'fetch': mean(5), 'send': mean(7), 'train': mean(6), 'build': mean(4),
          'mb': float(next(_PUT.finditer(log))[2])}


def main(argv) -> None:
  del argv
  root = pathlib.Path(_WORKDIR.value or tempfile.mkdtemp(prefix='deploy_overhead-'))
  overrides = _overrides(_MODEL.value, _ROUNDS.value)
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(root / 'jax-cache'))
  train.run(_config(overrides), str(root / 'simulation'))
  simulated = _mean_round(root / 'simulation')
  print(f'load average before the deployments: {os.getloadavg()}')
  results = {t: _deploy(root, t, overrides) for t in ('inline', 'shared')}
  print(f'\nmodel {_MODEL.value}: {results["inline"]["mb"]:.1f} MB, 2 clients, rounds 2-'
        f'{_ROUNDS.value}; load average now {os.getloadavg()}')
  print(f'simulation round: {simulated:.2f}s')
  keys = ('round', 'reply', 'on node', 'build', 'fetch', 'train', 'send', 'outside', 'put',
          'read')
  print('transport | overhead | ' + ' | '.join(keys))
  for transport, r in results.items():
    print(f'{transport} | {r["round"] - simulated:.2f}s | ' +
          ' | '.join(f'{r[k]:.2f}s' for k in keys))


if __name__ == '__main__':
  app.run(main)
