"""Scripted clients' reports for round-object tests: what a client says, without training."""

from fedjax_pt.federated import compression
from fedjax_pt.federated.messages import ClientReport
from fedjax_pt.local_training import TrainingSummary


def params_of(broadcast):
  """The global model a client receives (the tests broadcast with codec 'none': exact)."""
  return compression.decode(broadcast.payload)


def trained(client, delta, tokens=10, examples=0, loss=0.0, **fields):
  """The report of a client that trained on `tokens` tokens to `delta` (sent uncompressed)."""
  return ClientReport(client, compression.encode(delta, 'none'),
                      training=TrainingSummary(num_tokens=tokens, mean_loss=loss,
                                               mean_grad_norm=0.0, mean_update_norm=0.0),
                      num_examples=examples, **fields)
