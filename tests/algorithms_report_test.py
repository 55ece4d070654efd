"""The frontier-algorithms study's report (experiments/algorithms_report.py) on hand-made runs:
gaps paired by seed with their t interval, bytes against DDP, the robustness grid."""

import csv
import json
import os

from experiments import algorithms_report

SPEC = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'experiments', 'algorithms.yaml')


def _run(root, name, seed, final, federated=True, sent=0, received=0, ddp=0):
  workdir = root / f'{name},seed={seed}'
  workdir.mkdir(parents=True)
  (workdir / 'config.json').write_text(json.dumps({
      'mode': 'federated' if federated else 'centralized', 'seed': seed,
      'fl': {'local_steps': 50, 'rounds': 1}, 'model': {'d_model': 64}, 'data': {}}))
  last = {'kind': 'round', 'round': 1, 'tokens': 100, 'val_ppl': final}
  if federated:
    last.update(bytes_sent=sent, bytes_received=received, ddp_equivalent_bytes=ddp)
  (workdir / 'metrics.jsonl').write_text(
      json.dumps({'kind': 'round', 'round': 0, 'tokens': 0, 'val_ppl': 50.0}) + '\n' +
      json.dumps(last) + '\n')


def test_paired_gaps_bytes_and_the_robustness_grid(tmp_path):
  root = tmp_path / 'root'
  for seed, (adamw, muon) in enumerate([(10.0, 9.0), (11.0, 10.0), (12.0, 12.0)]):
    _run(root, 'scratch,adamw_tau50', seed, adamw, sent=4_000_000, received=4_000_000,
         ddp=800_000_000)
    _run(root, 'scratch,muon_tau50', seed, muon)
    _run(root, 'scratch,adamw_1worker', seed, 20.0, federated=False)
    _run(root, 'scratch,muon_1worker', seed, 20.0, federated=False)
    # top-k uploads: 1 MB down, 0.1 MB up against DDP's 2.2 GB.
    _run(root, 'comm,topk1.56_2bit', seed, adamw * 1.02, sent=1_000_000, received=100_000,
         ddp=2_200_000_000)
    _run(root, 'robust,clean,mean', seed, 10.0)
    _run(root, 'robust,scale,mean', seed, 15.0 + seed)
    _run(root, 'robust,scale,median', seed, 10.5)
  out = tmp_path / 'out'
  assert algorithms_report.main([f'--root={root}', f'--spec={SPEC}', f'--out={out}']) == 0
  table = (out / 'algorithms.md').read_text()
  # Muon against AdamW, seed by seed: 9/10 - 1, 10/11 - 1, 12/12 - 1 = -10%, -9.09%, 0%: mean
  # -6.36%, sample std 5.53%; the 95% interval of the mean +-t(0.975, 2) 4.303 x 5.53% / sqrt(3).
  # Against Muon's own 1-worker baseline (20 for every seed): 9/20, 10/20, 12/20 - 1.
  assert ('| `muon_tau50` | 3/3 | 10.33 ± 1.53 (9.00–12.00) | 9.00 10.00 12.00 | '
          '-6.4% ± 5.5% [-20.1%, +7.4%] (2/3 below) | -48.3% ± 7.6% [-67.3%, -29.4%] '
          '(3/3 below) |') in table
  # Bytes: 1.1 MB against 2.2 GB = 2000x; the uploads alone 22000x; +2.0% for every seed.
  assert ('| `comm,topk1.56_2bit` | 3/3 | 11.22 ± 1.02 (10.20–12.24) | +2.0% ± 0.0% '
          '[+2.0%, +2.0%] (0/3 below) | 1.00 + 0.10 | 2000× | 22000× |') in table
  assert '| `scratch,adamw_tau50` | 3/3 | 11.00 ± 1.00 (10.00–12.00) |  | 4.00 + 4.00 | 100× |' \
      in table
  # The grid: 15, 16, 17 against clean 10: +60% ± 10%; the median's 10.5: +5% for every seed.
  assert ('| scale | 16.00 ± 1.00 (15.00–17.00)<br>+60.0% ± 10.0% [+35.2%, +84.8%] (0/3 below) '
          '|  | 10.50 ± 0.00 (10.50–10.50)<br>+5.0% ± 0.0% [+5.0%, +5.0%] (0/3 below) |  |') \
      in table
  assert '| clean |  |' not in table and '(reference)' in table
  with open(out / 'algorithms.csv', encoding='utf-8') as f:
    rows = {r['cell']: r for r in csv.DictReader(f)}
  assert rows['comm,topk1.56_2bit']['reference'] == 'scratch,adamw_tau50'
  assert float(rows['comm,topk1.56_2bit']['less_than_ddp']) == 2000.0
  assert (out / 'algorithms.png').stat().st_size > 0
