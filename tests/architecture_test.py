"""The package's shape: no import cycles, no layer importing one above it, small modules, and the
round's statistics typed as round-record fields."""

import ast
import dataclasses
import pathlib

import pytest

from fedjax_pt import centralized
from fedjax_pt import records
from fedjax_pt.federated import tally

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'fedjax_pt'

# What a layer must not import (module-name prefixes), from the learner up to the commands: the
# learner knows nothing of federations, the round's policies nothing of who runs them.
_LEARNER = ('fedjax_pt.model', 'fedjax_pt.optimizers', 'fedjax_pt.sharding',
            'fedjax_pt.distributed', 'fedjax_pt.metrics', 'fedjax_pt.local_training',
            'fedjax_pt.data', 'fedjax_pt.records', 'fedjax_pt.errors')
_RUN = ('fedjax_pt.build', 'fedjax_pt.train', 'fedjax_pt.workdir', 'fedjax_pt.run_state',
        'fedjax_pt.accounting', 'fedjax_pt.reporting', 'fedjax_pt.plot')
_COMMANDS = ('fedjax_pt.main', 'fedjax_pt.plan', 'fedjax_pt.launch_local', 'fedjax_pt.export')
_ABOVE_FEDERATED = ('fedjax_pt.federated', 'fedjax_pt.simulation', 'fedjax_pt.centralized',
                    'fedjax_pt.deploy', 'fedjax_pt.planning', 'fedjax_pt.run_spec',
                    'fedjax_pt.checkpoint') + _RUN + _COMMANDS
_FORBIDDEN = {
    **{module: _ABOVE_FEDERATED for module in _LEARNER},
    'fedjax_pt.federated': ('fedjax_pt.simulation', 'fedjax_pt.centralized', 'fedjax_pt.deploy',
                            'fedjax_pt.planning', 'fedjax_pt.run_spec') + _RUN + _COMMANDS,
    'fedjax_pt.simulation': ('fedjax_pt.deploy', 'fedjax_pt.planning') + _RUN + _COMMANDS,
    'fedjax_pt.centralized': ('fedjax_pt.deploy', 'fedjax_pt.planning') + _RUN + _COMMANDS,
    'fedjax_pt.planning': ('fedjax_pt.deploy', 'fedjax_pt.train') + _COMMANDS,
    'fedjax_pt.deploy': ('fedjax_pt.planning',) + _COMMANDS,
    # The Hugging Face format is the learner's (a model's tensors), read by the run's warm start.
    'fedjax_pt.hf_format': _ABOVE_FEDERATED,
    'fedjax_pt.hf_import': _ABOVE_FEDERATED,
}


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(PACKAGE.rglob('*.py')):
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    if parts[-1] == '__init__':
      parts = parts[:-1]
    out['.'.join(parts)] = path
  return out


def _imports(path: pathlib.Path, modules) -> set[str]:
  """The fedjax_pt modules that `path` imports (a package's name when it imports the package)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        name = f'{node.module}.{alias.name}'
        found.add(name if name in modules else node.module)
  return {name for name in found if name in modules}


def test_no_import_cycles():
  modules = _modules()
  graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
  done, on_path = set(), []

  def visit(name):
    if name in on_path:
      cycle = on_path[on_path.index(name):] + [name]
      pytest.fail(f'import cycle: {" -> ".join(cycle)}')
    if name in done:
      return
    on_path.append(name)
    for imported in sorted(graph[name]):
      # A package imports its modules on purpose (fedjax_pt.data re-exports its API).
      if not imported.startswith(name + '.'):
        visit(imported)
    on_path.pop()
    done.add(name)

  for name in sorted(graph):
    visit(name)


def test_no_layer_imports_one_above_it():
  modules = _modules()
  upward = []
  for name, path in modules.items():
    forbidden = [prefixes for layer, prefixes in _FORBIDDEN.items()
                 if name == layer or name.startswith(layer + '.')]
    for imported in _imports(path, modules):
      if any(imported == p or imported.startswith(p + '.') for ps in forbidden for p in ps):
        upward.append(f'{name} imports {imported}')
  assert not upward


def test_modules_are_small():
  long = {name: n for name, path in _modules().items()
          if (n := len(path.read_text(encoding='utf-8').splitlines())) > 400}
  assert not long


@pytest.mark.parametrize('stats', [tally.FederatedStats, centralized.CentralizedStats])
def test_round_statistics_are_round_record_fields(stats):
  fields = {f.name for f in dataclasses.fields(records.RoundRecord)}
  assert {f.name for f in dataclasses.fields(stats)} <= fields
