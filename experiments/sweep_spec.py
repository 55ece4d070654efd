"""Sweep specs: a grid of runs from a small YAML (or Python) file, each run a list of overrides.

  config: configs/tiny.py
  base: {data.source: jsonl, fl.rounds: 12}
  grid:
    - {model.d_model: [64, 128]}                        # one key: one value per run
    - {fl.local_steps: [10, 50], fl.rounds: [60, 12]}   # several keys: zipped, one run per column
    - [{_name: nesterov}, {_name: fedavg, fl.outer_lr: 1.0, fl.outer_momentum: 0.0}]  # variants
  groups:                                               # optional: more grids, each may add a base
    - {name: central, base: {mode: centralized}, grid: [{model.d_model: [64, 128]}]}
    - name: warm                                        # runs that start from other runs
      base: {init.from_checkpoint: '{root}/central,d_model={model.d_model}'}
      grid: [{model.d_model: [64, 128]}]

The runs are the product of the grid's axes. Each is named by its grid values
(`d_model=64,local_steps=10,nesterov`, group name first): the name of its workdir.

A string value may name another of the run's keys as `{key}` (its value in this run) and the sweep
root as `{root}`. A run whose value contains `{root}/NAME` of an earlier run of the sweep needs
that run: it starts once NAME has finished, and not at all if NAME fails.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import re
import runpy
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_NAME_MAX = 120


class SpecError(ValueError):
  """A malformed spec or an inconsistent sweep root; the message names the culprit."""


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  config: str
  overrides: dict[str, Any]  # every --config.KEY=VALUE, base and grid, in order
  varying: dict[str, Any]  # the grid's share of them (what the name is made of)
  needs: tuple[str, ...] = ()  # earlier runs of the sweep this one starts from ({root}/NAME)

  def command(self, workdir: str, python: str = sys.executable,
              module: str = 'fedjax_pt.main') -> list[str]:
    root = os.path.dirname(os.path.abspath(workdir))
    return [python, '-m', module, f'--config={self.config}', f'--workdir={workdir}',
            *(f'--config.{k}={format_value(v).replace(ROOT, root)}'
              for k, v in self.overrides.items())]


ROOT = '{root}'
_REFERENCE = re.compile(r'\{([A-Za-z_][\w.]*)\}')


# --- spec ----------------------------------------------------------------------------------------

def load_spec(path: str) -> dict[str, Any]:
  """A spec from a .yaml/.yml file or a .py file that defines SPEC (a dict) or get_spec()."""
  if not os.path.isfile(path):
    raise SpecError(f'spec not found: {path}')
  if path.endswith(('.yaml', '.yml')):
    import yaml  # pylint: disable=import-outside-toplevel  (a dependency of flax)
    with open(path, encoding='utf-8') as f:
      try:
        spec = yaml.safe_load(f)
      except yaml.YAMLError as e:
        raise SpecError(f'{path}: not valid YAML ({" ".join(str(e).split())})') from e
  elif path.endswith('.py'):
    try:
      namespace = runpy.run_path(path)
      spec = namespace['get_spec']() if 'get_spec' in namespace else namespace.get('SPEC')
    except Exception as e:  # pylint: disable=broad-except  (a syntax error, a bad import, ...)
      raise SpecError(f'{path} does not load: {type(e).__name__}: '
                      f'{" ".join(str(e).split())}') from e
  else:
    raise SpecError(f'{path}: a spec is a .yaml, .yml or .py file')
  if not isinstance(spec, dict):
    raise SpecError(f'{path}: the spec must be a mapping (YAML) or define SPEC / get_spec() '
                    '(Python)')
  return spec


def expand(spec: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> list[Run]:
  """The runs of a spec, in grid order; `extra` overrides the base of every run (from --set)."""
  _check_keys(spec, {'config', 'base', 'grid', 'groups', 'description'}, 'spec')
  groups = spec.get('groups') or []
  if not isinstance(groups, list):
    raise SpecError('spec: groups must be a list of {name, base, grid}')
  labelled = [(f'groups[{i}]', group) for i, group in enumerate(groups)]
  if 'grid' in spec or not groups:
    labelled.insert(0, ('spec', {'grid': spec.get('grid') or []}))
  runs = []
  for where, group in labelled:
    _check_keys(group, {'name', 'config', 'base', 'grid'}, where)
    if group.get('name'):
      _check_label(group['name'], f'{where}.name')
    config = group.get('config') or spec.get('config')
    if not config:
      raise SpecError('spec: config (a config file, e.g. configs/tiny.py) is required')
    base = {**_overrides(spec.get('base'), 'base'),
            **_overrides(group.get('base'), f'{where}.base'), **dict(extra or {})}
    for parts, varying in _grid(group.get('grid') or [], f'{where}.grid'):
      name = run_name([str(group.get('name') or ''), *parts])
      overrides = _resolve({**base, **varying, **dict(extra or {})}, name)
      runs.append(Run(name, config, overrides, varying))
  seen: dict[str, Run] = {}
  for i, run in enumerate(runs):
    if run.name in seen:
      raise SpecError(f'two runs would share the workdir {run.name!r}: {seen[run.name].varying} '
                      f'and {run.varying}; give the variants a _name or the groups a name')
    seen[run.name] = run
    runs[i] = dataclasses.replace(run, needs=_needs(run, seen))
  return runs


def _resolve(overrides: dict[str, Any], name: str) -> dict[str, Any]:
  """String values with `{key}` replaced by the run's value of key; `{root}` stays for
  `Run.command`, which knows the sweep root."""
  def value_of(match: re.Match) -> str:
    key = match.group(1)
    if key == 'root':
      return ROOT
    if key not in overrides:
      raise SpecError(f'run {name}: {{{key}}} names no key of the run (its keys: '
                      f'{", ".join(overrides)})')
    return format_value(overrides[key])
  return {k: _REFERENCE.sub(value_of, v) if isinstance(v, str) else v
          for k, v in overrides.items()}


def _needs(run: Run, earlier: Mapping[str, Run]) -> tuple[str, ...]:
  needs = []
  for key, value in run.overrides.items():
    if not isinstance(value, str) or f'{ROOT}/' not in value:
      continue
    other = value.split(f'{ROOT}/', 1)[1].split('/')[0]
    if other not in earlier or other == run.name:
      raise SpecError(f'run {run.name}: {key}={value} names no earlier run of the sweep '
                      f'({other!r}); a run can only start from one listed before it')
    needs.append(other)
  return tuple(needs)


def _check_keys(mapping: Any, allowed: set[str], where: str) -> None:
  if not isinstance(mapping, Mapping):
    raise SpecError(f'{where}: expected a mapping, got {mapping!r}')
  unknown = sorted(set(mapping) - allowed)
  if unknown:
    raise SpecError(f'{where}: unknown key(s) {", ".join(unknown)}; allowed: {sorted(allowed)}')


def _overrides(value: Any, where: str) -> dict[str, Any]:
  if value is None:
    return {}
  if not isinstance(value, Mapping):
    raise SpecError(f'{where}: expected a mapping of config keys to values, got {value!r}')
  out = {}
  for key, v in value.items():
    key = str(key).removeprefix('--').removeprefix('config.')
    if not re.fullmatch(r'[A-Za-z_][\w.]*', key):
      raise SpecError(f'{where}: {key!r} is not a config key (e.g. fl.local_steps)')
    if isinstance(v, (list, dict)):
      raise SpecError(f'{where}: {key} must be a single value, got {v!r}')
    out[key] = v
  return out


def _grid(axes: Any, where: str) -> Iterable[tuple[list[Any], dict[str, Any]]]:
  """(name parts, overrides) of every point of the product of `axes`.

  A name part is a variant's label (str) or a (key, value) pair of a key axis.
  """
  if not isinstance(axes, list):
    raise SpecError(f'{where}: expected a list of axes')
  points = [_axis(axis, f'{where}[{i}]') for i, axis in enumerate(axes)]
  for combo in itertools.product(*points):
    parts, overrides = [], {}
    for axis_parts, axis_overrides in combo:
      parts += axis_parts
      overrides.update(axis_overrides)
    yield parts, overrides


def _axis(axis: Any, where: str) -> list[tuple[list[Any], dict[str, Any]]]:
  if isinstance(axis, list):  # variants: each a mapping of overrides, named by its _name
    out = []
    for j, variant in enumerate(axis):
      if not isinstance(variant, Mapping):
        raise SpecError(f'{where}[{j}]: a variant is a mapping of overrides, got {variant!r}')
      variant = dict(variant)
      label = variant.pop('_name', None)
      if label is not None:
        _check_label(label, f'{where}[{j}]._name')
      overrides = _overrides(variant, f'{where}[{j}]')
      parts = [str(label)] if label is not None else list(overrides.items())
      out.append((parts, overrides))
    return out
  if isinstance(axis, Mapping):  # one key, or several keys zipped together
    for key, values in axis.items():
      if not isinstance(values, list) or not values:
        raise SpecError(f'{where}: {key} must map to a non-empty list of values, got {values!r}')
    lengths = {len(v) for v in axis.values()}
    if len(lengths) != 1:
      raise SpecError(f'{where}: zipped keys need lists of equal length, got '
                      + ', '.join(f'{k}: {len(v)}' for k, v in axis.items()))
    out = []
    for values in zip(*axis.values()):
      overrides = _overrides(dict(zip(axis, values)), where)
      out.append((list(overrides.items()), overrides))
    return out
  raise SpecError(f'{where}: an axis is a mapping {{key: [values]}} or a list of variants')


def format_value(value: Any) -> str:
  """A value as config_flags parses it on the command line."""
  if isinstance(value, bool):
    return 'True' if value else 'False'
  if isinstance(value, float):
    return repr(value)
  return str(value)


def run_name(parts: Sequence[Any]) -> str:
  """`label,key=value,...` from variant labels and (key, value) pairs; filesystem-safe.

  Keys are shortened to their last component unless that is ambiguous within the run. A name too
  long for a directory keeps a readable head and a hash of the whole.
  """
  shorts = [p[0].rsplit('.', 1)[-1] for p in parts if isinstance(p, tuple)]
  out = []
  for part in parts:
    if isinstance(part, tuple):
      key, value = part
      short = key.rsplit('.', 1)[-1]
      out.append(f'{short if shorts.count(short) == 1 else key}={_safe(format_value(value))}')
    elif part:
      out.append(_safe(part))
  name = ','.join(out) or 'base'
  if len(name) > _NAME_MAX:
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    name = f'{name[:_NAME_MAX - 11]}-{digest}'
  return name


def _check_label(label: Any, where: str) -> None:
  """A variant's or group's name becomes part of a workdir's name under the sweep root: '.' or
  '..' would put the workdir at the root or outside it."""
  if not str(label).strip('.'):
    raise SpecError(f'{where}: {label!r} is not a name (it would put the run\'s workdir outside '
                    'its own directory under the root)')


def _safe(text: str) -> str:
  # Paths (data files, tokenizers) are named by their file name.
  text = os.path.basename(text.rstrip('/')) if '/' in text else text
  return re.sub(r'[^\w.+=-]', '_', text) or '_'


def parse_set(items: Sequence[str]) -> dict[str, Any]:
  """--set KEY=VALUE items; values are parsed as YAML scalars (1 -> int, false -> bool)."""
  import yaml  # pylint: disable=import-outside-toplevel
  out = {}
  for item in items:
    if '=' not in item:
      raise SpecError(f'--set {item!r}: expected KEY=VALUE')
    key, value = item.split('=', 1)
    parsed = yaml.safe_load(value) if value else ''
    if isinstance(parsed, str):
      try:  # YAML 1.1 reads 1e-3 as a string
        parsed = float(parsed)
      except ValueError:
        pass
    out.update(_overrides({key: value if isinstance(parsed, (list, dict)) else parsed}, '--set'))
  return out


def check_configs(runs: Sequence[Run], cwd: str) -> None:
  """Every run's config file exists and every override names one of its keys with a value of
  its type, before any trainer starts; SpecError names the run. (Values the trainer checks
  against each other, or paths that earlier runs write, are left to it.)"""
  from fedjax_pt import cli  # pylint: disable=g-import-not-at-top  (JAX only where it is needed)
  for run in runs:
    path = os.path.join(cwd, run.config.split(':')[0])
    if not os.path.isfile(path):
      raise SpecError(f'{run.name}: config {run.config} is not a file (relative to {cwd})')
    try:
      cli.load_config(os.path.join(cwd, run.config),
                      [f'--config.{k}={format_value(v)}' for k, v in run.overrides.items()])
    except ValueError as e:
      raise SpecError(f'{run.name}: {e}') from None


def requested_rounds(run: Run, cwd: str) -> int | None:
  """fl.rounds that `run` asks for: its override, else its config file's value (None if the file
  cannot be read from `cwd`)."""
  if 'fl.rounds' in run.overrides:
    return int(run.overrides['fl.rounds'])
  path, _, variant = run.config.partition(':')
  path = os.path.join(cwd, path)
  if not os.path.isfile(path):
    return None
  try:
    module = runpy.run_path(path)
    config = module['get_config'](variant) if variant else module['get_config']()
  except Exception:  # pylint: disable=broad-except
    return None
  return int(config.fl.rounds)
