"""The train request and reply survive Flower's records, and a reply becomes the simulation's
ClientReport."""

import math

from fedjax_pt.deploy import protocol


def test_request_round_trip():
  request = protocol.TrainRequest(round=3, attempt=1, client=2, run_key='abc', config_json='{}',
                                  vocab_size=384, transport='shared', shared_dir='/s',
                                  keep_snapshots=4)
  assert protocol.TrainRequest.from_record(request.to_record()) == request


def test_reply_round_trip_and_client_report():
  steps = [{'local_step': t, 'loss': 5.0 - t, 'grad_norm': 1.0, 'update_norm': 0.5, 'lr': 1e-3}
           for t in (2, 4)]
  reply = protocol.TrainReply(client=1, num_tokens=256, num_examples=9000, mean_loss=4.5,
                              last_loss=4.0, mean_grad_norm=1.0, mean_update_norm=0.5,
                              steps=steps, timings={'train': 1.5})
  back = protocol.TrainReply.from_content(reply.to_content())
  assert back == reply
  report = back.client_report('update', round_idx=3, local_steps=4, elapsed_s=2.0)
  assert report.update == 'update' and report.num_tokens == 256 and report.elapsed_s == 2.0
  # Global step numbering as the simulation's: (round - 1) * local_steps + local step.
  assert [(s.round, s.client, s.step, s.local_step) for s in report.steps] == [(3, 1, 10, 2),
                                                                             (3, 1, 12, 4)]


def test_failure_reply_has_no_numbers():
  back = protocol.TrainReply.from_content(
      protocol.TrainReply(client=0, failure='raised ValueError: no data').to_content())
  assert back.failure == 'raised ValueError: no data' and math.isnan(back.mean_loss)
  assert back.steps == [] and not back.injected
