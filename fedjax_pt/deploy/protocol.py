"""The messages between the ServerApp and a node's ClientApp, in one place for both sides.

A `train` message carries the global model (encoded with fl.compression.download, by the run's
transport) and a `TrainRequest`: the run's config as JSON (the recipe is the server's; the node
adds only where its data lives and how its devices are used), the round and attempt, which client
the node is to be, and the run key under which the node keeps its state. The reply carries the
client's delta (encoded with fl.compression.upload, same transport) and a `TrainReply`: the
numbers a `ClientReport` holds, its step metrics as columns, and the node's own timings. A node that cannot train replies with its error as text instead of raising, so the
server gets a readable reason rather than Flower's generic exception code. A `query` message asks
a node which client it is (nodes whose SuperLink registration did not name them).
"""

import dataclasses
import math
from typing import Any

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedjax_pt import records
from fedjax_pt.federated.algorithm import ClientReport

TRAIN, QUERY = 'train', 'query'
_STEP_COLUMNS = ('local_step', 'loss', 'grad_norm', 'update_norm', 'lr')


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
  keep_snapshots: int  # how many rounds of state the node keeps (the server may restart that far)

  def to_record(self) -> ConfigRecord:
    return ConfigRecord(dataclasses.asdict(self))

  @classmethod
  def from_record(cls, record: ConfigRecord) -> 'TrainRequest':
    return cls(**{f.name: f.type(record[f.name]) for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class TrainReply:
  """What a node tells the server about its round, besides the model itself."""
  client: int
  failure: str = ''  # the node's own error, one line ('' when it trained)
  injected: bool = False  # the failure (or NaN model) was injected on purpose (fl.fault.*)
  num_tokens: int = 0
  num_examples: int = 0
  local_steps: int = 0  # its own count (fl.profiles may give each client its own)
  mean_loss: float = math.nan
  last_loss: float = math.nan
  mean_grad_norm: float = math.nan
  mean_update_norm: float = math.nan
  steps: list[dict[str, float]] = dataclasses.field(default_factory=list)  # logged local steps
  timings: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds, by phase

  def to_content(self, model: dict[str, Any] | None = None) -> RecordDict:
    numbers = {f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name in ('mean_loss', 'last_loss', 'mean_grad_norm', 'mean_update_norm')}
    numbers.update(num_tokens=self.num_tokens, num_examples=self.num_examples,
                   local_steps=self.local_steps)
    numbers.update({f'step/{c}': [float(s[c]) for s in self.steps] for c in _STEP_COLUMNS})
    numbers.update({f'time/{k}': float(v) for k, v in self.timings.items()})
    status = ConfigRecord({'client': self.client, 'failure': self.failure,
                           'injected': self.injected})
    return RecordDict({'status': status, 'report': MetricRecord(numbers), **(model or {})})

  @classmethod
  def from_content(cls, content: RecordDict) -> 'TrainReply':
    status, numbers = content['status'], content['report']
    columns = {c: list(numbers[f'step/{c}']) for c in _STEP_COLUMNS}
    steps = [dict(zip(_STEP_COLUMNS, row)) for row in zip(*columns.values())]
    return cls(client=int(status['client']), failure=str(status['failure']),
               injected=bool(status['injected']), num_tokens=int(numbers['num_tokens']),
               num_examples=int(numbers['num_examples']),
               local_steps=int(numbers['local_steps']) if 'local_steps' in numbers else 0,
               mean_loss=float(numbers['mean_loss']), last_loss=float(numbers['last_loss']),
               mean_grad_norm=float(numbers['mean_grad_norm']),
               mean_update_norm=float(numbers['mean_update_norm']), steps=steps,
               timings={k[len('time/'):]: float(v) for k, v in numbers.items()
                        if k.startswith('time/')})

  def client_report(self, update, round_idx: int, local_steps: int, **fields) -> ClientReport:
    """The round object's view, numbered exactly as the simulation numbers its steps."""
    steps = [records.StepRecord(round=round_idx, client=self.client,
                                step=(round_idx - 1) * local_steps + int(s['local_step']),
                                local_step=int(s['local_step']), loss=s['loss'],
                                grad_norm=s['grad_norm'], update_norm=s['update_norm'], lr=s['lr'])
             for s in self.steps]
    return ClientReport(
        client=self.client, update=update, num_tokens=self.num_tokens,
        num_examples=self.num_examples, mean_loss=self.mean_loss, last_loss=self.last_loss,
        mean_grad_norm=self.mean_grad_norm, mean_update_norm=self.mean_update_norm, steps=steps,
        injected=self.injected, local_steps=self.local_steps,
        compute_s=self.timings.get('train'), **fields)


def storage_name(run_key: str, round_idx: int, attempt: int | None = None,
                 what: str | None = None) -> str:
  """Where the `shared` transport keeps a model: run/round-r/attempt-a/{global,client-k}."""
  parts = [run_key, f'round-{round_idx}']
  if attempt is not None:
    parts.append(f'attempt-{attempt}')
  if what is not None:
    parts.append(what)
  return '/'.join(parts)


def identity_reply(client: int) -> RecordDict:
  return RecordDict({'identity': ConfigRecord({'client': client})})


def identity(content: RecordDict) -> int:
  return int(content['identity']['client'])
