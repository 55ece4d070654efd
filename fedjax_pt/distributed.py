"""One client (or the centralized baseline) on several processes: JAX's multi-process runtime.

`jax.distributed` joins N processes, each with its own local devices, into one set of global devices
(the coordinator is process 0; on CPU the collectives go over gloo, on GPU over NCCL). Every
process runs the same program on the same global mesh (`fedjax_pt.sharding`), so the round, the
outer step and the checkpoints are the single-process code unchanged; what differs is listed here:

  * a process feeds only its own rows of each global batch (`Layout.process_rows`, with grain
    taking every N-th sub-batch: `fedjax_pt.data`), made global by
    `jax.make_array_from_process_local_data`;
  * decisions that read a clock (a client too slow for `fl.round_timeout_s` or the round deadline)
    are taken on process 0's measurement (`agree`), so every process takes the same branch;
  * process 0 alone writes the workdir's files (metrics.jsonl, TensorBoard, config.json) and shows
    the progress bar; all processes write the checkpoint together (orbax), each its own shards.

A process that dies is detected by the coordination service, which stops the others within
`mesh.heartbeat_timeout_s` (immediately when it is process 0).
"""

import dataclasses
import ipaddress
import logging as std_logging
import os
import signal
import socket
import threading
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

KEYS = ('num_processes', 'process_id', 'coordinator', 'heartbeat_timeout_s', 'init_timeout_s')


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free now: for a coordinator or a server on this machine.
  Racy in theory (free when asked, not when bound); a clash fails loudly."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class ProcessConfig:
  """The `mesh.*` keys that say which processes make up the mesh."""
  num_processes: int = 1  # 1: this process alone; 0: detected from the cluster (SLURM, Open MPI)
  process_id: int = 0
  coordinator: str = ''  # 'host:port' of process 0
  heartbeat_timeout_s: int = 100  # a process silent this long is declared dead, and all stop
  init_timeout_s: int = 300  # how long to wait for every process to join

  @property
  def multi(self) -> bool:
    return self.num_processes != 1

  @classmethod
  def from_config(cls, mesh: ml_collections.ConfigDict) -> 'ProcessConfig':
    """Raises ValueError naming the first bad key."""
    values = {k: mesh.get(k, getattr(cls, k)) for k in KEYS}
    for key in ('num_processes', 'process_id'):
      if not _is_int(values[key]) or values[key] < 0:
        raise ValueError(f'mesh.{key} must be an integer >= 0, got {values[key]!r}')
    for key in ('heartbeat_timeout_s', 'init_timeout_s'):
      if not _is_int(values[key]) or values[key] < 1:
        raise ValueError(f'mesh.{key} must be a positive integer (seconds), got {values[key]!r}')
    cfg = cls(**values)
    if cfg.num_processes > 1:
      if not 0 <= cfg.process_id < cfg.num_processes:
        raise ValueError(f'mesh.process_id={cfg.process_id} must be in [0, mesh.num_processes='
                         f'{cfg.num_processes})')
      if not cfg.coordinator:
        raise ValueError(f"mesh.num_processes={cfg.num_processes} needs mesh.coordinator: the "
                         f"'host:port' where process 0 serves (every process gives the same)")
    if cfg.coordinator:
      _check_address(cfg.coordinator)
    if cfg.num_processes == 1 and (cfg.process_id or cfg.coordinator):
      raise ValueError(f'mesh.process_id={cfg.process_id} / mesh.coordinator={cfg.coordinator!r} '
                       'join a multi-process run: set mesh.num_processes too (or 0 to detect it '
                       'from the cluster)')
    return cfg


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_address(address: str) -> None:
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"mesh.coordinator must be 'host:port', got {address!r}")


def _is_loopback(host: str) -> bool:
  try:
    return ipaddress.ip_address(socket.gethostbyname(host.strip('[]'))).is_loopback
  except (OSError, ValueError):
    return False


def initialize(cfg: ProcessConfig) -> None:
  """Joins the processes of `cfg` (no-op for one process, or when this process has joined them).

  Must run before JAX touches a device: the devices it then reports are the global ones.
  """
  if not cfg.multi:
    return
  if jax.distributed.is_initialized():
    if cfg.num_processes and (jax.process_count(), jax.process_index()) != (
        cfg.num_processes, cfg.process_id):
      raise ValueError(f'this Python process already joined process {jax.process_index()} of '
                       f'{jax.process_count()}; mesh.* asks for {cfg.process_id} of '
                       f'{cfg.num_processes}')
    return
  kwargs = {}
  if cfg.num_processes > 1:
    kwargs = dict(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes,
                  process_id=cfg.process_id)
    host = cfg.coordinator.rpartition(':')[0]
    if _is_loopback(host):  # a laptop or a test: the coordinator listens on loopback only
      kwargs['coordinator_bind_address'] = cfg.coordinator
  elif cfg.coordinator:
    kwargs['coordinator_address'] = cfg.coordinator
  logging.info('joining %s processes (coordinator %s) as process %s',
               cfg.num_processes or 'the cluster\'s', cfg.coordinator or 'detected',
               cfg.process_id if cfg.num_processes else 'detected')
  sigterm = signal.getsignal(signal.SIGTERM)
  try:
    jax.distributed.initialize(
        **kwargs, initialization_timeout=cfg.init_timeout_s,
        heartbeat_timeout_seconds=cfg.heartbeat_timeout_s,
        shutdown_timeout_seconds=cfg.heartbeat_timeout_s)
  except RuntimeError as e:
    if 'before any JAX' in str(e) or 'backend' in str(e).lower():
      raise ValueError('mesh.num_processes > 1: jax.distributed must start before JAX uses a '
                       'device, and this Python process already has (start a fresh one)') from e
    raise ValueError(f'mesh.coordinator={cfg.coordinator!r}: the {cfg.num_processes or ""} '
                     f'processes did not all join within mesh.init_timeout_s='
                     f'{cfg.init_timeout_s} ({" ".join(str(e).split())[:200]})') from e
  except ValueError as e:  # cluster detection found nothing
    raise ValueError(f'mesh.num_processes=0 detects the processes from the cluster, which '
                     f'failed: {e}') from e
  if callable(sigterm) and threading.current_thread() is threading.main_thread():
    # JAX's preemption notifier takes SIGTERM over and only records it; a scheduler's SIGTERM
    # must stop the run at the next step as Ctrl-C does (fedjax_pt.main's handler).
    signal.signal(signal.SIGTERM, sigterm)
  logging.info('process %d of %d: %d local devices of %d', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def is_primary() -> bool:
  """Whether this process writes the run's files and shows its progress (process 0)."""
  return jax.process_index() == 0


def agree(value: float) -> float:
  """Process 0's value, on every process: what a decision that reads a clock must be taken on."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return float(multihost_utils.broadcast_one_to_all(np.float32(value)))


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name`."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def log_to_file(path: str) -> None:
  """Sends this process's log to `path` (INFO and up), and only its errors to stderr: process 0's
  terminal is the run's, and the other processes' lines would repeat it."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  handler = std_logging.FileHandler(path, encoding='utf-8')
  handler.setFormatter(logging.PythonFormatter())
  std_logging.getLogger().addHandler(handler)
  logging.get_absl_handler().setLevel(std_logging.ERROR)
  logging.info('process %d of %d logs here', jax.process_index(), jax.process_count())


# What a collective or the coordination service raises when a peer process is gone.
_PEER_GONE = ('Gloo', 'Connection reset by peer', 'Connection closed by peer',
              'coordination service', 'Socket closed')


def lost_peer(error: BaseException) -> str | None:
  """A one-line account of `error` when it says that another process of this run is gone (its
  collective's connection broke), else None."""
  if jax.process_count() == 1:
    return None
  seen = error
  while seen is not None:
    text = ' '.join(str(seen).split())
    if any(marker in text for marker in _PEER_GONE):
      return (f'process {jax.process_index()}: another process of this run is gone (the '
              f'collective failed: {text[-160:]})')
    seen = seen.__cause__ or seen.__context__
  return None
