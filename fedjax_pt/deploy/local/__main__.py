r"""A whole Flower federation on this machine, from one command.

  python -m fedjax_pt.deploy.local --nodes=2 --config=configs/tiny.py --workdir=runs/flower \
      [--config.fl.rounds=3 ...] [--transport=shared] [--node_config="data.path='...'" ...] \
      [--link=50mbit,200mbit] [--proxy]

starts a SuperLink and --nodes SuperNodes on 127.0.0.1 with TLS and node authentication (a CA,
the SuperLink's certificate and one key pair per node are made in <workdir>/deploy/, and each
public key is registered under the name client-<i>), submits the run with `flwr run --stream`,
prints its log, and stops every process it started at the end, on an error or on Ctrl-C. Node i
is client i and trains the simulation's shard i of the config's corpus (num-partitions =
fl.num_clients); the i-th --node_config adds node config for node i (see `node.py`). Every client
is a node: --nodes=N (default fl.num_clients) runs the config with fl.num_clients=N (and
fl.clients_per_round at most N), as the overrides it prints say.

--proxy keeps the SuperLink on 127.0.0.1, where this launcher's `flwr` reaches it, and lets the
nodes in through nginx, which forwards the Fleet API only (`proxy.py`): what a partner could reach
on a real deployment serves no Control API. It needs nginx (`apt-get install nginx-light`).

--link=RATE[,RATE...] (root only) puts node i in a network namespace of its own behind a link of
the i-th rate (or the one rate) each way, shaped by tc's tbf (`links.py`; latency is not emulated:
this kernel has no netem), and gives client i the same uplink_mbps/downlink_mbps in fl.profiles,
so that the simulated clock (sim_round_time_s) predicts those links. fl.profiles that give other
rates or a latency are refused.

Results are those of `python -m fedjax_pt.main` on the same workdir contract (metrics.jsonl,
TensorBoard, checkpoints; re-running resumes). <workdir>/deploy/ holds this launcher's own files:
logs/ (superlink, node<i>, run), certificates, keys, the nodes' state and the JAX cache.
Exit code: 0 when the run completed, 1 when it failed or was stopped, 2 on a bad flag or config,
130 on Ctrl-C.
"""

import json
import os
import pathlib
import re
import shlex
import sys

from absl import app
from absl import flags
from flwr.common import config as flwr_config
from ml_collections import config_flags

from fedjax_pt import build
from fedjax_pt import cli
from fedjax_pt import data as data_lib
from fedjax_pt import errors
from fedjax_pt import workdir as workdir_lib
from fedjax_pt.deploy import node as node_lib
from fedjax_pt.deploy import server_app
from fedjax_pt.deploy import transport as transport_lib
from fedjax_pt.deploy.local import federation as launcher
from fedjax_pt.deploy.local import links as links_lib
from fedjax_pt.deploy.local import proxy as proxy_lib
from fedjax_pt.federated import profiles as profiles_lib
from fedjax_pt.run_spec import RunSpec

_PROGRAM = 'fedjax_pt.deploy.local'


def _say(text: str) -> None:
  print(f'[{_PROGRAM}] {text}', flush=True)


def _fail(message, code: int = errors.EXIT_BAD_INPUT) -> None:
  cli.fail(message, code, program=_PROGRAM)


_CONFIG = cli.define_config(
    str(pathlib.Path(__file__).resolve().parents[2] / 'configs' / 'tiny.py'), _PROGRAM)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The run directory, as for fedjax_pt.main.')
_NODES = flags.DEFINE_integer('nodes', None, 'SuperNodes to start, one per client: sets '
                               'fl.num_clients (default: the config\'s).', lower_bound=1)
_TRANSPORT = flags.DEFINE_enum('transport', 'inline', transport_lib.TRANSPORTS,
                               'How models travel: in the messages, or via --shared_dir.')
_SHARED_DIR = flags.DEFINE_string('shared_dir', '', "The 'shared' transport's root "
                                  '(default <workdir>/shared).')
_NODE_CONFIG = flags.DEFINE_multi_string(
    'node_config', [], 'Extra node config for node i (its i-th use), e.g. '
    """"data.source='jsonl' data.path='/data/org1/*.jsonl'".""")
_INSECURE = flags.DEFINE_bool('insecure', False, 'Plain HTTP and no node authentication.')
_PROXY = flags.DEFINE_bool('proxy', False, 'Nodes connect through nginx, which forwards the Fleet '
                           'API only; the SuperLink (Control API) listens on 127.0.0.1 only.')
_TIMEOUT_S = flags.DEFINE_float('timeout_s', 0, 'Stop the run after this long (0: never).')
_WAIT_S = flags.DEFINE_float('wait_for_nodes_s', 120, 'How long round 1 waits for the nodes.')
_LINK = flags.DEFINE_string(
    'link', '', 'RATE[,RATE...], e.g. 50mbit,200mbit (one for all nodes or one per node; kbit, '
    'mbit, gbit): each node in a network namespace behind a tbf-shaped link of its rate both '
    'ways, and fl.profiles with those rates (root only; latency is not emulated: no netem).')


def _parse_flags(argv: list[str]) -> list[str]:
  rest = cli.parse(argv, _CONFIG, _PROGRAM, usage=__doc__)
  if not _WORKDIR.value:
    _fail('--workdir is required')
  return rest


def _checked_spec(config, workdir: str) -> RunSpec:
  """Everything the server or the nodes would refuse, refused before any process starts: the
  config, the workdir, every --node_config, and the data (read and partitioned here once, as the
  server and each node will)."""
  server_app.check_config(config, _TRANSPORT.value)
  spec = RunSpec.from_config(config)
  resolved = build.resolved_config(config, build.model_config(config))
  workdir_lib.Workdir(workdir, spec, resolved).check()
  extra = _NODE_CONFIG.value
  if len(extra) > spec.fl.num_clients:
    raise ValueError(f'{len(extra)} --node_config for {spec.fl.num_clients} nodes')
  for i, text in enumerate(extra):
    node_lib.NodeConfig.parse({'partition-id': i, **_node_config(text, i)})
  data_lib.build_federated_data(spec.data, num_clients=spec.fl.num_clients, seed=spec.seed)
  return spec


def _node_config(text: str, node: int) -> dict:
  """--node_config as flower-supernode reads --node-config, except that what it would silently
  drop (text that is not key=value) is an error."""
  left = re.sub(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)", '', text).strip()
  if left:
    raise ValueError(f'--node_config for node {node}: {left!r} is not a key=value pair')
  try:
    return flwr_config.parse_config_args([text])
  except Exception as e:  # pylint: disable=broad-except  (Flower raises click's exception)
    raise ValueError(f'--node_config for node {node}: {e}') from None


def _nodes_overrides(config) -> list[str]:
  """--nodes=N as config overrides (applied to `config` too): every client is a node."""
  nodes = _NODES.value
  if nodes is None:
    return []
  wanted = {'num_clients': nodes, 'clients_per_round': min(config.fl.clients_per_round, nodes)}
  wanted['min_clients'] = min(config.fl.min_clients, wanted['clients_per_round'])
  changed = {k: v for k, v in wanted.items() if config.fl[k] != v}
  for key, value in changed.items():
    config.fl[key] = value
  return [f'--config.fl.{key}={value}' for key, value in changed.items()]


def _link_overrides(config) -> tuple[tuple[int, ...], list[str]]:
  """--link's rates, and fl.profiles with their rates (applied to `config` too) unless the
  user's own profiles give the same rates and no latency (then nothing changes)."""
  if not _LINK.value:
    return (), []
  nodes = config.fl.num_clients
  rates = links_lib.parse_rates(_LINK.value, nodes)
  wanted = links_lib.profiles(rates)
  if config.fl.profiles:
    for k, profile in enumerate(profiles_lib.parse(config.fl.profiles, nodes)):
      given = {key: getattr(profile, key) for key in wanted[k]}
      if given != wanted[k] or profile.latency_ms:
        raise ValueError(
            f'--link={_LINK.value} and fl.profiles disagree: client {k} has uplink_mbps='
            f'{profile.uplink_mbps}, downlink_mbps={profile.downlink_mbps}, latency_ms='
            f'{profile.latency_ms:g}, the link {wanted[k]["uplink_mbps"]:g} each way and no '
            'latency (drop one, or make them agree)')
    return rates, []
  config.fl.profiles = json.dumps(wanted, separators=(',', ':'))
  return rates, [f'--config.fl.profiles={config.fl.profiles}']


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  workdir = os.path.abspath(_WORKDIR.value)
  config = _CONFIG.value
  overrides = [a for a in sys.argv[1:] if a.startswith('--config.')] + _nodes_overrides(config)
  try:
    rates, link_overrides = _link_overrides(config)
    overrides += link_overrides
    spec = _checked_spec(config, workdir)
    if rates:
      links_lib.check_available()
    if _PROXY.value:
      if _INSECURE.value:
        raise ValueError('--proxy serves TLS: drop --insecure')
      proxy_lib.nginx()
  except errors.WorkdirRefused as e:
    _fail(str(e), errors.EXIT_WORKDIR_REFUSED)
  except (ValueError, OSError, links_lib.LinkError, proxy_lib.ProxyError) as e:
    _fail(str(e))
  config_file = config_flags.get_config_filename(flags.FLAGS[_CONFIG.name])
  path, colon, variant = config_file.partition(':')
  run_config = {
      'config': os.path.abspath(path) + colon + variant,
      'overrides': shlex.join(overrides),
      'workdir': workdir, 'transport': _TRANSPORT.value, 'shared-dir': _SHARED_DIR.value,
      'wait-for-nodes-s': _WAIT_S.value,
  }
  deploy_dir = pathlib.Path(workdir) / 'deploy'
  cli.interrupt_once(_PROGRAM)
  if rates and _TRANSPORT.value == 'shared':
    _say('note: --transport=shared moves the models through the shared directory on this '
         "machine's disk, past the shaped links, which carry only Flower's messages; the "
         "simulated clock still charges the models to fl.profiles' links")
  links = links_lib.Links(rates) if rates else None
  federation = launcher.LocalFederation(deploy_dir, secure=not _INSECURE.value, links=links,
                                        proxy=_PROXY.value)
  code, refused = 1, None
  try:
    federation.start_superlink()
    _say(f'SuperLink on {federation.control} ('
         f'{"TLS, node authentication" if federation.secure else "insecure"}); logs in '
         f'{federation.procs.logs}')
    if federation.proxy:
      _say(f'nodes connect to nginx on {federation.host}:{federation.port}: the Fleet API only')
    for link in links.links if links else ():
      _say(f'{link.namespace}: {link.node_ip} behind {link.rate / 1e6:g} Mbit/s each way (tbf; '
           'latency not emulated)')
    extra = _NODE_CONFIG.value
    _say(f'{spec.fl.num_clients} nodes, overrides: {run_config["overrides"] or "none"}')
    for i in range(spec.fl.num_clients):
      state_dir = launcher.toml_value(str(deploy_dir / 'nodes' / str(i)))
      federation.add_node(f'client-{i}', f'partition-id={i} num-partitions='
                          f'{spec.fl.num_clients} state-dir={state_dir} ' +
                          (extra[i] if i < len(extra) else ''))
    federation.wait_online(spec.fl.num_clients)
    _say('every SuperNode is online; submitting the run')
    status, error = federation.run(run_config, on_line=lambda line: print(line, end='',
                                                                           flush=True),
                                   timeout_s=_TIMEOUT_S.value)
    _say(f'run {status}' + (f': {error}' if error else ''))
    code = 0 if status == 'finished:completed' else 1
  except links_lib.LinkError as e:  # raised before any process starts
    refused = e
  except KeyboardInterrupt:
    _say('interrupted; stopping every process')
    code = 130
  except (RuntimeError, TimeoutError, OSError) as e:
    _say(f'error: {" ".join(str(e).split())}')
  finally:
    stragglers = federation.stop()
    _say('every process stopped' +
         (f' ({len(stragglers)} needed SIGKILL)' if stragglers else '') +
         (', every link removed' if links and not federation.links_left else ''))
    for left in federation.links_left:
      _say(f'not removed: {left}')
  if refused is not None:
    _fail(refused)
  return code


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)
