"""A thin orbax wrapper: checkpoints at round boundaries that survive crashes, never destroying one.

A checkpoint holds two items: `state`, a pytree of arrays, and `meta`, JSON (what they are is
`fedjax_pt.run_state`). orbax writes each step into a temporary directory and renames it when
complete, so a save killed midway never looks like a checkpoint; a finalized one that fails to
load (a truncated file) is moved aside, never deleted, and the previous one is used.
"""

from collections.abc import Callable
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import threading
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from fedjax_pt import errors


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_rounds: int = 1
  keep: int = 3
  restore: bool = True
  async_save: bool = True

  def __post_init__(self):
    if self.every_rounds < 0:
      raise ValueError(f'ckpt.every_rounds must be >= 0 (0 = never), got {self.every_rounds}')
    if self.keep <= 0:
      raise ValueError(f'ckpt.keep must be positive, got {self.keep}')

  @classmethod
  def from_config(cls, ckpt: ml_collections.ConfigDict) -> 'CheckpointConfig':
    return cls(**ckpt.to_dict())


class SaveFailed(OSError):
  """A checkpoint could not be written; the previous ones are intact."""


class CheckpointMismatch(errors.WorkdirRefused):
  """The workdir's checkpoints hold arrays of another shape or structure than this config's."""


@dataclasses.dataclass
class Restored:
  round: int
  state: Any
  meta: dict[str, Any]  # the JSON item (`fedjax_pt.run_state.RunMeta`)


class Checkpointer:
  """Saves and restores (state pytree, meta dict) at round numbers under `workdir/checkpoints`."""

  def __init__(self, workdir: str, cfg: CheckpointConfig):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self._cfg = cfg
    self._manager = ocp.CheckpointManager(
        self.directory,
        # A save that was killed or failed left a temporary directory: the run is this
        # workdir's only writer (its lock), so it is no one's save in progress.
        options=ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, create=True, enable_async_checkpointing=cfg.async_save,
            cleanup_tmp_directories=True),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})

  def check(self) -> None:
    """Waits for the save in flight and raises its error (a full disk): the run stops there,
    before it records another round, with its last complete checkpoint intact. A round takes
    longer than its save, so the wait is usually nothing."""
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._remove_unfinished()  # its space, on a full disk, is what the user needs back
      raise SaveFailed(self._failure_message(e)) from e

  def _remove_unfinished(self) -> None:
    if jax.process_index() != 0 or not os.path.isdir(self.directory):
      return
    for name in os.listdir(self.directory):
      if '.orbax-checkpoint-tmp' in name:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def _failure_message(self, error: Exception) -> str:
    steps = self.steps()
    last = f'round {steps[-1]}' if steps else 'none'
    return (f'a checkpoint could not be written to {self.directory} ({_os_cause(error)}'
            f'{type(error).__name__}: {_shortened(str(error))}); the last complete checkpoint is '
            f'{last}, and re-running the same command resumes from it')

  def should_save(self, round_idx: int, last_round: int) -> bool:
    every = self._cfg.every_rounds
    return bool(every) and (round_idx % every == 0 or round_idx == last_round)

  def save(self, round_idx: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts saving; with async_save the files are written while the next round trains. The
    meta records every array's fingerprint, which a restore checks."""
    meta = {**meta, FINGERPRINTS: fingerprints(state)}
    try:
      with _interrupts_deferred():
        self._manager.save(round_idx, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # pylint: disable=broad-except  (orbax raises a disk error as it can)
      raise SaveFailed(self._failure_message(e)) from e

  def steps(self) -> list[int]:
    """Rounds with a complete checkpoint (orbax renames a save into place only when complete)."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(name) for name in os.listdir(self.directory) if name.isdigit())

  def restore_latest(self, abstract_state: Callable[[dict[str, Any]], Any]) -> Restored | None:
    """The newest checkpoint that loads; unreadable newer ones are moved aside with a warning.

    `abstract_state(meta)` gives the structure to restore into (it can depend on the meta, e.g. on
    which clients kept optimizer state). A checkpoint that reads fine but holds other arrays (the
    config changed: another model size) is not corrupt: that raises `CheckpointMismatch` and
    touches nothing.
    """
    for step in reversed(self.steps()):
      try:
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = dict(meta['meta'])
        saved = self._manager.item_metadata(step)['state']
        target = abstract(abstract_state(meta))
      except errors.WorkdirRefused:
        raise  # the checkpoint is fine, this run must not continue it: touch nothing
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside_unreadable(step, e)
        continue
      mismatch = _first_difference(_arrays(saved), _arrays(target))
      if mismatch:
        raise CheckpointMismatch(
            f'the checkpoint of round {step} in {self.directory} does not match this config '
            f'({mismatch}); resume with the config that wrote it, or choose a new --workdir')
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))
        check_fingerprints(restored['state'], meta)
        return Restored(round=step, state=restored['state'], meta=meta)
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside_unreadable(step, e)
    return None

  def _set_aside_unreadable(self, step: int, error: Exception) -> None:
    # Any failure to read means this step is unusable; keep its files for a post-mortem.
    aside = self._move_aside(step)
    logging.warning('checkpoint of round %d does not load (%s: %s); moved to %s, falling back to '
                    'the previous one', step, type(error).__name__,
                    _shortened(str(error)), aside)

  def _move_aside(self, step: int) -> str:
    source = os.path.join(self.directory, str(step))
    if jax.process_index() != 0:  # process 0 moves it; every process reads the same files
      self._manager.reload()
      return f'{source} (moved by process 0)'
    target = os.path.join(os.path.dirname(self.directory), f'corrupted-checkpoint-{step}')
    suffix = 0
    while os.path.exists(target if not suffix else f'{target}.{suffix}'):
      suffix += 1
    target = target if not suffix else f'{target}.{suffix}'
    os.rename(source, target)
    self._manager.reload()
    return target

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the last save. After a failed one the manager is left open: closing it would
    stop the event loop under orbax's other writers, which then print tracebacks of their own."""
    self.check()
    self._manager.close()


class WarmStartError(ValueError):
  """init.from_checkpoint names no readable checkpoint, or one of another model (one line)."""


@dataclasses.dataclass(frozen=True)
class WarmStart:
  """The checkpoint whose parameters start a run (`init.from_checkpoint`)."""
  directory: str  # the checkpoints/ directory that holds it
  round: int
  latest: bool = True  # chosen as the latest of its directory (not named as checkpoints/N)

  @property
  def path(self) -> str:
    return os.path.join(self.directory, str(self.round))


def find_warm_start(source: str) -> WarmStart:
  """The checkpoint named by `init.from_checkpoint`: a workdir (its latest complete checkpoint),
  its checkpoints/ directory, or one checkpoint in it (checkpoints/N)."""
  where = f'init.from_checkpoint={source}'
  source = os.path.abspath(os.path.expanduser(source))
  if not os.path.isdir(source):
    raise WarmStartError(f'{where}: no such directory (give a workdir, or its checkpoints/N)')
  name = os.path.basename(source)
  if name.isdigit() and os.path.isdir(os.path.join(source, 'state')):
    return WarmStart(os.path.dirname(source), int(name), latest=False)
  directory = (os.path.join(source, 'checkpoints')
               if os.path.isdir(os.path.join(source, 'checkpoints')) else source)
  steps = sorted(int(n) for n in os.listdir(directory)
                 if n.isdigit() and os.path.isdir(os.path.join(directory, n, 'state')))
  if not steps:
    raise WarmStartError(f'{where}: no complete checkpoint there (a workdir that has saved one '
                         'round, or its checkpoints/N)')
  return WarmStart(directory, steps[-1])


def check_warm_start(start: WarmStart, abstract_params: Any) -> None:
  """Raises WarmStartError unless the checkpoint holds parameters of exactly these shapes. Reads
  only metadata: call it before the data is read."""
  try:
    saved = _params_metadata(start)
  except Exception as e:  # pylint: disable=broad-except
    raise WarmStartError(f'init.from_checkpoint: the checkpoint {start.path} does not load '
                         f'({type(e).__name__}: {_shortened(str(e))})') from e
  mismatch = _first_difference(_arrays({'params': saved}), _arrays({'params': abstract_params}))
  if mismatch:
    raise WarmStartError(f'init.from_checkpoint: the checkpoint {start.path} holds another model '
                         f'than this config ({mismatch}); warm starts need the same model.* shapes')


def load_warm_start(start: WarmStart, abstract_params: Any) -> Any:
  """The checkpoint's parameters, placed as `abstract_params` says (shapes, dtypes, shardings).
  Only the parameters are read: the optimizer states of the run that wrote it are not used."""
  check_warm_start(start, abstract_params)
  target = {'params': abstract(abstract_params)}
  with _reader(start) as manager:
    restored = manager.restore(start.round, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True),
        meta=ocp.args.JsonRestore()))
  try:
    check_fingerprints({'params': restored['state']['params']}, dict(restored['meta']))
  except CorruptCheckpoint as e:
    raise WarmStartError(f'init.from_checkpoint: {start.path} {e}') from None
  return restored['state']['params']


def _reader(start: WarmStart) -> ocp.CheckpointManager:
  # A PyTree handler restores a part (the parameters) of the saved state. It only reads: orbax's
  # read_only option would say so in three warnings.
  return ocp.CheckpointManager(
      start.directory, options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={'state': ocp.PyTreeCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()})


def _params_metadata(start: WarmStart) -> Any:
  with _reader(start) as manager:
    tree = manager.item_metadata(start.round)['state']
  tree = getattr(tree, 'tree', tree)
  if not isinstance(tree, dict) or 'params' not in tree:
    raise ValueError('it has no params')
  return tree['params']


@contextlib.contextmanager
def _interrupts_deferred():
  """Ctrl-C or SIGTERM during the block is delivered when it ends. A KeyboardInterrupt inside
  orbax's `save` leaves its background commit thread waiting for a signal that never comes (300 s,
  orbax's timeout), and the interrupted run hanging at exit after its last line."""
  if threading.current_thread() is not threading.main_thread():
    yield  # signals are delivered to the main thread only
    return
  received = []
  previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
              for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
  if received:
    signal.raise_signal(received[0])  # now, to the handler it was meant for


FINGERPRINTS = 'fingerprints'  # the meta's key


class CorruptCheckpoint(ValueError):
  """A checkpoint's arrays read back as other values than were saved."""


def _fingerprint(x: jax.Array) -> jax.Array:
  """sum_i (2 i + 1) * bits_i mod 2**32 over the array's values as unsigned integers: any change
  of one value changes it (odd factors are invertible mod 2**32), the same on any device layout
  (integer sums do not depend on their order), computed where the array is."""
  width = x.dtype.itemsize * 8
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{width}')).astype(jnp.uint32)
  bits = bits.reshape(-1)
  odd = jnp.arange(bits.size, dtype=jnp.uint32) * 2 + 1
  return jnp.sum(bits * odd, dtype=jnp.uint32)


_fingerprints = jax.jit(lambda leaves: [_fingerprint(x) for x in leaves])


def fingerprints(tree: Any) -> dict[str, int]:
  """{'params.wte.embedding': fingerprint} of every array of `tree`."""
  named = jax.tree_util.tree_leaves_with_path(tree)
  values = jax.device_get(_fingerprints([x for _, x in named]))
  return {_path_name(path): int(v) for (path, _), v in zip(named, values)}


def check_fingerprints(tree: Any, meta: dict[str, Any]) -> None:
  """Raises CorruptCheckpoint naming the first array of `tree` whose fingerprint is not the one
  saved in `meta` (a checkpoint written before fingerprints existed is not checked)."""
  saved = meta.get(FINGERPRINTS)
  if saved is None:
    return
  for name, value in fingerprints(tree).items():
    if saved.get(name) != value:
      raise CorruptCheckpoint(f'{name} does not hold the values that were saved (fingerprint '
                              f'{value}, saved {saved.get(name)}): the files are corrupted')


def abstract(tree: Any) -> Any:
  """Shapes, dtypes and shardings of `tree` (arrays or ShapeDtypeStructs): what a restore needs
  to rebuild it exactly."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), tree)


def _os_cause(error: BaseException) -> str:
  """'No space left on device: ' when an OS error code is anywhere in the error or its causes.
  Tensorstore (under orbax) ends its message with `[os_error_code='28']` and long specs, which
  `_shortened` may cut, so the cause is named first."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    code = getattr(error, 'errno', None)
    if not isinstance(code, int):
      match = re.search(r"os_error_code='?(\d+)", str(error))
      code = int(match.group(1)) if match else None
    if code:
      return f'{os.strerror(code)}: '
    error = error.__cause__ or error.__context__
  return ''


def _shortened(text: str, head: int = 80, tail: int = 140) -> str:
  """A long storage error in one line: its start (what was written) and its end (the cause, such
  as "No space left on device")."""
  text = ' '.join(text.split())
  return text if len(text) <= head + tail + 5 else f'{text[:head]} ... {text[-tail:]}'


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_name(path) -> str:
  return '.'.join(_key_name(k) for k in path)


def _arrays(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{'params.wte.embedding': (shape, dtype)} of a tree of arrays or array metadata."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {_path_name(path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in leaves}


def _first_difference(saved: dict[str, Any], wanted: dict[str, Any]) -> str | None:
  # The parameters first: they say best what differs (a model size, a vocabulary).
  for name in sorted(saved.keys() | wanted.keys(), key=lambda n: (not n.startswith('params.'), n)):
    if name not in saved:
      return f'{name} is not in the checkpoint'
    if name not in wanted:
      return f'the checkpoint has {name}, which this config does not'
    if saved[name] != wanted[name]:
      (s_shape, s_dtype), (w_shape, w_dtype) = saved[name], wanted[name]
      return f'{name} is {s_dtype}{list(s_shape)} there, {w_dtype}{list(w_shape)} here'
  return None
