"""The round object's clients as the SuperNodes of a Flower federation (`algorithm.Clients`).

Which node is client k: a node registered on the SuperLink under the name `client-k`, or else
the `partition-id` of its node config, which a `query` message asks for once per node id; the
seat is bound to the first key that claims it, and other keys are refused (`seats.py`). A client
whose node is not online and admitted is `unavailable()`: the round object does not sample it,
and samples it again once its node is back.

Every train request names the snapshot the node must continue from (the state after the last
synchronisation whose reply this server received from that client, kept in the run's checkpoints
with the model), so a node whose state is not that one refuses instead of training from it.

A synchronisation pushes one `train` message per sampled client with its part of the round object's
broadcast (the whole model, or to a node that holds a model of its own the fragment synchronised
last; inline, Flower uploads a record shared by several messages once). A node runs `client_round`
and replies with its report and its encoded delta, which the round object decodes; the server pulls
replies every `poll_s` until all are in or `fl.round_timeout_s` has passed. What does not come back
is a fault, never an error: Flower's NODE_UNAVAILABLE (a SuperNode that stopped sending heartbeats,
about 60 s) reads `unavailable`, a ClientApp process that died `crashed`, a reply still missing at
the deadline `late`; a node's own error reads as its text. Each reason ends with the node id.

Reports are yielded in client order once the round's replies are in, so the weighted mean adds
the clients in the simulation's order and the result is bit-identical to it.
"""

from collections.abc import Iterator, Sequence
import dataclasses
import time
from typing import Any

from absl import logging
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
import jax
import numpy as np

from fedjax_pt import errors
from fedjax_pt.deploy import protocol
from fedjax_pt.deploy import seats as seats_lib
from fedjax_pt.deploy import secure
from fedjax_pt.deploy import transport as transport_lib
from fedjax_pt.federated import compression
from fedjax_pt.federated import fragments
from fedjax_pt.federated import privacy
from fedjax_pt.federated.messages import Broadcast, ClientReport, SecureSum

# Errors that mean nothing came back from the node: faults of the federation, not of the code.
_LOST = {ErrorCode.NODE_UNAVAILABLE: 'unavailable', ErrorCode.CLIENT_APP_CRASHED: 'crashed',
         ErrorCode.MESSAGE_UNAVAILABLE: 'unavailable', ErrorCode.REPLY_MESSAGE_UNAVAILABLE: 'late'}


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """What every train request of the run carries (see `protocol.TrainRequest`)."""
  run_key: str
  config_json: str
  vocab_size: int
  shared_dir: str
  keep_snapshots: int
  num_clients: int
  round_timeout_s: float  # 0: wait for every reply (Flower reports dead nodes itself)
  compression: compression.CompressionConfig
  secagg: privacy.SecAggConfig = privacy.SecAggConfig()
  fragments: int = 1  # fl.fragments
  code_version: str = ''  # the server's `protocol.code_version()`


class FlowerClients:
  """Clients 0..num_clients-1, each the SuperNode that is it, reached through a Flower `Grid`."""

  trains_in_parallel = True  # each on its own node

  def __init__(self, grid, run: RunInfo, move: transport_lib.Inline | transport_lib.Shared,
               like: Any, poll_s: float = 0.1, seats: seats_lib.Seats | None = None):
    self._grid, self._run, self._move, self._poll_s = grid, run, move, poll_s
    self._seats = seats or seats_lib.Seats(None, seats_lib.FederationState(run.run_key),
                                           run.num_clients)
    comp = run.compression
    # What a reply's delta is read into: the payload of the parameters' shapes (of a fragment).
    whole = jax.eval_shape(
        lambda p: compression.encode(p, comp.upload, comp.block_size, comp.topk), like)
    assignment = fragments.partition(like, run.fragments)
    self._update_like = [whole if run.fragments == 1 else
                         fragments.select(whole, assignment, f) for f in range(run.fragments)]
    self._host = None  # (the broadcast's payload, {fragment: its part on the host})
    # node id -> (the client it claims to be, how), in the order nodes were identified
    self._client_of: dict[int, tuple[int | None, str]] = {}
    self._asked: dict[str, int] = {}  # query message id -> node id, awaiting its answer
    self._node_of: dict[int, int] = {}  # client -> its online node
    self._refused: dict[int, str] = {}  # node id -> why it holds no seat
    self._unbound_said = False
    # client -> the snapshot its node keeps after its last synchronisation the server received
    self._snapshots: dict[int, str] = {}
    self._unknown_snapshots: set[int] = set()  # resumed from a checkpoint that did not say

  # --- which node is which client ----------------------------------------------------------------

  def unavailable(self) -> dict[int, str]:
    self.refresh()
    return {k: self._why_unavailable(k) for k in range(self._run.num_clients)
            if k not in self._node_of}

  def refused(self) -> dict[int, str]:
    return dict(self._refused)

  def _why_unavailable(self, k: int) -> str:
    claimants = [n for n in self._refused if self._client_of.get(n, (None,))[0] == k]
    if claimants:
      return f'only refused nodes {claimants} claim it'
    return 'no node is online for it'

  def refresh(self) -> None:
    """Maps the online nodes to clients: by registered name, else by asking them (once)."""
    online = {info.node_id: info for info in self._grid.get_nodes()}
    self._collect_answers()
    asking = set(self._asked.values())
    unnamed = []
    for node_id, info in online.items():
      if node_id in self._client_of or node_id in asking:
        continue
      name = getattr(info, 'name', '') or ''
      named = seats_lib.SEAT.fullmatch(name)
      if named:
        self._client_of[node_id] = (int(named[1]), f'registered name {name}')
      elif name:
        self._client_of[node_id] = (None, f'registered name {name!r}')
      else:
        unnamed.append(node_id)
    if unnamed:
      queries = [Message(content=RecordDict({'ask': ConfigRecord({'what': 'identity'})}),
                         dst_node_id=node_id, message_type=protocol.QUERY) for node_id in unnamed]
      self._asked.update(zip(self._grid.push_messages(queries), unnamed))
    claims = [seats_lib.Claim(node_id, client, how, bytes(getattr(online[node_id], 'public_key',
                                                                   b'') or b''))
              for node_id, (client, how) in self._client_of.items()
              if node_id in online and how != 'unknown']
    if claims and not any(c.public_key for c in claims) and not self._unbound_said:
      logging.warning('the nodes have no keys (no node authentication): seats are not bound to '
                      'keys, any node may claim any seat')
      self._unbound_said = True
    node_of, refused = self._seats.settle(claims)
    for node_id in sorted(set(refused) - set(self._refused)):
      logging.warning('node %d refused: %s', node_id, refused[node_id])
    self._refused = refused
    for client in sorted(node_of):
      if node_of[client] != self._node_of.get(client):
        logging.info('client %d is node %d', client, node_of[client])
    for client in sorted(set(self._node_of) - set(node_of)):
      logging.warning('client %d (node %d) is no longer online', client, self._node_of[client])
    self._node_of = node_of

  def _collect_answers(self) -> None:
    if not self._asked:
      return
    for reply in self._grid.pull_messages(list(self._asked)):
      node_id = self._asked.pop(reply.metadata.reply_to_message_id)
      if reply.has_error():
        logging.warning('node %d did not say which client it is: %s', node_id,
                        ' '.join(reply.error.reason.split()))
        self._client_of[node_id] = (None, 'unknown')  # not asked again; a restart is a new id
      else:
        self._client_of[node_id] = (protocol.identity(reply.content), 'partition-id')

  def wait_for_nodes(self, timeout_s: float) -> None:
    """Waits until every client's node is online (or `timeout_s`); the run starts either way."""
    deadline = time.monotonic() + timeout_s
    while self.unavailable() and time.monotonic() < deadline:
      time.sleep(0.5)
    missing = sorted(self.unavailable())
    if missing:
      logging.warning('starting without clients %s: no node is online for them after %.0fs',
                      missing, timeout_s)

  # --- a synchronisation --------------------------------------------------------------------------

  def train(self, broadcast: Broadcast, round_idx: int, client_ids: Sequence[int], attempt: int,
            segment: fragments.Segment) -> Iterator[ClientReport | SecureSum]:
    run = self._run
    reports = {k: self._lost(k, None, 'unavailable: no node is online for it', received=False)
               for k in client_ids if k not in self._node_of}
    sent = [k for k in client_ids if k in self._node_of]
    if not sent:
      yield from (reports[k] for k in sorted(reports))
      return
    if attempt == 0 and segment.start == 0:  # what late nodes of the last round uploaded
      self._move.discard(protocol.storage_name(run.run_key, round_idx - 1))
    put_start = time.monotonic()
    payloads = self._payloads(broadcast, sent)
    if run.secagg.enabled:
      yield from self._secure(payloads[None], round_idx, attempt, segment, sent, reports)
      return
    records = {}
    for fragment, payload in payloads.items():
      what = 'global' if fragment is None else f'global-fragment-{fragment}'
      records[fragment] = self._move.put(payload, protocol.storage_name(
          run.run_key, round_idx, attempt, what, segment.start))
    logging.info('round %d: the model (%s) put for %d clients (%s) in %.2fs', round_idx,
                 ', '.join(f'{"whole" if f is None else f"fragment {f}"} '
                           f'{compression.payload_bytes(p) / 1e6:.1f} MB'
                           for f, p in payloads.items()),
                 len(sent), self._move.kind, time.monotonic() - put_start)
    ttl = {'ttl': run.round_timeout_s} if run.round_timeout_s else {}
    messages = [Message(content=RecordDict({
        'config': self._request(round_idx, attempt, segment, k, broadcast.fragment_for(k)),
        **records[broadcast.fragment_for(k)]}), dst_node_id=self._node_of[k],
                        message_type=protocol.TRAIN, group_id=str(round_idx), **ttl)
                for k in sent]
    start = time.monotonic()
    pending = dict(zip(self._grid.push_messages(messages), sent))
    deadline = start + run.round_timeout_s if run.round_timeout_s else float('inf')
    while pending and time.monotonic() < deadline:
      for reply in self._grid.pull_messages(list(pending)):
        k = pending.pop(reply.metadata.reply_to_message_id)
        reports[k] = self._report(reply, k, round_idx, attempt, segment,
                                  time.monotonic() - start)
      if pending:
        time.sleep(self._poll_s)
    for k in pending.values():
      reports[k] = self._lost(k, self._node_of[k], f'late: no reply within '
                              f'fl.round_timeout_s={run.round_timeout_s:g}')
    for k, report in reports.items():
      if report.training is not None:
        self._trained(k, round_idx, attempt, segment)
    for fragment in payloads:
      what = 'global' if fragment is None else f'global-fragment-{fragment}'
      self._move.discard(protocol.storage_name(run.run_key, round_idx, attempt, what,
                                               segment.start))
    yield from (reports[k] for k in sorted(reports))

  def _payloads(self, broadcast: Broadcast, sent: Sequence[int]) -> dict[int | None, Any]:
    """What the sampled clients receive, on the host: the whole model and/or one fragment."""
    if self._host is None or self._host[0] is not broadcast.payload:
      self._host = (broadcast.payload, {})
    on_host = self._host[1]
    for k in sent:
      fragment = broadcast.fragment_for(k)
      if fragment not in on_host:
        on_host[fragment] = jax.device_get(broadcast.payload_for(k))
    return {f: on_host[f] for f in sorted({broadcast.fragment_for(k) for k in sent},
                                          key=lambda f: -1 if f is None else f)}

  def _secure(self, broadcast, round_idx: int, attempt: int, segment: fragments.Segment,
              sent: Sequence[int], reports: dict[int, ClientReport]
              ) -> Iterator[ClientReport | SecureSum]:
    """The round by SecAgg+ (`secure.py`): the nodes' deltas arrive as one sum; each node that
    dropped out is lost (Flower's error) or, if the protocol could not finish, all are."""
    run = self._run
    if len(sent) < 2:  # the sum of one node is its update: not sent at all
      for k in sent:
        reports[k] = self._lost(k, self._node_of[k], 'secure aggregation needs 2 or more nodes '
                                f'online, {len(sent)} is', received=False)
      yield from (reports[k] for k in sorted(reports))
      return
    node_to_client = {self._node_of[k]: k for k in sent}
    result = secure.secure_round(
        self._grid, run.secagg, round_idx,
        {self._node_of[k]: self._request(round_idx, attempt, segment, k, None) for k in sent},
        [np.asarray(x) for x in jax.tree.leaves(broadcast)])
    metrics = {node_to_client[n]: m for n, m in result.metrics.items()}
    summed = sorted(metrics)
    for k in summed:
      self._trained(k, round_idx, attempt, segment)
    finite = [k for k in summed if metrics[k]['finite']]
    for k in summed:
      if not metrics[k]['finite']:  # the round object's verdict, told by the client itself
        reports[k] = self._failed(k, self._node_of[k], 'non-finite parameters (sent zeros)',
                                  injected=bool(metrics[k]['injected']))
    for node_id, k in node_to_client.items():
      if k in summed:
        continue
      code, reason = result.errors.get(node_id, (None, 'dropped out of secure aggregation'))
      if result.mean is None:
        reason += '; secure aggregation could not finish (too few nodes left to unmask the sum)'
      if code is None:  # its update was lost with the protocol: a fault of the federation
        reports[k] = self._lost(k, node_id, reason)
      elif code in _LOST:
        reports[k] = self._lost(k, node_id, f'{_LOST[code]}: {reason}')
      else:  # its own error (the ClientApp raised): what it says
        reports[k] = self._failed(k, node_id, f'error {code}: {reason}')
    yield from (reports[k] for k in sorted(reports))
    if result.mean is None or not finite:
      return
    clipped = sum(int(m['clipped_values']) for m in metrics.values())
    logging.info('round %d: secure sum of clients %s in %.2fs (the server saw no single delta)%s',
                 round_idx, finite, result.elapsed_s,
                 f'; {clipped} values clipped to ±fl.secagg.clip_range' if clipped else '')
    mean, loss = secure.split_mean(result.mean, run.secagg.clip_range, len(summed), len(finite))
    like = self._update_like[0]
    update = jax.tree.unflatten(jax.tree.structure(like), mean)
    update = jax.tree.map(lambda like, x: x.reshape(like.shape), like, update)
    raw = compression.raw_bytes(broadcast) + compression.raw_bytes(like) + 4
    yield SecureSum(
        clients=finite, update=update, mean_loss=loss,
        num_tokens=sum(int(m['num_tokens']) for m in metrics.values()),
        local_steps={k: int(m['local_steps']) for k, m in metrics.items()},
        download_bytes={k: result.download_bytes.get(self._node_of[k], 0) for k in summed},
        upload_bytes={k: result.upload_bytes.get(self._node_of[k], 0) for k in summed},
        uncompressed_bytes=len(summed) * raw, elapsed_s=result.elapsed_s, clipped_values=clipped)

  def _request(self, round_idx: int, attempt: int, segment: fragments.Segment, client: int,
               received: int | None) -> ConfigRecord:
    run = self._run
    return protocol.TrainRequest(
        round=round_idx, attempt=attempt, client=client, run_key=run.run_key,
        config_json=run.config_json, vocab_size=run.vocab_size, transport=self._move.kind,
        shared_dir=run.shared_dir, keep_snapshots=run.keep_snapshots,
        received=-1 if received is None else received, sync_fragment=segment.fragment,
        sync_start=segment.start, sync_steps=segment.steps,
        expected_snapshot=self._snapshots.get(
            client, protocol.UNKNOWN if client in self._unknown_snapshots else ''),
        code_version=run.code_version).to_record()

  def _trained(self, k: int, round_idx: int, attempt: int, segment: fragments.Segment) -> None:
    """Client k's node saved its state after this synchronisation: it continues from there."""
    self._snapshots[k] = protocol.snapshot_name(round_idx, segment.start, attempt)
    self._unknown_snapshots.discard(k)

  def _report(self, reply: Message, k: int, round_idx: int, attempt: int,
              segment: fragments.Segment, elapsed_s: float) -> ClientReport:
    node_id = self._node_of[k]
    if reply.has_error():
      code, reason = reply.error.code, ' '.join(reply.error.reason.split())
      if code in _LOST:
        return self._lost(k, node_id, f'{_LOST[code]}: {reason}')
      return self._failed(k, node_id, f'error {code}: {reason}')
    report, timings = protocol.report_of(reply.content)
    report.elapsed_s = elapsed_s
    if report.failure:
      logging.warning('client %d (node %d) %s; left out of the average', k, node_id,
                      report.failure)
      report.failure = f'{report.failure} (node {node_id})'
      return report
    read_start = time.monotonic()
    try:
      report.update = self._move.get(reply.content, self._update_like[segment.fragment])
    except Exception as e:  # pylint: disable=broad-except
      return self._failed(k, node_id, f'sent an unreadable update: {e}')
    finally:
      self._move.discard(protocol.storage_name(self._run.run_key, round_idx, attempt,
                                               f'client-{k}', segment.start))
    logging.info('round %d: client %d (node %d) replied after %.2fs, read in %.2fs; node: %s',
                 round_idx, k, node_id, elapsed_s, time.monotonic() - read_start,
                 ', '.join(f'{phase} {s:.2f}s' for phase, s in timings.items()))
    return report

  def _failed(self, k: int, node_id: int, reason: str, injected: bool = False) -> ClientReport:
    logging.warning('client %d (node %d) %s; left out of the average', k, node_id, reason)
    return ClientReport(client=k, update=None, failure=f'{reason} (node {node_id})',
                        injected=injected)

  def _lost(self, k: int, node_id: int | None, reason: str, received: bool = True
            ) -> ClientReport:
    where = f' (node {node_id})' if node_id is not None else ''
    logging.warning('client %d%s %s; left out of the average', k, where, reason)
    return ClientReport(client=k, update=None, failure=f'{reason}{where}', lost=True,
                        received=received)

  # --- the run's checkpoints: what the clients keep lives on the nodes ----------------------------

  def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
    """The nodes keep their own state; the run keeps which snapshot each continues from."""
    return {}, {'snapshots': {str(k): name for k, name in sorted(self._snapshots.items())}}

  def abstract(self, meta: dict[str, Any]) -> dict[str, Any]:
    if meta.get('memory'):
      raise errors.WorkdirRefused(
          'its checkpoint holds the state of simulated clients (python -m fedjax_pt.main wrote '
          "it); a deployment's nodes keep their own: resume it with fedjax_pt.main, or start "
          'the deployment in a new workdir')
    return {}

  def restore(self, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
    del arrays
    if 'snapshots' in meta:
      self._snapshots = {int(k): name for k, name in meta['snapshots'].items()}
      self._unknown_snapshots = set()
    else:  # a checkpoint of fedjax_pt before snapshots were named: each node's latest
      self._snapshots, self._unknown_snapshots = {}, set(range(self._run.num_clients))
