r"""What federation adds to a round: broadcast, aggregation and outer step, against local training.

  python -m benchmarks.fed_overhead [--config=configs/tiny.py] [--config.KEY=VALUE ...] [--tau=500]

A round of K = fl.clients_per_round clients at tau local steps takes about
  (K / mesh.clients) x tau x (local step) + broadcast + aggregation + outer step
on one host; the local step is measured here, and the three federated parts are timed with the code
that train.py runs (`Trainer.init` for each group, `RunningAverage.add` for each client,
`RunningAverage.result` and the outer step). Aggregation is also compared with its memory-bandwidth
bound: reading every client's parameters once, at the copy bandwidth measured in this run.
"""

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from benchmarks import harness
from fedjax_pt.federated import aggregation
from fedjax_pt import optimizers
from fedjax_pt.federated import server as server_lib

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Config file.',
                                          lock_config=True)
_TAU = flags.DEFINE_integer('tau', 500, 'Local steps per round to extrapolate the round time to.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Local steps per timed window (best of 3).')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repetitions of each federated part (best).')
_COPY_MB = flags.DEFINE_integer('copy_mb', 0, 'Size of the bandwidth-measuring copy; 0: 256 MB on '
                                'CPU, 2048 MB on accelerators.')


def main(argv):
  del argv
  config = _CONFIG.value
  fl = config.fl
  setup = harness.build(config)
  trainer, params = setup.trainer, setup.params
  groups = fl.clients_per_round // trainer.parallel
  print(f'device: {harness.device_line()}')
  print(f'mesh: {dict(setup.layout.mesh.shape)}; {fl.clients_per_round} clients per round in '
        f'{groups} group(s) of {trainer.parallel}')

  step_s, _ = harness.time_train_steps(setup, _STEPS.value)
  local_s = groups * _TAU.value * step_s

  outer_tx = optimizers.outer_optimizer(fl.outer_optimizer, fl.outer_lr, fl.outer_momentum,
                                        fl.outer_b2)
  state = server_lib.init_server_state(params, outer_tx, setup.layout.params(setup.model_cfg))
  server_update = server_lib.make_server_update(outer_tx, like=state)
  # K distinct client models, as K clients return them (re-reading one would time the cache).
  client_params = [jax.tree.map(lambda p, k=k: p + k, params) for k in range(fl.clients_per_round)]

  def broadcast():
    return [trainer.init(state.params, 0) for _ in range(groups)]

  def aggregate():
    average = aggregation.RunningAverage()
    for k in range(fl.clients_per_round):
      average.add(client_params[k], 1.0)
    return average.result()

  mean = aggregate()

  def outer_step():
    nonlocal state
    state, metrics = server_update(state, mean)
    return metrics

  broadcast_s = harness.best_time(broadcast, _REPEATS.value)
  aggregate_s = harness.best_time(aggregate, _REPEATS.value)
  outer_s = harness.best_time(outer_step, _REPEATS.value)
  overhead_s = broadcast_s + aggregate_s + outer_s
  round_s = local_s + overhead_s
  print(f'local step: {step_s * 1e3:.2f} ms -> local training of a round at tau={_TAU.value}: '
        f'{local_s:.2f} s')
  print(f'broadcast (Trainer.init x {groups}): {broadcast_s * 1e3:.2f} ms')
  print(f'aggregation ({fl.clients_per_round} x RunningAverage.add + result): '
        f'{aggregate_s * 1e3:.2f} ms')
  print(f'outer step ({fl.outer_optimizer}): {outer_s * 1e3:.2f} ms')
  print(f'federated overhead: {overhead_s * 1e3:.2f} ms = {100 * overhead_s / round_s:.3f}% of '
        f'a {round_s:.2f} s round')

  copy_bytes = (_COPY_MB.value or (256 if jax.default_backend() == 'cpu' else 2048)) * 2**20
  bandwidth = harness.copy_bandwidth(copy_bytes) * setup.layout.cfg.num_devices
  read_bytes = fl.clients_per_round * harness.tree_bytes(params)
  bound_s = read_bytes / bandwidth
  print(f'memory bandwidth: {bandwidth / 1e9:.1f} GB/s ({copy_bytes >> 20} MB copy, '
        f'x {setup.layout.cfg.num_devices} device(s))')
  print(f'aggregation bound: {read_bytes / 1e6:.1f} MB of client parameters read once = '
        f'{bound_s * 1e3:.2f} ms; measured / bound = {aggregate_s / bound_s:.1f}x')


if __name__ == '__main__':
  app.run(main)
