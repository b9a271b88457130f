"""Batches are fair samples of a folder-ordered bucket: shuffled pack order, parts, the shuffle window, peek.

The bucket is the real, labelled digits dataset as one folder per class, which is the worst listing
order a bucket can have: packed in listing order, every shard would hold one or two classes.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from helpers import swav_cli, synthetic_set

from pipeline.build import BuildConfig, build, build_part
from pipeline.merge import merge
from shards import layout
from shards.index import load_index
from shards.tario import iter_samples
from swav.config import load_config
from swav.peek import peek_batches, summarise

# Largest per-shard total-variation distance between a 128-sample shard's class histogram and the
# bucket's, over 50 pack-order seeds (simulated from pipeline.order.order_key): min 0.114, mean 0.150,
# max 0.229, sd 0.020. The bound is 7 sd above the mean; listing order gives 0.80 or more for every shard.
SHARD_TV_BOUND = 0.3
# Classes per batch of 64 from 20 one-class shards of 40, 2 ranks x 10 batches, seeds 0-9: window 16
# (pieces of 20 samples) gave 8.50-9.25 (mean 8.85, sd 0.24), window 1 gave 2.20-2.40 (sd 0.06). Bounds
# 3.5 sd below / above the spread.
WINDOW16_MIN_CLASSES = 8.0
WINDOW1_MAX_CLASSES = 2.7


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from swav.demo_bucket import digits_folder

    root = tmp_path_factory.mktemp("iid")
    digits_folder(root / "digits", size=32)
    return root / "digits"


@pytest.fixture(scope="module")
def digit_set(digits, tmp_path_factory):
    dst = tmp_path_factory.mktemp("iid-set") / "set"
    build(str(digits), str(dst), BuildConfig(samples_per_shard=128, workers=1), progress=False)
    return dst


def label(url: str, src: Path) -> int:
    return int(url[len(str(src)) + 1:].split("/")[0])


def shard_labels(dst: Path, src: Path) -> dict[str, list[int]]:
    out = {}
    for tar in sorted((dst / "shards").glob("*.tar")):
        with open(tar, "rb") as f:
            out[tar.name] = [label(json.loads(s["json"])["url"], src) for s in iter_samples(f)]
    return out


def tv(labels: list[int], ref: Counter) -> float:
    c, n, total = Counter(labels), len(labels), sum(ref.values())
    return 0.5 * sum(abs(c[k] / n - ref[k] / total) for k in ref)


def test_every_shard_is_a_fair_sample_of_a_folder_ordered_bucket(digits, digit_set):
    shards = shard_labels(digit_set, digits)
    bucket = Counter(x for labels in shards.values() for x in labels)
    assert sum(bucket.values()) == 1797 and len(bucket) == 10
    full = [name for name, labels in shards.items() if len(labels) == 128]
    assert len(full) == 14
    worst = max(tv(shards[name], bucket) for name in full)
    assert worst < SHARD_TV_BOUND, worst
    assert load_index(str(digit_set)).record["config"]["seed"] == 0


def test_the_pack_order_is_seeded_and_rebuilds_identically(digits, digit_set, tmp_path):
    same = tmp_path / "same"
    build(str(digits), str(same), BuildConfig(samples_per_shard=128, workers=1), progress=False)
    for tar in (digit_set / "shards").glob("*.tar"):
        assert (same / "shards" / tar.name).read_bytes() == tar.read_bytes()
    other = tmp_path / "other"
    build(str(digits), str(other), BuildConfig(samples_per_shard=128, workers=1, seed=7), progress=False)
    assert load_index(str(other)).record["config"]["seed"] == 7
    a, b = shard_labels(digit_set, digits), shard_labels(other, digits)
    assert a != b and sorted(sum(a.values(), [])) == sorted(sum(b.values(), []))


def test_parts_are_disjoint_fair_samples(digits, tmp_path):
    dst = tmp_path / "parts"
    for part in range(3):
        build_part(str(digits), str(dst), BuildConfig(samples_per_shard=128, workers=1, part=part, num_parts=3),
                   progress=False)
    merge(str(dst), 3)
    shards = shard_labels(dst, digits)
    bucket = Counter(x for labels in shards.values() for x in labels)
    assert sum(bucket.values()) == 1797, "parts together hold every object exactly once"
    for part in range(3):
        labels = [x for name, ls in shards.items() if name.startswith(f"p{part:05d}") for x in ls]
        assert 500 < len(labels) < 700
        # ~600 draws: the TV of a part's histogram is a few hundredths; a folder-split part would be ~0.7.
        assert tv(labels, bucket) < 0.1, part
        assert (dst / layout.snapshot_record_name(part, 3)).exists()


def peek_cfg(url: Path, workers: int, *extra: str):
    return load_config(None, [f"data.url={url}", f"data.num_workers={workers}", "train.batch_size=64", "seed=3",
                              *extra])


def classes_per_batch(rows: list[dict], src: Path) -> list[int]:
    return [len({label(u, src) for u in r["urls"]}) for r in rows]


@pytest.mark.parametrize("workers,ranks", [(0, 1), (2, 1), (0, 2), (2, 2)])
def test_peek_batches_hold_nearly_every_class(digits, digit_set, workers, ranks):
    rows = peek_batches(peek_cfg(digit_set, workers), ranks, 8)
    assert len(rows) == 8 * ranks and {r["rank"] for r in rows} == set(range(ranks))
    per_batch = classes_per_batch(rows, digits)
    assert sum(per_batch) / len(per_batch) >= 9.5, per_batch
    s = summarise(rows)
    assert s["folders_per_batch_mean"] == sum(per_batch) / len(per_batch)
    assert s["folders_per_batch_iid"] > 9.9


@pytest.fixture(scope="module")
def twelve_shards(digits, tmp_path_factory):
    dst = tmp_path_factory.mktemp("iid-12") / "set"
    build(str(digits), str(dst), BuildConfig(samples_per_shard=150, workers=1), progress=False)
    assert len(load_index(str(dst))) == 12
    return dst


@pytest.mark.parametrize("workers,ranks", [(0, 1), (2, 2)])
def test_one_pass_of_batches_sees_every_sample_once_on_a_set_of_few_shards(digits, twelve_shards, workers, ranks):
    """12 shards for 1 and 4 readers with 16-piece windows: before pieces, 1 reader saw 77% of the set."""
    batches = 1797 // (ranks * 64)
    for seed in (0, 1, 2):
        cfg = load_config(None, [f"data.url={twelve_shards}", f"data.num_workers={workers}", "train.batch_size=64",
                                 f"seed={seed}"])
        rows = peek_batches(cfg, ranks, batches)
        s = summarise(rows)
        # Shards of 150 cut into pieces of 25: every reader's share of a pass is exactly 450 samples.
        assert s["distinct"] == s["delivered"] == batches * ranks * 64, (seed, s)
        assert s["repeats_per_batch_max"] == 0
        per_batch = classes_per_batch(rows, digits)
        assert sum(per_batch) / len(per_batch) >= 9.5, per_batch


def test_peek_cli_writes_one_line_per_batch(digit_set, tmp_path):
    out = tmp_path / "peek.jsonl"
    r = swav_cli("shards", "peek", str(digit_set), "train.batch_size=64", "--ranks", "2", "--workers", "2",
                 "--batches", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["rank"], x["batch"]) for x in lines] == [(r, b) for r in range(2) for b in range(3)]
    assert all(len(x["urls"]) == 64 and set(x) == {"rank", "batch", "urls"} for x in lines)
    assert "source folders per batch" in r.stdout and "i.i.d. batch would hold" in r.stdout
    assert "coverage: 384 distinct of 384 delivered samples (100.0%)" in r.stdout, r.stdout
    assert "repeated samples inside a batch: mean 0.00, max 0" in r.stdout


def test_a_temp_dir_too_long_for_the_workers_sockets_is_a_clear_error_not_a_hang(digit_set):
    """Linux caps a Unix socket path at 107 bytes; the workers' sockets add 32 to the temp dir's path."""
    import shutil
    import tempfile

    base = tempfile.mkdtemp(prefix="t")   # short, whatever pytest's own folder is
    try:
        for length, ok in ((75, True), (76, False)):
            temp = Path(base) / ("x" * (length - len(base) - 1))
            temp.mkdir()
            assert len(str(temp)) == length
            r = swav_cli("shards", "peek", str(digit_set), "train.batch_size=64", "--ranks", "1", "--workers", "1",
                         "--batches", "1", env={"TMPDIR": str(temp)}, timeout=120)
            if ok:
                assert r.returncode == 0, r.stderr[-2000:]
                assert "source folders per batch" in r.stdout
            else:
                assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
                assert f"the temp dir {temp} is 76 bytes long" in r.stderr and "TMPDIR" in r.stderr, r.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_shuffle_window_mixes_even_one_class_per_shard(tmp_path):
    # Tars written by someone else in listing order: shard s holds only class s // 2 (its url mem://s/i).
    root = synthetic_set(tmp_path / "set", shards=20, per_shard=40, jpeg=b"not decoded by peek")
    mean = {}
    for window in (1, 16):
        rows = peek_batches(peek_cfg(root, 0, f"data.shuffle_window={window}"), 2, 10)
        per_batch = [len({int(u.split("/")[2]) // 2 for u in r["urls"]}) for r in rows]
        mean[window] = sum(per_batch) / len(per_batch)
    assert mean[1] <= WINDOW1_MAX_CLASSES, mean
    assert mean[16] >= WINDOW16_MIN_CLASSES, mean


def test_the_old_mix_shards_key_names_its_new_name():
    from swav_io.errors import UserError

    with pytest.raises(UserError, match="'data.mix_shards' is now 'data.shuffle_window'"):
        load_config(None, ["data.mix_shards=4"])
    with pytest.raises(UserError, match="data.shuffle_window must be >= 1"):
        load_config(None, ["data.shuffle_window=0"])
