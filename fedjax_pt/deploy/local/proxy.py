"""An nginx in front of the SuperLink that lets the organisations reach the Fleet API only.

Flower 1.41 serves the Fleet API (SuperNodes), the Control API (the `flwr` CLI: runs, node
registration) and the ServerApp's Runtime API on one HTTPS port (`--host`/`--port`), and the
open-source Control API has no authentication. So the SuperLink listens on 127.0.0.1 (the
operator's `flwr` and Flower's own helper processes use it there) and nginx, on the public
address, terminates TLS with the SuperLink's certificate and forwards a request only when its
path, exactly as sent, is `/v1/fleet/<name>`: nothing encoded, no dot segment, no query, so
what nginx checked is what the SuperLink routes. Everything else gets 403. nginx runs in the
foreground as one of the federation's processes (`processes.py`), with its config, pid file and
temporary files in one directory.
"""

import os
import pathlib
import shutil

from fedjax_pt.deploy import certs
from fedjax_pt.deploy.local import processes

FLEET_PATH = r'^/v1/fleet/[a-z-]+$'  # every route of Flower's Fleet router (all POST)


class ProxyError(RuntimeError):
  """nginx is missing."""


def nginx() -> str:
  """The nginx binary, or ProxyError saying how to install it."""
  found = shutil.which('nginx') or shutil.which('nginx', path='/usr/sbin:/usr/local/sbin')
  if not found:
    raise ProxyError('--proxy needs nginx (e.g. `apt-get install nginx-light`)')
  return found


def config(directory: pathlib.Path, listen: str, upstream: str, tls: certs.TLSFiles) -> str:
  """nginx.conf: `listen` (host:port, public) forwards the Fleet API to `upstream`
  (127.0.0.1:port, the SuperLink), which must present `tls.cert`."""
  tmp = directory / 'tmp'
  temp_paths = ''.join(f'  {kind}_temp_path {tmp / kind};\n'
                       for kind in ('client_body', 'proxy', 'fastcgi', 'uwsgi', 'scgi'))
  # nginx clears its workers' environment: they keep the federation's tag (and FLWR_HOME), so
  # that `Processes.stop_all` finds them even if the master died.
  return f"""daemon off;
worker_processes 1;
pid {directory / 'nginx.pid'};
error_log stderr notice;
env {processes.TAG_VAR};
env FLWR_HOME;
events {{ worker_connections 256; }}
http {{
  access_log /dev/stderr;
{temp_paths}  upstream superlink {{ server {upstream}; keepalive 8; }}
  server {{
    listen {listen} ssl;
    ssl_certificate {tls.cert};
    ssl_certificate_key {tls.key};
    client_max_body_size 0;  # models travel in the messages
    location / {{
      if ($request_uri !~ "{FLEET_PATH}") {{ return 403; }}
      proxy_pass https://superlink;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_request_buffering off;
      proxy_buffering off;
      proxy_read_timeout 1h;
      proxy_send_timeout 1h;
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate {tls.ca};
      proxy_ssl_name localhost;  # nginx checks DNS names only; the certificate has localhost
    }}
  }}
}}
"""


def command(directory: pathlib.Path, listen: str, upstream: str, tls: certs.TLSFiles
            ) -> list[str]:
  """Writes `directory`/nginx.conf and returns the command that runs nginx in the foreground."""
  binary = nginx()
  (directory / 'tmp').mkdir(parents=True, exist_ok=True)
  path = directory / 'nginx.conf'
  path.write_text(config(directory, listen, upstream, tls))
  os.chmod(path, 0o600)
  return [binary, '-p', str(directory), '-e', 'stderr', '-c', str(path)]
