"""The code follows the style pyproject.toml states (ruff: pyflakes, 100 columns)."""

import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_finds_nothing():
  ruff = shutil.which('ruff')
  if ruff is None:
    pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
  result = subprocess.run([ruff, 'check', '--no-cache', 'fedjax_pt', 'tests', 'benchmarks',
                           'experiments'], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
  assert result.returncode == 0, result.stdout[-3000:]
