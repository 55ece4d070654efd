"""Throw-away credentials for a federation on one machine: a CA and a SuperLink certificate for
127.0.0.1 (TLS), and SuperNode key pairs (node authentication). Real federations use their own
CA's certificate for the SuperLink's host name; the key pairs are made the same way, by each
organisation, which sends only the public key to the server's operator.
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


def _write_private(path: pathlib.Path, data: bytes) -> None:
  path.write_bytes(data)
  path.chmod(0o600)


def make_tls(directory: pathlib.Path, host: str = '127.0.0.1', days: int = 30) -> TLSFiles:
  """A CA (EC P-384) and a server certificate for `host` (an IP address) and localhost."""
  directory.mkdir(parents=True, exist_ok=True)
  now = datetime.datetime.now(datetime.timezone.utc)
  valid = dict(not_valid_before=now - datetime.timedelta(minutes=5),
               not_valid_after=now + datetime.timedelta(days=days))
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
  key = ec.generate_private_key(ec.SECP384R1())
  cert = (x509.CertificateBuilder()
          .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
          .issuer_name(ca_name).public_key(key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(valid['not_valid_before']).not_valid_after(valid['not_valid_after'])
          .add_extension(x509.SubjectAlternativeName(
              [x509.DNSName('localhost'), x509.IPAddress(ipaddress.ip_address(host))]),
                         critical=False)
          .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
          .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
          .sign(ca_key, hashes.SHA256()))
  files = TLSFiles(directory / 'ca.crt', directory / 'server.pem', directory / 'server.key')
  files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
  files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
  _write_private(files.key, key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
  return files


def make_node_key(directory: pathlib.Path, name: str) -> tuple[pathlib.Path, pathlib.Path]:
  """An ECDSA P-384 key pair in OpenSSH format, what `flower-supernode
  --auth-supernode-private-key` and `flwr supernode register` read: (private, public)."""
  directory.mkdir(parents=True, exist_ok=True)
  key = ec.generate_private_key(ec.SECP384R1())
  private, public = directory / name, directory / f'{name}.pub'
  _write_private(private, key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.OpenSSH,
                                            serialization.NoEncryption()))
  public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                   serialization.PublicFormat.OpenSSH))
  return private, public
