"""Warm start from a Hugging Face model directory (`init.from_hf=DIR`): a federation continues
pre-training a model that `fedjax_pt.export` wrote, or an open model of a supported architecture
(fedjax_pt/hf_format.py) whose shapes match the run's model.* config.

`find` reads only config.json and the safetensors headers, so a mismatch is refused in one line
before any data is read; `load` reads the tensors and places them as the run's parameters are
placed (shardings included), as a warm start from a checkpoint is.
"""

from collections.abc import Mapping
import dataclasses
import json
import os
import re
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
  arch = check_config(cfg, hf, where)
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
  # A tied GPT-NeoX may leave its output matrix out: it is the embedding.
  tied = arch.model_type == 'gpt_neox' and hf.get('tie_word_embeddings')
  check_tensors(cfg, shapes, where, optional=('embed_out.weight',) if tied else ())
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
  return from_hf(cfg, tensors, f'init.from_hf={start.directory}')


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


def architecture_of(hf: Mapping[str, Any], where: str) -> hf_format.Architecture:
  """The architecture of a Hugging Face config.json, if fedjax_pt has it."""
  for arch in hf_format.ARCHITECTURES.values():
    if hf.get('model_type') == arch.model_type:
      return arch
  names = ', '.join(a.name for a in hf_format.ARCHITECTURES.values())
  raise hf_format.HFFormatError(f'{where}: architectures={hf.get("architectures")} '
                      f'(model_type={hf.get("model_type")!r}); fedjax_pt reads {names}')


def check_config(cfg: model_lib.ModelConfig, hf: Mapping[str, Any],
                 where: str) -> hf_format.Architecture:
  """Raises HFFormatError naming the first key in which the HF model differs from `cfg`'s."""
  arch = architecture_of(hf, where)
  try:
    ours = hf_format.architecture(cfg)
  except hf_format.HFFormatError as e:
    raise hf_format.HFFormatError(f'{where}: {e}') from None
  if ours is not arch:
    raise hf_format.HFFormatError(
        f"{where} is a {arch.name}; this run's model (model.family={cfg.family!r}, "
        f'model.position_embedding={cfg.position_embedding!r}) is a {ours.name}')
  for key, value, hf_key, expected in arch.matched_keys(cfg):
    there = _hf_value(hf, hf_key, arch)
    if not _same(there, expected):
      raise hf_format.HFFormatError(f'{where}: model.{key}={value} here, {hf_key}={there} there')
  rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  if rope.get('rope_type', rope.get('type', 'default')) != 'default':
    raise hf_format.HFFormatError(f"{where}: rope_type={rope.get('rope_type', rope.get('type'))!r}"
                                  " there; fedjax_pt's rotary embedding is the unscaled 'default'")
  for hf_key, expected in arch.extra_config(cfg).items():
    # Dropout is off in a forward pass; a zero bias is checked on the tensors.
    if hf_key in ('rope_parameters', 'learned_pos_emb', 'pretraining_tp') or (
        'dropout' in hf_key or 'pdrop' in hf_key):
      continue
    if hf_key in ('tie_word_embeddings', 'attention_bias') and arch.model_type == 'gpt_neox':
      continue  # embed_out is compared with the embedding, biases are checked to be zero
    there = _hf_value(hf, hf_key, arch)
    if hf_key == 'attn_config':
      there = {k: there.get(k, v) for k, v in expected.items()} if isinstance(there, dict) else {}
      bad = [k for k, v in expected.items() if 'pdrop' not in k and there.get(k) != v]
      if bad:
        raise hf_format.HFFormatError(f'{where}: attn_config.{bad[0]}={there.get(bad[0])} '
                                      f'there; fedjax_pt computes {bad[0]}={expected[bad[0]]}')
      continue
    if not _same(there, expected):
      raise hf_format.HFFormatError(f'{where}: {hf_key}={there!r} there; fedjax_pt computes '
                                    f'{hf_key}={expected!r}')
  return arch


# What transformers assumes for a key that a config.json leaves out (its config classes'
# defaults), so that a key left at its default is compared as what it means.
_DEFAULTS = {
    'gpt2': {'activation_function': 'gelu_new', 'scale_attn_weights': True,
             'scale_attn_by_inverse_layer_idx': False, 'reorder_and_upcast_attn': False,
             'add_cross_attention': False, 'tie_word_embeddings': True,
             'layer_norm_epsilon': 1e-5, 'n_positions': 1024},
    'mpt': {'no_bias': True, 'logit_scale': None, 'tie_word_embeddings': True,
            'expansion_ratio': 4, 'layer_norm_epsilon': 1e-5, 'max_seq_len': 2048},
    'gpt_neox': {'hidden_act': 'gelu', 'use_parallel_residual': True, 'layer_norm_eps': 1e-5,
                 'max_position_embeddings': 2048},
    'llama': {'hidden_act': 'silu', 'mlp_bias': False, 'tie_word_embeddings': False,
              'num_key_value_heads': None, 'rms_norm_eps': 1e-6, 'head_dim': None,
              'max_position_embeddings': 2048},
}


def _hf_value(hf: Mapping[str, Any], key: str, arch: hf_format.Architecture) -> Any:
  """A config.json value as transformers reads it: spelled as this or another version spells it,
  or the default a missing key has."""
  if key in hf and hf[key] is not None:
    return hf[key]
  rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  if key in ('rotary_emb_base', 'rope_theta'):
    return hf.get('rope_theta', rope.get('rope_theta', 10000.0))
  if key == 'rotary_pct':
    return rope.get('partial_rotary_factor', 0.25)
  if key == 'n_inner':  # null: 4 * n_embd
    return 4 * hf.get('n_embd', 768)
  if key == 'num_key_value_heads':
    return hf.get('num_attention_heads')
  if key == 'head_dim' and hf.get('num_attention_heads'):
    return hf.get('hidden_size', 0) // hf['num_attention_heads']
  return _DEFAULTS[arch.model_type].get(key)


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
    return float(a) == float(b)
  return a == b


def check_tensors(cfg: model_lib.ModelConfig, shapes: Mapping[str, tuple[int, ...]],
                  where: str, optional: tuple[str, ...] = ()) -> None:
  """Raises HFFormatError naming the first tensor that is missing or of another shape."""
  expected = hf_format.hf_shapes(cfg)
  aliases = _aliases(cfg)
  for name, shape in expected.items():
    found = next((n for n in (name, *aliases.get(name, ())) if n in shapes), None)
    if found is None:
      if name in hf_format.bias_shapes(cfg) or name in optional:
        continue  # a bias a checkpoint leaves out is zero
      raise hf_format.HFFormatError(f'{where}: no tensor {name} (this run\'s model needs it)')
    if tuple(shapes[found]) != shape:
      raise hf_format.HFFormatError(f'{where}: {found} is {list(shapes[found])} there, '
                                    f"{list(shape)} for this run's model.* config")
  known = set(expected).union(*aliases.values())
  extra = sorted(n for n in shapes if n not in known and not _IGNORED.search(n))
  if extra:
    raise hf_format.HFFormatError(f"{where}: {extra[0]} there has no place in this run's model "
                                  '(a tensor its architecture does not have)')


# Tensors transformers itself ignores or recomputes: causal-mask and rotary buffers that old
# checkpoints saved, and the output matrix of a tied model (the embedding replaces it on load).
_IGNORED = re.compile(r'(\.attn\.(masked_)?bias|\.attention\.(masked_)?bias|rotary_emb\.inv_freq'
                      r'|^lm_head\.weight)$')


def _aliases(cfg: model_lib.ModelConfig) -> dict[str, tuple[str, ...]]:
  """Other names checkpoints give a tensor: GPT-2 without its 'transformer.' prefix; GPT-NeoX's
  output projection as transformers 5 saves it."""
  arch = hf_format.architecture(cfg)
  names = list(hf_format.hf_shapes(cfg))
  if arch.model_type == 'gpt2':
    return {n: (n[len('transformer.'):],) for n in names}
  if arch.model_type == 'gpt_neox':
    return {'embed_out.weight': ('lm_head.weight',)}
  return {}


def from_hf(cfg: model_lib.ModelConfig, tensors: Mapping[str, np.ndarray], where: str) -> Any:
  """fedjax_pt parameters (float32 numpy) from the named tensors of a checked HF model; raises
  HFFormatError naming the first tensor fedjax_pt's model cannot represent (a nonzero bias, an
  untied output projection of an architecture whose fedjax_pt model ties it)."""
  arch = hf_format.architecture(cfg)
  aliases = _aliases(cfg)
  named = {}
  for name in hf_format.hf_shapes(cfg):
    found = next((n for n in (name, *aliases.get(name, ())) if n in tensors), None)
    if found is not None:
      named[name] = np.asarray(tensors[found], np.float32)
  for name in arch.zero_biases(cfg):
    if name in named and np.any(named[name]):
      raise hf_format.HFFormatError(f"{where}: {name} is a nonzero bias, which fedjax_pt's "
                                    'model (no biases) cannot represent')
  if arch.model_type == 'gpt_neox' and 'embed_out.weight' in named and not np.array_equal(
      named['embed_out.weight'], named['gpt_neox.embed_in.weight']):
    raise hf_format.HFFormatError(f'{where}: embed_out.weight differs from '
                                  "gpt_neox.embed_in.weight; fedjax_pt's rotary MPT block ties "
                                  'its output projection to the embedding')
  return arch.from_hf(cfg, named)
