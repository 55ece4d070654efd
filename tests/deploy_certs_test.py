"""The credentials command never replaces what an organisation already holds by accident."""

import os
import subprocess
import sys

from fedjax_pt import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _certs(*flags):
  return subprocess.run([sys.executable, '-m', 'fedjax_pt.deploy.certs', *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=120, check=False)


def test_existing_credentials_are_kept_unless_forced(tmp_path):
  assert _certs(f'--node_key={tmp_path}/org0').returncode == 0
  key = (tmp_path / 'org0').read_bytes()
  again = _certs(f'--node_key={tmp_path}/org0')
  assert again.returncode == errors.EXIT_BAD_INPUT
  assert again.stderr.strip() == (f'fedjax_pt.deploy.certs: error: {tmp_path}/org0 exists; it '
                                  'would be replaced, locking out whoever holds it (--force '
                                  'replaces it)')
  assert (tmp_path / 'org0').read_bytes() == key
  assert _certs(f'--node_key={tmp_path}/org0', '--force').returncode == 0
  assert (tmp_path / 'org0').read_bytes() != key
  assert _certs(f'--tls_dir={tmp_path}/tls').returncode == 0
  ca = (tmp_path / 'tls' / 'ca.crt').read_bytes()
  assert 'ca.crt exists' in _certs(f'--tls_dir={tmp_path}/tls').stderr
  assert (tmp_path / 'tls' / 'ca.crt').read_bytes() == ca


def test_a_file_where_the_directory_goes_is_one_line(tmp_path):
  (tmp_path / 'taken').write_text('')
  result = _certs(f'--tls_dir={tmp_path}/taken')
  assert result.returncode == errors.EXIT_BAD_INPUT
  assert result.stderr.strip() == (f'fedjax_pt.deploy.certs: error: {tmp_path}/taken is a file, '
                                   'not a directory')
