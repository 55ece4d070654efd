"""Predicted wall time of federated training against data-parallel (DDP) training over the same
links, from FLOPs, bytes and a few assumed rates. Pure arithmetic: nothing runs.

Both process the same tokens on the same hardware: K clients (DDP: K workers) of G devices each,
every one taking `tokens_per_step` tokens a step. A local step computes for

    C = tokens_per_step x flops_per_token / (G x peak x MFU),

or tokens_per_step / tokens_per_s where the user gives a measured throughput.

Federated round: the server's model goes down (D bytes), tau local steps, the delta goes up
(U bytes), one message of latency each way, and no overlap of communication with compute; the
transport adds `fl.clock`'s fixed time F and moves the bytes at its own rate T besides the link
(`sim_clock.communication_s`, which the simulated clock charges too; DDP's collectives pay
neither):

    round = D / B + tau C + U / B + 2 latency + F + (U + D) / T.

Every client has its own link of B bits/s each way, and the server's is assumed to carry the K
messages at once (a datacenter uplink, or an all-reduce among the clients, which sends about as
much: 2 (K - 1) / K x M against 2 M). DDP all-reduces the M-byte gradient every step in a ring:
each worker sends 2 (K - 1) / K x M bytes in 2 (K - 1) messages, and the all-reduce of gradient
buckets runs during the backward pass, 2/3 of the step's FLOPs, so only what exceeds it shows:

    step = C + max(0, comm - 2/3 C),  comm = 2 (K - 1) / K x M / B + 2 (K - 1) latency.

Break-even bandwidth: where the two take the same time per token. Above it DDP's all-reduce hides
behind its backward pass and federated training's round-trip, which nothing hides, makes it the
slower; below it DDP waits on its link at every step. Equal time per token (tau DDP steps per
round) with comm > 2/3 C gives

    B = 8 (2 (K - 1) / K x M - (U + D) / tau)
        / (2/3 C + (2 latency + F + (U + D) / T) / tau - 2 (K - 1) latency)

in bits/s. When the numerator is not positive federated training sends at least as much per token
and is never faster; when the denominator is not positive DDP's per-step latency alone makes it
the slower at every bandwidth. Neither case has a break-even.
"""

import dataclasses

from fedjax_pt.federated import communication
from fedjax_pt.federated import sim_clock
from fedjax_pt.federated.sim_clock import ClockConfig

# The share of a step's FLOPs that DDP's gradient all-reduce can hide behind: the backward pass
# (2 of the 6 N FLOPs per token are the forward pass).
DDP_OVERLAP = 2 / 3


@dataclasses.dataclass(frozen=True)
class Workload:
  """What the run computes and sends (config and model, no rates)."""
  tokens_per_step: int  # per client (DDP: per worker): batch x seq_len
  flops_per_token: float
  local_steps: int  # tau
  clients: int  # K
  rounds: int
  upload_bytes: int  # one client's message to the server, per round
  download_bytes: int  # the server's message to one client, per round
  gradient_bytes: int  # M: what DDP all-reduces at every step


@dataclasses.dataclass(frozen=True)
class Hardware:
  """The rates (assumed, except a measured CPU's peak and what the user measured)."""
  peak_flops: float  # per device
  devices_per_client: int
  mfu: float
  bandwidth_bps: float  # bits/s each way on every link
  latency_s: float  # per message
  tokens_per_s: float | None = None  # a client's measured training throughput (replaces MFU)
  clock: ClockConfig = ClockConfig()  # what the federated transport adds (fl.clock)


@dataclasses.dataclass(frozen=True)
class Prediction:
  step_compute_s: float  # C
  federated_round_s: float
  federated_comm_s: float  # per round
  federated_bytes: int  # per run, all messages
  ddp_step_s: float
  ddp_comm_s: float  # per step, before overlap
  ddp_bytes: int  # per run, all workers
  rounds: int
  local_steps: int
  break_even_bps: float | None

  @property
  def federated_run_s(self) -> float:
    return self.rounds * self.federated_round_s

  @property
  def overlapped_round_s(self) -> float:
    """fl.overlap in steady state (`sim_clock.OverlapPipeline`, the server's work not counted):
    a client trains round r while round r - 1's delta goes up and theta_r comes down, so a round
    lasts its compute, or half of compute + communication when that is longer."""
    compute = self.local_steps * self.step_compute_s
    return max(compute, (compute + self.federated_comm_s) / 2)

  @property
  def ddp_round_s(self) -> float:
    """DDP's time for a round's tokens: tau steps."""
    return self.local_steps * self.ddp_step_s

  @property
  def ddp_run_s(self) -> float:
    return self.rounds * self.ddp_round_s

  @property
  def communication_ratio(self) -> float | None:
    return communication.ddp_ratio(self.ddp_bytes, self.federated_bytes)


def step_compute_s(w: Workload, hw: Hardware) -> float:
  if hw.tokens_per_s:
    return w.tokens_per_step / hw.tokens_per_s
  return w.tokens_per_step * w.flops_per_token / (hw.devices_per_client * hw.peak_flops * hw.mfu)


def implied_mfu(w: Workload, hw: Hardware) -> float:
  """The MFU that `step_compute_s` amounts to (the assumed one, or a measured throughput's)."""
  return (w.tokens_per_step * w.flops_per_token /
          (step_compute_s(w, hw) * hw.devices_per_client * hw.peak_flops))


def federated_comm_s(w: Workload, hw: Hardware) -> float:
  """A client's round trip less its compute, as the simulated clock times it."""
  mbps = hw.bandwidth_bps / 1e6
  return sim_clock.communication_s(w.download_bytes, w.upload_bytes, mbps, mbps, hw.latency_s,
                                   hw.clock)


def ddp_comm_s(w: Workload, hw: Hardware) -> float:
  k = w.clients
  return (8 * 2 * (k - 1) / k * w.gradient_bytes / hw.bandwidth_bps +
          2 * (k - 1) * hw.latency_s)


def _excess_bytes(w: Workload) -> float:
  """How many more bytes a DDP worker sends than a client, per step."""
  k = w.clients
  return 2 * (k - 1) / k * w.gradient_bytes - (w.upload_bytes + w.download_bytes) / w.local_steps


def _slack_s(w: Workload, hw: Hardware) -> float:
  """What DDP's overlap hides, per step, less the latency it pays beyond federated training,
  plus what the federated transport costs per step whatever the link (`fl.clock`)."""
  k, tau = w.clients, w.local_steps
  transport = hw.clock.round_trip_s + sim_clock.transfer_s(w.download_bytes + w.upload_bytes,
                                                          hw.clock.transport_mbps)
  return (DDP_OVERLAP * step_compute_s(w, hw) + (2 * hw.latency_s + transport) / tau -
          2 * (k - 1) * hw.latency_s)


def break_even_bps(w: Workload, hw: Hardware) -> float | None:
  """The bandwidth at which both take equal time per token (None: no such bandwidth)."""
  sent, slack = _excess_bytes(w), _slack_s(w, hw)
  if sent <= 0 or slack <= 0:
    return None
  return 8 * sent / slack


def faster_at_every_bandwidth(w: Workload, hw: Hardware) -> str | None:
  """'federated' or 'DDP' when one of them is faster per token whatever the bandwidth."""
  if _excess_bytes(w) <= 0:
    return 'DDP'
  return 'federated' if _slack_s(w, hw) <= 0 else None


def predict(w: Workload, hw: Hardware) -> Prediction:
  compute = step_compute_s(w, hw)
  fed_comm, ddp_comm = federated_comm_s(w, hw), ddp_comm_s(w, hw)
  tokens = w.rounds * w.local_steps * w.clients * w.tokens_per_step
  return Prediction(
      step_compute_s=compute,
      federated_round_s=w.local_steps * compute + fed_comm,
      federated_comm_s=fed_comm,
      federated_bytes=w.rounds * w.clients * (w.upload_bytes + w.download_bytes),
      ddp_step_s=compute + max(0.0, ddp_comm - DDP_OVERLAP * compute),
      ddp_comm_s=ddp_comm,
      ddp_bytes=communication.ddp_equivalent_bytes(w.gradient_bytes, w.clients,
                                                   w.tokens_per_step, tokens),
      rounds=w.rounds, local_steps=w.local_steps, break_even_bps=break_even_bps(w, hw))
