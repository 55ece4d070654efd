"""Base config: every key that the CLI contract (DESIGN.md) names, with the paper's local recipe.

Model-size configs (`tiny.py`, `75m.py`, ...) start from `get_config()` here and override groups.
Any key can be overridden on the command line: `--config.fl.outer_lr=0.7`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = 'federated'  # 'federated' | 'centralized'
  c.seed = 0
  c.dry_run = False  # print the model's size, FLOPs per token and memory estimate, then exit

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
  c.model.family = 'mpt'  # 'mpt' (the paper's block) | 'llama' (RMSNorm, SwiGLU, rotary, GQA)
  c.model.num_kv_heads = 0  # 0: num_heads; fewer: grouped-query attention (llama)
  c.model.mlp_dim = 0  # 0: mlp_ratio * d_model (mpt), 8/3 d_model rounded up to 64 (llama)
  c.model.tie_embeddings = True  # False: a separate output matrix (llama)
  c.model.rope_theta = 10000.0  # rotary base (position_embedding='rope')
  c.model.norm_eps = 1e-6  # LayerNorm / RMSNorm epsilon

  c.opt = ml_collections.ConfigDict()
  c.opt.lr = 6e-4
  c.opt.warmup_steps = 100
  c.opt.schedule_steps = 4800  # warmup + cosine decay length, in local steps.
  c.opt.final_lr_ratio = 0.1
  c.opt.b1 = 0.9
  c.opt.b2 = 0.95
  c.opt.eps = 1e-8
  c.opt.weight_decay = 0.0
  c.opt.grad_clip = 1.0  # global norm of the gradient; 0: no clipping
  # 'adamw' | 'muon': Muon (momentum orthogonalised by Newton-Schulz) on the blocks' 2-D kernels,
  # AdamW (the keys above) on embeddings and norms, as MuLoCo does. The muon_* keys are Muon's
  # only (refused with 'adamw'); its lr follows the same warmup + cosine schedule.
  c.opt.optimizer = 'adamw'
  c.opt.muon_lr = 0.02
  c.opt.muon_beta = 0.95  # Nesterov momentum of Muon
  c.opt.muon_ns_steps = 5  # Newton-Schulz iterations

  c.fl = ml_collections.ConfigDict()
  c.fl.num_clients = 8
  c.fl.clients_per_round = 8
  c.fl.rounds = 10
  c.fl.local_steps = 500
  c.fl.outer_optimizer = 'nesterov'  # 'nesterov' | 'sgd' | 'adam'
  c.fl.outer_lr = 0.1
  c.fl.outer_momentum = 0.9
  c.fl.outer_b2 = 0.95  # only for outer_optimizer='adam'
  # Outer warmups: round r uses outer_lr * min(1, r / R) (and the same ramp for the momentum).
  # From scratch they damp Nesterov's early overshoot; 0: none.
  c.fl.outer_lr_warmup_rounds = 0
  c.fl.outer_momentum_warmup_rounds = 0
  c.fl.reset_optimizer = True
  c.fl.weighting = 'tokens'  # 'tokens' (w_k ∝ n_k) | 'uniform'
  # Robust aggregation of the decoded deltas (fedjax_pt/federated/robust.py): 'mean' |
  # 'trimmed_mean' | 'median' (per coordinate, unweighted: need fl.weighting='uniform') |
  # 'norm_clipped' (each delta bounded to aggregation_clip x the median delta norm, then the
  # weighted mean). The robust rules keep all fl.clients_per_round deltas until the last report;
  # not with fl.dp or fl.secagg.
  c.fl.aggregation = 'mean'
  c.fl.aggregation_trim = 1.0  # trimmed_mean: clients dropped per end (a count; < 1: a fraction)
  c.fl.aggregation_clip = 2.0  # norm_clipped: the bound, in multiples of the median delta norm
  # Client faults: a client that raises, returns NaN/Inf or reports after the deadline is left out.
  c.fl.min_clients = 1  # fewest usable clients for the round to update the global model
  c.fl.round_timeout_s = 0.0  # a client's deadline in seconds (0: none)
  c.fl.round_deadline_s = 0.0  # the same in simulated seconds (federated/sim_clock.py; 0: none)
  c.fl.on_too_few_clients = 'retry'  # 'retry' (resample, up to max_round_retries) | 'skip'
  c.fl.max_round_retries = 2
  c.fl.fault = ml_collections.ConfigDict()  # seeded fault injection, for testing robustness
  c.fl.fault.failure_prob = 0.0  # a sampled client crashes
  c.fl.fault.nan_prob = 0.0  # a sampled client returns NaN parameters
  # Finite but wrong deltas, every round from the clients in poison_clients: 'none' | 'scale'
  # (x poison_scale) | 'sign_flip' | 'noise' (Gaussian, of the delta's norm) | 'stale' (zero delta)
  c.fl.fault.poison = 'none'
  c.fl.fault.poison_clients = ()  # e.g. (0,)
  c.fl.fault.poison_scale = 10.0  # poison='scale' only
  # Communication (fedjax_pt/federated/compression.py): clients send their delta theta_k - theta,
  # the server broadcasts theta; each direction is encoded with a codec, with exact wire sizes in
  # the records.
  c.fl.compression = ml_collections.ConfigDict()
  c.fl.compression.upload = 'none'  # 'none' (float32) | 'bf16' | 'int8' | 'int4' | 'topk': deltas
  c.fl.compression.download = 'none'  # the same codecs but 'topk' for the global model
  c.fl.compression.block_size = 64  # values sharing one float32 absmax scale (int8, int4); even
  c.fl.compression.error_feedback = False  # clients add what earlier messages lost to the next
  # 'topk' (fedjax_pt/federated/topk.py; SparseLoCo: 1/64, 2 bits, error feedback, outer
  # momentum 0): of each chunk of consecutive values keep max(1, round(fraction * chunk)).
  c.fl.compression.topk_fraction = 1 / 64  # in (0, 1]
  c.fl.compression.topk_chunk = 64  # values a chunk (positions: uint8 up to 256, else uint16)
  c.fl.compression.topk_bits = 2  # 2 | 4 | 8 bits a kept value, plus one float32 scale a chunk
  # Streaming fragments (fedjax_pt/federated/fragments.py, Streaming DiLoCo): the model in F
  # fragments of consecutive layers; fragment f syncs at local steps f * local_steps / F + k *
  # local_steps.
  c.fl.fragments = 1  # F (at most local_steps); F > 1 needs every client in every round
  c.fl.fragment_mixing = 0.0  # alpha: a client takes alpha * own + (1 - alpha) * global fragment
  # Overlapped rounds: a client trains the next round on from its own model while its delta
  # travels and the server steps, and rebases onto the new global model when it has trained
  # (one-step-delayed outer updates; fedjax_pt/federated/client_round.py).
  c.fl.overlap = False
  # Quorum rounds (fedjax_pt/federated/quorum.py, on the simulated clock): the server steps once
  # fl.quorum updates are in (0: every sampled client's), fl.grace_s simulated seconds after the
  # quorum-th; later ones are kept and merged into a later step with weight x (1 + staleness) ^
  # -fl.staleness_exponent (FedAsync's polynomial rule), their clients resampled after that.
  c.fl.quorum = 0
  c.fl.grace_s = 0.0
  c.fl.staleness_exponent = 0.5
  # Heterogeneous clients (fedjax_pt/federated/profiles.py): per-client batch, local steps or time
  # budget, throughput, links and availability, as a JSON list inline or a .json/.yaml file; '' =
  # identical.
  c.fl.profiles = ''
  # What a deployment's transport adds to every client's round trip in the simulated clock
  # (federated/sim_clock.py), as `python -m benchmarks.deploy_clock` measures it for Flower; 0: the
  # ideal transport (only fl.profiles' links and latency cost time).
  c.fl.clock = ml_collections.ConfigDict()
  c.fl.clock.round_trip_s = 0.0  # fixed: dispatch, polling, a fresh ClientApp process, its build
  c.fl.clock.transport_mbps = 0.0  # the transport's own rate, serial with the links (0: no time)
  # Client-level differential privacy (fedjax_pt/federated/privacy.py, DP-FedAvg): each client's
  # delta is clipped to clip_norm, Gaussian noise of std noise_multiplier * clip_norm is added to
  # their sum; (epsilon, delta) after every round is in the records (dp_epsilon, dp_delta).
  c.fl.dp = ml_collections.ConfigDict()
  c.fl.dp.enabled = False
  c.fl.dp.clip_norm = 1.0  # C, the largest L2 norm of a client's delta ('inf': no clipping)
  c.fl.dp.noise_multiplier = 1.0  # sigma
  c.fl.dp.noise_at = 'server'  # 'server' | 'clients' (each adds its share; needed with secagg)
  c.fl.dp.delta = 1e-5
  c.fl.dp.accountant = 'rdp'  # 'rdp' | 'pld' (dp-accounting)
  # Secure aggregation (Flower's SecAgg+; deployment only, fedjax_pt/deploy/secure.py): the server
  # receives only the sum of the clients' deltas, quantised to quantization_bits over
  # [-clip_range, clip_range]: the decoded mean is within 2 * clip_range / 2**bits of the plain
  # mean, per value, for deltas inside the range (values outside are clipped, and counted).
  c.fl.secagg = ml_collections.ConfigDict()
  c.fl.secagg.enabled = False
  c.fl.secagg.clip_range = 1.0
  c.fl.secagg.quantization_bits = 22
  c.fl.secagg.num_shares = 1.0  # fraction of the sampled clients each one shares its keys with
  c.fl.secagg.reconstruction_threshold = 0.67  # fraction of the shares that rebuild a key
  c.fl.secagg.timeout_s = 0.0  # each protocol stage waits this long for replies (0: forever)

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
  # The partition into clients and the held-out documents; `seed` orders batches and inits the
  # model. -1: `seed` does both (runs from before data.seed existed resume unchanged). Fix it to
  # score a sweep over `seed` on one validation set.
  c.data.seed = -1
  # A directory where the tokenised corpus is kept (fedjax_pt/data/token_cache.py), keyed by the
  # content of the corpus files, the tokenizer and the options that change the tokens: a later run
  # or round maps it from disk instead of tokenising again; a corpus of files is kept per file
  # too, so a file added to it costs that file's tokenisation. '': off (a Flower node uses one by
  # default: its cache-dir). Not for data.source='tfds'.
  c.data.cache_dir = ''

  # Local training on a mesh of clients x data x fsdp devices (fedjax_pt/sharding.py): this
  # process's devices, or those of every process of a multi-host client (fedjax_pt/distributed.py).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.clients = 1  # P clients train at once, each on its own data x fsdp devices
  c.mesh.data = 1  # data-parallel replicas within a client (parameters replicated)
  c.mesh.fsdp = -1  # parameter-sharded devices within a client; -1: the remaining devices
  # (logical axis, mesh axes) pairs; default: batch over data x fsdp, matrices split along d_model.
  c.mesh.rules = (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('vocab', None), ('pos', None),
                  ('heads', None), ('mlp', None), ('norm', None))
  c.mesh.offload_optimizer = False  # keep the optimizer state in pinned host memory between steps
  c.mesh.memory_check = True  # refuse, before any work, a run that cannot fit the devices' memory
  # One client on several processes/hosts (jax.distributed; `python -m fedjax_pt.launch_local`).
  c.mesh.num_processes = 1  # 1: this process alone; 0: detect from the cluster (SLURM, Open MPI)
  c.mesh.process_id = 0  # this process's index, 0 .. num_processes-1 (0 writes the files)
  c.mesh.coordinator = ''  # 'host:port' where process 0 serves; the same on every process
  c.mesh.heartbeat_timeout_s = 100  # a process silent this long is dead, and all others stop
  c.mesh.init_timeout_s = 300  # how long processes wait for each other to start

  # Warm start (either mode): the first session takes its parameters from another run's
  # checkpoint (a workdir: its latest; or workdir/checkpoints/N), with fresh optimizer states.
  # `init.step` = S makes the lr schedule continue from local step S (e.g. the steps of the
  # pre-training run) instead of starting again from its warmup. A resumed run ignores both.
  c.init = ml_collections.ConfigDict()
  c.init.from_checkpoint = ''  # ('init.from' cannot be a key: `from` is a Python keyword)
  # Or from a Hugging Face model directory (`python -m fedjax_pt.export`'s, or an open model of a
  # supported architecture: docs/export.md) whose config matches model.*; not with from_checkpoint.
  c.init.from_hf = ''
  c.init.step = 0

  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every_rounds = 1  # 0: never (the last round is always saved otherwise)
  c.ckpt.keep = 3
  c.ckpt.restore = True  # resume from <workdir>/checkpoints; False refuses to reuse a workdir
  c.ckpt.async_save = True  # write checkpoint files while the next round trains

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 16
  c.eval.max_batches = 0  # 0: the whole validation set
  c.eval.every_rounds = 1
  c.eval.per_client = False  # also evaluate the server model on each client's held-out set
  # Also the perplexity on these held-out files: 'a.jsonl,b.txt' (each named by its stem) or
  # 'acme=a.jsonl,...'; batched and capped as the validation set (fedjax_pt/data/extra_files.py).
  c.eval.extra_files = ''

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 10
  c.log.progress = True  # progress bar, per-round lines and the end-of-run summary
  c.log.tensorboard = True  # TensorBoard event files in <workdir>/tensorboard
  c.log.per_layer_norms = False  # per-module norms of the global model and pseudo-gradient

  return c
