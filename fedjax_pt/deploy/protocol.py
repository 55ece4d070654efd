"""The messages between the ServerApp and a node's ClientApp, in one place for both sides.

A `train` message carries the server's broadcast (the whole model, or for a node that holds a
model of its own the fragment synchronised last; encoded with fl.compression.download, moved by
the run's transport) and a `TrainRequest`: the run's config as JSON (the recipe is the server's;
the node adds only where its data lives and how its devices are used), the round, segment and
attempt, which client the node is to be, the run key under which the node keeps its state, the
snapshot of that state it must continue from, and the server's code version, which the node's
must equal.
The reply carries the client's delta (encoded with fl.compression.upload, same transport) and its
`ClientReport` as `client_round` made it (without the delta), plus the node's own timings. A node
that cannot train replies with its error as text instead of raising, so the server gets a
readable reason rather than Flower's generic exception code. A `query` message asks a node which
client it is (nodes whose SuperLink registration did not name them).
"""

import dataclasses
import functools
import hashlib
import pathlib
from typing import Any

from flwr.app import ConfigRecord, MetricRecord, RecordDict

import fedjax_pt
from fedjax_pt import records
from fedjax_pt.federated import fragments
from fedjax_pt.federated.messages import ClientReport
from fedjax_pt.local_training import TrainingSummary

TRAIN, QUERY = 'train', 'query'
UNKNOWN = '?'
_STEP_COLUMNS = tuple(f.name for f in dataclasses.fields(records.StepRecord))
_SUMMARY = tuple(f.name for f in dataclasses.fields(TrainingSummary))


@dataclasses.dataclass(frozen=True)
class TrainRequest:
  round: int
  attempt: int
  client: int
  run_key: str  # names the run's state on the node, stable across server restarts
  config_json: str  # the run's config (ConfigDict.to_json)
  vocab_size: int  # the server model's, which the node's tokenizer must give too
  transport: str
  shared_dir: str
  keep_snapshots: int  # how many synchronisations of state the node keeps
  received: int  # the fragment the broadcast holds (-1: the whole model)
  sync_fragment: int  # the segment of the round: the fragment synchronised after it, ...
  sync_start: int  # ... its first local step in the round ...
  sync_steps: int  # ... and its length
  # The snapshot the node continues from (`snapshot_name`): '' none (the client starts afresh),
  # UNKNOWN for a run resumed from a checkpoint older than this field (the node's latest).
  expected_snapshot: str = ''
  code_version: str = ''  # the server's `code_version()`

  @property
  def segment(self) -> fragments.Segment:
    return fragments.Segment(self.sync_fragment, self.sync_start, self.sync_steps)

  @property
  def received_fragment(self) -> int | None:
    return None if self.received < 0 else self.received

  def to_record(self) -> ConfigRecord:
    return ConfigRecord(dataclasses.asdict(self))

  @classmethod
  def from_record(cls, record: ConfigRecord) -> 'TrainRequest':
    return cls(**{f.name: f.type(record[f.name]) for f in dataclasses.fields(cls)
                  if f.name in record})


def reply_content(report: ClientReport, timings: dict[str, float] | None = None,
                  model: dict[str, Any] | None = None) -> RecordDict:
  """A train reply: `report` (its update travels in `model`, by the transport)."""
  status = ConfigRecord({'client': report.client, 'failure': report.failure or '',
                         'injected': report.injected,
                         'holds_model': -1 if report.holds_model is None else
                                        int(report.holds_model)})
  numbers = {'num_examples': report.num_examples, 'local_steps': report.local_steps}
  if report.training is not None:
    numbers.update({f'training/{k}': v for k, v in dataclasses.asdict(report.training).items()})
  numbers.update({f'step/{c}': [float(getattr(s, c)) for s in report.steps]
                  for c in _STEP_COLUMNS})
  numbers.update({f'time/{k}': float(v) for k, v in (timings or {}).items()})
  return RecordDict({'status': status, 'report': MetricRecord(numbers), **(model or {})})


def report_of(content: RecordDict, update: Any = None) -> tuple[ClientReport, dict[str, float]]:
  """The report in a train reply, with `update` (read by the transport), and the node's
  timings."""
  status, numbers = content['status'], content['report']
  training = None
  if 'training/num_tokens' in numbers:
    training = TrainingSummary(**{k: numbers[f'training/{k}'] for k in _SUMMARY})
    training = dataclasses.replace(training, num_tokens=int(training.num_tokens))
  columns = [list(numbers[f'step/{c}']) for c in _STEP_COLUMNS]
  steps = [records.StepRecord(**{c: int(v) if c in ('round', 'client', 'step', 'local_step')
                                 else v for c, v in zip(_STEP_COLUMNS, row)})
           for row in zip(*columns)]
  holds = int(status['holds_model'])
  report = ClientReport(
      client=int(status['client']), update=update, training=training, steps=steps,
      num_examples=int(numbers['num_examples']), local_steps=int(numbers['local_steps']),
      holds_model=None if holds < 0 else bool(holds), failure=str(status['failure']) or None,
      injected=bool(status['injected']))
  timings = {k[len('time/'):]: float(v) for k, v in numbers.items() if k.startswith('time/')}
  report.compute_s = timings.get('train')
  return report, timings


def snapshot_name(round_idx: int, sync_start: int, attempt: int) -> str:
  """A node's state after a synchronisation (round, segment start, attempt)."""
  return f'r{round_idx:06d}-s{sync_start}-a{attempt}'


@functools.lru_cache(maxsize=1)
def code_version() -> str:
  """fedjax_pt's version and a digest of its source: nodes on other code refuse to train."""
  package = pathlib.Path(fedjax_pt.__file__).parent
  digest = hashlib.sha256()
  for path in sorted(package.rglob('*.py')):
    digest.update(str(path.relative_to(package)).encode() + b'\0' + path.read_bytes())
  return f'{fedjax_pt.__version__}+{digest.hexdigest()[:12]}'


def storage_name(run_key: str, round_idx: int, attempt: int | None = None,
                 what: str | None = None, sync_start: int = 0) -> str:
  """Where the `shared` transport keeps a model: run/round-r[/step-s]/attempt-a/{global,
  client-k}, step-s naming a streaming segment that starts at local step s > 0."""
  parts = [run_key, f'round-{round_idx}'] + ([f'step-{sync_start}'] if sync_start else [])
  if attempt is not None:
    parts.append(f'attempt-{attempt}')
  if what is not None:
    parts.append(what)
  return '/'.join(parts)


def identity_reply(client: int) -> RecordDict:
  return RecordDict({'identity': ConfigRecord({'client': client})})


def identity(content: RecordDict) -> int:
  return int(content['identity']['client'])
