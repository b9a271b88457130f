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

from pipeline.listing import SourceObject
from shards import layout
from shards.storage import join, with_retries, write_bytes

SNAPSHOT_SCHEMA = pa.schema([
    ("order", pa.uint64()),    # pack-order key: keyed hash of (seed, rel)
    ("list_pos", pa.int64()),  # position in the deterministic listing of the source
    ("rel", pa.string()),      # path relative to the source prefix
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
                   run_rows: int = RUN_ROWS) -> dict:
    """Write the part's objects as key-sorted runs; returns the snapshot record (runs, rows)."""
    runs, rows = 0, 0
    cols: dict[str, list] = {"order": [], "list_pos": [], "rel": [], "size": []}

    def flush() -> None:
        nonlocal runs, cols
        if not cols["rel"]:
            return
        table = pa.Table.from_pydict(cols, schema=SNAPSHOT_SCHEMA).sort_by([("order", "ascending"),
                                                                           ("rel", "ascending")])
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", row_group_size=64 * 1024)
        write_bytes(fs, join(root, layout.listing_name(part, num_parts, runs)), buf.getvalue())
        runs += 1
        cols = {k: [] for k in cols}

    for obj in objects:
        cols["order"].append(order_key(seed, obj.rel))
        cols["list_pos"].append(obj.pos)
        cols["rel"].append(obj.rel)
        cols["size"].append(obj.size)
        rows += 1
        if len(cols["rel"]) >= run_rows:
            flush()
    flush()
    return {"runs": runs, "rows": rows, "seed": seed}


def _run_rows(fs, path: str) -> Iterator[tuple[int, str, int, int]]:
    with fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=MERGE_BATCH, use_threads=False):
            d = batch.to_pydict()
            yield from zip(d["order"], d["rel"], d["list_pos"], d["size"])


def in_order(fs, root: str, part: int, num_parts: int, runs: int, src_root: str, url_prefix: str,
             skip: int = 0) -> Iterator[SourceObject]:
    """The part's objects in pack order, from its snapshot; the first `skip` are passed over."""
    paths = [join(root, layout.listing_name(part, num_parts, r)) for r in range(runs)]
    lost = [p for p in paths if not with_retries(lambda p=p: fs.exists(p), f"stat {p}")]
    if lost:
        raise FileNotFoundError(f"the listing snapshot lost {len(lost)} run(s), e.g. {lost[0]}")
    merged = heapq.merge(*(_run_rows(fs, p) for p in paths))
    src_root, url_prefix = src_root.rstrip("/"), url_prefix.rstrip("/")
    for i, (_, rel, pos, size) in enumerate(merged):
        if i < skip:
            continue
        yield SourceObject(pos=pos, rel=rel, path=f"{src_root}/{rel}", url=f"{url_prefix}/{rel}", size=size)
