"""A finished (or running) run's model, read back from its workdir: what export and generation use.

A workdir holds config.json (the resolved config: the model's derived vocabulary and positions
included) and checkpoints/N. Loading reads only the parameters of one checkpoint; the tokenizer is
the one the run trained with (`data.tokenizer`).
"""

import dataclasses
import json
import os
from typing import Any

from fedjax_pt import checkpoint as checkpoint_lib
from fedjax_pt import data as data_lib
from fedjax_pt import model as model_lib


class TrainedModelError(ValueError):
  """The workdir or checkpoint cannot give a model (one line, naming the culprit)."""


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  cfg: model_lib.ModelConfig
  params: Any  # float32 arrays, as `model.init_params` makes them
  tokenizer: data_lib.Tokenizer
  config: dict[str, Any]  # the run's resolved config.json
  round: int  # the checkpoint's round
  checkpoint_path: str


def run_config(workdir: str) -> dict[str, Any]:
  path = os.path.join(os.path.expanduser(workdir), 'config.json')
  if not os.path.isdir(os.path.expanduser(workdir)):
    raise TrainedModelError(f'--workdir={workdir}: no such directory')
  if not os.path.isfile(path):
    raise TrainedModelError(f'--workdir={workdir}: no config.json there (not a fedjax_pt run)')
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise TrainedModelError(f'{path} does not read as JSON: {e}') from None


def model_config_of(config: dict[str, Any], where: str) -> model_lib.ModelConfig:
  fields = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
  model = config.get('model') or {}
  unknown = sorted(set(model) - fields)
  if unknown:
    raise TrainedModelError(f'{where}: model.{unknown[0]} is not a key this version of fedjax_pt '
                            'knows (a run of a newer version?)')
  try:
    return model_lib.ModelConfig(**model)
  except (TypeError, ValueError) as e:
    raise TrainedModelError(f'{where}: {e}') from None


def load(workdir: str, checkpoint: int | None = None) -> TrainedModel:
  """The model of `workdir` at its latest complete checkpoint, or at round `checkpoint`."""
  config = run_config(workdir)
  cfg = model_config_of(config, os.path.join(workdir, 'config.json'))
  source = workdir if checkpoint is None else os.path.join(workdir, 'checkpoints', str(checkpoint))
  try:
    if checkpoint is not None and not os.path.isdir(os.path.join(source, 'state')):
      raise TrainedModelError(f'--checkpoint={checkpoint}: {workdir} has no complete checkpoint of '
                              f'round {checkpoint} (it has {_rounds(workdir) or "none"})')
    start = checkpoint_lib.find_warm_start(source)
    params = checkpoint_lib.load_warm_start(start, model_lib.param_shapes(cfg))
  except checkpoint_lib.WarmStartError as e:
    # Its messages name init.from_checkpoint, the key of a warm start; here the user gave a workdir.
    message = str(e).replace(f'init.from_checkpoint={source}', f'--workdir={workdir}')
    raise TrainedModelError(message.replace('init.from_checkpoint: ', '')) from None
  try:
    tokenizer = data_lib.load_tokenizer(config['data']['tokenizer'])
  except (ValueError, OSError) as e:
    raise TrainedModelError(f"{workdir}: the run's tokenizer does not load: {e}") from None
  return TrainedModel(cfg=cfg, params=params, tokenizer=tokenizer, config=config,
                      round=start.round, checkpoint_path=start.path)


def _rounds(workdir: str) -> str:
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return ''
  return ', '.join(sorted((n for n in os.listdir(directory) if n.isdigit()), key=int))
