r"""What secure aggregation (Flower's SecAgg+, fl.secagg) costs a deployed round, in time and bytes.

  python -m benchmarks.secagg [--model=tiny|40mb] [--nodes=2] [--rounds=3]

Runs one config twice through a real local federation (`fedjax_pt.deploy.local.federation`:
SuperLink and SuperNodes on 127.0.0.1, TLS, node authentication, a ClientApp process per message,
the JAX compilation cache warm): plain, and with fl.secagg.enabled. Rounds after the first (which
compiles) are compared:

  round      mean `round_time_s` of metrics.jsonl (sampling to evaluation included)
  up / down  bytes per round, all nodes, as metrics.jsonl counts them: the encoded payloads of the
             plain run; every message of the SecAgg+ protocol (keys, shares, masked vectors)
  val_ppl    after the last round: SecAgg+ quantises the deltas (2 * clip_range / 2**22 per value)

`40mb` is a 10.8M-parameter decoder (d_model 384, 6 layers; 43 MB of float32, lr 3e-4) trained one
local step per round, so the round is mostly moving and masking the model; `tiny` is
configs/tiny.py:test (38k parameters).
"""

import os
import pathlib
import statistics
import tempfile

from absl import app
from absl import flags

from fedjax_pt import records
from fedjax_pt.deploy.local import federation as launcher

_MODEL = flags.DEFINE_enum('model', 'tiny', ['tiny', '40mb'], 'Model size.')
_NODES = flags.DEFINE_integer('nodes', 2, 'Nodes (= clients, all in every round).')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Rounds per run; the first is left out.')
_WORKDIR = flags.DEFINE_string('workdir', '', 'Where the runs go (default: a temporary dir).')

REPO = pathlib.Path(__file__).resolve().parents[1]


def _overrides(model: str, nodes: int, rounds: int) -> list[str]:
  flags_ = [f'--config.fl.num_clients={nodes}', f'--config.fl.clients_per_round={nodes}',
            f'--config.fl.rounds={rounds}', '--config.ckpt.every_rounds=0']
  if model == '40mb':
    flags_ += ['--config.model.d_model=384', '--config.model.num_layers=6',
               '--config.model.num_heads=6', '--config.fl.local_steps=1',
               '--config.eval.max_batches=1', '--config.eval.batch_size=4',
               '--config.opt.lr=3e-4']  # tiny's 3e-3 diverges at this width
  return flags_


def _deploy(workdir: pathlib.Path, nodes: int, overrides: list[str]) -> dict[str, float]:
  federation = launcher.LocalFederation(workdir / 'deploy')
  try:
    federation.start_superlink()
    for i in range(nodes):
      federation.add_node(f'client-{i}', f"partition-id={i} num-partitions={nodes} "
                          f"state-dir='{workdir}/deploy/nodes/{i}'")
    federation.wait_online(nodes)
    status, error = federation.run({
        'config': f'{REPO}/configs/tiny.py:test', 'workdir': str(workdir),
        'overrides': ' '.join(overrides), 'transport': 'inline'})
  finally:
    federation.stop()
  if status != 'finished:completed':
    raise RuntimeError(f'{workdir.name}: {status} {error}')
  rounds = records.read_records(str(workdir)).rounds
  later = rounds[2:]
  per_round = lambda key: (getattr(rounds[-1], key) - getattr(rounds[1], key)) / len(later)
  return {'round': statistics.mean(r.round_time_s for r in later),
          'up': per_round('bytes_received'), 'down': per_round('bytes_sent'),
          'val_ppl': rounds[-1].val_ppl}


def main(argv) -> None:
  del argv
  root = pathlib.Path(_WORKDIR.value or tempfile.mkdtemp(prefix='secagg-'))
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(root / 'jax-cache'))
  overrides = _overrides(_MODEL.value, _NODES.value, _ROUNDS.value)
  results = {}
  for name, extra in (('plain', []), ('secagg', ['--config.fl.secagg.enabled=True'])):
    results[name] = _deploy(root / name, _NODES.value, overrides + extra)
  plain, secure = results['plain'], results['secagg']
  print(f'\nmodel {_MODEL.value}, {_NODES.value} nodes, rounds 2-{_ROUNDS.value}; load average '
        f'{os.getloadavg()}')
  print('run | round | up MB/round | down MB/round | final val_ppl')
  for name, r in results.items():
    print(f'{name} | {r["round"]:.2f}s | {r["up"] / 1e6:.2f} | {r["down"] / 1e6:.2f} | '
          f'{r["val_ppl"]:.3f}')
  print(f'secagg / plain: round {secure["round"] / plain["round"]:.2f}x, upload '
        f'{secure["up"] / plain["up"]:.2f}x, download {secure["down"] / plain["down"]:.2f}x')


if __name__ == '__main__':
  app.run(main)
