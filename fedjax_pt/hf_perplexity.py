r"""Perplexity of a Hugging Face causal language model on a text file, with `transformers`.

  python -m fedjax_pt.hf_perplexity --model=DIR --text=FILE [--seq_len=N] [--batch_size=8] \
      [--text_field=text] [--max_windows=0] [--device=cpu|cuda]

The file is read and packed as `eval.extra_files` reads it (fedjax_pt/data/extra_files.py): a
.txt split into documents at blank lines or a .jsonl's `--text_field`, optionally gzipped, each
document followed by the model's end-of-text token, cut into non-overlapping windows of
seq_len + 1 tokens (--seq_len: the model's context by default). The result is exp of the mean
next-token loss over every window's seq_len targets: with a run's tokenizer and data.seq_len, what
the run reports as `extra_val_ppl` for that file. Each window is read without the context before
it, as during training; docs/evaluation.md has the sliding-window loop, which gives every token
more context.

The tokenizer is the model directory's. An export of a run (its config.json has a `fedjax_pt`
key) is encoded as the run encoded: its tokenizer.json or SentencePiece tokenizer.model read by
fedjax_pt's own tokenizers, and a byte-tokenizer run's (no file; `"tokenizer": "bytes"`) as UTF-8
bytes, 256 ending a document. Needs torch and transformers, imported only when it runs. Prints
one line:

  perplexity 12.345 (loss 2.5133) on FILE: 4,096 tokens, 32 windows of seq_len+1=129
"""

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from absl import app
from absl import flags
import numpy as np

from fedjax_pt import cli
from fedjax_pt import errors
from fedjax_pt.data import extra_files
from fedjax_pt.data.tokenizers import BytesTokenizer, load_tokenizer

PROGRAM = 'fedjax_pt.hf_perplexity'
_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'tokenizer.model', 'vocab.json')


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'{PROGRAM} needs torch and transformers ({e.name} is missing): '
                      "pip install -e '.[test]'") from None
  return torch, transformers


class _HFTokenizer:
  """A `transformers` tokenizer as `fedjax_pt.data` sees one (encode_batch, eot_id)."""

  def __init__(self, tokenizer, model_dir: str):
    if tokenizer.eos_token_id is None:
      raise ValueError(f'--model={model_dir}: its tokenizer has no eos token to end documents')
    self._tok, self.eot_id = tokenizer, tokenizer.eos_token_id

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    ids = self._tok(list(texts), add_special_tokens=False)['input_ids']
    return [np.array(i, np.int32) for i in ids]


def _tokenizer(model_dir: str, config: dict[str, Any], transformers):
  if 'fedjax_pt' in config:
    # An export (fedjax_pt.export): its tokenizer file read as the run read it, a SentencePiece
    # model included, which transformers has no verified class for (docs/export.md).
    for name in ('tokenizer.json', 'tokenizer.model'):
      if os.path.isfile(os.path.join(model_dir, name)):
        return load_tokenizer(os.path.join(model_dir, name))
    if (config['fedjax_pt'] or {}).get('tokenizer') == 'bytes':
      return BytesTokenizer()
  if any(os.path.isfile(os.path.join(model_dir, f)) for f in _TOKENIZER_FILES):
    return _HFTokenizer(transformers.AutoTokenizer.from_pretrained(model_dir), model_dir)
  raise ValueError(f'--model={model_dir} has no tokenizer files ({", ".join(_TOKENIZER_FILES)}) '
                   'and is not an export of a byte-tokenizer run')


def _context(config) -> int:
  for name in ('max_position_embeddings', 'n_positions', 'max_seq_len'):
    value = getattr(config, name, None)
    if isinstance(value, int) and value > 0:
      return value
  return 0


def perplexity(model_dir: str, text: str, seq_len: int = 0, batch_size: int = 8,
               text_field: str = 'text', max_windows: int = 0,
               device: str = '') -> dict[str, Any]:
  """{'ppl', 'loss', 'tokens', 'windows', 'seq_len'} of the model in `model_dir` on the file
  `text`. Raises ValueError (or ImportError) naming the flag at fault."""
  config_path = os.path.join(model_dir, 'config.json')
  if not os.path.isfile(config_path):
    raise ValueError(f'--model={model_dir}: no config.json (not a Hugging Face model directory)')
  for flag, value, least in (('--seq_len', seq_len, 0), ('--max_windows', max_windows, 0),
                             ('--batch_size', batch_size, 1)):
    if value < least:
      raise ValueError(f'{flag}={value} must be >= {least}')
  torch, transformers = _import_torch()
  with open(config_path, encoding='utf-8') as f:
    config = json.load(f)
  tokenizer = _tokenizer(model_dir, config, transformers)
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
  context = _context(model.config)
  seq_len = seq_len or context
  if not seq_len:
    raise ValueError(f'--model={model_dir}: its config gives no context length; set --seq_len')
  if context and seq_len > context:
    raise ValueError(f'--seq_len={seq_len} is longer than the model\'s context ({context})')
  windows = extra_files.load((('', text),), tokenizer, seq_len, text_field, key='--text')['']
  if max_windows:
    windows = windows[:max_windows]
  vocab = model.config.vocab_size
  if windows.max() >= vocab:
    raise ValueError(f'--text={text}: token id {int(windows.max())} is outside the model\'s '
                     f'vocabulary of {vocab} (--model={model_dir})')
  device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
  model.to(device)
  total = 0.0
  with torch.no_grad():
    for start in range(0, len(windows), batch_size):
      batch = torch.from_numpy(np.asarray(windows[start:start + batch_size], np.int64)).to(device)
      logits = model(input_ids=batch[:, :-1]).logits.float()
      total += float(torch.nn.functional.cross_entropy(
          logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction='sum'))
  tokens = len(windows) * seq_len
  loss = total / tokens
  return {'ppl': math.exp(min(loss, 700.0)), 'loss': loss, 'tokens': tokens,
          'windows': len(windows), 'seq_len': seq_len}


def _cli() -> None:
  # Flags are defined here, not at import, so importing this module defines nothing.
  model = flags.DEFINE_string('model', None, 'Hugging Face model directory (config.json, weights).')
  text = flags.DEFINE_string('text', None, 'Text file: .txt or .jsonl (optionally .gz).')
  seq_len = flags.DEFINE_integer('seq_len', 0, 'Tokens the model reads per window (0: its '
                                 'context length).')
  batch_size = flags.DEFINE_integer('batch_size', 8, 'Windows per forward pass.')
  text_field = flags.DEFINE_string('text_field', 'text', 'The text field of a .jsonl record.')
  max_windows = flags.DEFINE_integer('max_windows', 0, 'Score only the first N windows (0: all).')
  device = flags.DEFINE_string('device', '', "torch device ('': cuda if available, else cpu).")

  def main(argv):
    cli.quiet_logs()
    # Read when transformers is imported: no progress bar or warning around the one line.
    os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
    os.environ.setdefault('HF_HUB_DISABLE_PROGRESS_BARS', '1')
    if len(argv) > 1:
      cli.fail(f'unexpected arguments: {" ".join(argv[1:])}', program=PROGRAM)
    if not model.value or not text.value:
      cli.fail('give --model=DIR and --text=FILE', program=PROGRAM)
    try:
      result = perplexity(model.value, text.value, seq_len.value, batch_size.value,
                          text_field.value, max_windows.value, device.value)
    except (ValueError, OSError, ImportError) as e:
      cli.fail(e, errors.EXIT_BAD_INPUT, program=PROGRAM)
    print(f'perplexity {result["ppl"]:.3f} (loss {result["loss"]:.4f}) on {text.value}: '
          f'{result["tokens"]:,} tokens, {result["windows"]} windows of '
          f'seq_len+1={result["seq_len"] + 1}')

  app.run(main)


if __name__ == '__main__':
  _cli()
