"""The node's Flower ClientApp: `train` runs client k's round on the node's own data
(`fedjax_pt.deploy.node`), `query` tells the server which client this node is.

What it prints lands in the SuperNode's log, the node operator's view; the server sees a failed
round as the one-line error in the reply, so a bad data path on a node reads as exactly that in
the server's log and metrics.
"""

import logging
import os
import pathlib
import sys
import time
import traceback

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedjax_pt.deploy import node as node_lib
from fedjax_pt.deploy import protocol
from fedjax_pt.deploy import secure
from fedjax_pt.federated.messages import ClientReport

app = ClientApp()
# Flower prints its own lines; once absl has configured the root logger it would repeat them.
logging.getLogger('flwr').propagate = False


def _now() -> str:
  """A timestamp for the SuperNode's log, which has none of its own."""
  return time.strftime('%Y-%m-%d %H:%M:%S')


def process_age_s() -> float | None:
  """Seconds since this process started, when it is a `flwr-clientapp`: Flower starts one per
  message (`docs/deployment.md`, "A node's fixed cost per round"), so this is the price of the
  fresh process (Python, JAX, Flower, pulling the message, installing the app) that the node pays
  every round."""
  if not os.path.basename(sys.argv[0]).startswith('flwr-clientapp'):
    return None  # the in-process grid of the tests: one process serves every message
  try:
    ticks = int(pathlib.Path('/proc/self/stat').read_text().rsplit(')', 1)[1].split()[19])
    uptime = float(pathlib.Path('/proc/uptime').read_text().split()[0])
  except (OSError, ValueError, IndexError):
    return None
  return uptime - ticks / os.sysconf('SC_CLK_TCK')


def one_line(error: BaseException, limit: int = 600) -> str:
  text = f'raised {type(error).__name__}: {" ".join(str(error).split())}'
  return text if len(text) <= limit else text[:limit - 3] + '...'


@app.train(mods=[secure.secagg_when_asked])
def train(msg: Message, context: Context) -> Message:
  if secure.is_secure(msg.content):  # a round of fl.secagg: the mod masks what this returns
    node = node_lib.NodeConfig.parse(context.node_config)
    node_lib.use_compilation_cache(node)
    return Message(node_lib.train_secure(msg.content, node), reply_to=msg)
  age_s = process_age_s()
  started = time.perf_counter()
  request = msg.content['config']
  where = f'client {request["client"]} round {request["round"]} attempt {request["attempt"]}'
  print(f'{_now()} fedjax_pt node: {where}: started', flush=True)
  try:
    node = node_lib.NodeConfig.parse(context.node_config)
    node_lib.use_compilation_cache(node)
    content = node_lib.train(msg.content, node, {} if age_s is None else {'start': age_s})
  except Exception as e:  # pylint: disable=broad-except
    # The traceback is for the node's operator; the server gets the reason.
    traceback.print_exc(file=sys.stderr)
    content = protocol.reply_content(ClientReport(client=int(request['client']), update=None,
                                                  failure=one_line(e)))
  status = content['status']['failure'] or 'done'
  print(f'{_now()} fedjax_pt node: {where}: {status} in {time.perf_counter() - started:.1f}s',
        flush=True)
  return Message(content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
  node = node_lib.NodeConfig.parse(context.node_config)
  return Message(protocol.identity_reply(node.partition_id), reply_to=msg)
