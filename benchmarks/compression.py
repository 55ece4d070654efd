"""Encode/decode time of the clients' messages for a config's parameter tree, as a share of a round.

  python -m benchmarks.compression                          # configs/125m.py, every codec
  python -m benchmarks.compression --config=configs/tiny.py

Times what a round adds per client for communication, with the code the run uses: the client's
`compression.compress_delta` (delta, error-feedback residual, encode) and the server's
`compression.decode`, on random float32 arrays of the model's shapes (`jax.eval_shape`: nothing
is trained, and the codecs' speed does not depend on the values). The round it is compared with is
the local training of one client, tau local steps of the config's batch, at this device's own
peak matmul rate measured in the same run: a lower bound on the round's time (100% MFU), so the
share printed is an upper bound. The clients encode at the same time, each on its own machine; the
server decodes the K = fl.clients_per_round messages one after another: the share counts one
encode and K decodes.
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from benchmarks import harness
from fedjax_pt.federated import compression
from fedjax_pt import data as data_lib
from fedjax_pt import model as model_lib

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/125m.py', lock_config=True)
_REPEATS = flags.DEFINE_integer('repeats', 3, 'timed calls per codec (the fastest is kept)')
_VOCAB = flags.DEFINE_integer('vocab', 50277, "the tokenizer's vocabulary (GPT-NeoX-20B's), "
                              'padded as the run pads it')


def main(_):
  config = _CONFIG.value
  vocab = data_lib.padded_vocab_size(_VOCAB.value) if config.data.tokenizer != 'bytes' else 384
  model_cfg = model_lib.ModelConfig.from_config(config.model, vocab_size=vocab,
                                                seq_len=config.data.seq_len)
  shapes = jax.eval_shape(lambda: model_lib.init_params(model_cfg, jax.random.key(0)))
  rng = np.random.default_rng(0)
  theta = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape), jnp.float32), shapes)
  local = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(0, 1e-3, p.shape), jnp.float32),
                       theta)
  residual = jax.tree.map(jnp.zeros_like, theta)
  count = model_lib.param_count(model_cfg)
  print(harness.device_line())
  print(f'model: {count:,} parameters ({count * 4 / 1e6:.1f} MB float32), '
        f'{len(jax.tree.leaves(shapes))} arrays')

  fl, data = config.fl, config.data
  tokens = fl.local_steps * data.batch_size * data.seq_len
  flops = model_lib.flops_per_token(model_cfg, data.seq_len) * tokens
  peak = harness.peak_matmul_flops(2048, jnp.float32)
  round_s = flops / peak
  print(f'round: tau={fl.local_steps} x {data.batch_size} x {data.seq_len} tokens = '
        f'{flops:.3g} FLOPs; at the measured peak of {peak / 1e9:.0f} GFLOP/s (float32 2048^3 '
        f'matmul) >= {round_s:,.0f} s')
  k = fl.clients_per_round
  comp = compression.CompressionConfig.from_config(fl.compression)
  codec_args = dict(block_size=comp.block_size, topk=comp.topk)  # the config's blocks and top-k
  print(f'{"codec":>6} {"ef":>3} {"message":>10} {"ratio":>6} {"encode":>9} {"decode":>9} '
        f'{f"share of a round (1 encode + {k} decodes)":>40}')
  for codec in compression.CODECS:
    for error_feedback in (False, True):
      carried = residual if error_feedback else None
      encode_s = harness.best_time(
          lambda: compression.compress_delta(local, theta, carried, codec, **codec_args),
          _REPEATS.value)
      payload, _ = compression.compress_delta(local, theta, carried, codec, **codec_args)
      decode_s = harness.best_time(lambda: compression.decode(payload), _REPEATS.value)
      size = compression.payload_bytes(payload)
      print(f'{codec:>6} {"yes" if error_feedback else "no":>3} {size / 1e6:>8.1f}MB '
            f'{count * 4 / size:>5.2f}x {encode_s * 1e3:>7.0f}ms {decode_s * 1e3:>7.0f}ms '
            f'{(encode_s + k * decode_s) / round_s:>40.2e}')


if __name__ == '__main__':
  app.run(main)
