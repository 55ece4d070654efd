"""Heterogeneous clients: what each organisation brings (`fl.profiles`), and the local work it does.

A profile describes one client's hardware, links and habits:

    batch_size      sequences per local step (default: data.batch_size)
    local_steps     local steps per round (default: fl.local_steps) ...
    time_budget_s   ... or as many steps as fit in this much compute time at `tokens_per_s`
    tokens_per_s    training throughput (default: measured, the client's own compute time here)
    uplink_mbps     client -> server link, Mbit/s (default: no transfer time)
    downlink_mbps   server -> client link, Mbit/s (default: no transfer time)
    latency_ms      one-way latency, paid once each way (default 0)
    availability    probability that the client shows up in a round (default 1)

`fl.profiles` is '' (every client identical), a JSON list of profiles inline
(`--config.fl.profiles='[{"tokens_per_s": 4e4}, {"tokens_per_s": 1e4}]'`), or the path of a
.json/.yaml file holding that list. Client k gets profile k mod len(profiles), so one profile
applies to all and two alternate. Steps, batches and absences are pure functions of the config and
(seed, round, client), so a resumed run and a Flower deployment do exactly what the simulation
does; time is simulated by `fedjax_pt.federated.sim_clock`.
"""

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class ClientProfile:
  batch_size: int | None = None
  local_steps: int | None = None
  time_budget_s: float | None = None
  tokens_per_s: float | None = None
  uplink_mbps: float | None = None
  downlink_mbps: float | None = None
  latency_ms: float = 0.0
  availability: float = 1.0


_FIELDS = {f.name for f in dataclasses.fields(ClientProfile)}
_INTS = ('batch_size', 'local_steps')
_POSITIVE = ('time_budget_s', 'tokens_per_s', 'uplink_mbps', 'downlink_mbps')


def parse(value: Any, num_clients: int) -> tuple[ClientProfile, ...]:
  """The profiles that `fl.profiles` gives (a JSON string, a file path, or a list of dicts), one
  per client; () when unset. Raises ValueError naming the offending entry and key."""
  if isinstance(value, str):
    if not value.strip():
      return ()
    entries = _load(value)
  else:
    entries = value
  if isinstance(entries, dict) or not isinstance(entries, (list, tuple)) or not entries:
    raise ValueError(f'fl.profiles must be a non-empty list of profiles (dicts), got {entries!r}')
  if len(entries) > num_clients:
    raise ValueError(f'fl.profiles has {len(entries)} profiles for fl.num_clients={num_clients} '
                     'clients: some would never be used')
  profiles = [_profile(i, entry) for i, entry in enumerate(entries)]
  return tuple(profiles[k % len(profiles)] for k in range(num_clients))


def canonical(value: Any, num_clients: int) -> str:
  """`fl.profiles` as the inline JSON of its per-client profiles ('' for none): what a run records
  in config.json and sends to the nodes of a deployment, so that neither depends on a file that
  may change or be elsewhere."""
  table = parse(value, num_clients)
  if not table:
    return ''
  default = ClientProfile()
  return json.dumps([{k: v for k, v in dataclasses.asdict(p).items()
                      if v != getattr(default, k)} for p in table], separators=(',', ':'))


def _load(value: str) -> Any:
  if value.lstrip().startswith(('[', '{')):
    try:
      return json.loads(value)
    except json.JSONDecodeError as e:
      raise ValueError(f'fl.profiles is not valid JSON: {e}') from None
  path = os.path.expanduser(value)
  if not os.path.isfile(path):
    raise ValueError(f'fl.profiles={value!r}: no such file (give a JSON list inline, or the path '
                     'of a .json/.yaml file)')
  with open(path, encoding='utf-8') as f:
    text = f.read()
  try:
    if path.endswith(('.yaml', '.yml')):
      import yaml  # pylint: disable=import-outside-toplevel  (a dependency of flax)
      return yaml.safe_load(text)
    return json.loads(text)
  except Exception as e:  # pylint: disable=broad-except  (yaml and json raise their own types)
    raise ValueError(f'fl.profiles file {value!r} cannot be parsed: '
                     f'{str(e).splitlines()[0]}') from None


def _profile(i: int, entry: Any) -> ClientProfile:
  name = f'fl.profiles[{i}]'
  if not isinstance(entry, dict):
    raise ValueError(f'{name} must be a dict of profile keys, got {entry!r}')
  unknown = sorted(set(entry) - _FIELDS)
  if unknown:
    raise ValueError(f'{name} has unknown key {unknown[0]!r}; known: {", ".join(sorted(_FIELDS))}')
  for key, value in entry.items():
    if value is None:
      continue
    if key in _INTS:
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{name}.{key} must be a positive integer, got {value!r}')
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      raise ValueError(f'{name}.{key} must be a finite number, got {value!r}')
    elif key in _POSITIVE and value <= 0:
      raise ValueError(f'{name}.{key} must be positive, got {value!r}')
  profile = ClientProfile(**{k: (float(v) if k not in _INTS and v is not None else v)
                             for k, v in entry.items()})
  if profile.latency_ms < 0:
    raise ValueError(f'{name}.latency_ms must be >= 0, got {profile.latency_ms:g}')
  if not 0 < profile.availability <= 1:
    raise ValueError(f'{name}.availability must be in (0, 1], got {profile.availability:g}')
  if profile.time_budget_s is not None:
    if profile.local_steps is not None:
      raise ValueError(f'{name} gives both local_steps and time_budget_s: choose one')
    if profile.tokens_per_s is None:
      # Steps from this machine's speed would differ between runs and break exact resumes.
      raise ValueError(f'{name}.time_budget_s needs tokens_per_s (the steps that fit are computed '
                       "from it, not from this machine's speed, so that runs are reproducible)")
  return profile


@dataclasses.dataclass(frozen=True)
class ClientPlan:
  """The local work of one client in one round."""
  batch_size: int
  local_steps: int

  def tokens(self, seq_len: int) -> int:
    return self.local_steps * self.batch_size * seq_len


def plan(profile: ClientProfile | None, local_steps: int, batch_size: int,
         seq_len: int) -> ClientPlan:
  """Client's batch and step count: its own, or the steps its time budget fits at its throughput
  (at least one: `check` refuses a budget that fits none)."""
  if profile is None:
    return ClientPlan(batch_size, local_steps)
  batch = profile.batch_size or batch_size
  if profile.time_budget_s is not None:
    steps = math.floor(profile.time_budget_s * profile.tokens_per_s / (batch * seq_len) + 1e-9)
  else:
    steps = profile.local_steps or local_steps
  return ClientPlan(batch, steps)


def check(profiles: tuple[ClientProfile, ...], local_steps: int, batch_size: int, seq_len: int,
          micro_batch_size: int, batch_ways: int) -> None:
  """What a profile asks that the run cannot do; one line naming the profile."""
  for i, profile in enumerate(profiles):
    name = f'fl.profiles[{i}]'
    if profile.time_budget_s is not None and not math.isfinite(
        profile.time_budget_s * profile.tokens_per_s):
      raise ValueError(f'{name}: time_budget_s x tokens_per_s = {profile.time_budget_s:g} x '
                       f'{profile.tokens_per_s:g} overflows: no client trains that many tokens')
    p = plan(profile, local_steps, batch_size, seq_len)
    if p.local_steps < 1:
      raise ValueError(f'{name}.time_budget_s={profile.time_budget_s:g} fits no local step at '
                       f'tokens_per_s={profile.tokens_per_s:g} ({p.batch_size} x {seq_len} tokens '
                       'a step)')
    if p.batch_size % batch_ways or (micro_batch_size and p.batch_size % micro_batch_size):
      raise ValueError(f'{name}.batch_size={p.batch_size} must be divisible by mesh.data x '
                       f'mesh.fsdp = {batch_ways} and by data.micro_batch_size={micro_batch_size}')


def uniform(profiles: tuple[ClientProfile, ...], local_steps: int, batch_size: int,
            seq_len: int) -> bool:
  """Whether every client does the same local work (then clients can train side by side)."""
  return len({plan(p, local_steps, batch_size, seq_len) for p in profiles} |
             {ClientPlan(batch_size, local_steps)}) == 1


def absent(profiles: tuple[ClientProfile, ...], seed: int, round_idx: int) -> frozenset[int]:
  """The clients that do not show up in this round, each with probability 1 - availability.

  A stream of its own (the trailing 11), so availability never shifts sampling, faults or data.
  """
  return frozenset(k for k, p in enumerate(profiles) if p.availability < 1 and
                   np.random.default_rng([seed, round_idx, k, 11]).random() >= p.availability)
