"""The same model and local step in eager PyTorch, as a yardstick for the JAX step on the same CPU.

Benchmark-only: PyTorch is never a dependency of fedjax_pt; `benchmarks/mfu.py` imports this module
only when torch is installed. `make_step` builds, for a `ModelConfig`, the decoder of
`fedjax_pt/model.py` (pre-LN without biases, exact GELU MLP, tied embeddings, learned positions,
causal attention through `scaled_dot_product_attention`) and one local step: float32
cross-entropy, backward, gradient clipping at the global norm and AdamW (PyTorch's default
implementation) with the config's betas, epsilon and weight decay. The learning rate is held at
the peak: its schedule costs nothing measurable.
"""

from collections.abc import Callable
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedjax_pt import model as model_lib
from fedjax_pt import optimizers


def unsupported(cfg: model_lib.ModelConfig) -> str | None:
  """Why the twin cannot mirror `cfg`, or None."""
  if cfg.position_embedding != 'learned':
    return f'position_embedding={cfg.position_embedding} (the twin has learned positions only)'
  if cfg.dtype != 'float32':
    return f'dtype={cfg.dtype} (the twin runs float32 only)'
  if cfg.remat != 'none':
    return f'remat={cfg.remat} (the twin does not recompute)'
  return None


def _decoder(cfg: model_lib.ModelConfig) -> nn.Module:

  def layer_norm():
    return nn.LayerNorm(cfg.d_model, eps=1e-6, bias=False)  # flax's epsilon

  def linear(d_in, d_out):
    layer = nn.Linear(d_in, d_out, bias=False)
    nn.init.normal_(layer.weight, std=cfg.init_std)
    return layer

  class Block(nn.Module):

    def __init__(self):
      super().__init__()
      self.norm_1, self.norm_2 = layer_norm(), layer_norm()
      self.wqkv = linear(cfg.d_model, 3 * cfg.d_model)
      self.out_proj = linear(cfg.d_model, cfg.d_model)
      self.up_proj = linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
      self.down_proj = linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)

    def forward(self, x_BxLxD):
      batch, length, _ = x_BxLxD.shape
      qkv = self.wqkv(self.norm_1(x_BxLxD)).view(batch, length, 3, cfg.num_heads, cfg.head_dim)
      q_BxNxLxH, k_BxNxLxH, v_BxNxLxH = qkv.permute(2, 0, 3, 1, 4)
      out = F.scaled_dot_product_attention(q_BxNxLxH, k_BxNxLxH, v_BxNxLxH, is_causal=True)
      x_BxLxD = x_BxLxD + self.out_proj(out.transpose(1, 2).reshape(batch, length, cfg.d_model))
      return x_BxLxD + self.down_proj(F.gelu(self.up_proj(self.norm_2(x_BxLxD))))

  class Decoder(nn.Module):

    def __init__(self):
      super().__init__()
      self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
      nn.init.normal_(self.wte.weight, std=cfg.init_std)
      self.wpe = nn.Parameter(torch.randn(cfg.max_seq_len, cfg.d_model) * cfg.init_std)
      self.blocks = nn.ModuleList([Block() for _ in range(cfg.num_layers)])
      self.norm_f = layer_norm()

    def forward(self, tokens_BxL):
      x_BxLxD = self.wte(tokens_BxL) + self.wpe[:tokens_BxL.shape[1]]
      for block in self.blocks:
        x_BxLxD = block(x_BxLxD)
      return self.norm_f(x_BxLxD) @ self.wte.weight.T

  return Decoder()


def make_step(cfg: model_lib.ModelConfig, opt_cfg: optimizers.OptConfig,
              batch_BxL1: np.ndarray) -> Callable[[], float]:
  """`step()` runs one local step on the token ids `batch_BxL1` and returns the loss."""
  torch.manual_seed(0)
  model = _decoder(cfg)
  optimizer = torch.optim.AdamW(model.parameters(), lr=opt_cfg.lr, betas=(opt_cfg.b1, opt_cfg.b2),
                                eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay)
  batch = torch.from_numpy(batch_BxL1).long()
  inputs_BxL, targets_BxL = batch[:, :-1], batch[:, 1:]

  def step() -> float:
    logits_BxLxV = model(inputs_BxL)
    loss = F.cross_entropy(logits_BxLxV.reshape(-1, cfg.vocab_size).float(),
                           targets_BxL.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if opt_cfg.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip)
    optimizer.step()
    return loss.item()

  return step


def step_window(step: Callable[[], float], steps: int) -> Callable[[], float]:
  """A timed window of `steps` steps (after two untimed ones), in seconds per step."""
  for _ in range(2):
    step()

  def window() -> float:
    start = time.perf_counter()
    for _ in range(steps):
      step()
    return (time.perf_counter() - start) / steps

  return window


def version_line() -> str:
  return f'torch {torch.__version__}, {torch.get_num_threads()} threads'


def peak_matmul_flops(size: int, repeats: int = 10) -> float:
  """FLOP/s of a size^3 float32 matmul in PyTorch (the JAX peak's counterpart)."""
  a, b = torch.randn(size, size), torch.randn(size, size)
  a @ b
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best
