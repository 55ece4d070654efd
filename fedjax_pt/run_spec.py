"""The typed, validated view of a whole config, built before any data is read or code compiled."""

import dataclasses
import math
from typing import Any

import ml_collections

from fedjax_pt import checkpoint as checkpoint_lib
from fedjax_pt import data as data_lib
from fedjax_pt import distributed
from fedjax_pt import optimizers
from fedjax_pt import sharding
from fedjax_pt.configs import base as base_config
from fedjax_pt.data import extra_files
from fedjax_pt.federated import faults
from fedjax_pt.federated import profiles as profiles_lib
from fedjax_pt.federated.config import FLConfig


@dataclasses.dataclass(frozen=True)
class RunSpec:
  mode: str
  seed: int
  fl: FLConfig
  faults: faults.FaultConfig
  opt: optimizers.OptConfig
  data: data_lib.DataConfig
  ckpt: checkpoint_lib.CheckpointConfig
  mesh: sharding.MeshConfig
  eval_batch_size: int
  eval_max_batches: int
  eval_every_rounds: int
  eval_per_client: bool
  log_every_steps: int
  progress: bool
  tensorboard: bool
  per_layer_norms: bool
  init_from: str = ''  # init.from_checkpoint: a warm start's workdir or checkpoint, or ''
  init_from_hf: str = ''  # init.from_hf: a warm start's Hugging Face model directory, or ''
  eval_extra_files: tuple[tuple[str, str], ...] = ()  # (name, path) of eval.extra_files

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'RunSpec':
    """Raises ValueError naming the first offending key."""
    _check_finite(config.to_dict())
    if config.mode not in ('federated', 'centralized'):
      raise ValueError(f"mode must be 'federated' or 'centralized', got {config.mode!r}")
    for key in ('batch_size', 'every_rounds'):
      if config.eval[key] <= 0:
        raise ValueError(f'eval.{key} must be positive, got {config.eval[key]}')
    if config.eval.max_batches < 0:
      raise ValueError(f'eval.max_batches must be >= 0 (0 = all), got {config.eval.max_batches}')
    if config.log.every_steps < 0:
      raise ValueError(f'log.every_steps must be >= 0, got {config.log.every_steps}')
    if config.data.only_client >= 0 and config.mode != 'centralized':
      raise ValueError(f'data.only_client={config.data.only_client} trains one client alone: it '
                       f'needs mode=centralized, got {config.mode!r} (-1 turns it off)')
    init = config.get('init') or ml_collections.ConfigDict({'from_checkpoint': '', 'step': 0})
    if not isinstance(init.step, int) or isinstance(init.step, bool):
      raise ValueError(f'init.step must be an integer >= 0, got {init.step!r}')
    if init.step + config.fl.rounds * config.fl.local_steps >= 2**31:
      raise ValueError(f'init.step={init.step}: the run would end past step 2**31, which the '
                       'int32 step counter cannot count')
    from_hf = init.get('from_hf', '')
    for key, value in (('from_checkpoint', init.from_checkpoint), ('from_hf', from_hf)):
      if not isinstance(value, str):
        raise ValueError(f'init.{key} must be a path, got {value!r}')
    if init.from_checkpoint and from_hf:
      raise ValueError(f'init.from_checkpoint={init.from_checkpoint} and init.from_hf={from_hf} '
                       'are both set: a warm start takes its parameters from one of them')
    spec = cls(mode=config.mode, seed=config.seed, fl=FLConfig.from_config(config.fl),
               faults=faults.FaultConfig.from_config(config.fl),
               opt=dataclasses.replace(optimizers.OptConfig.from_config(config.opt),
                                       step_offset=init.step),
               data=data_lib.DataConfig.from_config(config.data),
               ckpt=checkpoint_lib.CheckpointConfig.from_config(config.ckpt),
               mesh=sharding.MeshConfig.from_config(
                   config.mesh, mode=config.mode, batch_size=config.data.batch_size,
                   micro_batch_size=config.data.micro_batch_size,
                   clients_per_round=config.fl.clients_per_round),
               eval_batch_size=config.eval.batch_size, eval_max_batches=config.eval.max_batches,
               eval_every_rounds=config.eval.every_rounds, eval_per_client=config.eval.per_client,
               log_every_steps=config.log.every_steps, progress=config.log.progress,
               tensorboard=config.log.tensorboard, per_layer_norms=config.log.per_layer_norms,
               init_from=init.from_checkpoint, init_from_hf=from_hf,
               eval_extra_files=extra_files.parse(config.eval.get('extra_files', '')))
    distributed.ProcessConfig.from_config(config.mesh)  # checks mesh.num_processes & co.
    _check_nothing_ignored(config)
    spec.check_profiles()
    if (spec.fl.dp.enabled or spec.fl.secagg.enabled) and spec.fl.weighting == 'tokens' and (
        not spec.uniform_clients):
      raise ValueError("fl.dp / fl.secagg average the clients uniformly, but fl.profiles give "
                       "them different work: set fl.weighting='uniform' (token weights would "
                       "depend on the clients)")
    return spec

  def client_plan(self, k: int) -> profiles_lib.ClientPlan:
    """Client k's batch and local steps per round (`fl.profiles`; the same for all without)."""
    return profiles_lib.plan(self.fl.profile(k), self.fl.local_steps, self.data.batch_size,
                             self.data.seq_len)

  @property
  def uniform_clients(self) -> bool:
    return profiles_lib.uniform(self.fl.profiles, self.fl.local_steps, self.data.batch_size,
                                self.data.seq_len)

  def check_profiles(self) -> None:
    fl = self.fl
    if not fl.profiles:
      return
    profiles_lib.check(fl.profiles, fl.local_steps, self.data.batch_size, self.data.seq_len,
                       self.data.micro_batch_size, self.mesh.data * self.mesh.fsdp)
    if self.uniform_clients or self.mode != 'federated':
      return
    if self.mesh.clients > 1:
      raise ValueError(f'fl.profiles give clients different batches or local steps: they train '
                       f'one at a time, so mesh.clients must be 1, got {self.mesh.clients}')
    if fl.fragments > 1:
      raise ValueError(f'fl.profiles give clients different batches or local steps, which '
                       f'streaming fragments cannot schedule: fl.fragments must be 1, got '
                       f'{fl.fragments}')


def _changed(config: ml_collections.ConfigDict, group: str) -> list[str]:
  """The keys of `group` ('fl.dp') whose value is not the default's."""
  default, current = base_config.get_config(), config
  for name in group.split('.'):
    default, current = default[name], current[name]
  return [f'{group}.{k}' for k, v in current.items() if k in default and v != default[k]]


def _check_nothing_ignored(config: ml_collections.ConfigDict) -> None:
  """A key that the rest of the config switches off is an error, not a silent no-op: a user who
  sets fl.dp.noise_multiplier without fl.dp.enabled must not believe the run was private."""
  fl = config.fl
  for group in ('fl.dp', 'fl.secagg'):
    switched_off = not config.fl[group.split('.')[1]].enabled
    changed = [k for k in _changed(config, group) if not k.endswith('.enabled')]
    if switched_off and changed:
      raise ValueError(f'{changed[0]} is set but {group}.enabled=False, which ignores it: set '
                       f'{group}.enabled=True, or leave {group}.* at their defaults')
  changed = _changed(config, 'fl')
  for key, rule in (('aggregation_trim', 'trimmed_mean'), ('aggregation_clip', 'norm_clipped')):
    if f'fl.{key}' in changed and fl.aggregation != rule:
      raise ValueError(f'fl.{key}={fl[key]} is set but fl.aggregation={fl.aggregation!r} ignores '
                       f"it: it applies to fl.aggregation={rule!r}")
  poison = fl.fault.get('poison', 'none')
  for key in ('poison_clients', 'poison_scale'):
    ignored = poison == 'none' or (key == 'poison_scale' and poison != 'scale')
    if f'fl.fault.{key}' in _changed(config, 'fl.fault') and ignored and fl.fault[key]:
      raise ValueError(f'fl.fault.{key}={fl.fault[key]} is set but fl.fault.poison={poison!r} '
                       'ignores it')
  comp = fl.compression
  quantised = {comp.upload, comp.download} & {'int8', 'int4'}
  if not quantised and 'fl.compression.block_size' in _changed(config, 'fl.compression'):
    raise ValueError(f'fl.compression.block_size={comp.block_size} is set, but only the int8 and '
                     'int4 codecs have blocks (fl.compression.upload and .download are '
                     f'{comp.upload!r} and {comp.download!r})')
  topk_keys = [k for k in _changed(config, 'fl.compression') if '.topk_' in k]
  if comp.upload != 'topk' and topk_keys:
    raise ValueError(f"{topk_keys[0]} is set, but only fl.compression.upload='topk' reads it "
                     f'(upload is {comp.upload!r})')
  if comp.error_feedback and comp.upload == 'none':
    raise ValueError("fl.compression.error_feedback=True with fl.compression.upload='none': "
                     'exact messages leave nothing to feed back; choose a lossy upload codec')
  if config.mode == 'centralized' and config.eval.per_client:
    raise ValueError('eval.per_client=True evaluates the global model on each client\'s held-out '
                     "data, which mode='centralized' has no global model of: set it to False")


_MAY_BE_INFINITE = ('fl.dp.clip_norm',)  # inf: no clipping


def _check_finite(tree: dict[str, Any], prefix: str = '') -> None:
  """NaN or infinity is never a meaningful setting (and `x <= 0` is False for NaN, so the range
  checks of each group would let it through): refuse it for every key at once."""
  for key, value in tree.items():
    if isinstance(value, dict):
      _check_finite(value, f'{prefix}{key}.')
    elif isinstance(value, float) and math.isinf(value) and f'{prefix}{key}' in _MAY_BE_INFINITE:
      continue
    elif isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f'{prefix}{key} must be a finite number, got {value}')
