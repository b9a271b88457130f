"""The row-by-row merge and info this project used before (to_pydict of every manifest row): the
baseline that bench/merge_info.py runs side by side with the columnar ones. Not used by the tool."""
# ruff: noqa
from __future__ import annotations

import hashlib
import json
import logging
import time

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.build import read_manifest, tool_version, _table_bytes
from pipeline.merge import _drop_from_shard, _manifests
from pipeline.order import order_key
from shards import layout
from swav_io.errors import UserError
from shards.manifest import ACCEPTED, INDEX_SCHEMA, REJECTED, to_parquet_bytes
from swav_io.storage import get_fs, join, read_json, redact, write_bytes, write_json
from shards.tario import iter_samples, write_tar

log = logging.getLogger(__name__)


def _drop_cross_part_duplicates(fs, root: str, manifests: list[str], source: str, seed: int) -> int:
    """Later copies (in pack order) of content already accepted in another part become rejections.

    Pack order, as within a part: the copy kept is the same whichever way the bucket was split.
    """
    tables = []
    for m in manifests:
        t, _ = read_manifest(fs, m)
        t = t.filter(pc.equal(t["status"], ACCEPTED)).select(["list_pos", "sha256", "key", "shard", "url"])
        tables.append(t.append_column("manifest", pa.array([m] * t.num_rows, pa.string())))
    if not tables:
        return 0
    acc = pa.concat_tables(tables).to_pydict()
    prefix = len(source.rstrip("/")) + 1
    rank = sorted(range(len(acc["url"])), key=lambda i: (order_key(seed, acc["url"][i][prefix:]), acc["url"][i][prefix:]))
    acc = {k: [v[i] for i in rank] for k, v in acc.items()}
    first: dict[str, str] = {}
    losers: dict[str, dict[str, str]] = {}   # manifest -> key -> winner url
    for sha, key, url, man in zip(acc["sha256"], acc["key"], acc["url"], acc["manifest"]):
        if sha in first:
            losers.setdefault(man, {})[key] = first[sha]
        else:
            first[sha] = url
    for man, keys in sorted(losers.items()):
        _drop_from_shard(fs, root, man, keys)   # the rewrite itself is shared with today's merge
    return sum(len(k) for k in losers.values())


def merge(dst: str, num_parts: int, options: dict | None = None, source: str | None = None) -> dict:
    """Combine finished parts into the published index and build record. Idempotent."""
    fs, root = get_fs(dst, options)
    records = []
    missing = []
    for part in range(num_parts):
        path = join(root, layout.part_record_name(part, num_parts))
        if fs.exists(path):
            records.append(read_json(fs, path))
        else:
            missing.append(str(part))
    if missing:
        raise UserError(f"cannot merge {dst}: part(s) {', '.join(missing)} of {num_parts} not finished")
    manifests = _manifests(fs, root)
    fingerprint = records[0]["fingerprint"]
    dropped = (_drop_cross_part_duplicates(fs, root, manifests, fingerprint["source"],
                                           fingerprint["config"].get("seed", 0)) if num_parts > 1 else 0)

    entries, counts = [], {"inputs": 0, ACCEPTED: 0, REJECTED: 0}
    reasons: dict[str, int] = {}
    for m in manifests:
        table, entry = read_manifest(fs, m)
        if entry and entry["samples"]:
            entries.append(entry)
        cols = table.select(["status", "reason"]).to_pydict()
        for status, reason in zip(cols["status"], cols["reason"]):
            counts["inputs"] += 1
            counts[status] += 1
            if status == REJECTED:
                reasons[reason] = reasons.get(reason, 0) + 1
    entries.sort(key=lambda e: e["name"])
    write_bytes(fs, join(root, layout.INDEX), to_parquet_bytes(entries, INDEX_SCHEMA))
    record = {
        "tool": "swav-stream", "version": tool_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source or fingerprint["source"], "config": redact(
            fingerprint["config"]),  # the settings that shape the bytes, however the parts were run
        "num_parts": num_parts, "counts": counts, "reasons": reasons, "shards": len(entries),
        "samples": sum(e["samples"] for e in entries), "bytes": sum(e["bytes"] for e in entries),
        "cross_part_duplicates": dropped,
    }
    write_json(fs, join(root, layout.BUILD_RECORD), record)
    return record


import numpy as np
from shards.index import load_index

SIZE_BINS = (0, 64, 128, 256, 512, 1024, 2048, 4096, 1 << 30)


def info(url: str, options: dict | None = None) -> dict:
    idx = load_index(url, options)
    fs, root = get_fs(url, options)
    tables = [read_manifest(fs, m)[0].select(["status", "reason", "width", "height"]) for m in _manifests(fs, root)]
    table = pa.concat_tables(tables) if tables else None
    by_status: dict[str, int] = {}
    by_reason: dict[str, int] = {}
    hist = [0] * (len(SIZE_BINS) - 1)
    if table is not None:
        cols = table.to_pydict()
        for s, r, w, h in zip(cols["status"], cols["reason"], cols["width"], cols["height"]):
            by_status[s] = by_status.get(s, 0) + 1
            if s != ACCEPTED:
                by_reason[r] = by_reason.get(r, 0) + 1
            elif w and h:
                hist[int(np.searchsorted(SIZE_BINS, max(w, h), side="right")) - 1] += 1
    return {
        "url": url, "shards": int(len(idx)), "samples": int(idx.samples.sum()), "bytes": int(idx.nbytes.sum()),
        "inputs": sum(by_status.values()), "by_status": by_status, "by_reason": by_reason,
        "longer_side_histogram": {f"{SIZE_BINS[i]}-{SIZE_BINS[i + 1] - 1}": n for i, n in enumerate(hist) if n},
        "record": {k: idx.record.get(k) for k in ("version", "created", "source", "num_parts")},
    }



