"""Sampling without replacement at any scale: every sample once per pass, no sample twice in a batch.

The cluster-scale cases are simulations: a pass's assignment of (shard, sample range) to consumers is
computed from sample counts alone, and a few consumers are streamed sample by sample over a reader
that needs no tar. `test_peek_*` read real tars through the training loader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shards.index import ShardIndex
from shards.passes import pass_assignment
from shards.stream import ShardStream

REPO = Path(__file__).resolve().parents[1]


def index_of(counts: list[int] | np.ndarray, generations=None) -> ShardIndex:
    counts = np.asarray(counts, dtype=np.int64)
    return ShardIndex(url="sim://set", names=None, samples=counts, nbytes=counts * 0, sha256=None, record={},
                      generations=None if generations is None else np.asarray(generations, dtype=np.int32))


def synthetic_reader(counts: np.ndarray):
    """Samples of shard s are ids s * 2**32 + ordinal; as many as the index says."""
    def read(shard: int, first: int):
        for i in range(first, int(counts[shard])):
            yield {"__key__": str(shard * 2**32 + i)}
    return read


def check_pass_tiles_every_sample_once(counts: np.ndarray, consumers: int, window: int) -> dict:
    """Every sample of the set lies in exactly one piece of the pass, and each piece has one owner."""
    idx = index_of(counts)
    stream = ShardStream(idx, 7, 0, consumers, window)
    layout = stream.layout
    a = pass_assignment(stream.passes, 0, layout, consumers)
    order = np.lexsort((a["start"], a["shard"]))
    shard, start, end = a["shard"][order], a["start"][order], a["end"][order]
    assert np.array_equal(np.bincount(shard, minlength=len(counts)), np.full(len(counts), layout.split))
    first = np.r_[True, shard[1:] != shard[:-1]]
    last = np.r_[shard[1:] != shard[:-1], True]
    assert (start[first] == 0).all(), "every shard's first piece starts at its first sample"
    assert (end[last] == counts[shard[last]]).all(), "every shard's last piece ends at its last sample"
    assert np.array_equal(end[~last], start[~first]), "pieces of a shard neither overlap nor leave gaps"
    per_consumer = np.bincount(a["consumer"], weights=a["end"] - a["start"], minlength=consumers)
    assert per_consumer.sum() == counts.sum()
    return {"layout": layout, "min_share": per_consumer.min(), "max_share": per_consumer.max(),
            "max_piece": int((end - start).max())}


def stream_passes(counts: np.ndarray, consumer: int, consumers: int, window: int, batch: int, passes: int = 2):
    """One consumer's batches over its first `passes` passes: ids per pass, and the batches."""
    idx = index_of(counts)
    s = ShardStream(idx, 7, consumer, consumers, window, reader=synthetic_reader(counts))
    per_pass: dict[int, list[int]] = {}
    batches = []
    while True:
        s.begin_batch()
        got = [next(s) for _ in range(batch)]
        batches.append([int(x["__key__"]) for x in got])
        for x in got:
            per_pass.setdefault(x["__pass__"], []).append(int(x["__key__"]))
        if min(x["__pass__"] for x in got) >= passes:
            return per_pass, batches


def all_ids(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([s * 2**32 + np.arange(c, dtype=np.int64) for s, c in enumerate(counts)])


DEMO_SET = np.array([128] * 14 + [68])   # the demo's 1,860 images in shards of 128


@pytest.mark.parametrize("ranks,workers", [(2, 1), (8, 4), (1, 0), (3, 2)])
def test_demo_set_every_sample_once_per_pass_and_never_twice_in_a_batch(ranks, workers):
    consumers = ranks * max(1, workers)
    check_pass_tiles_every_sample_once(DEMO_SET, consumers, 16)
    everything = np.sort(all_ids(DEMO_SET))
    delivered = {0: [], 1: []}
    for c in range(consumers):
        per_pass, batches = stream_passes(DEMO_SET, c, consumers, 16, 64)
        for p in (0, 1):
            delivered[p] += per_pass.get(p, [])
        repeats = [len(b) - len(set(b)) for b in batches]
        assert max(repeats) == 0, f"consumer {c}: a batch holds a sample twice"
    for p in (0, 1):
        assert np.array_equal(np.sort(delivered[p]), everything), f"pass {p}: every sample exactly once"


def test_a_set_smaller_than_one_batch_still_covers_every_sample_each_pass():
    counts = np.array([5, 7, 3])
    per_pass, _ = stream_passes(counts, 0, 1, 16, 4, passes=3)
    for p in range(3):
        assert sorted(per_pass[p]) == sorted(all_ids(counts).tolist())


@pytest.mark.parametrize("shards,ranks,workers", [(1300, 64, 10), (10_000, 256, 8), (1_000_000, 1024, 8)])
def test_cluster_scale_pass_assigns_every_sample_once(shards, ranks, workers):
    """ImageNet on the reference 64 GPUs, a 10M-image set on 256 GPUs, 1e9 images on 1,024 GPUs."""
    counts = np.full(shards, 1000, dtype=np.int64)
    consumers = ranks * workers
    got = check_pass_tiles_every_sample_once(counts, consumers, 16)
    layout = got["layout"]
    assert layout.pieces >= min(consumers * 16, shards * (1000 // 16)), "every window can hold distinct pieces"
    # Shares differ by at most one piece: no consumer is left waiting on another's pass.
    assert got["max_share"] - got["min_share"] <= got["max_piece"]
    # Sample by sample, over the first pass boundary, for the first, a middle and the last consumer.
    if shards <= 10_000:
        for c in (0, consumers // 2, consumers - 1):
            per_pass, batches = stream_passes(counts, c, consumers, 16, 64, passes=1)
            assert max(len(b) - len(set(b)) for b in batches) == 0
            assert len(per_pass[0]) == len(set(per_pass[0]))


def test_pieces_are_whole_shards_when_shards_outnumber_the_slots():
    # 1e9 images in shards of 1,000 on 1,024 x 8 readers: no shard is cut, so no tar is read twice a pass.
    stream = ShardStream(index_of(np.full(1_000_000, 1000)), 0, 0, 8192, 16)
    assert stream.layout.split == 1


def named_index(names: list[str], counts: list[int], generations: list[int] | None = None) -> ShardIndex:
    import pyarrow as pa

    idx = index_of(counts, generations)
    idx.names = pa.array(names)
    return idx


def reader_by_name(idx: ShardIndex):
    """Sample ids that follow a shard's name, not its position in the index (which growth shifts)."""
    def read(shard: int, first: int):
        name = idx.name(shard)
        for i in range(first, int(idx.samples[shard])):
            yield {"__key__": f"{name}#{i}"}
    return read


def drain(streams, counts_each: list[int]) -> list[dict]:
    out = []
    for s, n in zip(streams, counts_each):
        out += [next(s) for _ in range(n)]
    return out


def by_pass(samples: list[dict], p: int) -> list[str]:
    return sorted(x["__key__"] for x in samples if x["__pass__"] == p)


def everything(idx: ShardIndex, keep=None) -> list[str]:
    return sorted(f"{idx.name(s)}#{i}" for s in range(len(idx)) for i in range(int(idx.samples[s]))
                  if keep is None or keep(s))


def test_two_resizes_in_a_row_repeat_nothing():
    from shards.stream import resume_plan

    idx = named_index([f"s{i:02d}" for i in range(9)], [40] * 9)
    read = reader_by_name(idx)
    a = [ShardStream(idx, 3, c, 2, 4, reader=read) for c in range(2)]
    got = drain(a, [70, 45])
    b = [ShardStream(idx, 3, c, 3, 4, reader=read, plan=resume_plan([s.state_dict() for s in a])) for c in range(3)]
    got += drain(b, [30, 5, 61])
    c_ = [ShardStream(idx, 3, c, 5, 4, reader=read, plan=resume_plan([s.state_dict() for s in b])) for c in range(5)]
    got += drain(c_, [400] * 5)
    for p in (0, 1):
        assert by_pass(got, p) == everything(idx), f"pass {p}: every sample exactly once across two resizes"


def test_a_grown_set_finishes_the_pass_in_progress_then_reads_the_new_shards():
    from shards.stream import resume_plan

    old = named_index([f"a{i}" for i in range(6)], [30] * 6)
    # `--incremental` adds generation-1 shards whose names sort between the old ones.
    new = named_index(["a0", "a1", "a1x", "a2", "a3", "a4", "a4x", "a5", "a5x"], [30, 30, 25, 30, 30, 30, 25, 30, 25],
                      [0, 0, 1, 0, 0, 0, 1, 0, 1])
    s = ShardStream(old, 1, 0, 1, 4, reader=reader_by_name(old))
    got = [next(s) for _ in range(70)]
    r = ShardStream(new, 1, 0, 1, 4, reader=reader_by_name(new))
    r.load_state_dict(s.state_dict())
    got += [next(r) for _ in range(500)]
    assert by_pass(got, 0) == everything(old), "the pass in progress ends on the shards it started with"
    assert by_pass(got, 1) == everything(new), "the new shards join at the next pass"
    # The same growth across a resize.
    a = [ShardStream(old, 1, c, 2, 4, reader=reader_by_name(old)) for c in range(2)]
    got = drain(a, [50, 20])
    b = [ShardStream(new, 1, c, 3, 4, reader=reader_by_name(new), plan=resume_plan([x.state_dict() for x in a]))
         for c in range(3)]
    got += drain(b, [300] * 3)
    assert by_pass(got, 0) == everything(old) and by_pass(got, 1) == everything(new)


def test_a_set_that_lost_shards_is_a_named_error_that_says_how_to_continue():
    from shards.stream import check_resume
    from swav_io.errors import UserError

    old = named_index([f"a{i}" for i in range(6)], [30] * 6)
    s = ShardStream(old, 1, 0, 1, 4, reader=reader_by_name(old))
    [next(s) for _ in range(10)]
    smaller = named_index([f"a{i}" for i in range(5)], [30] * 5)
    with pytest.raises(UserError, match=r"no longer holds the 6 shard\(s\).*data.restart_pass=true"):
        check_resume(smaller, [s.state_dict()])
    with pytest.raises(UserError, match="data.restart_pass=true"):
        ShardStream(smaller, 1, 0, 1, 4).load_state_dict(s.state_dict())
    v1 = {"stream_v": 1, "consumer": 0, "num_consumers": 1}
    with pytest.raises(UserError, match="earlier version.*data.restart_pass=true"):
        check_resume(old, [v1])


def test_restart_pass_starts_a_fresh_pass_after_the_furthest_one():
    from shards.stream import restart_plan

    old = named_index([f"a{i}" for i in range(6)], [30] * 6)
    s = ShardStream(old, 1, 0, 1, 4, reader=reader_by_name(old))
    [next(s) for _ in range(200)]   # into pass 1
    smaller = named_index([f"a{i}" for i in range(5)], [30] * 5)
    r = ShardStream(smaller, 1, 0, 2, 4, reader=reader_by_name(smaller), plan=restart_plan([s.state_dict()]))
    first = next(r)
    assert first["__pass__"] == 2
