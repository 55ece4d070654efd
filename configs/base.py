"""Base config: every key that the CLI contract (DESIGN.md) names, with the paper's local recipe.

Model-size configs (`tiny.py`, `75m.py`, ...) start from `get_config()` here and override groups.
Any key can be overridden on the command line: `--config.fl.outer_lr=0.7`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = 'federated'  # 'federated' | 'centralized'
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 0  # 0: the tokenizer's vocabulary padded to a multiple of 128.
  c.model.d_model = 128
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.mlp_ratio = 4
  c.model.max_seq_len = 0  # 0: data.seq_len.
  c.model.position_embedding = 'learned'  # 'learned' | 'rope' | 'alibi'
  c.model.dtype = 'float32'  # compute dtype; parameters stay float32 ('bfloat16' on GPUs).
  c.model.remat = 'none'  # 'none' | 'full' | 'dots' (save matmul outputs only)
  c.model.attention = 'xla'  # 'xla' | 'cudnn' (jax.nn.dot_product_attention implementation)
  c.model.init_std = 0.02

  c.opt = ml_collections.ConfigDict()
  c.opt.lr = 6e-4
  c.opt.warmup_steps = 100
  c.opt.schedule_steps = 4800  # warmup + cosine decay length, in local steps.
  c.opt.final_lr_ratio = 0.1
  c.opt.b1 = 0.9
  c.opt.b2 = 0.95
  c.opt.eps = 1e-8
  c.opt.weight_decay = 0.0
  c.opt.grad_clip = 1.0

  c.fl = ml_collections.ConfigDict()
  c.fl.num_clients = 8
  c.fl.clients_per_round = 8
  c.fl.rounds = 10
  c.fl.local_steps = 500
  c.fl.outer_optimizer = 'nesterov'  # 'nesterov' | 'sgd' | 'adam'
  c.fl.outer_lr = 0.1
  c.fl.outer_momentum = 0.9
  c.fl.outer_b2 = 0.95  # only for outer_optimizer='adam'
  c.fl.reset_optimizer = True
  c.fl.weighting = 'tokens'  # 'tokens' (w_k ∝ n_k) | 'uniform'

  c.data = ml_collections.ConfigDict()
  c.data.source = 'builtin'  # 'builtin' | 'jsonl' | 'text' | 'tfds'
  c.data.path = ''
  c.data.tfds_split = 'train'
  c.data.tfds_data_dir = ''
  c.data.text_field = 'text'
  c.data.tokenizer = 'bytes'  # 'bytes' | path to tokenizer.json | path to a SentencePiece .model
  c.data.seq_len = 128
  c.data.batch_size = 16  # sequences per client per local step
  c.data.micro_batch_size = 0  # 0: no gradient accumulation
  c.data.partition = 'iid'  # 'iid' | 'by_source' | 'dirichlet' | 'mapping'
  c.data.partition_key = 'url_domain'
  c.data.dirichlet_alpha = 1.0
  c.data.mapping_file = ''
  c.data.val_fraction = 0.05
  c.data.max_documents = 0
  c.data.max_bad_lines = 0
  c.data.shuffle = True
  c.data.only_client = -1  # k >= 0 with mode=centralized: client k trains alone on its shard

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 16
  c.eval.max_batches = 0  # 0: the whole validation set
  c.eval.every_rounds = 1
  c.eval.per_client = False  # also evaluate the server model on each client's held-out set

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 10
  c.log.progress = True  # progress bar, per-round lines and the end-of-run summary
  c.log.tensorboard = True  # TensorBoard event files in <workdir>/tensorboard
  c.log.per_layer_norms = False  # per-module norms of the global model and pseudo-gradient

  return c
