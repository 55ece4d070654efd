"""Tokenizers: raw UTF-8 bytes, HuggingFace tokenizer.json, SentencePiece .model.

All three expose the same small interface (`Tokenizer`), so the rest of the data package never
branches on the kind. `encode_batch` is the fast path used to tokenize a whole corpus up front.
"""

import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

# Names a HuggingFace vocabulary may give its end-of-text token, in order of preference.
_HF_EOT_TOKENS = ('<|endoftext|>', '</s>', '<eos>')
_EOT_TEXT = '<|endoftext|>'


class Tokenizer(Protocol):
  """What the pipeline and the model need from a tokenizer."""

  name: str
  vocab_size: int  # unpadded; see padded_vocab_size for the embedding table size
  eot_id: int  # appended after every document

  def encode(self, text: str) -> list[int]:
    ...

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """int32 ids of each text, without any special token."""
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...


class BytesTokenizer:
  """UTF-8 bytes as ids 0..255 and end-of-text as 256: needs no file, never sees an unknown."""

  name = 'bytes'
  vocab_size = 257
  eot_id = 256

  def encode(self, text: str) -> list[int]:
    return list(text.encode('utf-8'))

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    if not texts:
      return []
    # One join + one widening copy instead of a Python loop over bytes.
    encoded = [t.encode('utf-8') for t in texts]
    flat = np.frombuffer(b''.join(encoded), dtype=np.uint8).astype(np.int32)
    return np.split(flat, np.cumsum([len(e) for e in encoded])[:-1])

  def decode(self, ids: Sequence[int]) -> str:
    pieces, run = [], bytearray()
    for i in ids:
      if i == self.eot_id:
        pieces += [run.decode('utf-8', errors='replace'), _EOT_TEXT]
        run = bytearray()
      else:
        run.append(int(i))
    pieces.append(run.decode('utf-8', errors='replace'))
    return ''.join(pieces)


class HuggingFaceTokenizer:
  """A `tokenizers` tokenizer.json (e.g. GPT-NeoX-20B), encoding batches in parallel in Rust."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=g-import-not-at-top
    try:
      self._tok = HFTokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a bare Exception on any parse error
      raise ValueError(f'{path}: not a valid HuggingFace tokenizer.json ({_first_line(e)})') from e
    ids = [self._tok.token_to_id(t) for t in _HF_EOT_TOKENS]
    if all(i is None for i in ids):
      raise ValueError(f'{path}: tokenizer has no end-of-text token (none of {_HF_EOT_TOKENS})')
    self.eot_id = next(i for i in ids if i is not None)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.name = path

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    # encode_batch_fast skips the character offsets, which we never use.
    encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
    return [np.array(e.ids, dtype=np.int32) for e in encodings]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class SentencePieceTokenizer:
  """A SentencePiece .model; its eos piece is the end-of-text token."""

  def __init__(self, path: str):
    spm = _import_sentencepiece()
    try:
      self._sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f'{path}: not a valid SentencePiece model ({_first_line(e)})') from e
    self.eot_id = self._sp.eos_id()
    if self.eot_id < 0:
      raise ValueError(f'{path}: SentencePiece model has no eos piece (trained with eos_id=-1)')
    self.vocab_size = self._sp.get_piece_size()
    self.name = path

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text, out_type=int)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.array(ids, dtype=np.int32) for ids in self._sp.encode(list(texts), out_type=int)]

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])


def load_tokenizer(spec: str) -> Tokenizer:
  """'bytes', a path to a HuggingFace tokenizer.json, or a path to a SentencePiece .model."""
  if spec == 'bytes':
    return BytesTokenizer()
  path = os.path.expanduser(spec)
  if not path.endswith(('.json', '.model')):
    raise ValueError(f"data.tokenizer must be 'bytes', a tokenizer.json or a .model file: {spec!r}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f'tokenizer file not found: {path}')
  if path.endswith('.json'):
    return HuggingFaceTokenizer(path)
  return SentencePieceTokenizer(path)


def tokenize_corpus(tokenizer: Tokenizer, texts: Sequence[str],
                    chunk_size: int = 2048) -> tuple[np.ndarray, np.ndarray]:
  """Tokenizes every text once: (flat int32 ids, int64 offsets with len(texts) + 1 entries).

  Document i is `ids[offsets[i]:offsets[i + 1]]`. One flat array instead of one per document
  keeps a million-document corpus at one allocation; chunking bounds the tokenizer's own
  per-batch memory.
  """
  parts = []
  for start in range(0, len(texts), chunk_size):
    parts.extend(tokenizer.encode_batch(texts[start:start + chunk_size]))
  lengths = np.array([len(p) for p in parts], dtype=np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  ids = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
  return ids, offsets


def padded_vocab_size(vocab_size: int, multiple: int = 128) -> int:
  """Embedding rows: vocab_size rounded up to a multiple (50,277 -> 50,368), for fast matmuls."""
  if vocab_size < 1 or multiple < 1:
    raise ValueError(f'vocab_size and multiple must be positive, got {vocab_size}, {multiple}')
  return -(-vocab_size // multiple) * multiple


def _import_sentencepiece():
  try:
    import sentencepiece  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('a SentencePiece .model tokenizer needs the sentencepiece package: '
                      'pip install sentencepiece') from e
  return sentencepiece


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__
