"""How a model travels between the server and a node: in the Flower message, or through storage.
What travels is a compression payload (`fedjax_pt.federated.compression`): the global model encoded
with fl.compression.download, a client's delta encoded with fl.compression.upload.

`inline` (the default) puts the arrays in the message: Flower chunks them through the SuperLink,
and one record placed in several messages is uploaded once. `shared` is the pattern Photon uses
with S3 for large models: the sender writes an orbax checkpoint under a root that both sides can
reach (a shared directory, or a URL orbax writes, such as gs://...) and the message carries only
its URI and a SHA-256 of the arrays, which the receiver checks. Either way the receiver gets the
same bits, so the run's results do not depend on the transport.
"""

from typing import Any

from etils import epath
from flwr.app import ConfigRecord, RecordDict
import orbax.checkpoint as ocp

from fedjax_pt.deploy import arrays

TRANSPORTS = ('inline', 'shared')


class Inline:
  kind = 'inline'

  def put(self, tree, name: str) -> dict[str, Any]:
    del name
    return {'arrays': arrays.to_record(tree)}

  def get(self, content: RecordDict, like) -> Any:
    return arrays.from_record(content['arrays'], like)

  def discard(self, name: str) -> None:
    del name  # nothing is stored outside the message


class Shared:
  """Models as orbax checkpoints under `root`/`name`, named in the message with their digest."""
  kind = 'shared'

  def __init__(self, root: str):
    if not root:
      raise ValueError("the 'shared' transport needs a directory or URL both sides can reach "
                       "(run config shared-dir)")
    self.root = epath.Path(root)

  def put(self, tree, name: str) -> dict[str, Any]:
    path = self.root / name
    if path.exists():  # a retried round writes again what an abandoned attempt left
      path.rmtree()
    path.parent.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(path, arrays.nested(tree))
      checkpointer.wait_until_finished()
    return {'ref': ConfigRecord({'uri': str(path), 'sha256': arrays.digest(tree)})}

  def get(self, content: RecordDict, like) -> Any:
    ref = content['ref']
    with ocp.StandardCheckpointer() as checkpointer:
      tree = arrays.unnested(checkpointer.restore(epath.Path(str(ref['uri'])),
                                                  arrays.abstract(arrays.nested(like))), like)
    if arrays.digest(tree) != ref['sha256']:
      raise ValueError(f'{ref["uri"]} does not hold the arrays that were sent (SHA-256 differs)')
    return tree

  def discard(self, name: str) -> None:
    path = self.root / name
    if path.exists():
      path.rmtree()


def make(kind: str, root: str = '') -> Inline | Shared:
  if kind == 'inline':
    return Inline()
  if kind == 'shared':
    return Shared(root)
  raise ValueError(f'transport must be one of {TRANSPORTS}, got {kind!r}')
