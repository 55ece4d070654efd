"""Where the arrays of local training live: the device mesh, logical-axis rules, sharded creation.

The mesh has three axes:
  'clients'  P = mesh.clients clients train at the same time on disjoint device groups; their
             parameters, optimizer states and batches are stacked along a leading client axis that
             is split over this mesh axis (see `client.Trainer`).
  'data'     data parallelism inside a client: the batch is split, parameters are replicated.
  'fsdp'     fully-sharded data parallelism inside a client: the batch is split and so is every
             large parameter (and its Adam moments), along the dimension the rules name; XLA
             all-gathers a layer's weights where it uses them and reduce-scatters their gradients.

Model code names axes logically (`model.logical_axes`: 'vocab', 'embed', 'pos', 'heads', 'mlp',
'norm'; activations: 'batch'); `mesh.rules` maps those names onto mesh axes, so a new layout is a
config change, not a code change.
"""

from collections.abc import Sequence
import contextlib
import dataclasses
import functools
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from fedjax_pt import distributed
from fedjax_pt import model as model_lib

MESH_AXES = ('clients', 'data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')

# FSDP (ZeRO-3): batches and activations are split over every device of a client, and every matrix
# along d_model ('embed' is a dimension of all of them, and d_model is a multiple of 128 in the
# paper's configs). Nothing is tensor-parallel; norm scales are too small to be worth splitting.
DEFAULT_RULES = (
    ('batch', BATCH_AXES),
    ('embed', 'fsdp'),
    ('vocab', None),
    ('pos', None),
    ('heads', None),
    ('mlp', None),
    ('norm', None),
)

_HOST_MEMORY = 'pinned_host'


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The `mesh` group of the config, with `mesh.fsdp = -1` resolved to a device count."""
  clients: int = 1
  data: int = 1
  fsdp: int = 1
  rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES
  offload_optimizer: bool = False
  memory_check: bool = True  # refuse a run whose memory estimate exceeds the device's memory

  @property
  def num_devices(self) -> int:
    return self.clients * self.data * self.fsdp

  @classmethod
  def from_config(cls, mesh: ml_collections.ConfigDict, *, mode: str, batch_size: int,
                  micro_batch_size: int, clients_per_round: int,
                  num_devices: int | None = None,
                  num_processes: int | None = None) -> 'MeshConfig':
    """Validates `mesh.*` against the local devices and the batch; one-line errors name the keys.

    `mesh.fsdp = -1` takes the devices that `mesh.clients x mesh.data` leave, or the largest part
    of them that splits every client's batch (and micro-batch) evenly, so the default config runs
    on any number of local devices. With several processes (`fedjax_pt.distributed`) the devices
    are all of theirs, and the mesh must use every one.
    """
    # The processes that make up the mesh (mesh.num_processes, ...) are `fedjax_pt.distributed`'s.
    values = {k: v for k, v in mesh.to_dict().items() if k not in distributed.KEYS}
    num_devices = num_devices or jax.device_count()
    num_processes = num_processes or jax.process_count()
    for name in ('clients', 'data'):
      if not _is_int(values[name]) or values[name] < 1:
        raise ValueError(f'mesh.{name} must be a positive integer, got {values[name]!r}')
    if not _is_int(values['fsdp']) or not (values['fsdp'] >= 1 or values['fsdp'] == -1):
      raise ValueError(f'mesh.fsdp must be a positive integer or -1 (the remaining devices), '
                       f'got {values["fsdp"]!r}')
    clients, data = values['clients'], values['data']
    if num_devices % (clients * data):
      raise ValueError(f'mesh.clients x mesh.data = {clients} x {data} does not divide the '
                       f'{num_devices} local devices')
    if values['fsdp'] == -1:
      remaining = num_devices // (clients * data)
      values['fsdp'] = max((f for f in range(1, remaining + 1) if remaining % f == 0 and
                            _splits(batch_size, micro_batch_size, data * f)), default=1)
      if values['fsdp'] < remaining:
        logging.warning('mesh.fsdp=-1: using %d of the %d remaining devices, the most that split '
                        'data.batch_size=%d evenly', values['fsdp'], remaining, batch_size)
    cfg = cls(**{**values, 'rules': _rules(values['rules'])})
    if num_devices % cfg.num_devices:
      raise ValueError(f'mesh.clients x mesh.data x mesh.fsdp = {clients} x {data} x {cfg.fsdp} '
                       f'does not divide the {num_devices} local devices')
    if not _splits(batch_size, 0, data * cfg.fsdp):
      raise ValueError(f'data.batch_size={batch_size} is not divisible by mesh.data x mesh.fsdp '
                       f'= {data * cfg.fsdp} (every device takes whole sequences)')
    if not _splits(batch_size, micro_batch_size, data * cfg.fsdp):
      raise ValueError(f'data.micro_batch_size={micro_batch_size} is not divisible by mesh.data x '
                       f'mesh.fsdp = {data * cfg.fsdp} (every device takes whole sequences)')
    if clients > 1 and mode != 'federated':
      raise ValueError(f"mesh.clients={clients} trains clients in parallel: it needs "
                       f"mode='federated', got {mode!r}")
    if clients_per_round % clients:
      raise ValueError(f'fl.clients_per_round={clients_per_round} is not divisible by '
                       f'mesh.clients={clients} (clients train in groups of mesh.clients)')
    if num_processes > 1:
      if cfg.num_devices != num_devices:
        raise ValueError(f'mesh.clients x mesh.data x mesh.fsdp = {cfg.num_devices} devices of the '
                         f'{num_devices} of {num_processes} processes: a multi-process mesh must '
                         f'use them all')
      if clients > 1:
        raise ValueError(f'mesh.clients={clients} with {num_processes} processes: a multi-process '
                         'mesh trains one client at a time, split over the data and fsdp axes; '
                         'set mesh.clients=1')
    if not isinstance(cfg.offload_optimizer, bool):
      raise ValueError(f'mesh.offload_optimizer must be a bool, got {cfg.offload_optimizer!r}')
    return cfg


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _splits(batch_size: int, micro_batch_size: int, ways: int) -> bool:
  return batch_size % ways == 0 and (micro_batch_size or batch_size) % ways == 0


def _rules(rules: Sequence[Any]) -> tuple[tuple[str, Any], ...]:
  """Checks `mesh.rules` (pairs of a logical name and None, a mesh axis or a tuple of them)."""
  out = []
  for rule in rules:
    if (not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str)):
      raise ValueError(f'mesh.rules: every rule must be a pair (logical name, mesh axes), got '
                       f'{rule!r}')
    name, axes = rule
    axes = tuple(axes) if isinstance(axes, (tuple, list)) else axes
    names = axes if isinstance(axes, tuple) else () if axes is None else (axes,)
    if any(a not in BATCH_AXES for a in names):
      raise ValueError(f'mesh.rules: {name!r} maps to {axes!r}; rules may only use the mesh axes '
                       f'{BATCH_AXES} (the clients axis is reserved for stacked clients)')
    out.append((name, axes))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class Layout:
  """A mesh and its rules: the shardings of parameters, optimizer states and batches.

  Arrays of local training are "stacked" when the mesh trains P > 1 clients at once: they carry a
  leading client axis of size P split over the 'clients' mesh axis. The server's arrays (the
  global model and the outer optimizer state) are never stacked: they are split like one client's
  and replicated over the 'clients' and 'data' axes.
  """
  cfg: MeshConfig
  mesh: jax.sharding.Mesh

  @classmethod
  def create(cls, cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> 'Layout':
    devices = list(devices if devices is not None else jax.devices())[:cfg.num_devices]
    if len(devices) < cfg.num_devices:
      raise ValueError(f'the mesh needs {cfg.num_devices} devices, {len(devices)} are available')
    if cfg.offload_optimizer:
      _check_offload(devices[0])
    shape = (cfg.clients, cfg.data, cfg.fsdp)
    return cls(cfg, jax.make_mesh(shape, MESH_AXES, (jax.sharding.AxisType.Auto,) * 3,
                                  devices=devices))

  @property
  def clients(self) -> int:
    return self.cfg.clients

  @property
  def stacked(self) -> bool:
    return self.cfg.clients > 1

  def named(self, logical: Sequence[str | None] = (), *, stacked: bool = False) -> NamedSharding:
    """The sharding of an array whose dimensions have these logical names."""
    spec = nn.logical_to_mesh_axes(tuple(logical), self.cfg.rules)
    if stacked:
      spec = PartitionSpec('clients', *spec)
    return NamedSharding(self.mesh, spec)

  def batch(self, *, stacked: bool = False) -> NamedSharding:
    """[(P,) B, L+1] token batches: sequences split over a client's devices."""
    return self.named(('batch', None), stacked=stacked)

  def process_rows(self, batch_size: int) -> tuple[int, int]:
    """(i, n): this process holds block i of n equal blocks of rows of a [batch_size, ...] batch
    (0, 1 for one process). It loads only those rows (`global_batch`)."""
    if jax.process_count() == 1:
      return 0, 1
    rows = {(s[0].start or 0, s[0].stop or batch_size) for s in
            self.batch().addressable_devices_indices_map((batch_size, 1)).values()}
    start, stop = min(r[0] for r in rows), max(r[1] for r in rows)
    size = stop - start
    if batch_size % size or start % size or sum(b - a for a, b in rows) != size:
      raise ValueError(f'mesh {dict(self.mesh.shape)}: the batch rows of process '
                       f'{jax.process_index()} are not one contiguous block ({sorted(rows)})')
    return start // size, batch_size // size

  def global_batch(self, local: np.ndarray, sharding: NamedSharding | None = None) -> Any:
    """A batch of which this process holds the rows `process_rows` names, as one global array
    (as it is, for one process: jit places a host array itself)."""
    if jax.process_count() == 1:
      return local
    return jax.make_array_from_process_local_data(sharding or self.batch(), local)

  def replicated(self, *, stacked: bool = False) -> NamedSharding:
    """Scalars (steps, metrics), or [P] vectors of them when stacked."""
    return self.named((), stacked=stacked)

  def params(self, model_cfg: model_lib.ModelConfig, *, stacked: bool = False) -> Any:
    """Shardings of the model's parameters, checked to split every dimension evenly."""
    axes = model_lib.logical_axes(model_cfg)
    shapes = model_lib.param_shapes(model_cfg)

    def checked(spec, shape):
      named = self.named(tuple(spec), stacked=stacked)
      for dim, (name, size) in enumerate(zip(spec, shape.shape)):
        ways = _ways(self.mesh, named.spec[dim + stacked])
        if size % ways:
          raise ValueError(f'mesh.rules split the {name!r} axis ({size}) of a parameter of shape '
                           f'{shape.shape} {ways} ways, which does not divide it; change mesh.fsdp '
                           f'or mesh.rules')
      return named

    return jax.tree.map(checked, axes, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))

  @contextlib.contextmanager
  def activate(self):
    """Within a traced function: the mesh and rules that the model's activation constraints use."""
    with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh), \
        nn.logical_axis_rules(self.cfg.rules):
      yield


def _ways(mesh: jax.sharding.Mesh, entry: Any) -> int:
  names = entry if isinstance(entry, tuple) else () if entry is None else (entry,)
  return int(np.prod([mesh.shape[n] for n in names]))


def _check_offload(device: jax.Device) -> None:
  kinds = {m.kind for m in device.addressable_memories()}
  if _HOST_MEMORY not in kinds:
    raise ValueError(f'mesh.offload_optimizer=True needs a {_HOST_MEMORY!r} memory, which the '
                     f'{device.platform} backend does not offer (it has {sorted(kinds)})')
  if device.platform == 'cpu':
    logging.warning("mesh.offload_optimizer=True on the CPU backend: JAX supports the "
                    "'pinned_host' memory kind there, but a CPU's device memory is host memory, "
                    'so offloading runs and saves nothing')


def optimizer_shardings(tx: optax.GradientTransformation, param_shapes: Any, param_shardings: Any,
                        replicated: NamedSharding, host: bool = False) -> Any:
  """Shardings of `tx`'s state: its parameter-shaped trees (Adam moments, momentum) split like the
  parameters, the rest (step counts) replicated; on host memory when `host`."""
  place = (lambda s: s.with_memory_kind(_HOST_MEMORY)) if host else (lambda s: s)
  # A partitioned optimizer (Muon's matrices, AdamW's rest) keeps masked parameter trees: their
  # MaskedNodes stand where the other optimizer's parameters are and stay as they are.
  masked = lambda x: isinstance(x, optax.MaskedNode)
  return optax.tree_map_params(
      tx, lambda x, s: x if masked(x) else place(s), jax.eval_shape(tx.init, param_shapes),
      param_shardings, transform_non_params=lambda _: place(replicated), is_leaf=masked)


def init_params(model_cfg: model_lib.ModelConfig, rng: jax.Array, layout: Layout) -> Any:
  """Parameters created where they belong: each device computes its own shards only."""
  init = jax.jit(functools.partial(model_lib.init_params, model_cfg),
                 out_shardings=layout.params(model_cfg))
  return init(rng)
