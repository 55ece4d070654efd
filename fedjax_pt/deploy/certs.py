r"""Credentials for a federation: a CA and a SuperLink certificate (TLS), and SuperNode key pairs
(node authentication), made with the `cryptography` package.

  python -m fedjax_pt.deploy.certs --tls_dir=certs --host=server.example.org   # the operator
  python -m fedjax_pt.deploy.certs --tls_dir=certs --host=... --renew   # a new server certificate
  python -m fedjax_pt.deploy.certs --node_key=keys/org1   # each organisation: keys/org1{,.pub}

The certificate is for `host` (a name or an IP address) and also for localhost and 127.0.0.1,
where the operator's `flwr` CLI reaches the SuperLink. An organisation keeps its private key and
sends only the public one to the operator, who registers it (`flwr supernode register`).

The CA's private key is kept beside its certificate (`ca.key`, readable by its owner only; keep
it off shared disks and out of version control): `--renew` signs a new server certificate with it
before the old one expires, so no organisation needs a new `ca.crt`.
"""

import dataclasses
import datetime
import ipaddress
import pathlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.oid import NameOID


@dataclasses.dataclass(frozen=True)
class TLSFiles:
  ca: pathlib.Path  # what SuperNodes and the flwr CLI trust (--root-certificates)
  cert: pathlib.Path  # the SuperLink's certificate (--ssl-certfile)
  key: pathlib.Path  # and its private key (--ssl-keyfile)
  ca_key: pathlib.Path  # the CA's private key: signs renewed server certificates

  @classmethod
  def under(cls, directory: pathlib.Path) -> 'TLSFiles':
    return cls(directory / 'ca.crt', directory / 'server.pem', directory / 'server.key',
               directory / 'ca.key')


def _write_private(path: pathlib.Path, data: bytes) -> None:
  path.write_bytes(data)
  path.chmod(0o600)


def _names(hosts: list[str]) -> list[x509.GeneralName]:
  names = [x509.DNSName('localhost'), x509.IPAddress(ipaddress.ip_address('127.0.0.1'))]
  for host in hosts:
    try:
      name = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
      name = x509.DNSName(host)
    if name not in names:
      names.append(name)
  return names


def _refuse_to_overwrite(paths: list[pathlib.Path], force: bool) -> None:
  """Credentials are never replaced by accident: a new CA or key locks out whoever holds the
  old one (every organisation, or the node whose key the operator registered)."""
  existing = [str(p) for p in paths if p.exists()]
  if existing and not force:
    raise FileExistsError(f'{existing[0]} exists; it would be replaced, locking out whoever holds '
                          'it (--force replaces it)')


def _validity(days: int) -> dict[str, datetime.datetime]:
  now = datetime.datetime.now(datetime.timezone.utc)
  return dict(not_valid_before=now - datetime.timedelta(minutes=5),
              not_valid_after=now + datetime.timedelta(days=days))


def _pem_key(key) -> bytes:
  return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())


def make_tls(directory: pathlib.Path, host: str = '127.0.0.1', days: int = 30,
             force: bool = True, also: tuple[str, ...] = ()) -> TLSFiles:
  """A CA (EC P-384) and a server certificate for `host`, localhost, 127.0.0.1 and the names or
  addresses in `also`. Existing files are replaced only with `force`."""
  files = TLSFiles.under(directory)
  _refuse_to_overwrite([files.ca, files.ca_key, files.cert, files.key], force)
  directory.mkdir(parents=True, exist_ok=True)
  valid = _validity(days)
  ca_key = ec.generate_private_key(ec.SECP384R1())
  ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'fedjax_pt local CA')])
  ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid['not_valid_before']).not_valid_after(valid['not_valid_after'])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256()))
  _write_private(files.ca_key, _pem_key(ca_key))
  files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
  _server_certificate(files, ca, ca_key, host, also, days)
  return files


def renew(directory: pathlib.Path, host: str, days: int = 30,
          also: tuple[str, ...] = ()) -> TLSFiles:
  """A new server certificate and key, signed by the kept CA (`ca.crt` stays as it is)."""
  files = TLSFiles.under(directory)
  missing = [str(p) for p in (files.ca, files.ca_key) if not p.is_file()]
  if missing:
    raise ValueError(f'{missing[0]} does not exist: renewing needs the CA that made the '
                            "certificates (a CA made before fedjax_pt kept ca.key needs a new "
                            'one: --force, and every organisation gets the new ca.crt)')
  ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
  ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
  if ca.public_key().public_numbers() != ca_key.public_key().public_numbers():
    raise ValueError(f'{files.ca_key} is not the key of {files.ca}')
  _server_certificate(files, ca, ca_key, host, also, days)
  return files


def _server_certificate(files: TLSFiles, ca: x509.Certificate, ca_key, host: str,
                        also: tuple[str, ...], days: int) -> None:
  valid = _validity(days)
  key = ec.generate_private_key(ec.SECP384R1())
  cert = (x509.CertificateBuilder()
          .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
          .issuer_name(ca.subject).public_key(key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(valid['not_valid_before']).not_valid_after(valid['not_valid_after'])
          .add_extension(x509.SubjectAlternativeName(_names([host, *also])), critical=False)
          .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
          .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
          .sign(ca_key, hashes.SHA256()))
  files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
  _write_private(files.key, _pem_key(key))


def make_node_key(directory: pathlib.Path, name: str,
                  force: bool = True) -> tuple[pathlib.Path, pathlib.Path]:
  """An ECDSA P-384 key pair in OpenSSH format, what `flower-supernode
  --auth-supernode-private-key` and `flwr supernode register` read: (private, public)."""
  private, public = directory / name, directory / f'{name}.pub'
  _refuse_to_overwrite([private, public], force)
  directory.mkdir(parents=True, exist_ok=True)
  key = ec.generate_private_key(ec.SECP384R1())
  _write_private(private, key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.OpenSSH,
                                            serialization.NoEncryption()))
  public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                   serialization.PublicFormat.OpenSSH))
  return private, public


def _cli() -> None:
  # Flags are defined here, not on import: the launcher and tests import this module.
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  from fedjax_pt import cli  # pylint: disable=g-import-not-at-top
  tls_dir = flags.DEFINE_string('tls_dir', '', 'Make ca.crt, server.pem, server.key here.')
  host = flags.DEFINE_string('host', '127.0.0.1', "The SuperLink's host name or IP address.")
  days = flags.DEFINE_integer('days', 365, 'Validity of the certificates.')
  node_key = flags.DEFINE_string('node_key', '', 'Make a SuperNode key pair: PATH and PATH.pub.')
  force = flags.DEFINE_bool('force', False, 'Replace existing files (locks out their holders).')
  renew_cert = flags.DEFINE_bool('renew', False, 'With --tls_dir: a new server certificate '
                                 'signed by the kept CA (ca.crt stays valid for everyone).')
  program = 'fedjax_pt.deploy.certs'

  def main(argv) -> None:
    if len(argv) > 1:
      cli.fail(f'unexpected arguments: {" ".join(argv[1:])}', program=program)
    if bool(tls_dir.value) == bool(node_key.value):
      cli.fail('give --tls_dir (with --host) or --node_key', program=program)
    where = pathlib.Path(tls_dir.value or node_key.value)
    directory = where if tls_dir.value else where.parent
    if directory.exists() and not directory.is_dir():
      cli.fail(f'{directory} is a file, not a directory', program=program)
    try:
      if renew_cert.value and not tls_dir.value:
        cli.fail('--renew renews the server certificate of --tls_dir', program=program)
      if renew_cert.value:
        files = renew(pathlib.Path(tls_dir.value), host.value, days.value)
        print(f'certificate {files.cert} and key {files.key} renewed for {days.value} days, '
              f'signed by {files.ca} (restart the SuperLink with them)')
      elif tls_dir.value:
        files = make_tls(pathlib.Path(tls_dir.value), host.value, days.value, force.value)
        print(f'CA {files.ca} (give it to every organisation), certificate {files.cert} and key '
              f'{files.key} (keep them on the SuperLink host)')
      else:
        path = pathlib.Path(node_key.value)
        private, public = make_node_key(path.parent, path.name, force.value)
        print(f'private key {private} (keep it on the node), public key {public} (send it to '
              'the operator)')
    except OSError as e:  # exists, a file where a directory should be, not writable
      cli.fail(e if e.filename is None else f'{e.filename}: {e.strerror}', program=program)
    except ValueError as e:  # renewing without the CA, or with a key that is not the CA's
      cli.fail(e, program=program)

  app.run(main)


if __name__ == '__main__':
  _cli()
