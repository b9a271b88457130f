"""The streaming clustering pieces: spherical k-means (against scikit-learn, and across ranks), the exact
equipartition of a bank, and the bounded memory bank keyed by sample id."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import torchrun

from swav.clustering import MemoryBank, equipartition, spherical_kmeans


def _data(n: int = 300, d: int = 16, k: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    x = F.normalize(centres[torch.arange(n) % k] + 0.4 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    init = x[torch.randperm(n, generator=g)[:k]].clone()
    return x, init


def test_one_step_agrees_with_scikit_learn_on_unit_vectors_from_the_same_centroids():
    from sklearn.cluster import KMeans

    x, init = _data()
    ours, _ = spherical_kmeans(x, init, iterations=1)
    km = KMeans(n_clusters=init.shape[0], init=init.numpy(), n_init=1, max_iter=1, algorithm="lloyd", tol=0.0)
    km.fit(x.numpy())
    # From unit centroids, nearest in Euclidean distance is nearest in cosine; the new centroid is the mean,
    # which spherical k-means puts back on the sphere.
    assert np.allclose(F.normalize(torch.from_numpy(km.cluster_centers_), dim=1).numpy(), ours.numpy(), atol=1e-12)


def test_several_steps_equal_a_plain_loop_and_empty_clusters_keep_their_centroid():
    x, init = _data(seed=1)
    # Every row and centroid leans along one extra axis (cosine above 0.8 to each other); a centroid
    # pointing the other way is nearest to no row.
    x = F.normalize(torch.cat([x, torch.full((x.shape[0], 1), 3.0, dtype=x.dtype)], 1), dim=1)
    init = F.normalize(torch.cat([init, torch.full((init.shape[0], 1), 3.0, dtype=x.dtype)], 1), dim=1)
    far = torch.zeros(1, x.shape[1], dtype=x.dtype)
    far[0, -1] = -1.0
    init = torch.cat([init, far])
    ours, assign = spherical_kmeans(x, init, iterations=4)
    c = init.clone()
    for _ in range(4):
        a = (x @ c.t()).argmax(1)
        for j in range(c.shape[0]):
            if (a == j).any():
                c[j] = F.normalize(x[a == j].mean(0), dim=0)
    assert torch.allclose(ours, c, atol=1e-12) and torch.equal(assign, (x @ c.t()).argmax(1))
    assert torch.equal(ours[-1], far[0]) and not (assign == init.shape[0] - 1).any()


@pytest.mark.slow
def test_two_ranks_agree_on_centroids_split_their_banks_evenly_and_look_up_each_others_banks(tmp_path):
    x, init = _data(n=301, seed=2)
    torch.save({"x": x, "init": init, "split": [0, 137, 301]}, tmp_path / "kmeans.pt")
    r = torchrun(2, "tests/dist/kmeans_ranks.py", str(tmp_path), module=False)
    assert r.returncode == 0, r.stderr[-2000:]
    one, assign = spherical_kmeans(x, init, 5)
    parts = [torch.load(tmp_path / f"kmeans{rank}.pt") for rank in range(2)]
    for p in parts:
        assert torch.allclose(p["centroids"], one, atol=1e-12)
    assert torch.equal(torch.cat([p["assign"] for p in parts]), assign)
    # The bank equipartition across ranks: each rank's rows split exactly evenly (137 and 164 rows, 6
    # clusters), so the union is within one row per rank of N / K in every cluster.
    k = init.shape[0]
    for p, n in zip(parts, (137, 164)):
        assert set(torch.bincount(p["labels"], minlength=k).tolist()) <= {n // k, -(-n // k)}
    union = torch.bincount(torch.cat([p["labels"] for p in parts]), minlength=k)
    assert int(union.sum()) == 301 and int(union.max() - union.min()) <= 2
    # A rank with an empty bank changes nothing: rank 0 alone gives the one-process result.
    for p in parts:
        assert torch.allclose(p["alone"], one, atol=1e-12)
    assert parts[1]["alone_labels"].numel() == 0
    # A sample in another rank's bank gets its assignment from there; one in no bank gets -1.
    assert parts[0]["everywhere"].tolist() == [[0, 100 % 7, 5, -1], [0, 0, 0, -1]]
    assert parts[1]["everywhere"].tolist() == [[104 % 7, 3, -1, 9 % 7], [104 % 5, 3, -1, 9 % 5]]
    assert parts[0]["own"].tolist() == [[0, -1, 5, -1], [0, -1, 0, -1]]
    assert parts[0]["world_ids"].tolist() == parts[1]["world_ids"].tolist() == [0, 100, 5, 7777, 104, 3, 9999, 9]
    assert set(torch.bincount(parts[0]["alone_labels"], minlength=k).tolist()) <= {301 // k, -(-301 // k)}


@pytest.mark.parametrize("n,k", [(300, 30), (301, 30), (64, 7), (10, 3)])
def test_the_bank_is_split_exactly_evenly(n, k):
    g = torch.Generator().manual_seed(n * k)
    scores = torch.randn(n, k, generator=g)
    labels = equipartition(scores, epsilon=0.05, iterations=50)
    counts = torch.bincount(labels, minlength=k)
    assert (labels >= 0).all() and int(counts.sum()) == n
    assert set(counts.tolist()) <= {n // k, -(-n // k)}
    assert torch.equal(labels, equipartition(scores, epsilon=0.05, iterations=50))


def test_equipartition_follows_the_scores_when_they_are_already_balanced():
    k, per = 5, 12
    truth = torch.arange(k).repeat_interleave(per)
    scores = F.one_hot(truth, k).float() * 3 + 0.01 * torch.randn(k * per, k, generator=torch.Generator().manual_seed(0))
    assert torch.equal(equipartition(scores, 0.05, 30), truth)


def test_the_bank_is_a_ring_keyed_by_sample_id_and_round_trips():
    bank = MemoryBank(size=5, views=2, dim=3, heads=2)
    bank.add(torch.tensor([10, 11, 12]), torch.eye(3).unsqueeze(1).repeat(1, 2, 1))
    bank.assignments[0, :3] = torch.tensor([0, 1, 2])
    bank.assignments[1, :3] = torch.tensor([4, 5, 6])
    assert bank.lookup(torch.tensor([11, 99]))[0].tolist() == [1, -1]
    assert bank.lookup(torch.tensor([12, 10]))[1].tolist() == [6, 4]
    # 11 again: one row per sample, the newest, unassigned; new rows fill the empty slots first
    bank.add(torch.tensor([13, 14, 11]), torch.ones(3, 2, 3))
    assert bank.ids.tolist() == [10, 13, 12, 14, 11] and bank.filled == 5
    assert bank.lookup(torch.tensor([11, 12]))[0].tolist() == [-1, 2]
    assert int((bank.ids == 11).sum()) == 1
    # A sample seen again keeps the label it was given until the next relabelling, in the slot it left.
    bank.add(torch.tensor([12]), torch.ones(1, 2, 3), assignments=torch.tensor([[7], [8]]))
    assert bank.lookup(torch.tensor([12, 13])).tolist() == [[7, -1], [8, -1]] and bank.ids.tolist()[2] == 12
    # Full: the oldest row (10) goes first; a forgotten row's slot is the next one filled.
    bank.add(torch.tensor([15]), torch.ones(1, 2, 3))
    assert bank.ids.tolist() == [15, 13, 12, 14, 11]
    bank.forget(torch.tensor([14, 99]))
    assert bank.lookup(torch.tensor([14])).tolist() == [[-1], [-1]] and bank.filled == 4
    bank.add(torch.tensor([16]), torch.eye(3)[:1].unsqueeze(1).repeat(1, 2, 1))
    assert bank.ids.tolist() == [15, 13, 12, 16, 11]
    assert torch.allclose(bank.rows[3].norm(dim=-1), torch.ones(2))   # rows are stored on the unit sphere
    state = bank.state_dict()
    other = MemoryBank(size=5, views=2, dim=3, heads=2)
    other.load_state_dict(state)
    assert torch.equal(other.rows, bank.rows) and other.next == bank.next and torch.equal(other.ids, bank.ids)
    assert torch.equal(other.assignments, bank.assignments) and torch.equal(other.written, bank.written)
    with pytest.raises(ValueError):
        MemoryBank(size=4, views=2, dim=3, heads=2).load_state_dict(state)


def test_lookup_equals_a_plain_search_on_a_bank_that_was_refilled_many_times():
    g = torch.Generator().manual_seed(3)
    bank = MemoryBank(size=64, views=1, dim=2, heads=3)
    for _ in range(20):   # 20 batches of 24 ids from 0-199: repeats, evictions, wraps
        ids = torch.randint(0, 200, (24,), generator=g).unique()
        bank.add(ids, torch.ones(ids.numel(), 1, 2))
        filled = bank.ids >= 0
        bank.assignments[:, filled] = torch.randint(0, 9, (3, int(filled.sum())), generator=g)
    asked = torch.randint(0, 260, (500,), generator=g)
    plain = torch.full((3, 500), -1, dtype=torch.int64)
    for j, i in enumerate(asked.tolist()):
        where = torch.nonzero(bank.ids == i).flatten()
        if where.numel():
            plain[:, j] = bank.assignments[:, where[0]]
    assert torch.equal(bank.lookup(asked), plain) and int((plain[0] >= 0).sum()) > 50
