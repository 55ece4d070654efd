"""The lm-eval tasks shipped in tests/data/lm_eval: well formed (always), and, where lm-eval is
installed (it is not a dependency: docs/evaluation.md), scored on a tiny Hugging Face model with
the byte perplexity checked against transformers."""

import glob
import json
import math
import os
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(REPO, 'tests', 'data', 'lm_eval')


def _tasks():
  out = {}
  for path in sorted(glob.glob(os.path.join(TASKS, '*.yaml'))):
    with open(path, encoding='utf-8') as f:
      out[os.path.basename(path)] = yaml.safe_load(f)
  return out


def _records(task):
  with open(os.path.join(REPO, task['dataset_kwargs']['data_files']['test']),
            encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def test_the_tasks_read_their_local_files_and_fields():
  tasks = _tasks()
  assert sorted(t['task'] for t in tasks.values()) == ['fedjax_pt_choice', 'fedjax_pt_sample']
  for task in tasks.values():
    assert task['dataset_path'] == 'json' and task['test_split'] == 'test'
    records = _records(task)
    assert len(records) >= 4
    if task['output_type'] == 'loglikelihood_rolling':
      assert task['doc_to_target'] == '{{text}}'
      assert all(isinstance(r['text'], str) and r['text'].strip() for r in records)
    else:
      assert task['output_type'] == 'multiple_choice'
      for r in records:
        assert isinstance(r['context'], str) and len(r['choices']) >= 2
        assert 0 <= r['label'] < len(r['choices'])


def test_lm_eval_scores_a_tiny_model_and_its_byte_perplexity_is_transformers(tmp_path):
  pytest.importorskip('lm_eval', reason="lm-eval is not a dependency (pip install 'lm-eval[hf]'; "
                      'docs/evaluation.md)')
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
    bpe.train_from_iterator([f.read()], trainers.BpeTrainer(
        vocab_size=512, special_tokens=['<|endoftext|>'],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token='<|endoftext|>',
                                             bos_token='<|endoftext|>')
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=512, n_positions=128, n_embd=32, n_layer=2, n_head=2,
      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).eval()
  model_dir = str(tmp_path / 'model')
  model.save_pretrained(model_dir)
  tok.save_pretrained(model_dir)
  env = {**os.environ, 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1',
         'HF_DATASETS_CACHE': str(tmp_path / 'datasets')}
  result = subprocess.run(
      [sys.executable, '-m', 'lm_eval', '--model', 'hf', '--model_args',
       f'pretrained={model_dir},dtype=float32', '--tasks', 'fedjax_pt_sample,fedjax_pt_choice',
       '--include_path', TASKS, '--device', 'cpu', '--batch_size', '4', '--output_path',
       str(tmp_path / 'out')],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  (path,) = glob.glob(str(tmp_path / 'out' / '**' / 'results_*.json'), recursive=True)
  with open(path, encoding='utf-8') as f:
    scores = json.load(f)['results']
  assert 0 <= scores['fedjax_pt_choice']['acc,none'] <= 1

  # loglikelihood_rolling: each document's tokens after an end-of-text, over its UTF-8 bytes.
  log_likelihood, num_bytes = 0.0, 0
  with torch.no_grad():
    for record in _records(_tasks()['fedjax_pt_sample.yaml']):
      ids = [tok.eos_token_id, *tok(record['text'], add_special_tokens=False)['input_ids']]
      logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0]
      log_likelihood += float(torch.log_softmax(logits, -1)[range(len(ids) - 1), ids[1:]].sum())
      num_bytes += len(record['text'].encode('utf-8'))
  expected = math.exp(-log_likelihood / num_bytes)
  assert scores['fedjax_pt_sample']['byte_perplexity,none'] == pytest.approx(expected, rel=1e-4)
