"""README.md and docs/ point at things that exist, and docs/outputs.md lists every record key."""

import dataclasses
import glob
import importlib.util
import os
import re

import pytest

from fedjax_pt import records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted([os.path.join(REPO, 'README.md'), *glob.glob(os.path.join(REPO, 'docs', '*.md')),
                *glob.glob(os.path.join(REPO, 'experiments', 'results', '*_findings.md'))])
_LINK = re.compile(r'\]\(([^)\s]+)\)')
_MODULE = re.compile(r'python3? -m ([A-Za-z_][\w.]*\w)')
_SCRIPT = re.compile(r'python3? ((?:experiments|benchmarks)/[\w/]+\.py)')
_KEY_ROW = re.compile(r'^\| `(\w+)` \| [\w, ]+ \|')


def _text(path):
  with open(path, encoding='utf-8') as f:
    return f.read()


def _name(path):
  return os.path.relpath(path, REPO)


def test_the_pages_exist():
  names = {_name(p) for p in PAGES}
  for page in ('configuration', 'outputs', 'scaling', 'reliability', 'heterogeneous',
               'communication', 'planning', 'deployment', 'privacy', 'benchmarks',
               'architecture', 'results'):
    assert f'docs/{page}.md' in names


def test_readme_is_short():
  assert len(_text(os.path.join(REPO, 'README.md')).splitlines()) <= 200


@pytest.mark.parametrize('page', PAGES, ids=_name)
def test_relative_links_exist(page):
  missing = []
  for target in _LINK.findall(_text(page)):
    if re.match(r'[a-z]+:', target) or target.startswith('#'):
      continue
    path = os.path.normpath(os.path.join(os.path.dirname(page), target.split('#')[0]))
    if not os.path.exists(path):
      missing.append(target)
  assert not missing, f'{_name(page)} links to missing files: {missing}'


def _module_exists(name):
  top = name.split('.')[0]
  if os.path.isdir(os.path.join(REPO, top)):
    base = os.path.join(REPO, *name.split('.'))
    return os.path.exists(base + '.py') or os.path.exists(os.path.join(base, '__main__.py'))
  return importlib.util.find_spec(top) is not None


@pytest.mark.parametrize('page', PAGES, ids=_name)
def test_commands_name_modules_and_scripts_that_exist(page):
  text = _text(page)
  missing = [m for m in _MODULE.findall(text) if not _module_exists(m)]
  missing += [s for s in _SCRIPT.findall(text) if not os.path.exists(os.path.join(REPO, s))]
  assert not missing, f'{_name(page)} runs what does not exist: {missing}'


def test_outputs_table_lists_every_record_key_and_no_other():
  documented = [m.group(1) for line in _text(os.path.join(REPO, 'docs', 'outputs.md')).splitlines()
                if (m := _KEY_ROW.match(line))]
  fields = {f.name for cls in (records.RoundRecord, records.StepRecord)
            for f in dataclasses.fields(cls)} | {'kind'}
  assert len(documented) == len(set(documented)), 'a key is listed twice'
  assert not fields - set(documented), f'undocumented keys: {sorted(fields - set(documented))}'
  assert not set(documented) - fields, f'keys no record has: {sorted(set(documented) - fields)}'


@pytest.mark.parametrize('page', PAGES, ids=_name)
def test_code_fences_are_closed(page):
  fences = [line for line in _text(page).splitlines() if line.lstrip().startswith('```')]
  assert len(fences) % 2 == 0, f'{_name(page)} leaves a code block open'
