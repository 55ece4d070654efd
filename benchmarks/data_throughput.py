"""Tokenization and pipeline throughput of the data package, in tokens/s.

    python benchmarks/data_throughput.py [--repeats=3]

Reads the C4 sample of ../shared (the first 1,000 C4 documents) and tokenizes it with the bytes
tokenizer and the GPT-NeoX-20B tokenizer.json; where ../shared is absent it says so and uses the
builtin corpus and the bytes tokenizer only. Then it times a whole `build_federated_data` (read,
tokenize, partition, pack) and the draw of batches from a client iterator.
"""

import argparse
import os
import time
from pathlib import Path

from fedjax_pt.data import DataConfig, build_federated_data, load_tokenizer
from fedjax_pt.data.sources import load_documents
from fedjax_pt.data.tokenizers import tokenize_corpus

SHARED = Path(__file__).resolve().parents[2] / 'shared' / 'data'
C4 = SHARED / 'c4' / 'c4_sample.jsonl'
NEOX = SHARED / 'tokenizers' / 'gpt-neox-20b' / 'tokenizer.json'


def _best_time(fn, repeats: int) -> tuple[float, object]:
  best, out = float('inf'), None
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - start)
  return best, out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()

  if C4.exists():
    source = {'source': 'jsonl', 'path': str(C4)}
  else:
    print(f'note: {C4} is absent: using the builtin corpus')
    source = {}
  tokenizers = ['bytes']
  if NEOX.exists():
    tokenizers.append(str(NEOX))
  else:
    print(f'note: {NEOX} is absent: bytes tokenizer only')

  texts = [d.text for d in load_documents(DataConfig.from_config(source))]
  mbytes = sum(len(t.encode('utf-8')) for t in texts) / 1e6
  print(f'corpus: {source.get("path", "builtin")}: {len(texts)} documents, {mbytes:.2f} MB; '
        f'{os.cpu_count()} CPUs')
  for spec in tokenizers:
    tok = load_tokenizer(spec)
    seconds, (ids, _) = _best_time(lambda: tokenize_corpus(tok, texts), args.repeats)
    print(f'tokenize  {Path(spec).parent.name or spec:14s} {len(ids):>10,d} tokens  '
          f'{len(ids) / seconds:>12,.0f} tokens/s  {mbytes / seconds:7.1f} MB/s')

  for spec in tokenizers:
    cfg = DataConfig.from_config(dict(source, tokenizer=spec, seq_len=1024, batch_size=8))
    seconds, data = _best_time(lambda: build_federated_data(cfg, num_clients=8, seed=0),
                               args.repeats)
    tokens = sum(data.client_num_tokens(k) for k in range(data.num_clients))
    it = data.client_iterator(0)
    steps = 200
    start = time.perf_counter()
    for _ in range(steps):
      next(it)
    batch_s = (time.perf_counter() - start) / steps
    print(f'build     {Path(spec).parent.name or spec:14s} {tokens:>10,d} tokens  '
          f'{tokens / seconds:>12,.0f} tokens/s  ({seconds:.2f} s, 8 clients); '
          f'iterator {8 * 1025 / batch_s:,.0f} tokens/s ({batch_s * 1e6:.0f} us/batch of 8x1025)')


if __name__ == '__main__':
  main()
