"""Warm start from a Hugging Face model directory (`init.from_hf=DIR`): a federation continues
pre-training a model that `fedjax_pt.export` wrote, or an open model of a supported architecture
(fedjax_pt/hf_format.py) whose shapes match the run's model.* config.

`find` reads only config.json and the safetensors headers, so a mismatch is refused in one line
before any data is read; `load` reads the tensors and places them as the run's parameters are
placed (shardings included), as a warm start from a checkpoint is.
"""

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
from safetensors import safe_open

from fedjax_pt import hf_format
from fedjax_pt import model as model_lib

_INDEX = 'model.safetensors.index.json'
_SINGLE = 'model.safetensors'


@dataclasses.dataclass(frozen=True)
class HFWarmStart:
  """A checked Hugging Face directory whose tensors start a run."""
  directory: str
  files: tuple[str, ...]  # its safetensors files
  architecture: str

  @property
  def path(self) -> str:
    return self.directory


def find(directory: str, cfg: model_lib.ModelConfig) -> HFWarmStart:
  """The directory's model checked against `cfg` (config.json, then every tensor's shape);
  HFFormatError naming the first difference."""
  where = f'init.from_hf={directory}'
  path = os.path.abspath(os.path.expanduser(directory))
  if not os.path.isdir(path):
    raise hf_format.HFFormatError(f'{where}: no such directory')
  config_path = os.path.join(path, 'config.json')
  if not os.path.isfile(config_path):
    raise hf_format.HFFormatError(f'{where}: no config.json there (not a Hugging Face model '
                                  'directory)')
  try:
    with open(config_path) as f:
      hf = json.load(f)
  except (OSError, ValueError) as e:
    raise hf_format.HFFormatError(f'{where}: config.json does not read as JSON: {e}') from None
  arch = hf_format.check_config(cfg, hf, where)
  files = _safetensors_files(path, where)
  shapes = {}
  for file in files:
    try:
      with safe_open(file, 'np') as f:
        for name in f.keys():
          shapes[name] = tuple(f.get_slice(name).get_shape())
    except Exception as e:  # pylint: disable=broad-except
      raise hf_format.HFFormatError(f'{where}: {os.path.basename(file)} does not read as '
                                    f'safetensors ({type(e).__name__}: {e})') from None
  hf_format.check_tensors(cfg, shapes, where)
  return HFWarmStart(path, tuple(files), arch.name)


def _safetensors_files(path: str, where: str) -> list[str]:
  if os.path.isfile(os.path.join(path, _INDEX)):
    try:
      with open(os.path.join(path, _INDEX)) as f:
        weight_map = json.load(f)['weight_map']
    except (OSError, ValueError, KeyError) as e:
      raise hf_format.HFFormatError(f'{where}: {_INDEX} has no weight_map ({e})') from None
    files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise hf_format.HFFormatError(f'{where}: {os.path.basename(missing[0])}, named in {_INDEX}, '
                                    'is missing')
    return files
  if os.path.isfile(os.path.join(path, _SINGLE)):
    return [os.path.join(path, _SINGLE)]
  raise hf_format.HFFormatError(f'{where}: no {_SINGLE} or {_INDEX} there (fedjax_pt reads '
                                'safetensors weights only)')


def read_params(start: HFWarmStart, cfg: model_lib.ModelConfig) -> Any:
  """The parameters as float32 numpy arrays, in fedjax_pt's tree."""
  tensors = {}
  for file in start.files:
    with safe_open(file, 'np') as f:
      for name in f.keys():
        tensors[name] = f.get_tensor(name)
  return hf_format.from_hf(cfg, tensors, f'init.from_hf={start.directory}')


def load(start: HFWarmStart, cfg: model_lib.ModelConfig, abstract_params: Any) -> Any:
  """The parameters placed as `abstract_params` says (shapes, dtypes, shardings). Each process
  reads the files and keeps the pieces its devices hold, so this works across processes too."""
  params = read_params(start, cfg)

  def place(x: np.ndarray, target: jax.ShapeDtypeStruct) -> jax.Array:
    x = np.asarray(x, target.dtype)
    if target.sharding is None:
      return jax.numpy.asarray(x)
    return jax.make_array_from_callback(x.shape, target.sharding, lambda index: x[index])

  return jax.tree.map(place, params, abstract_params)
