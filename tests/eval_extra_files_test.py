"""eval.extra_files: perplexity on extra held-out files, every evaluated round, in the simulation,
the centralized baseline and the deployment's server; checked by hand against the model; bad files
refused before training; resumable with other files."""

import glob
import gzip
import json
import math
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from fake_grid import FakeGrid, FakeNode
from fedjax_pt import build
from fedjax_pt import model as model_lib
from fedjax_pt import records
from fedjax_pt import reporting
from fedjax_pt import train
from fedjax_pt.configs import tiny
from fedjax_pt.data import extra_files
from fedjax_pt.data.tokenizers import BytesTokenizer
from fedjax_pt.deploy import server_app

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One paragraph: with end-of-text 177 tokens, 5 windows of seq_len+1 = 33 (tiny:test) and a rest.
_ACME = ('Organisation A publishes this sample of its text so that every member can see how well '
         'the shared model reads it; it is never used for training the model. Its words are '
         'public.')
_GLOBEX = ['def add(x, y):\n  return x + y', 'Globex ships its code as JSON lines, one per record.',
           'print(add(2, 3))  # 5']


@pytest.fixture(name='files')
def _files(tmp_path):
  (tmp_path / 'acme.txt').write_text(_ACME + '\n', encoding='utf-8')
  with open(tmp_path / 'globex.jsonl', 'w', encoding='utf-8') as f:
    for i, text in enumerate(_GLOBEX):
      f.write(json.dumps({'text': text, 'url': f'https://globex.example/{i}'}) + '\n')
  return f'{tmp_path}/acme.txt,{tmp_path}/globex.jsonl'


def _config(extra, **overrides):
  config = tiny.get_config('test')
  config.fl.num_clients = config.fl.clients_per_round = 2
  config.eval.extra_files = extra
  config.eval.max_batches = 0  # all of every file, so the hand check covers every window
  for key, value in overrides.items():
    group, name = key.split('__')
    if group == 'mode':
      config.mode = value
    else:
      config[group][name] = value
  return config


def _evaluated(rounds):
  return [r.round for r in rounds if r.val_ppl is not None]


def test_parse_names_files_by_stem_or_explicitly():
  assert extra_files.parse('') == ()
  assert extra_files.parse(' a/acme.jsonl.gz, b/sample.txt ,globex=c/sample.txt,') == (
      ('acme', 'a/acme.jsonl.gz'), ('sample', 'b/sample.txt'), ('globex', 'c/sample.txt'))


@pytest.mark.parametrize('spec, message', [
    ('a/sample.txt,b/sample.txt', "'a/sample.txt' and 'b/sample.txt' are both named 'sample'"),
    ('x=a.txt,x=b.jsonl', "'a.txt' and 'b.jsonl' are both named 'x'"),
    ('a.csv', "'a.csv' is not a .jsonl, .json or .txt file"),
    ('my org=a.txt', "the name 'my org' of 'a.txt' must be"),
    ('a/b=c.txt', "the name 'a/b' of 'c.txt' must be"),
])
def test_parse_refuses_collisions_and_unknown_files(spec, message):
  with pytest.raises(ValueError, match='^eval.extra_files: ') as e:
    extra_files.parse(spec)
  assert message in str(e.value)


def _windows(tokens, seq_len):
  """Packing written out here: windows of seq_len + 1 tokens, stride seq_len."""
  n = (len(tokens) - 1) // seq_len
  return np.array([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)], np.int32)


def _hand_ppl(params, config, tokens):
  """exp(mean next-token loss) over every window of `tokens`, from the model's logits."""
  windows = _windows(tokens, config.data.seq_len)
  logits = model_lib.Decoder(build.model_config(config)).apply({'params': params}, windows[:, :-1])
  logits = np.asarray(logits, np.float64)
  top = logits.max(axis=-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
  nll = -np.take_along_axis(logp, windows[:, 1:, None], axis=-1)
  return math.exp(nll.mean()), len(windows)


def test_two_files_are_scored_every_evaluated_round_and_match_a_hand_check(tmp_path, files):
  config = _config(files, fl__rounds=3, eval__every_rounds=2)
  result = train.run(config, str(tmp_path / 'run'))
  rounds = result.rounds
  assert _evaluated(rounds) == [0, 2, 3]  # every 2 rounds, and the last
  for r in rounds:
    if r.round not in (0, 2, 3):
      assert r.extra_val_ppl is None and r.extra_val_loss is None
      continue
    assert sorted(r.extra_val_ppl) == ['acme', 'globex']
    for name, ppl in r.extra_val_ppl.items():
      assert math.isfinite(ppl) and ppl > 1
      np.testing.assert_allclose(ppl, math.exp(r.extra_val_loss[name]), rtol=1e-12)
  # Training lowers them, and each file is its own measurement (not the validation set's).
  assert rounds[-1].extra_val_ppl['acme'] < rounds[0].extra_val_ppl['acme']
  assert len({rounds[-1].val_ppl, *rounds[-1].extra_val_ppl.values()}) == 3

  eot = BytesTokenizer.eot_id
  acme = list(_ACME.encode()) + [eot]
  globex = [t for text in _GLOBEX for t in [*text.encode(), eot]]
  for name, tokens, windows in (('acme', acme, 5), ('globex', globex, 3)):
    ppl, n = _hand_ppl(result.params, config, tokens)
    assert n == windows
    np.testing.assert_allclose(rounds[-1].extra_val_ppl[name], ppl, rtol=2e-5)

  with open(tmp_path / 'run' / 'metrics.jsonl', encoding='utf-8') as f:
    written = [json.loads(line) for line in f if '"kind": "round"' in line]
  assert [sorted(r.get('extra_val_ppl', {})) for r in written] == [
      ['acme', 'globex'], [], ['acme', 'globex'], ['acme', 'globex']]
  tags = _tensorboard_tags(tmp_path / 'run' / 'tensorboard')
  assert {'extra_val_ppl/acme', 'extra_val_ppl/globex', 'extra_val_loss/acme'} <= tags
  summary = reporting.summary_table(rounds, 1.0)
  assert re.search(rf'^final extra_val_ppl/acme +{rounds[-1].extra_val_ppl["acme"]:.3f}$', summary,
                   re.M), summary


def _tensorboard_tags(directory):
  """Scalar tags of the TFRecord event files directly in `directory`."""
  tags = set()
  for path in glob.glob(os.path.join(directory, 'events.out.tfevents.*')):
    with open(path, 'rb') as f:
      data = f.read()
    at = 0
    while at < len(data):
      (length,) = struct.unpack('<Q', data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      tags |= {v.tag for v in event.summary.value}
      at += 12 + length + 4
  return tags


def test_centralized_runs_score_them_too(tmp_path, files):
  rounds = train.run(_config(files, mode__mode='centralized'), str(tmp_path / 'c')).rounds
  assert [sorted(r.extra_val_ppl) for r in rounds] == [['acme', 'globex']] * 3
  assert all(math.isfinite(v) for r in rounds for v in r.extra_val_ppl.values())


def test_the_deployment_server_scores_them_as_the_simulation_does(tmp_path, files):
  simulated = train.run(_config(files), str(tmp_path / 'sim'))
  nodes = {100 + k: FakeNode({'partition-id': k, 'num-partitions': 2,
                              'state-dir': str(tmp_path / f'node{k}')}) for k in range(2)}
  deployed = server_app.serve(FakeGrid(nodes), {
      'config': 'configs/tiny.py:test', 'workdir': str(tmp_path / 'dep'), 'transport': 'inline',
      'shared-dir': '', 'wait-for-nodes-s': 5.0,
      'overrides': ('--config.fl.num_clients=2 --config.fl.clients_per_round=2 '
                    f'--config.eval.max_batches=0 --config.eval.extra_files={files}')})
  assert [r.extra_val_ppl for r in deployed.rounds] == [
      r.extra_val_ppl for r in simulated.rounds]  # bit for bit
  assert len(deployed.rounds) == 3


def test_a_resumed_run_may_score_other_files(tmp_path, files):
  """Rounds trained before the change keep their records; a file added later starts its own
  curve; the training, which reads no extra file, is the same as without them."""
  acme = files.split(',')[0]
  workdir = str(tmp_path / 'run')
  first = train.run(_config(acme, fl__rounds=2), workdir).rounds
  resumed = train.run(_config(files, fl__rounds=3), workdir).rounds
  assert [records.to_json(r) for r in resumed[:3]] == [records.to_json(r) for r in first]
  assert sorted(resumed[3].extra_val_ppl) == ['acme', 'globex']
  plain = train.run(_config('', fl__rounds=3), str(tmp_path / 'plain')).rounds
  assert [r.val_loss for r in resumed] == [r.val_loss for r in plain]
  assert plain[-1].extra_val_ppl is None


def _write(path, content: bytes):
  opener = gzip.open if str(path).endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(content)
  return str(path)


@pytest.mark.parametrize('name, content, message', [
    ('missing.txt', None, 'no such file'),
    ('empty.txt', b'', 'empty file'),
    ('blank.txt', b'\n  \n\n', 'empty file'),
    ('short.txt', b'x' * 31, '32 tokens (with end-of-text), fewer than one window of '
     'seq_len+1=33'),
    ('latin1.txt', 'caf\xe9 au lait\n'.encode('latin-1'), 'latin1.txt:1: not valid UTF-8'),
    ('latin1.jsonl.gz', b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 'latin1.jsonl.gz:2: not valid '
     'UTF-8'),
    ('notext.jsonl', b'{"text": "ok"}\n{"body": "no text"}\n', "notext.jsonl:2: no string field "
     "'text'"),
    ('torn.jsonl', b'{"text": "ok"}\n{"text": "to\n', 'torn.jsonl:2: malformed JSON'),
])
def test_bad_files_are_refused_naming_the_file_and_the_key(tmp_path, name, content, message):
  path = str(tmp_path / name) if content is None else _write(tmp_path / name, content)
  stem = name.split('.')[0]
  with pytest.raises(ValueError) as e:
    extra_files.load(extra_files.parse(path), BytesTokenizer(), 32, 'text')
  text = str(e.value)
  assert text.startswith(f'eval.extra_files: {stem}: {tmp_path}/') and message in text, text
  assert 'data.max_bad_lines' not in text  # nothing is skipped in an extra file
  assert '\n' not in text


def test_a_bad_file_ends_the_command_before_training_with_one_line(tmp_path, files):
  bad = _write(tmp_path / 'latin1.txt', 'caf\xe9\n'.encode('latin-1'))
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, '-m', 'fedjax_pt.main', '--config=configs/tiny.py:test',
       f'--workdir={workdir}', f'--config.eval.extra_files={files},{bad}'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      f'fedjax_pt: error: eval.extra_files: latin1: {bad}:1: not valid UTF-8 (invalid '
      'continuation byte at byte 3)')
  assert not workdir.exists()  # refused before anything was written
