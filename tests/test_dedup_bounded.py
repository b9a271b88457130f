"""Duplicate checks in bounded memory: the build's on-disk hash set and merge's partitioned search."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow as pa
from test_build_faults import jpegs, reasons

from pipeline import dupsearch
from pipeline.build import BuildConfig, build
from pipeline.dupsearch import DuplicateSearch
from pipeline.seen import SeenHashes, seen_path


def test_the_hash_file_holds_committed_hashes_only(tmp_path):
    s = SeenHashes(str(tmp_path / "seen.sqlite"))
    a, b = hashlib.sha256(b"a").hexdigest(), hashlib.sha256(b"b").hexdigest()
    s.add(a)
    assert a in s and b not in s
    s.commit(1, "tail-1", [b])
    assert a in s and b in s and s.manifests == 1 and s.tail == "tail-1"
    s.add(hashlib.sha256(b"c").hexdigest())   # the shard in progress when the process dies
    s.close()
    again = SeenHashes(str(tmp_path / "seen.sqlite"))
    assert a in again and hashlib.sha256(b"c").hexdigest() not in again


def test_a_hash_file_left_by_another_build_is_not_trusted(tmp_path):
    """A killed build of other content left its file for the same destination: the rerun must not take
    its hashes for duplicates."""
    src = tmp_path / "src"
    jpegs(src, 12)
    dst, work = tmp_path / "dst", tmp_path / "work"
    work.mkdir()
    stale = SeenHashes(str(work / os.path.basename(seen_path(str(dst), 0, 1, str(work)))).replace(
        f"-{os.getpid()}.sqlite", "-999999999.sqlite"))
    for p in sorted(src.iterdir()):   # the same images' hashes, as if a build of them had committed
        from pipeline.normalise import NormaliseConfig, decode_job

        out = decode_job(p.read_bytes(), NormaliseConfig())
        stale.add(out["sha256"])
    stale.commit(3, "not-a-manifest-of-this-destination")
    stale.close()
    build(str(src), str(dst), BuildConfig(samples_per_shard=4, workers=1, work_dir=str(work)), progress=False)
    assert "duplicate" not in reasons(dst), reasons(dst)
    assert not [n for n in os.listdir(work) if n.endswith(".sqlite")], "a finished part removes its file"


def brute_force(rows: list[tuple[int, int, str, int, str]]) -> dict[int, dict[str, str]]:
    """(manifest, row, sha, gen, url) -> the expected losers, by the documented rule."""
    from pipeline.order import order_key

    groups: dict[str, list] = {}
    for m, row, sha, gen, url in rows:
        rel = url[len("s3://b/raw/"):]
        groups.setdefault(sha, []).append(((gen, order_key(0, rel), rel), m, f"k{m}-{row}", url))
    out: dict[int, dict[str, str]] = {}
    for g in groups.values():
        g.sort()
        for _, m, key, _ in g[1:]:
            out.setdefault(m, {})[key] = g[0][3]
    return out


def test_the_partitioned_search_finds_exactly_the_later_copies(tmp_path, monkeypatch):
    # Tiny buffers and partitions: every step spills and reads many files, as at 1e9 rows.
    monkeypatch.setattr(dupsearch, "BUFFER_BYTES", 4096)
    monkeypatch.setattr(dupsearch, "HASH_PARTS", 8)
    monkeypatch.setattr(dupsearch, "MANIFEST_PARTS", 4)
    monkeypatch.setattr(dupsearch, "PARTITION_BYTES", 64 * 1024)
    rng = np.random.default_rng(3)
    contents = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(3000)]
    # Two contents that share their first 64 bits but differ after: a prefix collision, not a duplicate.
    collide = ("f" * 16 + "0" * 48, "f" * 16 + "1" * 48)
    manifests: dict[int, list] = {}
    rows = []
    for m in range(40):
        shas = [contents[i] for i in rng.integers(0, len(contents), 200)]   # ~12% of rows repeat a content
        if m < 2:
            shas[0] = collide[m]
        gen = 1 if m >= 30 else 0
        urls = [f"s3://b/raw/m{m}/{r}.jpg" for r in range(200)]
        manifests[m] = (pa.table({"sha256": shas, "key": [f"k{m}-{r}" for r in range(200)], "url": urls}), gen)
        rows += [(m, r, shas[r], gen, urls[r]) for r in range(200)]
    search = DuplicateSearch(str(tmp_path))
    for m, (t, _) in manifests.items():
        from pipeline.merge import _prefix64

        search.add(m, np.arange(200, dtype=np.int32), _prefix64(t.column("sha256").combine_chunks()))

    def read_copies(m, picked):
        t, gen = manifests[m]
        return t.take(pa.array(picked)), gen

    got = dict(search.losers(read_copies, len("s3://b/raw/"), 0))
    search.close()
    want = brute_force(rows)
    assert got == want
    assert sum(len(v) for v in want.values()) > 1000
    assert not os.listdir(tmp_path), "the spill files are removed"
