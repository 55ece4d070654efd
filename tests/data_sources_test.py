"""Tests of fedjax_pt.data.sources: builtin, JSONL / gzip / text files, TFDS, bad input."""

import gzip
import json
import re
import sys
from pathlib import Path

import pytest

from fedjax_pt.data.config import DataConfig
from fedjax_pt.data.sources import load_documents


def _cfg(**kw) -> DataConfig:
  return DataConfig.from_config(kw)


def _write_jsonl(path: Path, records, compress: bool = False) -> Path:
  data = ''.join(json.dumps(r) + '\n' for r in records).encode()
  path.write_bytes(gzip.compress(data) if compress else data)
  return path


def _texts(docs):
  return [d.text for d in docs]


def test_builtin_is_offline_deterministic_and_sorted():
  docs = load_documents(_cfg())
  assert len(docs) == 79
  topics = [d.fields['topic'] for d in docs]
  assert topics == sorted(topics)
  assert sum(len(d.text) for d in docs) > 400_000
  assert _texts(load_documents(_cfg())) == _texts(docs)
  assert _texts(load_documents(_cfg(max_documents=3))) == _texts(docs)[:3]


def test_jsonl_keeps_other_fields_and_custom_text_field(tmp_path):
  path = _write_jsonl(tmp_path / 'a.jsonl', [{'body': 'first', 'url': 'http://a.com/x'},
                                             {'body': 'second', 'url': 'http://b.org/'}])
  docs = load_documents(_cfg(source='jsonl', path=str(path), text_field='body'))
  assert _texts(docs) == ['first', 'second']
  assert docs[0].fields == {'url': 'http://a.com/x'}
  assert docs[1].origin == f'{path}:2'


@pytest.mark.parametrize('name', ['c.json.gz', 'c.jsonl.gz', 'c.json'])
def test_json_variants_and_gzip(tmp_path, name):
  path = _write_jsonl(tmp_path / name, [{'text': 'héllo'}, {'text': 'wörld'}],
                      compress=name.endswith('.gz'))
  assert _texts(load_documents(_cfg(source='jsonl', path=str(path)))) == ['héllo', 'wörld']


def test_text_files_split_into_documents_at_blank_lines(tmp_path):
  path = tmp_path / 'play.txt'
  path.write_text('ROMEO:\nHello.\n\n\nJULIET:\nHi.\n  \nEnd\n')
  docs = load_documents(_cfg(source='text', path=str(path)))
  assert _texts(docs) == ['ROMEO:\nHello.', 'JULIET:\nHi.', 'End']
  assert [d.origin for d in docs] == [f'{path}:1', f'{path}:5', f'{path}:8']
  assert docs[0].fields == {'file': str(path)}


def test_patterns_keep_order_sort_files_and_number_groups(tmp_path):
  for name in ['b2.jsonl', 'b1.jsonl']:
    _write_jsonl(tmp_path / name, [{'text': name}])
  (tmp_path / 'a.txt').write_text('plain text\n')
  docs = load_documents(_cfg(source='jsonl', path=f'{tmp_path}/b*.jsonl, {tmp_path}/a.txt'))
  assert _texts(docs) == ['b1.jsonl', 'b2.jsonl', 'plain text']
  assert [d.group for d in docs] == [0, 0, 1]


def test_max_documents_stops_reading_and_blank_documents_are_dropped(tmp_path):
  _write_jsonl(tmp_path / 'a.jsonl', [{'text': 'one'}, {'text': '  '}, {'text': 'two'}])
  (tmp_path / 'b.jsonl').write_text('{not json\n')  # never reached
  docs = load_documents(_cfg(source='jsonl', path=f'{tmp_path}/*.jsonl', max_documents=2))
  assert _texts(docs) == ['one', 'two']


def test_max_bad_lines_skips_then_fails_naming_file_and_line(tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_bytes(b'{"text": "ok"}\n{broken\n{"other": 1}\n"\xff\xfe"\n{"text": "end"}\n')
  docs = load_documents(_cfg(source='jsonl', path=str(path), max_bad_lines=3))
  assert _texts(docs) == ['ok', 'end']
  with pytest.raises(ValueError, match=rf'^{path}:4: not valid UTF-8'):
    load_documents(_cfg(source='jsonl', path=str(path), max_bad_lines=2))


@pytest.mark.parametrize('line,message', [
    (b'{"text": "a",\n', 'malformed JSON'),
    (b'{"body": "a"}\n', "no string field 'text'"),
    (b'["text"]\n', "no string field 'text'"),
    (b'{"text": 3}\n', "no string field 'text'"),
    (b'{"text": "\xc3\x28"}\n', 'not valid UTF-8'),
])
def test_bad_line_is_an_error_naming_file_and_line(tmp_path, line, message):
  path = tmp_path / 'x.jsonl'
  path.write_bytes(b'{"text": "fine"}\n' + line)
  with pytest.raises(ValueError, match=rf'^{path}:2: {message}'):
    load_documents(_cfg(source='jsonl', path=str(path)))


def test_bad_utf8_in_text_file_names_line(tmp_path):
  path = tmp_path / 'x.txt'
  path.write_bytes(b'good\n\xff bad\n')
  with pytest.raises(ValueError, match=rf'^{path}:2: not valid UTF-8'):
    load_documents(_cfg(source='text', path=str(path)))


def test_glob_without_match_names_the_pattern(tmp_path):
  pattern = f'{tmp_path}/missing*.jsonl'
  with pytest.raises(FileNotFoundError, match=re.escape(f'pattern {pattern!r} matches no file')):
    load_documents(_cfg(source='jsonl', path=pattern))


@pytest.mark.parametrize('name,content', [('e.jsonl', b''), ('e.txt', b'\n \n'),
                                          ('e.jsonl.gz', gzip.compress(b'', mtime=0))])
def test_empty_file_is_named(tmp_path, name, content):
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(ValueError, match=rf'^{path}: empty file'):
    load_documents(_cfg(source='jsonl', path=str(path)))


def test_truncated_gzip_is_named(tmp_path):
  data = gzip.compress(b''.join(b'{"text": "doc %d"}\n' % i for i in range(500)))
  path = tmp_path / 't.jsonl.gz'
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=rf'^{path}: truncated or corrupt gzip'):
    load_documents(_cfg(source='jsonl', path=str(path)))


def test_not_gzip_is_named(tmp_path):
  path = tmp_path / 'n.jsonl.gz'
  path.write_bytes(b'{"text": "not compressed"}\n')
  with pytest.raises(ValueError, match=rf'^{path}: truncated or corrupt gzip'):
    load_documents(_cfg(source='jsonl', path=str(path)))


def test_unsupported_extension_and_double_match_are_named(tmp_path):
  path = tmp_path / 'notes.md'
  path.write_text('# hi\n')
  with pytest.raises(ValueError, match=rf'^{path}: unsupported file type'):
    load_documents(_cfg(source='text', path=str(path)))
  txt = tmp_path / 'a.txt'
  txt.write_text('a\n')
  with pytest.raises(ValueError, match=f'{txt} is matched by both'):
    load_documents(_cfg(source='text', path=f'{txt},{tmp_path}/*.txt'))


def test_corpus_of_blank_documents_names_the_path(tmp_path):
  path = _write_jsonl(tmp_path / 'blank.jsonl', [{'text': ''}, {'text': '\n'}])
  with pytest.raises(ValueError, match='no documents with text in data.path=.*blank.jsonl'):
    load_documents(_cfg(source='jsonl', path=str(path)))


def test_missing_tfds_package_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
  with pytest.raises(ImportError, match=re.escape('pip install fedjax_pt[tfds]')):
    load_documents(_cfg(source='tfds', path='c4/en'))


# ---------------------------------------------------------------------------------------------
# TFDS, mocked, through a tiny builder defined here: real text datasets such as c4 need TensorFlow
# just to import their builder module, which the data_source path itself does not.


@pytest.fixture(scope='module')
def tfds():
  tfds = pytest.importorskip('tensorflow_datasets', reason='tensorflow-datasets is not installed')

  class FedjaxPtMockText(tfds.core.GeneratorBasedBuilder):  # registered as fedjax_pt_mock_text
    VERSION = tfds.core.Version('1.0.0')
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='en')]

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {'text': tfds.features.Text(), 'url': tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      yield 0, {'text': 'unused', 'url': 'unused'}

  del FedjaxPtMockText
  return tfds


def test_tfds_mock_random_examples(tfds):
  with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE):
    docs = load_documents(_cfg(source='tfds', path='fedjax_pt_mock_text/en'))
  assert 1 <= len(docs) <= 7 and all(isinstance(d.text, str) for d in docs)
  assert set(docs[0].fields) == {'url'}


def test_tfds_mock_bytes_are_decoded_and_max_documents_applies(tfds):
  records = [{'text': f'doc {i}'.encode(), 'url': b'http://x.org/'} for i in range(5)]
  records[1]['text'] = b'\xff'
  with tfds.testing.mock_data(as_data_source_fn=lambda *a, **k: records):
    cfg = _cfg(source='tfds', path='fedjax_pt_mock_text/en', tfds_split='validation',
               max_documents=3, max_bad_lines=1)
    docs = load_documents(cfg)
    assert _texts(docs) == ['doc 0', 'doc 2', 'doc 3']
    assert docs[0].origin == 'tfds:fedjax_pt_mock_text/en[validation]#0'
    with pytest.raises(ValueError, match=r'#1: not valid UTF-8'):
      load_documents(_cfg(source='tfds', path='fedjax_pt_mock_text/en'))
    with pytest.raises(ValueError, match="no field 'body'"):
      load_documents(_cfg(source='tfds', path='fedjax_pt_mock_text/en', text_field='body'))


def test_tfds_unknown_dataset_is_named(tfds):
  del tfds  # only needs the package
  with pytest.raises(ValueError, match=r'^tfds:no_such_dataset_xyz\[train\]: cannot open'):
    load_documents(_cfg(source='tfds', path='no_such_dataset_xyz',
                        tfds_data_dir='/nonexistent/tfds'))
