"""Local training on a mesh of 8 fake CPU devices (tests/conftest.py) equals the one-device run.

A "round" here is 4 clients x 3 local AdamW steps (lr 1e-2) from the same global model, their
weighted mean and one Nesterov outer step (lr 0.7, momentum 0.9). A sharded layout adds float32
sums in another order, so its gradients differ from the one-device run's by rounding. The
tolerances follow from that:

- Adam's update m / (sqrt(v) + eps) amplifies a gradient difference dg by up to dg / eps. With
  the default eps = 1e-8, a coordinate whose true gradient is ~0 can move by +-lr in either run
  (measured: 3e-5 on an AMD EPYC, while CI machines differ), so these tests use eps = 1e-3: the
  update stays Adam-like for the typical |g| ~ 1e-3 and the amplification is bounded by 1e3.
- Moments (linear in g) differ by at most 2.3e-9 (measured, both AVX-512 and AVX2-only code via
  --xla_cpu_max_isa=AVX2), i.e. gradients by about 2.3e-8; an update then differs by at most
  2.3e-8 / 1e-3 = 2.3e-5 of its learning rate, a round's parameters by at most
  (1 + mu) x outer lr x sum of local lr x 2.3e-5 = 1.9 x 0.7 x 0.03 x 2.3e-5 = 9e-7: ATOL 1e-6
  (measured 4e-8). Moments: ATOL_MOMENTS 1e-7, 40x what was measured, far below |g| ~ 1e-3.
- Losses are means over 256 tokens of float32 terms: rtol 1e-5 (measured 2.3e-7).
A wrong sharding (a missing reduction, a misplaced batch split) changes gradients by O(1), far
beyond every bound.
"""

import dataclasses
import functools

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fedjax_pt.configs import base
from fedjax_pt.configs import tiny
from fedjax_pt.federated import aggregation
from fedjax_pt import local_training
from fedjax_pt import model as model_lib
from fedjax_pt import optimizers
from fedjax_pt.federated import sampling
from fedjax_pt.federated import server as server_lib
from fedjax_pt import sharding
from fedjax_pt import train

RTOL, ATOL, ATOL_MOMENTS = 1e-5, 1e-6, 1e-7
MODEL = model_lib.ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, mlp_ratio=4,
                              max_seq_len=16)
OPT = optimizers.OptConfig(lr=1e-2, warmup_steps=1, schedule_steps=40, weight_decay=0.1, eps=1e-3)
MUON = dataclasses.replace(OPT, optimizer='muon', muon_lr=2e-2)
# Muon's momentum is linear in g: it differs by ATOL_MOMENTS at most (measured 3.3e-9). Newton-
# Schulz divides it by its Frobenius norm (>= 3.4e-3 here), so its input differs by ~1e-6 per
# entry; its five quintic steps amplify that by a factor kappa (at most 3.4445 a step, and only
# for the smallest singular values). A round's parameters then move by at most about 1e-6 x kappa
# x muon_lr 0.02 x width scale 2 x 3 steps x (1 + mu) x outer lr 0.7 = 1.6e-7 kappa, besides
# AdamW's 9e-7 on the other parameters: MUON_ATOL 2e-6 allows kappa up to 7 (measured: 1.3e-7
# in all). Orthogonalising each shard alone gives another matrix: an O(muon_lr) = 2e-2 change.
MUON_ATOL = 2e-6
OUTER = optimizers.outer_optimizer('nesterov', lr=0.7, momentum=0.9)
CLIENTS, STEPS, BATCH = 4, 3, 16


def _layout(clients=1, data=1, fsdp=1, offload=False):
  return sharding.Layout.create(sharding.MeshConfig(clients=clients, data=data, fsdp=fsdp,
                                                    offload_optimizer=offload))


def _batches(client):
  rng = np.random.default_rng(client)
  while True:
    yield rng.integers(0, MODEL.vocab_size, size=(BATCH, MODEL.max_seq_len + 1), dtype=np.int32)


@dataclasses.dataclass
class _Round:
  params: object  # the global model after the outer step
  losses: np.ndarray  # [client, local step]
  opt_states: list  # each client's Adam state after its local steps


@functools.cache
def _trainer(layout_kwargs: tuple, model: model_lib.ModelConfig = MODEL,
             micro_batch_size: int = 0, opt: optimizers.OptConfig = OPT
             ) -> tuple[sharding.Layout, local_training.Trainer]:
  layout = _layout(**dict(layout_kwargs))
  return layout, local_training.Trainer(model, opt, layout, micro_batch_size)


@functools.cache
def _round(layout_kwargs: tuple, model: model_lib.ModelConfig = MODEL, micro_batch_size: int = 0,
           kept: bool = False, opt: optimizers.OptConfig = OPT) -> _Round:
  """One round as train.py runs it; `kept`: clients start from the Adam states of a first round."""
  layout, trainer = _trainer(layout_kwargs, model, micro_batch_size, opt)
  # The same initial values everywhere (test_shardings_follow_the_rules checks sharded creation).
  params = jax.device_put(model_lib.init_params(model, jax.random.key(0)), layout.params(model))
  state = server_lib.init_server_state(params, OUTER, layout.params(model))
  server_update = server_lib.make_server_update(OUTER, like=state)
  iterators = [_batches(k) for k in range(CLIENTS)]
  groups = sampling.client_groups(list(range(CLIENTS)), trainer.parallel)
  opt_states = [None] * CLIENTS
  if kept:
    opt_states = [r.state.opt_state for g in groups for r in trainer.train(
        state.params, 0, [iterators[k] for k in g], [None] * len(g), 1)]
  average, results = aggregation.RunningAverage(), []
  for group in groups:
    for k, result in zip(group, trainer.train(state.params, 5, [iterators[k] for k in group],
                                              [opt_states[k] for k in group], STEPS, log_every=1)):
      average.add(result.state.params, 1.0 + k)  # unequal weights: the order of clients matters
      results.append(result)
  mean_delta = jax.tree.map(lambda m, p: m - p, average.result(), state.params)
  state, _ = server_update(state, mean_delta)
  losses = np.array([[m['loss'] for m in r.step_metrics] for r in results])
  return _Round(jax.device_get(state.params), losses,
                jax.device_get([r.state.opt_state for r in results]))


def _assert_close(a, b, atol=ATOL):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=atol), a, b)


ONE_DEVICE = (('fsdp', 1),)


def test_one_device_mesh_is_the_plain_train_step():
  """The default path on one device computes what the unsharded `make_train_step` does."""
  train_step = local_training.make_train_step(MODEL, OPT)
  params = model_lib.init_params(MODEL, jax.random.key(0))
  state = local_training.init_local_state(params, OPT, 5)
  result = local_training.client_update(train_step, state, _batches(0), STEPS, log_every=1)
  reference = _round(ONE_DEVICE)
  np.testing.assert_allclose([m['loss'] for m in result.step_metrics], reference.losses[0],
                             rtol=1e-6)


@pytest.mark.parametrize('mesh', [
    (('fsdp', 8),),
    (('data', 2), ('fsdp', 4)),
    (('clients', 2), ('fsdp', 4)),
    (('fsdp', 8), ('offload', True)),
], ids=['fsdp8', 'data2xfsdp4', 'clients2xfsdp4', 'fsdp8-offload'])
def test_sharded_round_matches_one_device(mesh):
  reference, sharded = _round(ONE_DEVICE), _round(mesh)
  np.testing.assert_allclose(sharded.losses, reference.losses, rtol=RTOL)
  _assert_close(sharded.params, reference.params)


def test_parallel_clients_with_kept_optimizer_states_match_sequential():
  """fl.reset_optimizer=False: each client's own Adam moments are stacked into its group."""
  reference, parallel = _round(ONE_DEVICE, kept=True), _round((('clients', 2), ('fsdp', 4)),
                                                              kept=True)
  np.testing.assert_allclose(parallel.losses, reference.losses, rtol=RTOL)
  _assert_close(parallel.params, reference.params)
  _assert_close(parallel.opt_states, reference.opt_states, atol=ATOL_MOMENTS)


@pytest.mark.parametrize('mesh', [
    (('fsdp', 8),),
    (('clients', 2), ('fsdp', 4), ('offload', True)),
], ids=['fsdp8', 'clients2xfsdp4-offload'])
def test_muon_on_sharded_matrices_matches_one_device(mesh):
  """Newton-Schulz on FSDP-split matrices (XLA's sharded X X^T), kept Muon states stacked per
  client group and offloaded: the same round as on one device, within MUON_ATOL."""
  reference, sharded = _round(ONE_DEVICE, kept=True, opt=MUON), _round(mesh, kept=True, opt=MUON)
  np.testing.assert_allclose(sharded.losses, reference.losses, rtol=RTOL)
  _assert_close(sharded.params, reference.params, atol=MUON_ATOL)
  _assert_close(sharded.opt_states, reference.opt_states, atol=ATOL_MOMENTS)


LLAMA = dataclasses.replace(MODEL, family='llama', position_embedding='rope', num_kv_heads=2,
                            tie_embeddings=False, mlp_dim=64)


@pytest.mark.parametrize('mesh', [(('fsdp', 8),), (('clients', 2), ('data', 2), ('fsdp', 2))],
                         ids=['fsdp8', 'clients2xdata2xfsdp2'])
def test_llama_sharded_round_matches_one_device(mesh):
  """The Llama family's parameters (SwiGLU, grouped keys, a separate output matrix) take the
  same logical axes and rules: the same round as on one device, within the bounds above."""
  reference, sharded = _round(ONE_DEVICE, LLAMA), _round(mesh, LLAMA)
  np.testing.assert_allclose(sharded.losses, reference.losses, rtol=RTOL)
  _assert_close(sharded.params, reference.params)
  with_remat = _round(mesh, dataclasses.replace(LLAMA, remat='full'), micro_batch_size=8)
  np.testing.assert_allclose(with_remat.losses, reference.losses, rtol=RTOL)
  _assert_close(with_remat.params, reference.params)


def test_accumulation_and_remat_match_under_fsdp():
  """k = 2 micro-batches with full remat give the full batch's round (both on fsdp=8)."""
  plain = _round((('fsdp', 8),))
  other = _round((('fsdp', 8),), dataclasses.replace(MODEL, remat='full'), micro_batch_size=8)
  np.testing.assert_allclose(other.losses, plain.losses, rtol=1e-5)
  _assert_close(other.params, plain.params)


def test_shardings_follow_the_rules():
  layout = _layout(fsdp=8)
  shardings = layout.params(MODEL)
  params = sharding.init_params(MODEL, jax.random.key(0), layout)
  # 'embed' -> fsdp; 'vocab', 'pos', 'heads', 'mlp', 'norm' -> replicated (DEFAULT_RULES).
  expected = {'wte': {'embedding': P(None, 'fsdp')}, 'wpe': P(None, 'fsdp'),
              'norm_f': {'scale': P(None)}}
  block = {'attn': {'wqkv': {'kernel': P('fsdp', None)}, 'out_proj': {'kernel': P(None, 'fsdp')}},
           'mlp': {'up_proj': {'kernel': P('fsdp', None)},
                   'down_proj': {'kernel': P(None, 'fsdp')}},
           'norm_1': {'scale': P(None)}, 'norm_2': {'scale': P(None)}}
  expected.update({f'block_{i}': block for i in range(MODEL.num_layers)})
  assert jax.tree.map(lambda s: s.spec, shardings) == expected
  assert jax.tree.map(lambda p: p.sharding, params) == shardings
  # Created already split: every device holds 1/8 of the embedding, not a replica.
  assert params['wte']['embedding'].addressable_shards[0].data.shape == (64, 4)
  assert len(params['wte']['embedding'].sharding.device_set) == 8

  parallel = _layout(clients=2, fsdp=4, offload=True)
  trainer = local_training.Trainer(MODEL, OPT, parallel)
  state = trainer.init(sharding.init_params(MODEL, jax.random.key(0), parallel), 0)
  kernel = state.params['block_0']['mlp']['up_proj']['kernel']
  assert kernel.shape == (2, 32, 128) and kernel.sharding.spec == P('clients', 'fsdp', None)
  mu = state.opt_state[1].mu['block_0']['mlp']['up_proj']['kernel']
  assert mu.sharding.spec == P('clients', 'fsdp', None) and mu.sharding.memory_kind == 'pinned_host'
  assert state.step.shape == (2,) and state.step.sharding.spec == P('clients')


def _mesh_config(**overrides):
  mesh = ml_collections.ConfigDict(dict(clients=1, data=1, fsdp=-1,
                                        rules=sharding.DEFAULT_RULES, offload_optimizer=False))
  context = dict(mode='federated', batch_size=16, micro_batch_size=0, clients_per_round=4,
                 num_devices=8)
  for key, value in overrides.items():
    if key in context:
      context[key] = value
    else:
      mesh[key] = value
  return sharding.MeshConfig.from_config(mesh, **context)


def test_mesh_defaults_use_the_remaining_devices():
  assert _mesh_config().fsdp == 8
  assert _mesh_config(clients=2).fsdp == 4
  assert _mesh_config(data=2, batch_size=4).fsdp == 2  # the most that split the batch evenly
  assert _mesh_config(fsdp=2).num_devices == 2  # a part of the devices is allowed


@pytest.mark.parametrize('overrides, message', [
    (dict(fsdp=8, batch_size=4),
     r'data.batch_size=4 is not divisible by mesh.data x mesh.fsdp = 8'),
    (dict(fsdp=8, micro_batch_size=4), r'data.micro_batch_size=4 is not divisible'),
    (dict(data=3, num_devices=3, batch_size=4), r'data.batch_size=4 is not divisible by mesh.data'),
    (dict(clients=3), r'mesh.clients x mesh.data = 3 x 1 does not divide the 8 local devices'),
    (dict(data=2, fsdp=8), r'= 1 x 2 x 8 does not divide the 8 local devices'),
    (dict(clients=3, num_devices=6, clients_per_round=4),
     r'fl.clients_per_round=4 is not divisible by mesh.clients=3'),
    (dict(clients=2, mode='centralized'), r"mesh.clients=2 .* needs mode='federated'"),
    (dict(fsdp=0), r'mesh.fsdp must be a positive integer or -1'),
    (dict(rules=(('embed', 'clients'),)), r"mesh.rules: 'embed' maps to 'clients'"),
])
def test_mesh_config_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    _mesh_config(**overrides)


def test_parameters_that_the_mesh_cannot_split_are_an_error():
  with pytest.raises(ValueError, match=r"split the 'embed' axis \(36\) .* 8 ways"):
    _layout(fsdp=8).params(dataclasses.replace(MODEL, d_model=36, num_heads=4))


def _run_config(**mesh):
  config = tiny.get_config('test')
  config.seed = 2  # round 1: client 0 crashes, client 1 returns NaN, clients 2 and 3 are fine
  config.opt.eps = OPT.eps  # see the module docstring
  config.eval.max_batches = 1
  config.fl.rounds, config.fl.local_steps = 1, 2
  config.fl.fault.failure_prob, config.fl.fault.nan_prob = 0.2, 0.2
  config.log.tensorboard, config.ckpt.every_rounds = False, 0
  config.mesh.update(mesh)
  return config


def test_round_loop_with_parallel_clients_and_faults_matches_sequential(tmp_path):
  """train.run with mesh.clients=2: groups of 2 (one with a crashed and a NaN client) give the
  sequential run's round."""
  sequential = train.run(_run_config(fsdp=4), str(tmp_path / 'sequential'))
  parallel = train.run(_run_config(clients=2, fsdp=4), str(tmp_path / 'parallel'))
  for run in (sequential, parallel):
    assert sorted(run.last_round.failed_clients) == [0, 1]
    assert run.last_round.num_aggregated == 2
  np.testing.assert_allclose(parallel.last_round.train_loss, sequential.last_round.train_loss,
                             rtol=RTOL)
  _assert_close(jax.device_get(parallel.params), jax.device_get(sequential.params))


def test_base_config_rules_are_the_default_rules():
  assert base.get_config().mesh.rules == sharding.DEFAULT_RULES
