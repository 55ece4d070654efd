"""Client sampling: seeded, reproducible, and retries draw only among the clients still missing."""

from fedjax_pt.federated import sampling


def test_sample_clients_is_seeded_subset():
  a = sampling.sample_clients(10, 4, seed=3, round_idx=7)
  assert len(set(a)) == 4 and all(0 <= k < 10 for k in a) and a == sorted(a)
  assert a == sampling.sample_clients(10, 4, seed=3, round_idx=7)
  draws = {tuple(sampling.sample_clients(10, 4, seed=3, round_idx=r)) for r in range(20)}
  assert len(draws) > 10
  assert sampling.sample_clients(8, 8, seed=0, round_idx=1) == list(range(8))


def test_a_retry_draws_among_the_clients_not_yet_aggregated():
  first = sampling.sample_clients(10, 4, seed=3, round_idx=7)
  kept = first[:2]
  for attempt in range(1, 20):
    again = sampling.sample_clients(10, 2, seed=3, round_idx=7, attempt=attempt, exclude=kept)
    assert len(again) == 2 and not set(again) & set(kept)
  assert sampling.sample_clients(4, 4, 0, 1, attempt=1, exclude=[0, 2]) == [1, 3]


def test_client_groups():
  assert sampling.client_groups([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
  assert sampling.client_groups([4, 6, 7], 2) == [[4, 6], [7]]
