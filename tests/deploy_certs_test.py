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


def test_the_kept_ca_renews_the_server_certificate(tmp_path):
  """ca.key stays beside ca.crt (owner-only): --renew signs a new server certificate that the
  organisations' unchanged ca.crt verifies."""
  # pylint: disable=g-import-not-at-top
  from cryptography import x509
  from cryptography.hazmat.primitives.asymmetric import ec
  tls = tmp_path / 'tls'
  assert _certs(f'--tls_dir={tls}', '--host=server.example.org').returncode == 0
  assert (tls / 'ca.key').stat().st_mode & 0o777 == 0o600
  ca_before, cert_before = (tls / 'ca.crt').read_bytes(), (tls / 'server.pem').read_bytes()
  renewed = _certs(f'--tls_dir={tls}', '--host=server.example.org', '--renew', '--days=90')
  assert renewed.returncode == 0, renewed.stderr
  assert (tls / 'ca.crt').read_bytes() == ca_before
  assert (tls / 'server.pem').read_bytes() != cert_before
  ca = x509.load_pem_x509_certificate(ca_before)
  cert = x509.load_pem_x509_certificate((tls / 'server.pem').read_bytes())
  assert cert.issuer == ca.subject
  ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                         ec.ECDSA(cert.signature_hash_algorithm))  # raises if not the CA's
  days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
  assert days == 90
  (tls / 'ca.key').unlink()
  lost = _certs(f'--tls_dir={tls}', '--renew')
  assert lost.returncode == errors.EXIT_BAD_INPUT and lost.stderr.count('\n') == 1
  assert f'{tls}/ca.key does not exist: renewing needs the CA' in lost.stderr
