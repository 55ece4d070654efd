"""init.from_hf: a Hugging Face directory back into fedjax_pt. Export then import is bit-exact for
every variant (and for what `transformers` itself saves); a warm start from it evaluates as the
source run did; directories that do not match are refused in one line before any data is read."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from fedjax_pt import errors
from fedjax_pt import export as export_lib
from fedjax_pt import hf_format
from fedjax_pt import hf_import
from fedjax_pt import model as model_lib
from fedjax_pt import run_spec
from fedjax_pt import train
from fedjax_pt import trained_model
from fedjax_pt.configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {
    'learned': {},
    'alibi': {'position_embedding': 'alibi'},
    'rope': {'position_embedding': 'rope'},
    'llama_gqa_untied': {'family': 'llama', 'position_embedding': 'rope', 'num_kv_heads': 2,
                         'tie_embeddings': False, 'mlp_dim': 96},
}


def _cfg(**overrides):
  base = dict(vocab_size=384, d_model=32, num_layers=2, num_heads=4, mlp_ratio=4, max_seq_len=16)
  return model_lib.ModelConfig(**(base | overrides))


def _write(cfg, params, directory):
  os.makedirs(directory, exist_ok=True)
  save_file(hf_format.to_hf(cfg, params), os.path.join(directory, 'model.safetensors'),
            metadata={'format': 'pt'})
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(hf_format.hf_config(cfg, bos_token_id=0, eos_token_id=0, torch_dtype='float32'), f)


def _bitwise_equal(a, b) -> bool:
  return jax.tree.all(jax.tree.map(
      lambda x, y: np.asarray(x).dtype == np.asarray(y).dtype and
      np.array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32)), a, b))


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_round_trip_is_bit_exact(variant, tmp_path):
  cfg = _cfg(**VARIANTS[variant])
  params = jax.tree.map(np.asarray, model_lib.init_params(cfg, jax.random.key(3)))
  _write(cfg, params, tmp_path)
  back = hf_import.read_params(hf_import.find(str(tmp_path), cfg), cfg)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  assert _bitwise_equal(back, params)


@pytest.mark.parametrize('variant', ['rope', 'llama_gqa_untied'])
def test_what_transformers_saves_imports_bit_exact(variant, tmp_path):
  """transformers renames and drops tensors when it saves (GPT-NeoX's embed_out is lm_head in
  5.x; tied matrices are written once): its own save_pretrained output must import too."""
  import torch  # pylint: disable=g-import-not-at-top  (the test extra installs both)
  import transformers  # pylint: disable=g-import-not-at-top
  cfg = _cfg(**VARIANTS[variant])
  params = jax.tree.map(np.asarray, model_lib.init_params(cfg, jax.random.key(4)))
  _write(cfg, params, tmp_path / 'ours')
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'ours'),
                                                            dtype=torch.float32)
  model.save_pretrained(str(tmp_path / 'theirs'))
  back = hf_import.read_params(hf_import.find(str(tmp_path / 'theirs'), cfg), cfg)
  assert _bitwise_equal(back, params)


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """A 2-round tiny run and its float32 export."""
  workdir = str(tmp_path_factory.mktemp('source'))
  result = train.run(_config(), workdir)
  out = str(tmp_path_factory.mktemp('export') / 'hf')
  export_lib.export(workdir, out)
  return workdir, out, result


def _config():
  config = tiny.get_config('test')
  config.fl.num_clients = config.fl.clients_per_round = 2
  config.log.tensorboard = False
  return config


def test_export_then_import_gives_the_checkpoint_bit_exact(source):
  workdir, out, _ = source
  model = trained_model.load(workdir)
  back = hf_import.read_params(hf_import.find(out, model.cfg), model.cfg)
  assert _bitwise_equal(back, jax.tree.map(np.asarray, model.params))


def test_warm_start_from_hf_evaluates_as_the_source_run(source, tmp_path):
  """Round 0 evaluates the imported parameters (sharded over the 8 test devices) on the same
  held-out data as the source's last round."""
  _, out, before = source
  config = _config()
  config.fl.rounds = 1
  config.init.from_hf = out
  result = train.run(config, str(tmp_path))
  assert result.rounds[0].val_loss == before.last_round.val_loss
  assert result.rounds[1].val_loss < result.rounds[0].val_loss


def test_both_init_keys_are_refused():
  config = _config()
  config.init.from_checkpoint, config.init.from_hf = 'runs/a', 'hf/b'
  with pytest.raises(ValueError, match=r'^init\.from_checkpoint=runs/a and init\.from_hf=hf/b '
                     'are both set'):
    run_spec.RunSpec.from_config(config)


def _main(tmp_path, *overrides):
  done = subprocess.run([sys.executable, '-m', 'fedjax_pt.main',
                         '--config=fedjax_pt/configs/tiny.py:test', f'--workdir={tmp_path / "w"}',
                         *overrides], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == errors.EXIT_BAD_INPUT, done.stderr
  lines = [l for l in done.stderr.splitlines() if 'error' in l]
  assert len(lines) == 1, done.stderr
  assert not os.path.exists(tmp_path / 'w' / 'metrics.jsonl')  # refused before training
  return lines[0]


def test_mismatched_config_is_one_line_before_training(source, tmp_path):
  _, out, _ = source
  line = _main(tmp_path, f'--config.init.from_hf={out}', '--config.model.d_model=64')
  assert line == f'fedjax_pt: error: init.from_hf={out}: model.d_model=64 here, n_embd=32 there'


def test_another_architecture_is_one_line(tmp_path):
  bert = tmp_path / 'bert'
  bert.mkdir()
  (bert / 'config.json').write_text(json.dumps(
      {'architectures': ['BertForMaskedLM'], 'model_type': 'bert', 'hidden_size': 32}))
  line = _main(tmp_path, f'--config.init.from_hf={bert}')
  assert "architectures=['BertForMaskedLM'] (model_type='bert')" in line
  assert 'GPT2LMHeadModel' in line  # what it reads instead


def test_mismatched_tensor_shape_is_named(tmp_path):
  cfg = _cfg()
  _write(cfg, model_lib.init_params(cfg, jax.random.key(0)), tmp_path)
  tensors = load_file(str(tmp_path / 'model.safetensors'))
  tensors['transformer.h.1.mlp.c_fc.weight'] = tensors['transformer.h.1.mlp.c_fc.weight'][:, :64]
  save_file(tensors, str(tmp_path / 'model.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(hf_format.HFFormatError, match=r'transformer\.h\.1\.mlp\.c_fc\.weight is '
                     r'\[32, 64\] there, \[32, 128\]'):
    hf_import.find(str(tmp_path), cfg)


def test_nonzero_bias_and_other_activation_are_refused(tmp_path):
  """A real GPT-2 has biases and the tanh GELU: neither is fedjax_pt's model."""
  cfg = _cfg()
  _write(cfg, model_lib.init_params(cfg, jax.random.key(0)), tmp_path)
  tensors = load_file(str(tmp_path / 'model.safetensors'))
  tensors['transformer.h.0.attn.c_attn.bias'][5] = 0.25
  save_file(tensors, str(tmp_path / 'model.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(hf_format.HFFormatError,
                     match=r'transformer\.h\.0\.attn\.c_attn\.bias is a nonzero bias'):
    hf_import.read_params(hf_import.find(str(tmp_path), cfg), cfg)
  config = json.loads((tmp_path / 'config.json').read_text())
  config['activation_function'] = 'gelu_new'
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(hf_format.HFFormatError, match=r"activation_function='gelu_new' there"):
    hf_import.find(str(tmp_path), cfg)


def test_config_keys_are_read_as_transformers_reads_them(tmp_path):
  """A key left out or null means transformers' default: GPT-2's n_inner=null is 4 * n_embd, a
  missing activation_function is the tanh 'gelu_new' (not fedjax_pt's); what changes the
  arithmetic (untied output, scaled rotary positions) is refused by name."""
  cfg = _cfg()
  _write(cfg, model_lib.init_params(cfg, jax.random.key(0)), tmp_path)
  config = json.loads((tmp_path / 'config.json').read_text())
  config['n_inner'] = None
  (tmp_path / 'config.json').write_text(json.dumps(config))
  hf_import.find(str(tmp_path), cfg)
  for key, value, message in (('activation_function', None, "activation_function='gelu_new'"),
                              ('tie_word_embeddings', False, 'tie_word_embeddings=False')):
    changed = dict(config)
    if value is None:
      del changed[key]
    else:
      changed[key] = value
    (tmp_path / 'config.json').write_text(json.dumps(changed))
    with pytest.raises(hf_format.HFFormatError, match=message):
      hf_import.find(str(tmp_path), cfg)
  llama = _cfg(**VARIANTS['llama_gqa_untied'])
  _write(llama, model_lib.init_params(llama, jax.random.key(0)), tmp_path / 'llama')
  config = json.loads((tmp_path / 'llama' / 'config.json').read_text())
  config['rope_parameters'] = {'rope_type': 'llama3', 'rope_theta': 10000.0, 'factor': 8.0}
  (tmp_path / 'llama' / 'config.json').write_text(json.dumps(config))
  with pytest.raises(hf_format.HFFormatError, match="rope_type='llama3' there"):
    hf_import.find(str(tmp_path / 'llama'), llama)


def test_a_tensor_the_model_lacks_is_refused(tmp_path):
  cfg = _cfg(**VARIANTS['llama_gqa_untied'])
  _write(cfg, model_lib.init_params(cfg, jax.random.key(0)), tmp_path)
  tensors = load_file(str(tmp_path / 'model.safetensors'))
  tensors['model.layers.0.self_attn.q_proj.bias'] = np.zeros(32, np.float32)
  save_file(tensors, str(tmp_path / 'model.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(hf_format.HFFormatError,
                     match=r'model\.layers\.0\.self_attn\.q_proj\.bias there has no place'):
    hf_import.find(str(tmp_path), cfg)
