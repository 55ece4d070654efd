"""What crosses between the server and the clients in one synchronisation: the broadcast (the
server's model, encoded once), a client's report (its encoded delta and what it says about its
training) and, with secure aggregation, one sum of several clients' deltas.

Byte counts are the server's: it knows what it sent (`Broadcast.bytes_for`) and what arrived
(`compression.payload_bytes` of an update), so a client never reports them.
"""

from collections.abc import Collection
import dataclasses
from typing import Any

from fedjax_pt import records
from fedjax_pt.federated import compression
from fedjax_pt.federated import fragments as fragments_lib
from fedjax_pt.local_training import TrainingSummary


@dataclasses.dataclass(frozen=True)
class Broadcast:
  """The server's model in one synchronisation, encoded once with fl.compression.download.

  A client that holds a model of its own (streaming fragments, mixing: `holders`) receives only
  `fragment`, the part synchronised last; every other client receives the whole model.
  """
  payload: Any  # the whole model, encoded
  fragment: int | None = None  # None: every client receives the whole model
  holders: Collection[int] = frozenset()
  assignment: Any = None  # fragments.partition of the parameters, when `fragment` is set

  def fragment_for(self, client: int) -> int | None:
    """The fragment `client` receives, or None for the whole model."""
    return self.fragment if self.fragment is not None and client in self.holders else None

  def payload_for(self, client: int) -> Any:
    fragment = self.fragment_for(client)
    if fragment is None:
      return self.payload
    return fragments_lib.select(self.payload, self.assignment, fragment)

  def bytes_for(self, client: int) -> tuple[int, int]:
    """What sending to `client` costs: (bytes on the wire, the same arrays as float32)."""
    payload = self.payload_for(client)
    return compression.payload_bytes(payload), compression.raw_bytes(payload)


@dataclasses.dataclass
class ClientReport:
  """What the server learns from one client in one synchronisation (a round, or with streaming
  fragments one segment of it).

  `update` is the client's message as the server received it: its delta theta_k - theta (of the
  segment's fragment), encoded by `fedjax_pt.federated.compression`; None when nothing arrived.
  `training` is None when the client did not train (it crashed first, or nothing came back).
  """
  client: int
  update: Any | None
  training: TrainingSummary | None = None
  steps: list[records.StepRecord] = dataclasses.field(default_factory=list)
  num_examples: int = 0  # the size of its training set, in tokens
  local_steps: int = 0  # local steps it trained
  # Whether it holds a model of its own after this synchronisation (None: it did not say).
  holds_model: bool | None = None
  failure: str | None = None  # its own error, one line
  injected: bool = False  # the failure was injected on purpose (fl.fault.*)
  lost: bool = False  # nothing came back (node gone, crashed or late): a fault, not a bug
  received: bool = True  # it was sent the broadcast (False: no node was online for it)
  elapsed_s: float = 0.0  # from sending the model to receiving the report
  compute_s: float | None = None  # of that, training (None: unknown, all of it)

  @property
  def num_tokens(self) -> int:
    return self.training.num_tokens if self.training is not None else 0


@dataclasses.dataclass
class SecureSum:
  """What the server learns from a secure aggregation (`fl.secagg`): the uniform mean of the
  deltas of `clients`, never one of them, plus what each client says in the clear (its tokens,
  local steps and the bytes it moved; no loss, no norm: only their mean loss).

  `update` is the mean as a payload (codec 'none') of the parameters' shapes. Its bytes are
  measured by the protocol (masked vectors are larger than the deltas)."""
  clients: list[int]
  update: Any
  num_tokens: int = 0
  local_steps: dict[int, int] = dataclasses.field(default_factory=dict)
  download_bytes: dict[int, int] = dataclasses.field(default_factory=dict)
  upload_bytes: dict[int, int] = dataclasses.field(default_factory=dict)
  uncompressed_bytes: int = 0
  elapsed_s: float = 0.0
  clipped_values: int = 0  # delta values outside ±fl.secagg.clip_range, all clients
  mean_loss: float | None = None  # the clients' mean training loss, summed securely too
