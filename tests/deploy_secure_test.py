"""The node's side of a SecAgg+ round and the server's reading of the unmasked mean, by hand."""

import math

from flwr.compat.common import recorddict_compat as compat
from flwr.common import parameters_to_ndarrays
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pt.deploy import secure
from fedjax_pt.federated.messages import ClientReport
from fedjax_pt.local_training import TrainingSummary


def _fitres(update, loss=2.0, clip_range=1.0):
  report = ClientReport(client=3, update=None, local_steps=3, training=TrainingSummary(
      num_tokens=96, mean_loss=loss, mean_grad_norm=1.0, mean_update_norm=0.1))
  content = secure.reply_content(report, update, clip_range, {'train': 1.5})
  fitres = compat.recorddict_to_fitres(content, keep_input=True)
  return parameters_to_ndarrays(fitres.parameters), fitres


def test_a_client_sends_its_delta_and_its_scaled_loss_and_only_clear_counts():
  arrays, fitres = _fitres({'a': jnp.asarray([0.5, -2.0]), 'b': jnp.asarray([[0.25]])}, loss=4.0)
  np.testing.assert_array_equal(arrays[0], [0.5, -2.0])
  np.testing.assert_array_equal(arrays[1], [[0.25]])
  np.testing.assert_array_equal(arrays[2], [4.0 / 32])  # loss * clip_range / LOSS_RANGE
  assert fitres.num_examples == 1  # uniform: SecAgg+ divides the sum by the number of clients
  assert set(fitres.metrics) == set(secure.CLEAR_METRICS)
  assert fitres.metrics['clipped_values'] == 1 and fitres.metrics['finite'] == 1  # -2.0 > 1


def test_a_diverged_client_sends_zeros_and_the_server_averages_the_others_exactly():
  arrays, fitres = _fitres({'a': jnp.asarray([math.nan, 1.0])})
  assert fitres.metrics['finite'] == 0
  assert all(not a.any() for a in arrays)
  # Clients 0 and 1 finite with deltas 0.2 and 0.4 and losses 3 and 5, client 2 sent zeros:
  # the unmasked mean over 3 is (0.6 / 3, 8 / 32 / 3); the mean of the finite two is 0.3 and 4.
  delta, loss = secure.split_mean([np.asarray([0.6 / 3]), np.asarray([8 / 32 / 3])], 1.0, 3, 2)
  np.testing.assert_allclose(delta[0], [0.3], rtol=1e-6)
  assert delta[0].dtype == np.float32 and len(delta) == 1
  assert loss == pytest.approx(4.0)


def test_record_bytes_counts_arrays_and_byte_strings():
  _, fitres = _fitres({'a': jnp.zeros(1000)})
  content = compat.fitres_to_recorddict(fitres, keep_input=True)
  assert 4004 < secure.record_bytes(content) < 4004 + 600  # float32 values + npy headers, metrics
