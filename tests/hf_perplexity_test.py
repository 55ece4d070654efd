"""hf_perplexity: a Hugging Face model's perplexity on a text file, against the loss transformers
computes itself (labels=input_ids), with the byte tokenizer of an export and with a tokenizer file;
on a run's export, the run's own extra_val_ppl; one-line errors."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

# The test extra installs both: a missing one is an error here, not a skip.
import torch
import transformers

from fedjax_pt import export
from fedjax_pt import hf_perplexity
from fedjax_pt import train
from fedjax_pt.configs import tiny
# pylint: enable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TEXT = ('Every organisation keeps its own text. The model they train together reads all of it '
         'in turn, round after round, and nobody sends a word of it to anybody else.\n\n'
         'A second paragraph: the file is split into documents at blank lines.\n')


def _model(directory, context=48, vocab=384, fedjax_tokenizer=None):
  """A random GPT-2 saved as `directory`; `fedjax_tokenizer` adds the key an export writes."""
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=vocab, n_positions=context, n_embd=32, n_layer=2,
                                   n_head=2, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
  transformers.GPT2LMHeadModel(config).save_pretrained(directory)
  if fedjax_tokenizer:
    with open(os.path.join(directory, 'config.json'), encoding='utf-8') as f:
      saved = json.load(f)
    saved['fedjax_pt'] = {'tokenizer': fedjax_tokenizer}
    with open(os.path.join(directory, 'config.json'), 'w', encoding='utf-8') as f:
      json.dump(saved, f)
  return str(directory)


def _reference_ppl(model_dir, tokens, seq_len):
  """exp(mean loss) of non-overlapping windows of seq_len + 1 tokens, as transformers computes
  the loss itself when given labels (shifted inside the model)."""
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
  n = (len(tokens) - 1) // seq_len
  losses = []
  with torch.no_grad():
    for i in range(n):
      window = torch.tensor([tokens[i * seq_len:i * seq_len + seq_len + 1]])
      losses.append(float(model(input_ids=window, labels=window).loss))
  return math.exp(sum(losses) / n), n


def test_byte_tokenizer_export_matches_transformers_own_loss(tmp_path):
  model_dir = _model(tmp_path / 'model', fedjax_tokenizer='bytes')
  (tmp_path / 'sample.txt').write_text(_TEXT, encoding='utf-8')
  result = hf_perplexity.perplexity(model_dir, str(tmp_path / 'sample.txt'), seq_len=16,
                                    batch_size=3)
  paragraphs = _TEXT.rstrip('\n').split('\n\n')
  tokens = [t for p in paragraphs for t in [*p.encode(), 256]]
  ppl, windows = _reference_ppl(model_dir, tokens, 16)
  assert result['windows'] == windows == (len(tokens) - 1) // 16
  assert result['tokens'] == windows * 16 and result['seq_len'] == 16
  np.testing.assert_allclose(result['ppl'], ppl, rtol=1e-5)
  assert 300 < result['ppl'] < 500  # a random model: about uniform over 384 ids
  capped = hf_perplexity.perplexity(model_dir, str(tmp_path / 'sample.txt'), seq_len=16,
                                    max_windows=2)
  assert capped['windows'] == 2 and capped['ppl'] != result['ppl']


def test_the_model_directory_tokenizer_is_used(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.train_from_iterator([_TEXT] * 4, trainers.BpeTrainer(
      vocab_size=320, special_tokens=['<|endoftext|>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token='<|endoftext|>')
  model_dir = _model(tmp_path / 'model', context=32, vocab=320)
  fast.save_pretrained(model_dir)
  with open(tmp_path / 'sample.jsonl', 'w', encoding='utf-8') as f:
    for paragraph in _TEXT.split('\n\n'):
      f.write(json.dumps({'body': paragraph.strip()}) + '\n')
  whole = hf_perplexity.perplexity(model_dir, str(tmp_path / 'sample.jsonl'), text_field='body')
  assert whole['seq_len'] == 32  # the model's context
  # transformers' own loss reads seq_len + 1 tokens: one fewer than the context.
  result = hf_perplexity.perplexity(model_dir, str(tmp_path / 'sample.jsonl'), seq_len=31,
                                    text_field='body')
  eos = fast.convert_tokens_to_ids('<|endoftext|>')
  tokens = [t for p in _TEXT.split('\n\n')
            for t in [*fast(p.strip(), add_special_tokens=False)['input_ids'], eos]]
  assert len(tokens) < 200  # BPE merged bytes (229 with the byte tokenizer): the file's was used
  assert whole['windows'] == (len(tokens) - 1) // 32
  ppl, windows = _reference_ppl(model_dir, tokens, 31)
  assert result['windows'] == windows
  np.testing.assert_allclose(result['ppl'], ppl, rtol=1e-5)


def test_a_runs_export_scores_its_extra_files_as_the_run_did(tmp_path):
  (tmp_path / 'sample.txt').write_text(_TEXT * 3, encoding='utf-8')
  with open(tmp_path / 'sample.jsonl', 'w', encoding='utf-8') as f:
    for paragraph in (_TEXT * 2).split('\n\n'):
      f.write(json.dumps({'text': paragraph.strip()}) + '\n')
  config = tiny.get_config('test')
  config.fl.num_clients = config.fl.clients_per_round = 2
  config.eval.max_batches = 0
  config.eval.extra_files = f'txt={tmp_path}/sample.txt,jsonl={tmp_path}/sample.jsonl'
  last = train.run(config, str(tmp_path / 'run')).last_round
  export.export(str(tmp_path / 'run'), str(tmp_path / 'hf'))
  for name in ('sample.txt', 'sample.jsonl'):
    result = hf_perplexity.perplexity(str(tmp_path / 'hf'), str(tmp_path / name),
                                      seq_len=config.data.seq_len)
    # float32 sums in another order: measured 1.1e-6 relative
    np.testing.assert_allclose(result['loss'], last.extra_val_loss[name.split('.')[1]],
                               rtol=1e-5)


def test_a_sentencepiece_export_is_encoded_as_the_run_encoded(tmp_path):
  spm = pytest.importorskip('sentencepiece')
  model_dir = _model(tmp_path / 'model', vocab=64, fedjax_tokenizer='sp.model')
  spm.SentencePieceTrainer.train(sentence_iterator=iter(_TEXT.split('. ') * 20),
                                 model_prefix=str(tmp_path / 'sp'), vocab_size=48, eos_id=2,
                                 minloglevel=2, num_threads=1)
  os.rename(tmp_path / 'sp.model', tmp_path / 'model' / 'tokenizer.model')  # as the export ships it
  (tmp_path / 'sample.txt').write_text(_TEXT, encoding='utf-8')
  result = hf_perplexity.perplexity(model_dir, str(tmp_path / 'sample.txt'), seq_len=16)
  sp = spm.SentencePieceProcessor(model_file=str(tmp_path / 'model' / 'tokenizer.model'))
  tokens = [t for p in _TEXT.rstrip('\n').split('\n\n') for t in [*sp.encode(p), 2]]
  ppl, windows = _reference_ppl(model_dir, tokens, 16)
  assert result['windows'] == windows
  np.testing.assert_allclose(result['ppl'], ppl, rtol=1e-5)


@pytest.mark.parametrize('setup, kwargs, message', [
    ('none', {}, '--model={model}: no config.json'),
    ('plain', {}, '--model={model} has no tokenizer files'),
    ('bytes', {'seq_len': 64}, "--seq_len=64 is longer than the model's context (48)"),
    ('bytes', {'batch_size': 0}, '--batch_size=0 must be >= 1'),
    ('long', {'seq_len': 240}, '--text: {text}: 229 tokens (with end-of-text), fewer than one '
     'window of seq_len+1=241'),
    ('tiny-vocab', {'seq_len': 16}, "--text={text}: token id 256 is outside the model's "
     'vocabulary of 200'),
])
def test_bad_input_is_one_error_naming_the_flag(tmp_path, setup, kwargs, message):
  text = str(tmp_path / 'sample.txt')
  (tmp_path / 'sample.txt').write_text(_TEXT, encoding='utf-8')
  model_dir = str(tmp_path / 'model')
  if setup == 'none':
    os.makedirs(model_dir)
  else:
    _model(model_dir, context=256 if setup == 'long' else 48,
           vocab=200 if setup == 'tiny-vocab' else 384,
           fedjax_tokenizer=None if setup == 'plain' else 'bytes')
  with pytest.raises(ValueError) as e:
    hf_perplexity.perplexity(model_dir, text, **kwargs)
  assert str(e.value).startswith(message.format(model=model_dir, text=text)), str(e.value)


def test_the_command_prints_one_line_and_fails_in_one(tmp_path):
  model_dir = _model(tmp_path / 'model', fedjax_tokenizer='bytes')
  (tmp_path / 'sample.txt').write_text(_TEXT, encoding='utf-8')

  def run(*flags):
    return subprocess.run([sys.executable, '-m', 'fedjax_pt.hf_perplexity', *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)

  ok = run(f'--model={model_dir}', f'--text={tmp_path}/sample.txt', '--seq_len=16')
  assert ok.returncode == 0, ok.stderr[-2000:]
  expected = hf_perplexity.perplexity(model_dir, str(tmp_path / 'sample.txt'), seq_len=16)
  assert ok.stdout.strip() == (
      f'perplexity {expected["ppl"]:.3f} (loss {expected["loss"]:.4f}) on {tmp_path}/sample.txt: '
      f'{expected["tokens"]:,} tokens, {expected["windows"]} windows of seq_len+1=17')
  bad = run(f'--model={model_dir}', f'--text={tmp_path}/missing.txt')
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1] == (
      f'fedjax_pt.hf_perplexity: error: --text: {tmp_path}/missing.txt: no such file')
