r"""A run's model as a Hugging Face model directory, which `transformers` loads as it is.

  python -m fedjax_pt.export --workdir=RUN --out=DIR [--checkpoint=N] \
      [--dtype=float32|bfloat16] [--max_shard_size=2GB]

Writes config.json (an architecture transformers implements exactly: fedjax_pt/hf_format.py),
model.safetensors (or shards and model.safetensors.index.json above --max_shard_size),
generation_config.json, the run's tokenizer (a tokenizer.json or SentencePiece model; the byte
tokenizer needs no file: README.md says how to use it) and README.md. The model keeps the run's
padded vocabulary: config.json's `fedjax_pt` key says how many ids the tokenizer uses, and from
which run and round the weights come. --out is written whole or not at all; an existing --out is
replaced only if it holds a previous export (its config.json has the `fedjax_pt` key).
"""

import json
import os
import shutil
import subprocess
import tempfile
from typing import Any

from absl import app
from absl import flags
import ml_dtypes
import numpy as np

from fedjax_pt import cli
from fedjax_pt import hf_format
from fedjax_pt import trained_model

PROGRAM = 'fedjax_pt.export'
_DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16}
BYTES_USAGE = ('ids are the UTF-8 bytes of the text (0-255) and 256 ends a document: '
               'input_ids = list(text.encode("utf-8")); text = bytes(i for i in ids if i < 256)'
               '.decode("utf-8", errors="replace")')


class ExportError(ValueError):
  """Nothing was written (one line, naming the culprit)."""


def export(workdir: str, out: str, checkpoint: int | None = None, dtype: str = 'float32',
           max_shard_size: str | int = '2GB') -> dict[str, Any]:
  """Writes the export of `workdir`'s model into `out`; returns its config.json. Raises
  ExportError, trained_model.TrainedModelError or hf_format.HFFormatError before writing
  anything."""
  if dtype not in _DTYPES:
    raise ExportError(f'--dtype={dtype}: float32 or bfloat16')
  # The variant is checked from config.json first: an unsupported one is refused without loading.
  config = trained_model.run_config(workdir)
  hf_format.architecture(trained_model.model_config_of(config, os.path.join(workdir,
                                                                            'config.json')))
  _check_out(out)
  model = trained_model.load(workdir, checkpoint)
  tokenizer = model.tokenizer
  hf = hf_format.hf_config(model.cfg, bos_token_id=tokenizer.eot_id,
                           eos_token_id=tokenizer.eot_id, torch_dtype=dtype)
  hf['fedjax_pt'] = {
      'run': os.path.abspath(workdir), 'round': model.round, 'checkpoint': model.checkpoint_path,
      'tokenizer': config['data']['tokenizer'], 'tokenizer_vocab_size': tokenizer.vocab_size,
      'vocab_padding': (f'vocab_size={model.cfg.vocab_size} is the tokenizer\'s '
                        f'{tokenizer.vocab_size} ids padded to a multiple of 128 for fast '
                        'matmuls; ids from tokenizer_vocab_size on are never produced by the '
                        'tokenizer and were never trained'),
      'model': {k: v for k, v in config['model'].items()},
      'commit': _commit(),
  }
  tensors = {name: x.astype(_DTYPES[dtype]) for name, x in
             hf_format.to_hf(model.cfg, model.params).items()}
  parent = os.path.dirname(os.path.abspath(out)) or '.'
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(os.path.abspath(out))}.', dir=parent)
  try:
    _write_weights(staging, tensors, max_shard_size)
    _write_json(os.path.join(staging, 'config.json'), hf)
    # No max_length: transformers warns whenever a caller's max_new_tokens overrides one.
    _write_json(os.path.join(staging, 'generation_config.json'), {
        'bos_token_id': tokenizer.eot_id, 'eos_token_id': tokenizer.eot_id})
    tokenizer_note = _write_tokenizer(staging, config['data']['tokenizer'], tokenizer,
                                      model.cfg.max_seq_len)
    with open(os.path.join(staging, 'README.md'), 'w') as f:
      f.write(_readme(hf, out, tokenizer_note))
    _publishable(staging)
    _replace(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  hf['fedjax_pt']['tokenizer_note'] = tokenizer_note
  return hf


def _check_out(out: str) -> None:
  if os.path.exists(out) and not os.path.isdir(out):
    raise ExportError(f'--out={out} is a file, not a directory')
  if os.path.isdir(out) and os.listdir(out) and not _is_export(out):
    raise ExportError(f'--out={out} is not empty and holds no previous export: give a new '
                      'directory')


def _is_export(directory: str) -> bool:
  try:
    with open(os.path.join(directory, 'config.json')) as f:
      return 'fedjax_pt' in json.load(f)
  except (OSError, ValueError):
    return False


def _publishable(directory: str) -> None:
  """The modes a directory and files made by hand would have: mkdtemp (and safetensors' writer)
  make them private to the user."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(directory, 0o777 & ~umask)
  for name in os.listdir(directory):
    os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def _replace(staging: str, out: str) -> None:
  """Puts the finished export at `out`: a rename, so a reader never sees a half-written one."""
  if os.path.isdir(out):
    old = staging + '.old'
    os.rename(out, old)
    os.rename(staging, out)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(staging, out)


def _write_weights(directory: str, tensors: dict[str, np.ndarray],
                   max_shard_size: str | int) -> None:
  from huggingface_hub import split_state_dict_into_shards_factory  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  try:
    split = split_state_dict_into_shards_factory(
        tensors, get_storage_size=lambda x: x.nbytes, max_shard_size=max_shard_size,
        filename_pattern='model{suffix}.safetensors')
  except ValueError as e:
    raise ExportError(f'--max_shard_size={max_shard_size}: {e}') from None
  for filename, names in split.filename_to_tensors.items():
    # transformers refuses safetensors files whose metadata does not name a known format.
    save_file({n: tensors[n] for n in names}, os.path.join(directory, filename),
              metadata={'format': 'pt'})
  if split.is_sharded:
    _write_json(os.path.join(directory, 'model.safetensors.index.json'), {
        'metadata': {'total_size': int(sum(x.nbytes for x in tensors.values()))},
        'weight_map': split.tensor_to_filename})


def _write_tokenizer(directory: str, spec: str, tokenizer, max_seq_len: int) -> str:
  """Copies the run's tokenizer files; returns a line saying how to tokenize for the model."""
  if spec == 'bytes':
    return f'byte tokenizer (no file): {BYTES_USAGE}'
  path = os.path.expanduser(spec)
  special = {'eos_token': tokenizer.decode([tokenizer.eot_id]),
             'bos_token': tokenizer.decode([tokenizer.eot_id]),
             'model_max_length': max_seq_len}
  sibling = os.path.join(os.path.dirname(path), 'tokenizer_config.json')
  if path.endswith('.json'):
    shutil.copyfile(path, os.path.join(directory, 'tokenizer.json'))
    if os.path.isfile(sibling):
      shutil.copyfile(sibling, os.path.join(directory, 'tokenizer_config.json'))
    else:
      _write_json(os.path.join(directory, 'tokenizer_config.json'),
                  {'tokenizer_class': 'PreTrainedTokenizerFast', **special})
    return 'tokenizer.json (AutoTokenizer.from_pretrained(DIR)); the run added no BOS token'
  # No tokenizer_config.json: which transformers class would encode exactly as
  # sentencepiece does (prefix spaces, BOS) is unverified, and a wrong one would tokenize silently
  # otherwise; without it AutoTokenizer refuses, and the note says what encodes as the run did.
  shutil.copyfile(path, os.path.join(directory, 'tokenizer.model'))
  return ('tokenizer.model, SentencePiece, as the run used it (no BOS token): '
          'sentencepiece.SentencePieceProcessor(model_file="DIR/tokenizer.model").encode(text)')


def _write_json(path: str, value: Any) -> None:
  with open(path, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write('\n')


def _commit() -> str | None:
  """The fedjax_pt commit that exported (None outside a git checkout)."""
  try:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=os.path.dirname(__file__),
                          capture_output=True, text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


def _readme(hf: dict[str, Any], out: str, tokenizer_note: str) -> str:
  meta = hf['fedjax_pt']
  return f"""# {hf['architectures'][0]} exported by fedjax_pt

Weights of round {meta['round']} of the fedjax_pt run `{meta['run']}`
(`{meta['checkpoint']}`), as a `{hf['architectures'][0]}` that `transformers` computes exactly
as fedjax_pt does.

```python
import torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained({out!r})
```

Tokenizer: {tokenizer_note}.

Vocabulary: {meta['vocab_padding']}.
"""


def _cli() -> None:
  workdir = flags.DEFINE_string('workdir', '', 'The run directory whose model to export.')
  checkpoint = flags.DEFINE_integer('checkpoint', None, 'The round of a checkpoint in '
                                    'RUN/checkpoints (default: the latest complete one).')
  out = flags.DEFINE_string('out', '', 'The Hugging Face model directory to write.')
  dtype = flags.DEFINE_enum('dtype', 'float32', list(_DTYPES), 'Type of the written weights.')
  max_shard_size = flags.DEFINE_string('max_shard_size', '2GB', 'Largest safetensors file '
                                       '(e.g. 2GB, 500MB); larger models are sharded.')

  def main(argv):
    if len(argv) > 1:
      cli.fail(f'unexpected arguments: {" ".join(argv[1:])}', program=PROGRAM)
    cli.quiet_logs()
    if not workdir.value or not out.value:
      cli.fail('--workdir=RUN and --out=DIR are required', program=PROGRAM)
    try:
      hf = export(workdir.value, out.value, checkpoint.value, dtype.value, max_shard_size.value)
    except (OSError, ValueError) as e:
      cli.fail(e, program=PROGRAM)
    meta = hf['fedjax_pt']
    print(f'{out.value}: {hf["architectures"][0]}, round {meta["round"]} of {workdir.value}, '
          f'{dtype.value}')
    print(f'load: transformers.AutoModelForCausalLM.from_pretrained({out.value!r})')
    print(f'tokenizer: {meta["tokenizer_note"]}')

  app.run(main)


if __name__ == '__main__':
  _cli()
