"""The build's pack order: a seeded pseudo-random permutation of a part's objects, not the listing order.

Buckets are ordered by folder (camera, user, crawl), so packing in listing order makes every shard a
few folders. Each object gets a 64-bit key from a keyed hash of its relative path; packing in key
order is a uniform random permutation, so every shard is an i.i.d. sample (without replacement) of
the part. There is no full in-memory sort: the listing snapshot is written as runs of at most
``run_rows`` objects, each sorted by key, and the build streams a k-way merge of the runs. Memory is
one run while listing and one small batch per run while merging.

The snapshot is the build's own record of what it set out to pack: a rerun resumes from it (skipping
the objects already committed, by count) instead of re-walking a bucket that may have changed.
"""

from __future__ import annotations

import hashlib
import heapq
import io
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.listing import SourceObject, printable
from shards import layout
from shards.manifest import open_parquet
from swav_io.storage import join, read_json, with_retries, write_bytes

SNAPSHOT_SCHEMA = pa.schema([
    ("order", pa.uint64()),    # pack-order key: keyed hash of (seed, rel)
    ("rel", pa.string()),      # path relative to the source prefix
    ("list_pos", pa.int64()),  # position in the listing (or list file) this snapshot was taken from
    ("size", pa.int64()),
])
RUN_ROWS = 1_000_000
MERGE_BATCH = 2048


def order_key(seed: int, rel: str) -> int:
    """The object's place in the pack order (independent of the hash that assigns parts)."""
    digest = hashlib.blake2b(rel.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little", signed=True),
                             person=b"swav-pack-order").digest()
    return int.from_bytes(digest, "little")


def write_snapshot(fs, root: str, part: int, num_parts: int, objects: Iterable[SourceObject], seed: int,
                   run_rows: int = RUN_ROWS, generation: int = 0) -> dict:
    """Write the part's objects as key-sorted runs; returns the snapshot record (runs, rows)."""
    runs, rows = _write_runs(fs, root, part, num_parts, _keyed(objects, seed), run_rows, generation)
    return {"runs": runs, "rows": rows, "seed": seed, "generation": generation}


def _keyed(objects: Iterable[SourceObject], seed: int) -> Iterator[tuple[int, str, int, int]]:
    for obj in objects:
        yield order_key(seed, obj.rel), obj.rel, obj.pos, obj.size


def _write_runs(fs, root: str, part: int, num_parts: int, rows: Iterable[tuple[int, str, int, int]],
                run_rows: int, generation: int, tag: str = "") -> tuple[int, int]:
    """(runs, rows) written: (order, rel, list_pos, size) tuples as runs of <= run_rows, each key-sorted."""
    runs, count = 0, 0
    cols: dict[str, list] = {"order": [], "rel": [], "list_pos": [], "size": []}

    def flush() -> None:
        nonlocal runs, cols
        if not cols["rel"]:
            return
        table = pa.Table.from_pydict(cols, schema=SNAPSHOT_SCHEMA).sort_by([("order", "ascending"),
                                                                           ("rel", "ascending")])
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", row_group_size=64 * 1024)
        write_bytes(fs, _run_path(root, part, num_parts, runs, generation, tag), buf.getvalue())
        runs += 1
        cols = {k: [] for k in cols}

    for row in rows:
        for k, v in zip(("order", "rel", "list_pos", "size"), row):
            cols[k].append(v)
        count += 1
        if len(cols["rel"]) >= run_rows:
            flush()
    flush()
    return runs, count


def _run_path(root: str, part: int, num_parts: int, run: int, generation: int, tag: str = "") -> str:
    name = layout.listing_name(part, num_parts, run, generation)
    return join(root, name.replace(".parquet", f".{tag}.parquet") if tag else name)


def _sorted(fs, paths: list[str]) -> Iterator[tuple[int, str, int, int]]:
    return heapq.merge(*(_run_rows(fs, p) for p in paths))


def write_additions(fs, root: str, part: int, num_parts: int, objects: Iterable[SourceObject], seed: int,
                    generation: int, run_rows: int = RUN_ROWS) -> dict:
    """Snapshot generation `generation`: the listed objects that no earlier generation holds.

    Both sides are streams sorted by (key, path), so this is a merge anti-join in bounded memory:
    the new listing is first written as sorted scan runs, then walked against the earlier runs.
    """
    scan_runs, _ = _write_runs(fs, root, part, num_parts, _keyed(objects, seed), run_rows, generation, "scan")
    scan_paths = [_run_path(root, part, num_parts, r, generation, "scan") for r in range(scan_runs)]
    old_paths = []
    for g in range(generation):
        rec = read_json(fs, join(root, layout.snapshot_record_name(part, num_parts, g)))
        old_paths += [_run_path(root, part, num_parts, r, g) for r in range(rec["runs"])]
    old = _sorted(fs, old_paths)
    nxt = next(old, None)

    def new_only() -> Iterator[tuple[int, str, int, int]]:
        nonlocal nxt
        for row in _sorted(fs, scan_paths):
            while nxt is not None and nxt[:2] < row[:2]:
                nxt = next(old, None)
            if nxt is None or nxt[:2] != row[:2]:
                yield row

    runs, rows = _write_runs(fs, root, part, num_parts, new_only(), run_rows, generation)
    for path in scan_paths:
        with_retries(lambda path=path: fs.rm(path), f"remove {path}")
    return {"runs": runs, "rows": rows, "seed": seed, "generation": generation}


def _run_rows(fs, path: str) -> Iterator[tuple[int, str, int, int]]:
    with fs.open(path, "rb") as f:
        for batch in open_parquet(f).iter_batches(batch_size=MERGE_BATCH, use_threads=False):
            d = batch.to_pydict()
            yield from zip(d["order"], d["rel"], d["list_pos"], d["size"])  # the tuples _write_runs takes


def in_order(fs, root: str, part: int, num_parts: int, runs: int, src_root: str, url_prefix: str,
             skip: int = 0, generation: int = 0) -> Iterator[SourceObject]:
    """The part's objects in pack order, from one generation of its snapshot; the first `skip` are passed over."""
    paths = [_run_path(root, part, num_parts, r, generation) for r in range(runs)]
    lost = [p for p in paths if not with_retries(lambda p=p: fs.exists(p), f"stat {p}")]
    if lost:
        raise FileNotFoundError(f"the listing snapshot lost {len(lost)} run(s), e.g. {lost[0]}")
    src_root, url_prefix = src_root.rstrip("/"), url_prefix.rstrip("/")
    for i, (_, rel, pos, size) in enumerate(_sorted(fs, paths)):
        if i < skip:
            continue
        yield SourceObject(pos=pos, rel=rel, path=f"{src_root}/{rel}", url=f"{url_prefix}/{printable(rel)}", size=size)
