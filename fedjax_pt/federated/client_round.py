"""A client's side of a synchronisation, written once: the simulation's clients and a Flower node
both call it, so what one does the other does, bit for bit.

    memory = ClientMemory()                                   # what the client keeps
    start, memory = rule.receive(memory, received, fragment, round_idx, segment)
    ... local training from start.params, with rule.opt_state(memory, segment) ...
    message, memory, report = rule.finish(k, memory, start, result, fault, ...)

In order: a seeded fault may crash the client before it trains (`crashed`); it takes the model it
receives (or, with a model of its own, merges the fragment it receives into it: streaming
fragments and mixing, `fedjax_pt.federated.fragments`); it trains; a poisoned client
(fl.fault.poison) alters its delta and a seeded fault may make its result NaN; it clips and
noises its delta (fl.dp.noise_at='clients'), encodes it with error feedback (fl.compression) and
keeps what the next synchronisation needs. A client whose model is not finite keeps nothing of
this round but its Adam state of the previous one, and starts again from the global model.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from fedjax_pt import local_training
from fedjax_pt import records
from fedjax_pt.federated import compression
from fedjax_pt.federated import faults
from fedjax_pt.federated import fragments as fragments_lib
from fedjax_pt.federated import privacy
from fedjax_pt.federated.config import FLConfig
from fedjax_pt.federated.messages import ClientReport

_INJECTED = 'raised InjectedFailure: injected failure (fl.fault.failure_prob)'
PARTS = ('opt_state', 'residual', 'model', 'anchor')  # the arrays a ClientMemory may hold


class ClientMemory(flax.struct.PyTreeNode):
  """What a client keeps from one synchronisation to the next (None: nothing of that kind)."""
  # Its Adam state: across rounds with fl.reset_optimizer=False, else between the segments of a
  # round (streaming fragments).
  opt_state: Any = None
  residual: Any = None  # what its messages could not carry yet (fl.compression.error_feedback)
  model: Any = None  # its own model (streaming fragments, mixing)
  # The global model as it last received it, fragment by fragment: what its deltas are taken
  # against when it has a model of its own (Streaming DiLoCo's "original parameters").
  anchor: Any = None
  # (round, segment start) whose fragment `model` has merged: a retry does not merge it twice.
  merged: tuple[int, int] | None = flax.struct.field(pytree_node=False, default=None)

  def parts(self) -> list[str]:
    """The names of the arrays it holds."""
    return [name for name in PARTS if getattr(self, name) is not None]


class Start(flax.struct.PyTreeNode):
  """Where a client's local training starts: its parameters, and the model its delta is taken
  against (the global model as received). With fl.overlap and streaming fragments, the fragment
  it received, which it merges when it has trained (`deferred` of fragment `deferred_fragment`).
  """
  params: Any
  reference: Any
  deferred: Any = None
  deferred_fragment: int | None = flax.struct.field(pytree_node=False, default=None)


class NoModel(RuntimeError):
  """A fragment arrived for a client that holds no model to merge it into (its state was lost)."""


class ClientRule:
  """The client's side of every synchronisation of a run: fl.*, the faults, the seed and the
  parameters' layout (`like`: arrays or ShapeDtypeStructs with their shardings)."""

  def __init__(self, fl: FLConfig, fault_cfg: faults.FaultConfig, seed: int, like: Any):
    self.fl, self.faults, self.seed = fl, fault_cfg, seed
    comp = fl.compression
    self.assignment = fragments_lib.partition(like, fl.fragments)
    fragment_ids = range(fl.fragments)
    # Jitted for the parameters' layout: a decoded model and an encoded delta land where the
    # parameters are, identical on every kind of client.
    self._download = compression.Codec(comp.download, comp.block_size, like)
    self._download_parts = [compression.Codec(comp.download, comp.block_size,
                                              self.fragment(like, f)) for f in fragment_ids]
    self._upload = [compression.Codec(comp.upload, comp.block_size, self.fragment(like, f),
                                      comp.topk) for f in fragment_ids]

  def fragment(self, tree: Any, fragment: int) -> Any:
    """`tree`, or with F > 1 fragments its part `fragment` (None elsewhere)."""
    if self.fl.fragments == 1:
      return tree
    return fragments_lib.select(tree, self.assignment, fragment)

  def fault(self, client: int, round_idx: int, attempt: int,
            segment: fragments_lib.Segment) -> str | None:
    """The seeded fault of this client in this synchronisation: 'fail', 'nan' or None."""
    fragment = segment.fragment if self.fl.fragments > 1 else 0
    return faults.injected_fault(self.faults, self.seed, round_idx, client, attempt, fragment)

  def local_steps(self, planned: int, segment: fragments_lib.Segment) -> int:
    """Its local steps in this segment: its own per round (`fl.profiles`), unless streaming
    fragments split the round (their clients all do the same work)."""
    return planned if self.fl.fragments == 1 else segment.steps

  def first_step(self, round_idx: int, segment: fragments_lib.Segment) -> int:
    """The run's step at which the segment starts: what the lr schedule reads."""
    return records.first_step(round_idx, self.fl.local_steps, segment.start)

  def decode(self, payload: Any, fragment: int | None) -> Any:
    """The model (or fragment) a client holds after receiving `payload`."""
    if fragment is None:
      return self._download.decode(payload)
    return self._download_parts[fragment].decode(payload)

  def receive(self, memory: ClientMemory, received: Any, fragment: int | None, round_idx: int,
              segment: fragments_lib.Segment) -> tuple[Start, ClientMemory]:
    """Where training starts from `received` (the decoded whole model, or `fragment` of it)."""
    fl = self.fl
    if not fl.keeps_client_models:
      return Start(received, received), memory
    here = (round_idx, segment.start)
    if fl.overlap and fl.fragments == 1:
      return self._overlapped_start(memory, received, round_idx)
    if fragment is None:  # the whole model: it becomes the client's own
      memory = memory.replace(model=received, anchor=received, merged=here)
    elif memory.model is None:
      raise NoModel(f'received fragment {fragment} but holds no model to merge it into (its state '
                    'was lost); the server sends it the whole model next')
    elif fl.overlap:
      # Streaming DiLoCo's overlap: it trains on, and merges the fragment when it has trained.
      return Start(memory.model, memory.anchor, received, fragment), memory
    elif memory.merged != here:
      mixed = fragments_lib.mix(self.fragment(memory.model, fragment), received,
                                fl.fragment_mixing)
      memory = memory.replace(
          model=fragments_lib.replace(memory.model, mixed, self.assignment, fragment),
          anchor=fragments_lib.replace(memory.anchor, received, self.assignment, fragment),
          merged=here)
    return Start(memory.model, memory.anchor), memory

  def _overlapped_start(self, memory: ClientMemory, received: Any,
                        round_idx: int) -> tuple[Start, ClientMemory]:
    """fl.overlap: a client that took part in the previous round trains on from its own model,
    theta_{r-1} + its delta of round r - 1 (the global model it had then plus its own progress:
    it has not waited for theta_r), and takes its delta against that start. `received`, theta_r,
    is kept as the anchor it rebases onto when it has trained (`finish`): its next start is
    theta_r + its delta of round r. One-step-delayed outer updates, the overlap of DiLoCoX
    (arXiv 2506.21263) and "eager updates" (arXiv 2502.12996) in the form written here. Any
    other client starts from theta_r, as in a synchronous round."""
    took_part = memory.model is not None and memory.merged == (round_idx - 1, 0)
    start = memory.model if took_part else received
    return Start(start, start), memory.replace(anchor=received, merged=(round_idx, 0))

  def opt_state(self, memory: ClientMemory, segment: fragments_lib.Segment) -> Any:
    """The Adam state it trains with: its own, or None for fresh moments."""
    if not self.fl.reset_optimizer or segment.start:
      return memory.opt_state
    return None

  def crashed(self, client: int, num_examples: int, failure: str | None = None) -> ClientReport:
    """The report of a client that raised `failure` (None: the seeded crash of fl.fault.*)
    before it had anything to send. It keeps its memory, as a process that crashed keeps what it
    had saved."""
    return ClientReport(client=client, update=None, num_examples=num_examples,
                        failure=failure or _INJECTED, injected=failure is None)

  def no_model(self, client: int, num_examples: int, error: NoModel) -> ClientReport:
    """The report of a client that could not merge what it received: it says it holds no model,
    so the server sends it the whole model next."""
    report = self.crashed(client, num_examples, f'raised NoModel: {error}')
    report.holds_model = False
    return report

  def finish(self, client: int, memory: ClientMemory, start: Start,
             result: local_training.ClientResult, fault: str | None,
             segment: fragments_lib.Segment, round_idx: int, attempt: int, local_steps: int,
             num_examples: int) -> tuple[Any, ClientMemory, ClientReport]:
    """The client's message (its encoded delta of the segment's fragment), what it keeps, and
    its report, after its local training `result`."""
    fl = self.fl
    params = result.state.params
    poison = faults.poison_of(self.faults, client)
    if poison:
      key = faults.poison_key(self.seed, round_idx, client, attempt, segment.fragment)
      delta = faults.poisoned_delta(poison, jax.tree.map(jnp.subtract, params, start.reference),
                                    self.faults.poison_scale, key)
      params = jax.tree.map(jnp.add, start.reference, delta)
    if fault == 'nan':
      params = faults.poisoned(params)
    finite = bool(faults.all_finite(params))
    residual = None
    if fl.compression.error_feedback:
      residual = memory.residual
      if residual is None:
        residual = jax.tree.map(jnp.zeros_like, params)
    message, residual_part = self._upload[segment.fragment].compress_delta(
        self.fragment(params, segment.fragment), self.fragment(start.reference, segment.fragment),
        None if residual is None else self.fragment(residual, segment.fragment),
        **self._privatize(client, round_idx, attempt))
    if residual is not None and fl.fragments > 1:
      residual_part = fragments_lib.replace(residual, residual_part, self.assignment,
                                            segment.fragment)
    own = params
    if fl.overlap and fl.fragments == 1:  # rebased onto the model of this round (`receive`)
      own = jax.tree.map(lambda a, p, s: a + (p - s), memory.anchor, params, start.reference)
    elif start.deferred is not None:
      own, memory = self._merge(memory, params, start, round_idx, segment)
    memory = self._keep(memory, result.state.opt_state, own, residual_part, finite, segment)
    report = ClientReport(
        client=client, update=message, training=result.summary,
        steps=records.step_records(result.step_metrics, round_idx, client, fl.local_steps,
                                   segment.start),
        num_examples=num_examples, local_steps=local_steps, injected=fault == 'nan',
        holds_model=memory.model is not None if fl.keeps_client_models else None)
    return message, memory, report

  def _merge(self, memory: ClientMemory, params: Any, start: Start, round_idx: int,
             segment: fragments_lib.Segment) -> tuple[Any, ClientMemory]:
    """fl.overlap with streaming fragments: the fragment that came with this segment, synced at
    the end of the previous one, merged into the model it has trained on meanwhile (alpha *
    own + (1 - alpha) * global, as `receive` merges it without overlap), and its anchor."""
    f = start.deferred_fragment
    mixed = fragments_lib.mix(self.fragment(params, f), start.deferred, self.fl.fragment_mixing)
    return (fragments_lib.replace(params, mixed, self.assignment, f),
            memory.replace(anchor=fragments_lib.replace(memory.anchor, start.deferred,
                                                        self.assignment, f),
                           merged=(round_idx, segment.start)))

  def _privatize(self, client: int, round_idx: int, attempt: int) -> dict[str, Any]:
    """With fl.dp.noise_at='clients': its clipping and its share of the noise."""
    noise = privacy.client_noise(self.fl.dp, self.fl.clients_per_round)
    if noise is None:
      return {}
    return dict(privatize=noise, key=privacy.noise_key(self.seed, round_idx, client, attempt))

  def _keep(self, memory: ClientMemory, opt_state: Any, params: Any, residual: Any,
            finite: bool, segment: fragments_lib.Segment) -> ClientMemory:
    """A finite client keeps its new Adam state (while it needs one), residual and model; a
    diverged one keeps none of them, and with fl.reset_optimizer=False its previous Adam state
    (it starts afresh from the global model, as after a restart)."""
    fl = self.fl
    round_ends = segment.start + segment.steps == fl.local_steps
    if not fl.reset_optimizer:
      kept_opt = opt_state if finite else memory.opt_state
    else:
      kept_opt = opt_state if finite and not round_ends else None
    own = fl.keeps_client_models and finite
    return memory.replace(
        opt_state=kept_opt,
        residual=residual if fl.compression.error_feedback and finite else None,
        model=params if own else None, anchor=memory.anchor if own else None,
        merged=memory.merged if own else None)
