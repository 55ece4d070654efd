"""The memory estimate: exact for parameters and optimizer state, a lower bound overall (checked
against XLA's compiled memory analysis of the local step), and the up-front refusal."""

import jax
import numpy as np
import pytest

from configs import tiny
from fedjax_pt import build
from fedjax_pt import memory
from fedjax_pt.run_spec import RunSpec


def _estimate_and_xla(config):
  spec = RunSpec.from_config(config)
  model_cfg = build.model_config(config)
  est = memory.estimate(spec, model_cfg)
  model = build.build_model(model_cfg, spec.opt, spec.mesh, spec.data.micro_batch_size)
  batch = jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len + 1), np.int32)
  state = model.trainer.init(model.params, 0)
  analysis = model.trainer.train_step.lower(state, batch).compile().memory_analysis()
  return est, analysis, model


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_estimate_is_a_lower_bound_of_the_compiled_step(remat):
  config = tiny.get_config()
  config.model.remat = remat
  config.mesh.fsdp = 1
  est, analysis, model = _estimate_and_xla(config)
  n = sum(x.size for x in jax.tree.leaves(model.params))
  assert est.params == 4 * n and est.optimizer == 8 * n  # float32 values, two Adam moments
  # The step's arguments are the parameters, two moments and the batch: exact up to the batch.
  assert 0 <= analysis.argument_size_in_bytes - 3 * est.params < 1e5
  xla = analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
  local = est.params + est.gradients + est.optimizer + est.activations
  # Measured on XLA:CPU: 1.9x (none) and 3.0x (full remat, which XLA:CPU does not turn into a
  # saving here); below 1 the estimate would refuse runs that fit.
  assert 1.0 <= xla / local <= 4.0, (xla, local)


def test_fsdp_splits_the_parameters_over_the_devices():
  config = tiny.get_config()
  config.mesh.fsdp = 8  # conftest: 8 fake devices
  spec = RunSpec.from_config(config)
  split = memory.estimate(spec, build.model_config(config))
  config.mesh.fsdp = 1
  whole = memory.estimate(RunSpec.from_config(config), build.model_config(config))
  # Every matrix is split along d_model; only the norm scales (d_model values each) are not.
  norms = 4 * (2 * 2 + 1) * 128
  assert split.params == pytest.approx((whole.params - norms) / 8 + norms, abs=8)
  assert split.activations == pytest.approx(whole.activations / 8)


def test_a_run_that_cannot_fit_is_refused_naming_what_it_needs():
  config = tiny.get_config()
  config.data.batch_size, config.data.seq_len, config.model.max_seq_len = 4096, 2048, 2048
  spec = RunSpec.from_config(config)
  est = memory.estimate(spec, build.model_config(config))
  with pytest.raises(ValueError, match=r'this run needs at least [\d.]+ GiB of memory .* but cpu '
                     r'has [\d.]+ GiB \(MemAvailable of this host\); lower data.batch_size'):
    memory.check_fits(est)
