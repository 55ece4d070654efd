"""`fl.*`: the federation's typed config (the fault policy is `faults.FaultConfig`)."""

import dataclasses

import ml_collections

from fedjax_pt import optimizers
from fedjax_pt.federated import aggregation
from fedjax_pt.federated import compression as compression_lib
from fedjax_pt.federated import privacy
from fedjax_pt.federated import profiles as profiles_lib
from fedjax_pt.federated import robust
from fedjax_pt.federated import sim_clock


@dataclasses.dataclass(frozen=True)
class FLConfig:
  num_clients: int
  clients_per_round: int
  rounds: int
  local_steps: int
  outer_optimizer: str = 'nesterov'
  outer_lr: float = 0.1
  outer_momentum: float = 0.9
  outer_b2: float = 0.95
  outer_lr_warmup_rounds: int = 0  # R: the outer lr ramps as lr * min(1, r / R) at round r
  outer_momentum_warmup_rounds: int = 0  # the same ramp for the outer momentum
  reset_optimizer: bool = True
  weighting: str = 'tokens'
  aggregation: str = 'mean'  # 'mean' | 'trimmed_mean' | 'median' | 'norm_clipped' (`robust`)
  aggregation_trim: float = 1.0  # trimmed_mean: clients dropped per end (a count, or a fraction)
  aggregation_clip: float = 2.0  # norm_clipped: the bound, in median delta norms
  fragments: int = 1
  fragment_mixing: float = 0.0
  # Overlapped rounds (`client_round`): a client trains round r on from its own model, the
  # global model of round r - 1 plus its own progress since, while its delta of round r - 1
  # travels and the server steps; it rebases onto the global model of round r when it finishes.
  overlap: bool = False
  # Quorum rounds (`quorum`): step once `quorum` updates are in (0: all of them), `grace_s`
  # simulated seconds after that; later updates are merged into a later step, weighted by
  # (1 + staleness) ^ -staleness_exponent.
  quorum: int = 0
  grace_s: float = 0.0
  staleness_exponent: float = 0.5
  compression: compression_lib.CompressionConfig = compression_lib.CompressionConfig()
  profiles: tuple[profiles_lib.ClientProfile, ...] = ()  # one per client, or () (identical)
  clock: sim_clock.ClockConfig = sim_clock.ClockConfig()
  dp: privacy.DPConfig = privacy.DPConfig()
  secagg: privacy.SecAggConfig = privacy.SecAggConfig()

  @property
  def merges_fragments(self) -> bool:
    """Whether clients merge the fragments they receive into a model of their own (streaming
    fragments, or mixing)."""
    return self.fragments > 1 or self.fragment_mixing > 0

  @property
  def keeps_client_models(self) -> bool:
    """Whether clients carry their own model from one synchronisation to the next (fragments,
    mixing, overlapped rounds); otherwise every round starts from the global model."""
    return self.merges_fragments or self.overlap

  def own_models_keys(self) -> str:
    """The keys that give every client a model of its own, for messages."""
    if self.overlap and not self.merges_fragments:
      return 'fl.overlap=True'
    return f'fl.fragments={self.fragments} / fl.fragment_mixing={self.fragment_mixing}'

  def __post_init__(self):
    for name in ('num_clients', 'clients_per_round', 'rounds', 'local_steps'):
      if getattr(self, name) <= 0:
        raise ValueError(f'fl.{name} must be positive, got {getattr(self, name)}')
    if self.clients_per_round > self.num_clients:
      raise ValueError(f'fl.clients_per_round={self.clients_per_round} exceeds '
                       f'fl.num_clients={self.num_clients}')
    if self.outer_optimizer not in optimizers.OUTER_OPTIMIZERS:
      raise ValueError(f'fl.outer_optimizer must be one of {optimizers.OUTER_OPTIMIZERS}, got '
                       f'{self.outer_optimizer!r}')
    if self.outer_lr <= 0 or not 0 <= self.outer_momentum < 1:
      raise ValueError(f'fl.outer_lr must be > 0 and fl.outer_momentum in [0, 1), got '
                       f'{self.outer_lr} and {self.outer_momentum}')
    for name in ('outer_lr_warmup_rounds', 'outer_momentum_warmup_rounds'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f'fl.{name} must be an integer >= 0 (0: no warmup), got {value!r}')
    if self.outer_momentum_warmup_rounds and not self.outer_momentum:
      raise ValueError(f'fl.outer_momentum_warmup_rounds={self.outer_momentum_warmup_rounds} '
                       'ramps a momentum of 0: set fl.outer_momentum, or the warmup to 0')
    if self.weighting not in aggregation.WEIGHTINGS:
      raise ValueError(f'fl.weighting must be one of {aggregation.WEIGHTINGS}, got '
                       f'{self.weighting!r}')
    if not isinstance(self.fragments, int) or self.fragments < 1:
      raise ValueError(f'fl.fragments must be a positive integer, got {self.fragments!r}')
    if self.fragments > self.local_steps:
      raise ValueError(f'fl.fragments={self.fragments} exceeds fl.local_steps='
                       f'{self.local_steps} (a fragment syncs every tau / F steps)')
    if not 0 <= self.fragment_mixing < 1:
      raise ValueError(f'fl.fragment_mixing must be in [0, 1), got {self.fragment_mixing}')
    if not isinstance(self.overlap, bool):
      raise ValueError(f'fl.overlap must be True or False, got {self.overlap!r}')
    if self.overlap and self.fragments == 1 and self.fragment_mixing:
      raise ValueError(f'fl.overlap=True with fl.fragment_mixing={self.fragment_mixing} and one '
                       'fragment is not built: an overlapped client rebases its progress onto '
                       'the whole model (set fl.fragments > 1 for Streaming DiLoCo\'s overlap)')
    self._check_quorum()
    if self.keeps_client_models and self.clients_per_round != self.num_clients:
      # A client left out of a synchronisation would train on from a stale model.
      raise ValueError(f'{self.own_models_keys()} keeps every client\'s model between syncs: '
                       f'it needs fl.clients_per_round = fl.num_clients, got '
                       f'{self.clients_per_round} of {self.num_clients}')
    self._check_privacy()
    robust.check(self.aggregation, self.aggregation_trim, self.aggregation_clip, self.weighting,
                 self.clients_per_round)

  def _check_quorum(self) -> None:
    q = self.quorum
    if isinstance(q, bool) or not isinstance(q, int) or not 0 <= q <= self.clients_per_round:
      raise ValueError(f'fl.quorum must be an integer in 0..fl.clients_per_round='
                       f'{self.clients_per_round} (0: every sampled client), got {q!r}')
    for name in ('grace_s', 'staleness_exponent'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e30:
        raise ValueError(f'fl.{name} must be a finite number >= 0, got {value!r}')
    if not q:
      changed = [n for n, default in (('grace_s', 0.0), ('staleness_exponent', 0.5))
                 if getattr(self, n) != default]
      if changed:
        raise ValueError(f'fl.{changed[0]}={getattr(self, changed[0])} is set but fl.quorum=0 '
                         'ignores it: it applies to quorum rounds (fl.quorum > 0)')
      return
    if self.keeps_client_models:
      raise ValueError(f'fl.quorum={q} with {self.own_models_keys()} is not built yet: a late '
                       "client's own model would train on from a round the others have left")
    if self.dp.enabled or self.secagg.enabled:
      what = 'fl.dp' if self.dp.enabled else 'fl.secagg'
      why = ("its accounting assumes each round averages the clients sampled for it, and a late "
             "delta lands in another round" if self.dp.enabled else
             "its masks cancel only in the sum of one round's clients, and a late delta would "
             "leave them unmasked")
      raise ValueError(f'fl.quorum={q} cannot be used with {what}: {why}; set fl.quorum=0')

  def _check_privacy(self) -> None:
    dp, secagg = self.dp, self.secagg
    if dp.enabled or secagg.enabled:
      what = 'fl.dp' if dp.enabled else 'fl.secagg'
      if self.fragments > 1 or self.fragment_mixing:
        raise ValueError(f'{what} needs whole-model synchronisations: fl.fragments must be 1 and '
                         f'fl.fragment_mixing 0, got {self.fragments} and {self.fragment_mixing}')
      if self.weighting == 'examples':
        raise ValueError(f"{what} averages the clients uniformly (a weight that depends on a "
                         f"client's data would unbound its influence): fl.weighting must be "
                         f"'uniform' or 'tokens' with identical clients, got 'examples'")
    if self.aggregation != 'mean' and (dp.enabled or secagg.enabled):
      why = ("shows the server only the clients' sum, and the rule needs each delta" if
             secagg.enabled else "calibrates its noise to the mean of clipped deltas, which one "
             "client moves by at most clip_norm; the rule's output has no such bound")
      raise ValueError(f"fl.aggregation={self.aggregation!r} cannot be used with "
                       f"{'fl.secagg' if secagg.enabled else 'fl.dp'}: it {why}; set "
                       "fl.aggregation='mean'")
    if secagg.enabled:
      secagg.check(self.clients_per_round)
      if self.overlap:
        raise ValueError('fl.overlap=True with fl.secagg is not built yet: a secure sum reports '
                         "no client's own timing or model; set fl.overlap=False")
      if self.compression.upload == 'topk':
        raise ValueError("fl.secagg cannot take fl.compression.upload='topk': its masks cancel "
                         'only in a sum over the same positions, and each client keeps different '
                         'ones')
      if self.compression.upload != 'none':
        raise ValueError(f'fl.secagg quantises the deltas itself: fl.compression.upload must be '
                         f"'none', got {self.compression.upload!r}")
      if dp.enabled and dp.noise_at != 'clients':
        raise ValueError("fl.secagg hides each client's delta from the server, which can then "
                         "neither clip it nor noise it alone: fl.dp.noise_at must be 'clients', "
                         f'got {dp.noise_at!r}')

  @classmethod
  def from_config(cls, fl: ml_collections.ConfigDict) -> 'FLConfig':
    groups = {'compression', 'profiles', 'clock', 'dp', 'secagg'}
    fields = {f.name for f in dataclasses.fields(cls)} - groups
    return cls(**{k: v for k, v in fl.to_dict().items() if k in fields},
               compression=compression_lib.CompressionConfig.from_config(fl.compression),
               profiles=profiles_lib.parse(fl.get('profiles', ''), fl.num_clients),
               clock=sim_clock.ClockConfig.from_config(fl.get('clock')),
               dp=privacy.DPConfig.from_config(fl.dp) if 'dp' in fl else privacy.DPConfig(),
               secagg=(privacy.SecAggConfig.from_config(fl.secagg) if 'secagg' in fl else
                       privacy.SecAggConfig()))

  def profile(self, k: int) -> profiles_lib.ClientProfile | None:
    return self.profiles[k] if self.profiles else None
