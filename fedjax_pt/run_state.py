"""What a run's checkpoint holds: the round object's state and the clients' own.

A checkpoint (`fedjax_pt.checkpoint`) has two items:
  state  the arrays: the algorithm's (global parameters and outer optimizer state; the
         centralized learner's parameters, Adam state and step) and, under 'clients', what the
         clients keep (`Clients.state()`: by client id, its Adam state, residual, model, ...);
  meta   JSON (`RunMeta`): the round, the run's totals, the length of metrics.jsonl then, and
         the algorithm's and the clients' JSON (which clients hold what, data positions).
Layout 1, written before the clients owned their state, kept them in one flat dict of the state
('3', 'residual_3', 'model_3'); `abstract` and `restore` still read it (`_upgrade`).
"""

import dataclasses
from typing import Any

from fedjax_pt import accounting
from fedjax_pt import checkpoint as checkpoint_lib
from fedjax_pt.federated import client_round
from fedjax_pt.federated import compression

LAYOUT = 2


@dataclasses.dataclass
class RunMeta:
  """The JSON item of a checkpoint."""
  round: int
  totals: accounting.Totals
  metrics_bytes: int  # the length of metrics.jsonl at this round
  server: dict[str, Any]
  clients: dict[str, Any]
  layout: int = LAYOUT

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, obj: dict[str, Any]) -> 'RunMeta':
    totals = accounting.Totals(**obj['totals'])
    if 'layout' not in obj:  # layout 1: what it says of the clients is read by `_upgrade`
      legacy = {key: obj.get(key, default) for key, default in (
          ('iterators', []), ('kept_clients', []), ('carried', {}))}
      return cls(obj['round'], totals, obj.get('metrics_bytes', 0), {}, legacy, layout=1)
    return cls(obj['round'], totals, obj['metrics_bytes'], obj['server'], obj['clients'],
               obj['layout'])


def save_items(algorithm, state, clients, round_idx: int, totals: accounting.Totals,
               metrics_bytes: int) -> tuple[dict[str, Any], RunMeta]:
  """The arrays and the meta of a checkpoint of round `round_idx`."""
  arrays, server = algorithm.state_arrays(state)
  client_arrays, client_meta = clients.state()
  return {**arrays, 'clients': client_arrays}, RunMeta(round_idx, totals, metrics_bytes, server,
                                                       client_meta)


def abstract(algorithm, state, clients, meta_json: dict[str, Any]) -> dict[str, Any]:
  """The arrays of a checkpoint whose meta is `meta_json`, as shapes, dtypes and shardings;
  `state` is the algorithm's initial state (`init`), which gives the server's shapes."""
  meta = RunMeta.from_json(meta_json)
  arrays, _ = algorithm.state_arrays(state)
  if meta.layout == 1:
    return checkpoint_lib.abstract({**arrays, **_legacy_clients(arrays, clients, meta)})
  return checkpoint_lib.abstract({**arrays, **algorithm.abstract_pending(state, meta.server),
                                  'clients': clients.abstract(meta.clients)})


def restore(algorithm, state, clients, restored: checkpoint_lib.Restored,
            download: compression.CompressionConfig | None = None):
  """The algorithm's state after the checkpoint `restored`, with the clients restored too;
  returns (state, totals). `download` is fl.compression (layout 1 needs it)."""
  meta = RunMeta.from_json(restored.meta)
  arrays = restored.state
  if meta.layout == 1:
    arrays, meta = _upgrade(arrays, meta, download)
  clients.restore(arrays.pop('clients'), meta.clients)
  return algorithm.restore(state, arrays, meta.server, restored.round), meta.totals


def _legacy_memory(meta: RunMeta) -> dict[str, list[str]]:
  """Layout 1's clients, by id: the parts each kept (its Adam state, 'residual', 'model')."""
  memory = {str(k): ['opt_state'] for k in meta.clients['kept_clients']}
  for name, ids in meta.clients['carried'].items():
    for k in ids:
      memory.setdefault(str(k), []).append(name)
  return memory


def _legacy_clients(arrays: dict[str, Any], clients, meta: RunMeta) -> dict[str, Any]:
  """Layout 1's client arrays, as abstract ones: {'kept': {'3': Adam state, 'model_3': ...}}
  (the centralized learner kept none)."""
  if 'step' in arrays:
    return {}
  memory = _legacy_memory(meta)
  like = clients.abstract({'memory': {k: {'parts': parts} for k, parts in memory.items()}})
  return {'kept': {(k if name == 'opt_state' else f'{name}_{k}'): like[k][name]
                   for k, parts in memory.items() for name in parts}}


def _upgrade(arrays: dict[str, Any], meta: RunMeta,
             download: compression.CompressionConfig | None) -> tuple[dict[str, Any], RunMeta]:
  """Layout 1 as layout 2. A client that kept a model then took its deltas against the global
  model as it decoded the broadcast; that is its anchor now."""
  kept = arrays.pop('kept', {})
  memory = {k: {name: kept[k if name == 'opt_state' else f'{name}_{k}'] for name in parts}
            for k, parts in _legacy_memory(meta).items()}
  if any('model' in parts for parts in memory.values()):
    codec = compression.Codec(download.download, download.block_size, arrays['params'])
    anchor = codec.decode(codec.encode(arrays['params']))
    for parts in memory.values():
      if 'model' in parts:
        parts['anchor'] = anchor
  client_meta = {'iterators': meta.clients['iterators'],
                 'memory': {k: {'parts': [p for p in client_round.PARTS if p in parts],
                                'merged': None}
                            for k, parts in memory.items()}}
  server = {'holders': sorted(int(k) for k, parts in memory.items() if 'model' in parts)}
  return ({**arrays, 'clients': memory},
          dataclasses.replace(meta, server=server, clients=client_meta, layout=LAYOUT))
