"""A node's data preparation per round, with and without the tokenised cache, vs corpus size.

    python -m benchmarks.data_preparation [--scales=1,5,20] [--repeats=3]
    python -m benchmarks.data_preparation --files=10 [--scales=1,5,20]   # a corpus of files

The corpus is the C4 sample of ../shared (1,000 documents, 2.4 MB) replicated 1x, 5x and 20x into
one JSONL file each, tokenised with GPT-NeoX-20B's tokenizer.json; where either is absent it says
so and measures nothing. For each size it times `build_federated_data` for one client (a node's
own corpus, num-partitions=1):
  uncached  what every round cost before data.cache_dir (read, tokenise, partition, pack)
  cold      the first round with a cache: the same, plus writing the cache
  warm      every later round: fingerprint (digests remembered by stat), map the cached arrays,
            partition, split and pack; `load` is the cache's part of it (`token_cache.load`)
  sha256    what the fingerprint costs when a file's digest is not remembered (a changed file)

With --files=N the corpus is many files, as a node's grows: each copy of the C4 sample is split
into N files, and every copy's documents start with their own '(copy k) ' so that no two files
share a digest. For each size it times:
  first     the first round: every file tokenised, its entry and the corpus entry written
  hit       every later round (the corpus entry); `load` is the cache's part of it
  +1 file   the round after one more file (1/N of a new copy) arrives: that file tokenised, the
            corpus put together from the files' entries and written as one entry again; the
            best of --repeats such rounds, a file more each; `tokenise` is that file's part of
            it (`corpus.tokenise_file` timed on its own)
  before    a lower bound of what the +1 file round cost before the files' entries: the whole
            corpus read and tokenised again (`corpus.tokenise`, without writing the entry)
  cache MB  the cache's size on disk after the +1 file round
"""

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from fedjax_pt.data import DataConfig, build_federated_data, load_tokenizer
from fedjax_pt.data import corpus as corpus_lib
from fedjax_pt.data import fingerprint
from fedjax_pt.data import token_cache

SHARED = Path(__file__).resolve().parents[2] / 'shared' / 'data'
C4 = SHARED / 'c4' / 'c4_sample.jsonl'
NEOX = SHARED / 'tokenizers' / 'gpt-neox-20b' / 'tokenizer.json'


def _seconds(fn, repeats: int = 1) -> float:
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def _replicate(scale: int, directory: str) -> str:
  path = os.path.join(directory, f'c4x{scale}.jsonl')
  lines = C4.read_bytes()
  with open(path, 'wb') as f:
    for _ in range(scale):
      f.write(lines)
  return path


def _split_copy(copy: int, files: int, directory: str, parts: range | None = None) -> list[str]:
  """Copy `copy` of the C4 sample as `files` files (those of `parts`; all by default) whose
  documents start with '(copy `copy`) '."""
  lines = C4.read_text(encoding='utf-8').splitlines()
  per_file = -(-len(lines) // files)
  paths = []
  for i in parts or range(files):
    path = os.path.join(directory, f'copy{copy:03d}-part{i:03d}.jsonl')
    with open(path, 'w', encoding='utf-8') as f:
      for line in lines[i * per_file:(i + 1) * per_file]:
        record = json.loads(line)
        record['text'] = f'(copy {copy}) ' + record['text']
        f.write(json.dumps(record) + '\n')
    paths.append(path)
  return paths


def _du_mb(directory: str) -> float:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory)
             for f in fs) / 1e6


def _files(scales: list[int], files: int, repeats: int, work: str) -> None:
  print('| corpus | files (+ added) | MB | tokens | first s | hit s | hit: load s | +1 file s | '
        '+1 file: tokenise s | before s | before / +1 file | cache MB |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|')
  tok = load_tokenizer(str(NEOX))
  for scale in scales:
    directory = os.path.join(work, f'files{scale}')
    os.makedirs(directory)
    for copy in range(scale):
      _split_copy(copy, files, directory)
    time.sleep(fingerprint._SETTLED_NS / 1e9 + 0.5)  # pylint: disable=protected-access
    mb = _du_mb(directory)
    cfg = {'source': 'jsonl', 'path': os.path.join(directory, '*.jsonl'), 'tokenizer': str(NEOX),
           'seq_len': 128, 'batch_size': 8}
    cache = os.path.join(work, f'files-cache{scale}')
    cached = DataConfig.from_config({**cfg, 'cache_dir': cache})
    first = _seconds(lambda: build_federated_data(cached, 1, 0))
    hit = _seconds(lambda: build_federated_data(cached, 1, 0), repeats)
    load = _seconds(lambda: token_cache.load(cached, tok), repeats)
    tokens = len(token_cache.load(cached, tok).ids)
    added, new_s = float('inf'), float('inf')
    for part in range(repeats):  # a file more each time; the best is shown
      new, = _split_copy(scale, files, directory, range(part, part + 1))
      added = min(added, _seconds(lambda: build_federated_data(cached, 1, 0)))
      new_s = min(new_s, _seconds(lambda: corpus_lib.tokenise_file(cached, tok, new)))
    before = _seconds(lambda: corpus_lib.tokenise(DataConfig.from_config(cfg), tok))
    print(f'| {scale}x | {scale * files} + {repeats} | {mb:.1f} | {tokens:,} | {first:.1f} | '
          f'{hit:.3f} | {load:.3f} | {added:.2f} | {new_s:.2f} | {before:.1f} | '
          f'{before / added:.0f}x | {_du_mb(cache):.0f} |', flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--scales', default='1,5,20')
  parser.add_argument('--repeats', type=int, default=3, help='warm builds; the best is shown')
  parser.add_argument('--files', type=int, default=0,
                      help='split each copy of the sample into this many files (0: one file)')
  args = parser.parse_args()
  missing = [str(p) for p in (C4, NEOX) if not p.exists()]
  if missing:
    print(f'skipped: {", ".join(missing)} absent (the C4 sample and GPT-NeoX tokenizer of '
          '../shared); nothing measured')
    return
  scales = [int(s) for s in args.scales.split(',')]
  if args.files:
    print(f'corpus: {C4} x {scales}, {args.files} files per copy; tokenizer: {NEOX}; '
          f'{os.cpu_count()} CPUs')
    work = tempfile.mkdtemp(prefix='data-preparation-')
    try:
      _files(scales, args.files, args.repeats, work)
    finally:
      shutil.rmtree(work, ignore_errors=True)
    return
  print(f'corpus: {C4} x {scales}; tokenizer: {NEOX}; {os.cpu_count()} CPUs')
  work = tempfile.mkdtemp(prefix='data-preparation-')
  try:
    paths = {s: _replicate(s, work) for s in scales}
    # A node's corpus is older than its first round: let the files' stat settle, so their digests
    # are remembered as they would be (fingerprint._SETTLED_NS).
    time.sleep(fingerprint._SETTLED_NS / 1e9 + 0.5)  # pylint: disable=protected-access
    tokenizer_s = _seconds(lambda: load_tokenizer(str(NEOX)))
    print(f'load_tokenizer (NeoX tokenizer.json, in every build): {tokenizer_s:.2f} s')
    print('| corpus | MB | tokens | uncached s | cold s | warm s | warm: load s | sha256 s | '
          'uncached / warm |')
    print('|---|---|---|---|---|---|---|---|---|')
    for scale, path in paths.items():
      cache = os.path.join(work, f'cache{scale}')
      cfg = {'source': 'jsonl', 'path': path, 'tokenizer': str(NEOX), 'seq_len': 128,
             'batch_size': 8}
      plain = DataConfig.from_config(cfg)
      cached = DataConfig.from_config({**cfg, 'cache_dir': cache})
      uncached = _seconds(lambda: build_federated_data(plain, 1, 0))
      cold = _seconds(lambda: build_federated_data(cached, 1, 0))
      warm = _seconds(lambda: build_federated_data(cached, 1, 0), args.repeats)
      tok = load_tokenizer(str(NEOX))
      load = _seconds(lambda: token_cache.load(cached, tok), args.repeats)
      sha = _seconds(lambda: fingerprint._sha256(path))  # pylint: disable=protected-access
      entry, = [e for e in os.listdir(cache) if e.startswith('corpus-')]
      with open(os.path.join(cache, entry, 'manifest.json'), encoding='utf-8') as f:
        tokens = json.load(f)['num_tokens']
      mb = os.path.getsize(path) / 1e6
      print(f'| {scale}x | {mb:.1f} | {tokens:,} | {uncached:.2f} | {cold:.2f} | {warm:.3f} | '
            f'{load:.3f} | {sha:.3f} | {uncached / warm:.0f}x |', flush=True)
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
