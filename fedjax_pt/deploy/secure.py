"""Secure aggregation of a round (fl.secagg) with Flower's SecAgg+, both sides.

The server never receives a client's delta: each node quantises its delta (over
±fl.secagg.clip_range, 2**fl.secagg.quantization_bits levels), adds masks that cancel only in the
sum, and the server unmasks the sum of the nodes that answered, recovering the masks of nodes
that dropped out from the key shares of the others. This is Flower's SecAgg+ protocol
(`SecAggPlusWorkflow` on the server, `secaggplus_mod` on the nodes), which runs in Flower's
legacy fit format: the train request travels as FitIns (its config the `TrainRequest`, its
parameters the encoded global model) and the node answers with a FitRes holding its delta as
float32 arrays plus its mean training loss, weight 1 (the mean is uniform), and in the clear only
what `CLEAR_METRICS` names: its token count, local steps, how many values fell outside the
range, whether it diverged (then it sends zeros), its timings.

The server side, `secure_round`, gives the round object one `messages.SecureSum` (the mean and
its clients) plus a lost or failed `ClientReport` for every node that dropped out. A strategy
object stands in for Flower's legacy `Strategy`: it sees what the workflow passes to
`aggregate_fit`, which is the unmasked aggregate and the clear metrics, nothing else.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import time
from typing import Any

from absl import logging
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import Code, FitIns, FitRes, Parameters, Status
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.client.mod import secaggplus_mod
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
import jax
import numpy as np

from fedjax_pt.deploy import protocol
from fedjax_pt.federated import privacy
from fedjax_pt.federated.messages import ClientReport

_MODULUS = 2 ** privacy.SecAggConfig.MODULUS_BITS
CLEAR_METRICS = ('client', 'num_tokens', 'local_steps', 'clipped_values', 'finite', 'injected',
                 'time/train')
LOSS_RANGE = 32.0  # nats: a client's mean loss travels as loss / LOSS_RANGE * clip_range


# --- the node's side ------------------------------------------------------------------------------

def is_secure(content: RecordDict) -> bool:
  """Whether a train message is a step of the SecAgg+ protocol (not a plain round)."""
  return RECORD_KEY_CONFIGS in content.config_records


def secagg_when_asked(msg: Message, context: Context, call_next) -> Message:
  """Flower's `secaggplus_mod` on the protocol's messages; plain rounds pass straight through,
  so one ClientApp serves runs with and without fl.secagg."""
  if is_secure(msg.content):
    return secaggplus_mod(msg, context, call_next)
  return call_next(msg, context)


def request_of(content: RecordDict) -> tuple[protocol.TrainRequest, list[np.ndarray]]:
  """The train request and the broadcast's arrays (leaves of its payload) of a FitIns."""
  fitins = compat.recorddict_to_fitins(content, keep_input=True)
  request = protocol.TrainRequest.from_record(fitins.config)
  return request, parameters_to_ndarrays(fitins.parameters)


def reply_content(report: ClientReport, update: Any, clip_range: float,
                  timings: Mapping[str, float]) -> RecordDict:
  """The FitRes that `secaggplus_mod` masks: the delta's arrays and, last, the client's mean loss
  (scaled into the range: the server gets the clients' mean loss, not one of them); weight 1;
  the clear metrics. A diverged client sends zeros and says so (`finite` 0): quantising NaN
  would give finite garbage that spoils the sum, while zeros let the server take the mean of the
  others exactly (it knows how many were finite)."""
  arrays = [np.asarray(x, np.float32) for x in jax.tree.leaves(jax.device_get(update))]
  mean_loss = report.training.mean_loss
  finite = all(np.isfinite(a).all() for a in arrays) and np.isfinite(mean_loss)
  if finite:
    arrays.append(np.asarray([mean_loss * clip_range / LOSS_RANGE], np.float32))
  else:
    logging.warning('client %d: non-finite parameters; it sends zeros and says so',
                    report.client)
    arrays = [np.zeros_like(a) for a in arrays] + [np.zeros(1, np.float32)]
  clipped = sum(int(np.count_nonzero(np.abs(a) > clip_range)) for a in arrays)
  if clipped:
    logging.warning('client %d: %d values outside fl.secagg.clip_range=%g are clipped',
                    report.client, clipped, clip_range)
  metrics = {'client': report.client, 'num_tokens': report.num_tokens,
             'local_steps': report.local_steps, 'clipped_values': clipped,
             'finite': int(finite), 'injected': int(report.injected),
             'time/train': float(timings.get('train', 0.0))}
  fitres = FitRes(Status(Code.OK, 'trained'), ndarrays_to_parameters(arrays), num_examples=1,
                  metrics=metrics)
  return compat.fitres_to_recorddict(fitres, keep_input=False)


def split_mean(mean: Sequence[np.ndarray], clip_range: float, summed: int, finite: int
               ) -> tuple[list[np.ndarray], float]:
  """The mean delta and the mean loss of the `finite` clients, from the unmasked mean over all
  `summed` (whose diverged ones sent zeros)."""
  scale = summed / finite
  delta = [np.asarray(np.asarray(a, np.float64) * scale, np.float32) for a in mean[:-1]]
  return delta, float(mean[-1][0]) * scale * LOSS_RANGE / clip_range


# --- the server's side ----------------------------------------------------------------------------

@dataclasses.dataclass
class SecureResult:
  """One SecAgg+ round as the server saw it."""
  mean: list[np.ndarray] | None  # the uniform mean of the summed nodes' deltas (None: halted)
  metrics: dict[int, dict[str, Any]]  # node id -> its clear metrics, for the nodes in the sum
  errors: dict[int, tuple[int, str]]  # node id -> Flower's error (code, reason): dropped out
  download_bytes: dict[int, int]  # node id -> bytes of every message sent to it this round
  upload_bytes: dict[int, int]  # node id -> bytes of every reply it sent this round
  elapsed_s: float


class _Node(ClientProxy):
  """A sampled node as the legacy workflow addresses it: by node id, nothing else."""

  def __init__(self, node_id: int):
    super().__init__(str(node_id))
    self.node_id = node_id

  def get_properties(self, ins, timeout, group_id):
    raise NotImplementedError

  def get_parameters(self, ins, timeout, group_id):
    raise NotImplementedError

  def fit(self, ins, timeout, group_id):
    raise NotImplementedError

  def evaluate(self, ins, timeout, group_id):
    raise NotImplementedError

  def reconnect(self, ins, timeout, group_id):
    raise NotImplementedError


class _OneRound(Strategy):
  """Hands the workflow this round's FitIns and keeps what it aggregates: the only place where
  the server's code meets the protocol's output."""

  def __init__(self, fitins: Mapping[int, FitIns]):
    self._fitins = fitins
    self.mean: list[np.ndarray] | None = None
    self.metrics: dict[int, dict[str, Any]] = {}

  def configure_fit(self, server_round, parameters, client_manager):
    del server_round, parameters, client_manager
    return [(_Node(node_id), fitins) for node_id, fitins in self._fitins.items()]

  def aggregate_fit(self, server_round, results, failures):
    del server_round, failures
    if results:
      self.mean = parameters_to_ndarrays(results[0][1].parameters)
    # Each result holds the same aggregate; what is a node's own is its clear metrics.
    self.metrics = {proxy.node_id: dict(fitres.metrics) for proxy, fitres in results}
    return None, {}

  def initialize_parameters(self, client_manager):
    return None

  def configure_evaluate(self, server_round, parameters, client_manager):
    return []

  def aggregate_evaluate(self, server_round, results, failures):
    return None, {}

  def evaluate(self, server_round, parameters):
    return None


def record_bytes(content: RecordDict) -> int:
  """The payload of a message: its arrays and byte strings (numbers count 8 bytes)."""
  total = 0
  for record in content.array_records.values():
    total += sum(len(array.data) for array in record.values())
  for record in (*content.config_records.values(), *content.metric_records.values()):
    for value in record.values():
      for item in value if isinstance(value, list) else [value]:
        total += len(item) if isinstance(item, (bytes, str)) else 8
  return total


class _Metered:
  """The grid, with every message's bytes counted by node and every error reply kept."""

  def __init__(self, grid):
    self._grid = grid
    self.sent: dict[int, int] = {}
    self.received: dict[int, int] = {}
    self.errors: dict[int, tuple[int, str]] = {}

  def send_and_receive(self, messages, *, timeout=None):
    for message in messages:
      node_id = message.metadata.dst_node_id
      self.sent[node_id] = self.sent.get(node_id, 0) + record_bytes(message.content)
    replies = list(self._grid.send_and_receive(messages, timeout=timeout))
    for reply in replies:
      node_id = reply.metadata.src_node_id
      if reply.has_error():
        self.errors[node_id] = (reply.error.code, ' '.join(reply.error.reason.split()))
      else:
        self.received[node_id] = self.received.get(node_id, 0) + record_bytes(reply.content)
    return replies

  def __getattr__(self, name):
    return getattr(self._grid, name)


def secure_round(grid, cfg: privacy.SecAggConfig, round_idx: int,
                 requests: Mapping[int, ConfigRecord], broadcast: Sequence[np.ndarray]
                 ) -> SecureResult:
  """Runs SecAgg+ over the nodes of `requests` (node id -> its TrainRequest record), each sent
  the `broadcast` arrays."""
  parameters = ndarrays_to_parameters(list(broadcast))
  strategy = _OneRound({node_id: FitIns(parameters, dict(request))
                        for node_id, request in requests.items()})
  nodes = SimpleClientManager()
  for node_id in requests:
    nodes.register(_Node(node_id))
  context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                  run_config={}),
                          config=ServerConfig(num_rounds=round_idx), strategy=strategy,
                          client_manager=nodes)
  context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
      {WorkflowKey.CURRENT_ROUND: round_idx})
  context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
      Parameters(tensors=[], tensor_type='numpy.ndarray'), keep_input=True)
  workflow = SecAggPlusWorkflow(
      num_shares=float(cfg.num_shares),
      reconstruction_threshold=float(cfg.reconstruction_threshold), max_weight=1.0,
      clipping_range=float(cfg.clip_range), quantization_range=2 ** cfg.quantization_bits,
      modulus_range=_MODULUS, timeout=cfg.timeout_s or None)
  metered = _Metered(grid)
  start = time.monotonic()
  workflow(metered, context)
  mean = None
  if strategy.mean is not None:
    mean = [np.asarray(a, np.float32) for a in strategy.mean]
  return SecureResult(mean=mean, metrics=strategy.metrics, errors=metered.errors,
                      download_bytes=metered.sent, upload_bytes=metered.received,
                      elapsed_s=time.monotonic() - start)
