"""Shaped links on one machine: each SuperNode in a network namespace of its own, joined to this
host by a veth pair whose two ends carry a token-bucket qdisc (`tbf`) at the node's rate, so that
what the server sends it (the host end's egress) and what it sends back (the node end's) both
cross a link of that rate. Latency is not emulated: that needs `netem`, which this kernel lacks.

Link k is the /30 network 10.213.x.0/30 (a free one: none of its addresses is in a network that
this host's addresses or routes already use), the host end .1, the node end .2, in namespace
<prefix>-k; the SuperLink listens on link 0's host address, which the other namespaces reach by
a host route through their own link (nothing else is routed). `Links.start` makes everything
(root needed) and `stop` removes it all, whatever was made before a failure or a signal; nothing
is made under /etc/netns.
"""

import dataclasses
import fcntl
import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import tempfile

POOL = ipaddress.ip_network('10.213.0.0/16')
_UNITS = {'kbit': 10**3, 'mbit': 10**6, 'gbit': 10**9}
_LOCK = os.path.join(tempfile.gettempdir(), 'fedjax_pt-links.lock')  # allocation across runs
_IFNAMSIZ = 15
_instances = 0


class LinkError(RuntimeError):
  """A link that cannot be made or parsed (the message is the one line to print)."""


def parse_rates(text: str, nodes: int) -> tuple[int, ...]:
  """--link's rates in bit/s, one per node: RATE[,RATE...], each a number and kbit, mbit or gbit
  (as `tc` writes them: 10**3, 10**6, 10**9 bit/s); one rate for all nodes or one per node."""
  parts = [p.strip() for p in text.split(',')]
  rates = []
  for part in parts:
    found = re.fullmatch(r'(\d+(?:\.\d*)?|\.\d+)\s*([kmg]bit)', part, re.IGNORECASE)
    rate = round(float(found[1]) * _UNITS[found[2].lower()]) if found else 0
    if not found or rate < 8000:
      raise LinkError(f'--link: {part!r} is not a rate of at least 8kbit (give e.g. 50mbit; '
                      'units kbit, mbit, gbit)')
    rates.append(rate)
  if len(rates) not in (1, nodes):
    raise LinkError(f'--link gives {len(rates)} rates for {nodes} nodes: give one for all or '
                    'one per node')
  return tuple(rates) * nodes if len(rates) == 1 else tuple(rates)


def profiles(rates: tuple[int, ...]) -> list[dict]:
  """The clients' `fl.profiles` for these links: uplink and downlink at the rate, in Mbit/s."""
  return [{'uplink_mbps': r / 1e6, 'downlink_mbps': r / 1e6} for r in rates]


def burst_bytes(rate: int) -> int:
  """tbf's bucket: 64 KiB (a GSO segment passes whole), or 10 ms at the rate when more, so the
  rate is reachable with a timer tick of up to 10 ms. At most this many bytes pass at once; from
  then on, no more than the rate."""
  return max(64 * 1024, rate // 8 // 100)


def tbf_command(dev: str, rate: int, namespace: str | None = None) -> list[str]:
  """The qdisc of one end: `rate` bit/s, `burst_bytes`, and a queue of up to 100 ms."""
  where = ['-n', namespace] if namespace else []
  return ['tc', *where, 'qdisc', 'add', 'dev', dev, 'root', 'tbf', 'rate', f'{rate}bit',
          'burst', str(burst_bytes(rate)), 'latency', '100ms']


def check_available() -> None:
  """Raises LinkError unless this process may make namespaces and qdiscs (root, `ip`, `tc`)."""
  if os.geteuid() != 0:
    raise LinkError('--link needs root (it makes network namespaces, veth pairs and tc qdiscs)')
  for tool in ('ip', 'tc'):
    if shutil.which(tool) is None:
      raise LinkError(f'--link needs `{tool}` (iproute2) on PATH')


def _run(cmd: list[str]) -> str:
  try:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise LinkError(f'{shlex.join(cmd)}: {e}') from None
  if result.returncode:
    raise LinkError(f'{shlex.join(cmd)} failed: {" ".join(result.stderr.split()) or "no output"}')
  return result.stdout


def used_networks() -> list[ipaddress.IPv4Network]:
  """The IPv4 networks of this namespace's addresses and routes (every table)."""
  nets = []
  for line in _run(['ip', '-4', '-o', 'addr', 'show']).splitlines():
    found = re.search(r'\binet (\S+)', line)
    if found:
      nets.append(ipaddress.ip_network(found[1], strict=False))
  for line in _run(['ip', '-4', 'route', 'show', 'table', 'all']).splitlines():
    for token in line.split()[:2]:  # the destination, after a route type (local, broadcast ...)
      try:
        nets.append(ipaddress.ip_network(token, strict=False))
        break
      except ValueError:
        continue
  return nets


def free_subnets(count: int, used: list[ipaddress.IPv4Network]) -> list[ipaddress.IPv4Network]:
  out = []
  for subnet in POOL.subnets(new_prefix=30):
    if not any(subnet.overlaps(n) for n in used):
      out.append(subnet)
      if len(out) == count:
        return out
  raise LinkError(f'no {count} free /30 networks left in {POOL} for --link')


@dataclasses.dataclass(frozen=True)
class Link:
  namespace: str
  host_dev: str  # in this namespace
  node_dev: str  # in `namespace`
  host_ip: str
  node_ip: str
  rate: int  # bit/s, each way


class Links:
  """The shaped links of one run (one per node), made by `start` and removed by `stop`."""

  def __init__(self, rates: tuple[int, ...], prefix: str | None = None):
    global _instances
    if prefix is None:  # unique per run: this process's id, and a letter per Links object
      prefix = f'fjl{os.getpid()}{chr(ord("a") + _instances % 26)}'
      _instances += 1
    if len(f'{prefix}h{len(rates) - 1}') > _IFNAMSIZ:
      raise LinkError(f'{len(rates)} links: device names would exceed {_IFNAMSIZ} characters')
    self.prefix = prefix
    self.rates = tuple(rates)
    self.links: list[Link] = []
    self._made: list[list[str]] = []  # the commands that remove what was made, in order made

  @property
  def server_address(self) -> str:
    """Where the SuperLink listens: link 0's host end, reached from every namespace."""
    return self.links[0].host_ip

  @property
  def host_addresses(self) -> list[str]:
    return [link.host_ip for link in self.links]

  def exec_prefix(self, k: int) -> list[str]:
    """What runs a command in node k's namespace (the command keeps its process id: `ip`
    execs it, so its session, signals and environment are the caller's)."""
    return [shutil.which('ip') or 'ip', 'netns', 'exec', self.links[k].namespace]

  def start(self) -> None:
    """Makes every link; on a failure (or a signal) what was made stays recorded for `stop`."""
    check_available()
    with open(_LOCK, 'a', encoding='utf-8') as lock:
      # Held until the addresses are on the host ends, where the next run's check sees them.
      fcntl.flock(lock, fcntl.LOCK_EX)
      subnets = free_subnets(len(self.rates), used_networks())
      for k, (rate, subnet) in enumerate(zip(self.rates, subnets)):
        host, node = list(subnet.hosts())
        self.links.append(Link(f'{self.prefix}-{k}', f'{self.prefix}h{k}', f'{self.prefix}n{k}',
                               str(host), str(node), rate))
      for link in self.links:
        self._make(link)

  def _create(self, cmd: list[str], undo: list[str]) -> None:
    # Recorded before it is made, so that a signal between the two leaves nothing behind; and
    # forgotten if it was not made (it may exist already, and is not this object's to remove).
    self._made.append(undo)
    try:
      _run(cmd)
    except LinkError:
      self._made.pop()
      raise

  def _make(self, link: Link) -> None:
    ns = link.namespace
    self._create(['ip', 'netns', 'add', ns], ['ip', 'netns', 'delete', ns])
    self._create(['ip', 'link', 'add', link.host_dev, 'type', 'veth', 'peer', 'name',
                  link.node_dev, 'netns', ns],
                 ['ip', 'link', 'delete', link.host_dev])  # deletes its peer too
    _run(['ip', 'addr', 'add', f'{link.host_ip}/30', 'dev', link.host_dev])
    _run(['ip', 'link', 'set', link.host_dev, 'up'])
    _run(['ip', '-n', ns, 'addr', 'add', f'{link.node_ip}/30', 'dev', link.node_dev])
    _run(['ip', '-n', ns, 'link', 'set', link.node_dev, 'up'])
    _run(['ip', '-n', ns, 'link', 'set', 'lo', 'up'])  # SuperNode <-> its ClientApps
    if link.host_ip != self.server_address:
      _run(['ip', '-n', ns, 'route', 'add', f'{self.server_address}/32', 'via', link.host_ip])
    _run(tbf_command(link.host_dev, link.rate))  # server -> node
    _run(tbf_command(link.node_dev, link.rate, ns))  # node -> server

  def remaining(self) -> list[str]:
    """This run's namespaces and devices that exist now (none after `stop`)."""
    namespaces = set(os.listdir('/run/netns')) if os.path.isdir('/run/netns') else set()
    devices = set(os.listdir('/sys/class/net'))
    return sorted({link.namespace for link in self.links} & namespaces |
                  {link.host_dev for link in self.links} & devices)

  def stop(self) -> list[str]:
    """Removes everything made (qdiscs go with their devices); returns what could not be."""
    failed = []
    for cmd in reversed(self._made):
      try:
        _run(cmd)
      except LinkError as e:
        if 'Cannot find' not in str(e) and 'No such file' not in str(e):
          failed.append(str(e))
    self._made = []
    return failed + [f'{name} still exists' for name in self.remaining()]

  def __enter__(self) -> 'Links':
    try:
      self.start()
    except BaseException:
      self.stop()
      raise
    return self

  def __exit__(self, *exc) -> None:
    self.stop()
