"""Extra held-out text files (`eval.extra_files`): text the run never trains on, scored every
evaluation next to the validation split (e.g. each organisation's public sample).

The key is one string, so that `--config.eval.extra_files=a.jsonl,b.txt` works on the command line
(ml_collections overrides an existing field; it cannot add keys to a dict): comma-separated
entries, each a file `PATH` named after its stem (`c4/acme.jsonl.gz` -> `acme`) or `NAME=PATH`.
Names key the records (`extra_val_ppl: {name: ...}`) and TensorBoard tags, so they must be unique.

A file is read as `data.path` reads it (`sources.read_file`: .jsonl/.json with `data.text_field`,
.txt split into documents at blank lines, optionally gzipped), tokenised with the run's tokenizer
once, packed like the validation split (end-of-text after each document) into windows of
seq_len + 1 tokens. Unlike `data.path`, nothing is skipped: a line that is not UTF-8 or not a
record is an error, so every file is scored on all of its text.
"""

import os
import re

import numpy as np

from fedjax_pt.data import packing
from fedjax_pt.data.sources import BadLines, read_file
from fedjax_pt.data.tokenizers import Tokenizer, tokenize_corpus

KEY = 'eval.extra_files'
_NAME = re.compile(r'[A-Za-z0-9_.-]+')
_SUFFIXES = ('.jsonl', '.json', '.txt')


def parse(spec: str) -> tuple[tuple[str, str], ...]:
  """(name, path) of each entry of `spec`, in order; reads no file (a Flower node parses the
  server's config too, without the server's files). Raises ValueError naming the key."""
  if not isinstance(spec, str):
    raise ValueError(f'{KEY} must be a string of comma-separated files, got {spec!r}')
  out, paths = [], {}
  for entry in (e.strip() for e in spec.split(',')):
    if not entry:
      continue
    name, sep, path = entry.partition('=')
    if not sep:
      name, path = _stem(entry), entry
    name, path = name.strip(), path.strip()
    base = path[:-3] if path.endswith('.gz') else path
    if not base.endswith(_SUFFIXES):
      raise ValueError(f'{KEY}: {path!r} is not a .jsonl, .json or .txt file (optionally .gz)')
    if not _NAME.fullmatch(name):
      raise ValueError(f'{KEY}: the name {name!r} of {path!r} must be letters, digits, "_", "-" '
                       'or "." (name a file NAME=PATH)')
    if name in paths:
      raise ValueError(f'{KEY}: {paths[name]!r} and {path!r} are both named {name!r}; name them '
                       'NAME=PATH')
    paths[name] = path
    out.append((name, path))
  return tuple(out)


def _stem(path: str) -> str:
  base = os.path.basename(path)
  base = base[:-3] if base.endswith('.gz') else base
  return os.path.splitext(base)[0]


class _Strict(BadLines):
  """Skips nothing: the first malformed line is the file's error."""

  def __init__(self):
    super().__init__(0)

  def skip(self, where: str, why: str) -> None:
    raise ValueError(f'{where}: {why}')


def load(files: tuple[tuple[str, str], ...], tokenizer: Tokenizer, seq_len: int,
         text_field: str, key: str = KEY) -> dict[str, np.ndarray]:
  """{name: [n, seq_len + 1] int32 windows} of each file; a file that is missing, empty, not
  UTF-8, malformed or shorter than one window is a ValueError naming it, `key` (the config key
  or flag that named the file) and its name (if not '')."""
  out = {}
  for name, path in files:
    full = os.path.expanduser(path)
    prefix = f'{key}: {name}' if name else key
    where = f'{prefix}: {full}'
    if not os.path.isfile(full):
      raise ValueError(f'{where}: no such file')
    try:
      texts = [d.text for d in read_file(full, text_field, _Strict()) if d.text.strip()]
    except OSError as e:
      raise ValueError(f'{where}: cannot be read ({e.strerror})') from e
    except ValueError as e:  # its message starts with the file (and line)
      raise ValueError(f'{prefix}: {e}') from e
    if not texts:
      raise ValueError(f'{where}: no text (empty file)')
    ids, offsets = tokenize_corpus(tokenizer, texts)
    stream = packing.pack(packing.select(ids, offsets, np.arange(len(texts))), tokenizer.eot_id)
    windows = packing.windows(stream, seq_len)
    if not len(windows):
      raise ValueError(f'{where}: {len(stream)} tokens (with end-of-text), fewer than one window '
                       f'of seq_len+1={seq_len + 1}')
    out[name] = windows
  return out
