"""The train request and reply survive Flower's records: a reply is the node's `ClientReport`."""

from fedjax_pt import records
from fedjax_pt.deploy import protocol
from fedjax_pt.federated.messages import ClientReport
from fedjax_pt.local_training import TrainingSummary


def test_request_round_trip():
  request = protocol.TrainRequest(round=3, attempt=1, client=2, run_key='abc', config_json='{}',
                                  vocab_size=384, transport='shared', shared_dir='/s',
                                  keep_snapshots=4, received=1, sync_fragment=0, sync_start=2,
                                  sync_steps=2)
  back = protocol.TrainRequest.from_record(request.to_record())
  assert back == request
  assert back.received_fragment == 1 and back.segment.start == 2


def test_reply_round_trip():
  steps = records.step_records(
      [{'local_step': t, 'loss': 5.0 - t, 'grad_norm': 1.0, 'update_norm': 0.5, 'lr': 1e-3}
       for t in (2, 4)], round_idx=3, client=1, local_steps=4)
  report = ClientReport(
      client=1, update=None, training=TrainingSummary(num_tokens=256, mean_loss=4.5,
                                                      mean_grad_norm=1.0, mean_update_norm=0.5),
      steps=steps, num_examples=9000, local_steps=4, holds_model=True)
  back, timings = protocol.report_of(protocol.reply_content(report, {'train': 1.5}), 'update')
  assert back.update == 'update' and back.compute_s == 1.5 and timings == {'train': 1.5}
  back.update, back.compute_s = None, None
  assert back == report
  # Global step numbering: (round - 1) * local_steps + local step.
  assert [(s.round, s.client, s.step, s.local_step) for s in back.steps] == [(3, 1, 10, 2),
                                                                           (3, 1, 12, 4)]


def test_failure_reply_has_no_numbers():
  back, _ = protocol.report_of(protocol.reply_content(
      ClientReport(client=0, update=None, failure='raised ValueError: no data')))
  assert back.failure == 'raised ValueError: no data' and back.training is None
  assert back.steps == [] and not back.injected and back.holds_model is None
