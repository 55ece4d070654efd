"""The notebooks in colabs/ run top to bottom (nbclient), with tiny settings injected after their
`parameters` cell, as papermill does; fedjax_pt is made importable through PYTHONPATH so the
notebook's install cell has nothing to do."""

import copy
import os

import nbformat
import pytest

nbclient = pytest.importorskip('nbclient')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO, 'colabs')


def _execute(name, parameters, monkeypatch, timeout=600):
  with open(os.path.join(COLABS, name), encoding='utf-8') as f:
    nb = nbformat.read(f, as_version=4)
  tagged = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  assert len(tagged) == 1, f'{name} needs exactly one cell tagged "parameters"'
  nb = copy.deepcopy(nb)
  nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(parameters))
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
      [REPO] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
  client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name='python3',
                                   resources={'metadata': {'path': COLABS}})
  client.execute()
  return nb


def _outputs(nb):
  text = []
  for cell in nb.cells:
    for out in cell.get('outputs', []):
      text.append(out.get('text', '') + str(out.get('data', {}).get('text/markdown', '')))
  return '\n'.join(text)


def _images(nb):
  return sum('image/png' in out.get('data', {}) for c in nb.cells for out in c.get('outputs', []))


TINY = ("D_MODEL, SEQ_LEN, BATCH_SIZE, EVAL_BATCHES = 32, 32, 4, 2\n"
        "ROUNDS, LOCAL_STEPS, NUM_CLIENTS, WARMUP_STEPS = 2, 3, 2, 1\n")


def test_quickstart_runs_top_to_bottom(tmp_path, monkeypatch):
  nb = _execute('quickstart.ipynb', TINY + f'WORKDIR = {str(tmp_path)!r}\n', monkeypatch)
  text = _outputs(nb)
  assert 'fedjax_pt from ' + os.path.join(REPO, 'fedjax_pt') in text  # nothing was installed
  assert 'federated    final val_ppl' in text and 'centralized  final val_ppl' in text
  assert _images(nb) == 4  # the curves and the three figures of fedjax_pt.plot
  for run in ('federated', 'centralized'):
    assert os.path.isfile(tmp_path / run / 'metrics.jsonl')
  assert sorted(os.listdir(tmp_path / 'figures')) == ['gradients.png', 'norms.png',
                                                       'perplexity.png']


def test_analysis_trains_demo_runs_when_none_found_and_tabulates_them(tmp_path, monkeypatch):
  runs, out = tmp_path / 'runs', tmp_path / 'out'
  runs.mkdir()
  nb = _execute('analysis.ipynb',
                f'RUNS = [{str(runs)!r}]\nOUT = {str(out)!r}\n'
                'DEMO_ROUNDS, DEMO_LOCAL_STEPS, DEMO_D_MODEL = 2, 2, 32\n', monkeypatch)
  text = _outputs(nb)
  assert '2 run(s) loaded' in text
  assert '| federated | federated | 32×2 | 2/2 | 4 |' in text
  assert '| federated | centralized |' in text  # the crossing table
  assert '| federated | 1 |' in text  # over seeds: one seed, its value alone
  assert 'for its seed' in text  # and the crossing over seeds
  assert _images(nb) == 4
  assert sorted(p for p in os.listdir(out) if p.endswith('.png')) == [
      'gradients.png', 'norms.png', 'perplexity.png']


def test_notebooks_are_committed_without_outputs():
  for name in ('quickstart.ipynb', 'analysis.ipynb'):
    with open(os.path.join(COLABS, name), encoding='utf-8') as f:
      nb = nbformat.read(f, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
      if cell.cell_type == 'code':
        assert not cell.outputs and cell.execution_count is None, name
