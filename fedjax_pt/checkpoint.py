"""A thin orbax wrapper: round-boundary checkpoints that survive crashes and never destroy good ones.

A checkpoint holds two items: `state`, the arrays (global parameters, outer optimizer state, kept
client optimizer states), and `meta`, JSON (round, cumulative totals, every data iterator's position,
the byte length of metrics.jsonl at that round). orbax writes each step into a temporary directory and
renames it when complete, so a save killed midway never looks like a checkpoint; a finalized one
that fails to load (a truncated file) is moved aside, never deleted, and the previous one is used.
"""

from collections.abc import Callable
import dataclasses
import os
from typing import Any

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp


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


@dataclasses.dataclass
class Totals:
  """Cumulative counts of a run, carried across sessions."""
  tokens: int = 0
  bytes_sent: int = 0
  bytes_received: int = 0


@dataclasses.dataclass
class RunMeta:
  """The JSON item of a checkpoint: what is not an array."""
  round: int
  totals: Totals
  iterators: list[dict[str, Any]]  # every data iterator's position (grain state)
  kept_clients: list[int] = dataclasses.field(default_factory=list)  # whose Adam state is saved
  metrics_bytes: int = 0  # the length of metrics.jsonl at this round
  # Whose model / error-feedback residual is saved ({'model': [0, 1], 'residual': [0, 1]}).
  carried: dict[str, list[int]] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, obj: dict[str, Any]) -> 'RunMeta':
    return cls(round=obj['round'], totals=Totals(**obj['totals']),
               iterators=list(obj['iterators']), kept_clients=list(obj.get('kept_clients', [])),
               metrics_bytes=obj.get('metrics_bytes', 0), carried=dict(obj.get('carried', {})))


@dataclasses.dataclass
class Restored:
  round: int
  state: Any
  meta: RunMeta


class Checkpointer:
  """Saves and restores (state pytree, meta dict) at round numbers under `workdir/checkpoints`."""

  def __init__(self, workdir: str, cfg: CheckpointConfig):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self._cfg = cfg
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, create=True, enable_async_checkpointing=cfg.async_save),
        item_names=('state', 'meta'))

  def should_save(self, round_idx: int, last_round: int) -> bool:
    every = self._cfg.every_rounds
    return bool(every) and (round_idx % every == 0 or round_idx == last_round)

  def save(self, round_idx: int, state: Any, meta: RunMeta) -> None:
    """Starts saving; with async_save the files are written while the next round trains."""
    self._manager.save(round_idx, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta.to_json())))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore_latest(self, abstract_state: Callable[[RunMeta], Any]) -> Restored | None:
    """The newest checkpoint that loads; unreadable newer ones are moved aside with a warning.

    `abstract_state(meta)` gives the structure to restore into (it can depend on the meta, e.g. on
    which clients kept optimizer state).
    """
    for step in reversed(self.steps()):
      try:
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = RunMeta.from_json(dict(meta['meta']))
        target = abstract(abstract_state(meta))
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))
        return Restored(round=step, state=restored['state'], meta=meta)
      except Exception as e:  # pylint: disable=broad-except
        # Any failure to read means this step is unusable; keep its files for a post-mortem.
        aside = self._move_aside(step)
        logging.warning('checkpoint of round %d does not load (%s: %s); moved to %s, falling back '
                        'to the previous one', step, type(e).__name__,
                        ' '.join(str(e).split())[:200], aside)
    return None

  def _move_aside(self, step: int) -> str:
    source = os.path.join(self.directory, str(step))
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
    self._manager.wait_until_finished()
    self._manager.close()


def abstract(tree: Any) -> Any:
  """Shapes, dtypes and shardings of `tree` (arrays or ShapeDtypeStructs): what a restore needs
  to rebuild it exactly."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), tree)
