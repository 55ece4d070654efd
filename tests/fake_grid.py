"""A Flower `Grid` whose SuperNodes are the deployment's ClientApp called in this process.

Messages go to `fedjax_pt.deploy.client_app.app` exactly as a SuperNode's ClientApp process gets
them (message, Context with the node config), so the server side (fleet, server_app) and the
node side run their real code, without processes or sockets. Faults are scripted per node.
"""

from collections.abc import Callable
import copy
import dataclasses
import types
import uuid

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fedjax_pt.deploy import client_app


@dataclasses.dataclass
class FakeNode:
  node_config: dict
  name: str = ''  # the name it was registered under ('' without node authentication)
  public_key: bytes = b''  # its key, with node authentication
  online: bool = True
  silent: bool = False  # takes messages but never replies (hung, or far too slow)
  gone: bool = False  # answers every message with Flower's NODE_UNAVAILABLE (killed)
  handler: Callable | None = None  # (message, context) -> reply; default: the real ClientApp


class FakeGrid:

  def __init__(self, nodes: dict[int, FakeNode]):
    # What Flower sets in a ServerApp process before user code creates messages.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    self.nodes = nodes
    self.log = []  # (node id, message type, group id): every message delivered
    self.replies = []  # every reply, as the server received it
    self._replies = {}
    self._contexts = {}  # node id -> its Context, whose state persists across messages

  def get_nodes(self):
    return [types.SimpleNamespace(node_id=node_id, name=node.name, public_key=node.public_key)
            for node_id, node in self.nodes.items() if node.online]

  def push_messages(self, messages):
    ids = []
    for message in messages:
      message_id = uuid.uuid4().hex
      message.metadata.__dict__['_message_id'] = message_id
      ids.append(message_id)
      node_id = message.metadata.dst_node_id
      node = self.nodes[node_id]
      self.log.append((node_id, message.metadata.message_type, message.metadata.group_id))
      if node.gone:
        self._replies[message_id] = Message(
            Error(code=ErrorCode.NODE_UNAVAILABLE, reason='Error: Node Unavailable'),
            reply_to=message)
      elif not node.silent:
        context = self._contexts.setdefault(node_id, Context(
            run_id=1, node_id=node_id, node_config=dict(node.node_config), state=RecordDict(),
            run_config={}))
        handler = node.handler or (lambda m, c: client_app.app(message=m, context=c))
        # Each node gets its own copy, as over the wire (Flower's mods edit what they receive).
        self._replies[message_id] = handler(copy.deepcopy(message), context)
    return ids

  def pull_messages(self, message_ids):
    replies = [self._replies.pop(i) for i in list(message_ids) if i in self._replies]
    self.replies += replies
    return replies

  def send_and_receive(self, messages, *, timeout=None):
    del timeout  # every node answers at once, or (silent) never
    return self.pull_messages(self.push_messages(messages))
