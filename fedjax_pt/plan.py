"""What a config would train and whether it fits, without reading data or allocating the model.

`python -m fedjax_pt.main --config=... --config.dry_run=True` prints `describe(config)`.
"""

import jax
import ml_collections

from fedjax_pt import build
from fedjax_pt import memory
from fedjax_pt import model as model_lib
from fedjax_pt.run_spec import RunSpec


def describe(config: ml_collections.ConfigDict) -> str:
  """What `config` would train, and whether it fits: without reading data or allocating."""
  unset_path = config.data.source != 'builtin' and not config.data.path
  if unset_path:  # the plan reads no data: describe the paper configs before the data exists
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.data.path = '<data.path>'
  spec = RunSpec.from_config(config)
  model_cfg = build.model_config(config)
  estimate = memory.estimate(spec, model_cfg)
  have, source = memory.available_bytes(jax.devices()[0])
  lines = [f'model: {model_lib.param_count(model_cfg):,} parameters, d_model {model_cfg.d_model}, '
           f'{model_cfg.num_layers} layers, {model_cfg.num_heads} heads, vocab '
           f'{model_cfg.vocab_size}, seq {spec.data.seq_len}, {model_cfg.dtype}',
           f'training FLOPs per token: {model_lib.flops_per_token(model_cfg, spec.data.seq_len):.3g}',
           f'mesh: clients {spec.mesh.clients} x data {spec.mesh.data} x fsdp {spec.mesh.fsdp} of '
           f'{jax.device_count()} {jax.devices()[0].platform} device(s)',
           f'memory per device, at least: {estimate.total / memory.GIB:.2f} GiB '
           f'({estimate.breakdown()})',
           'device memory: ' + (f'{have / memory.GIB:.1f} GiB ({source})' if have else source)]
  if unset_path:
    lines.append(f'data: {config.data.source}, data.path is not set (training needs it)')
  try:
    memory.check_fits(estimate)
    lines.append('fits: yes, by this lower bound')
  except ValueError as e:
    lines.append('fits: no; ' + str(e).split('; ', 1)[1])
  return '\n'.join(lines)
