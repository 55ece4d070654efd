"""Packing: documents -> one token stream -> overlapping windows of seq_len + 1 tokens.

Each document is followed by the end-of-text token and the documents are concatenated, so no
position is padding. Window i is stream[i * seq_len : i * seq_len + seq_len + 1]; the model reads
w[:-1] and predicts w[1:], so consecutive windows share one token and every stream token but the
first is a target exactly once. Only the final partial window (< seq_len targets) is dropped.
"""

from collections.abc import Sequence

import numpy as np


def pack(documents: Sequence[np.ndarray], eot_id: int) -> np.ndarray:
  """Concatenates the documents, each followed by `eot_id`, into one int32 stream."""
  eot = np.array([eot_id], dtype=np.int32)
  pieces = []
  for doc in documents:
    pieces += [doc, eot]
  return np.concatenate(pieces).astype(np.int32, copy=False) if pieces else np.zeros(0, np.int32)


def num_windows(num_tokens: int, seq_len: int) -> int:
  """How many full windows of seq_len + 1 tokens, stride seq_len, a stream of num_tokens holds."""
  return max(num_tokens - 1, 0) // seq_len


def windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
  """[num_windows, seq_len + 1] read-only view of the stream (no copy of the corpus)."""
  n = num_windows(len(stream), seq_len)
  if n == 0:
    return np.zeros((0, seq_len + 1), dtype=stream.dtype)
  view = np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)
  return view[:n * seq_len:seq_len]


def select(ids: np.ndarray, offsets: np.ndarray, doc_indices: Sequence[int]) -> list[np.ndarray]:
  """Views of the chosen documents of a flat corpus (document i is ids[offsets[i]:offsets[i+1]])."""
  return [ids[offsets[i]:offsets[i + 1]] for i in doc_indices]
