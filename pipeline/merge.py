"""Publish a shard set: resolve duplicates across parts, write the index, then the build record.

The build record is written last, so a reader that finds it knows the index and
every shard it names are complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import swav_io
from pipeline.dupsearch import DuplicateSearch
from shards import layout
from shards.manifest import (
    ACCEPTED,
    BUILT_INDEX_SCHEMA,
    REJECTED,
    from_parquet_bytes,
    read_manifest,
    table_to_parquet_bytes,
    to_parquet_bytes,
)
from shards.tario import iter_samples, write_tar
from swav_io.errors import UserError
from swav_io.storage import get_fs, join, read_bytes, read_json, redact, redact_text, write_bytes, write_json

log = logging.getLogger(__name__)


def manifest_paths(fs, root: str) -> list[str]:
    path = join(root, layout.MANIFEST_DIR)
    if not fs.exists(path):
        return []
    return sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))


def _scan(fs, manifests: list[str], search: DuplicateSearch | None) -> tuple[dict, dict, list]:
    """One read of every manifest: (counts, reasons, shard entries); with `search`, every accepted row's
    hash prefix goes to it (spilled to disk, so memory holds one manifest whatever the set's size)."""
    counts, reasons = {"inputs": 0, ACCEPTED: 0, REJECTED: 0}, {}
    entries: list[dict] = []
    for mi, m in enumerate(manifests):
        table = from_parquet_bytes(read_bytes(fs, m), columns=["status", "reason", "sha256"])
        meta = table.schema.metadata or {}
        entry = json.loads(meta[b"shard"]) if b"shard" in meta else None
        if entry and entry["samples"]:
            entries.append(entry)
        accepted = pc.equal(table["status"], ACCEPTED)
        n_acc = pc.sum(accepted).as_py() or 0
        counts["inputs"] += table.num_rows
        counts[ACCEPTED] += n_acc
        counts[REJECTED] += table.num_rows - n_acc
        for item in pc.value_counts(table["reason"].filter(pc.invert(accepted))).to_pylist():
            reasons[item["values"]] = reasons.get(item["values"], 0) + item["counts"]
        if search is not None and n_acc:
            rows = pc.indices_nonzero(accepted).to_numpy().astype(np.int32)
            search.add(mi, rows, _prefix64(table["sha256"].filter(accepted).combine_chunks()))
    return counts, reasons, entries


_HEX = np.full(256, 255, np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint8)


def _prefix64(sha: pa.StringArray) -> np.ndarray:
    """The first 64 bits of each hex digest, read straight from the arrow buffers (8 bytes per row)."""
    offsets = np.frombuffer(sha.buffers()[1], np.int32)[sha.offset: sha.offset + len(sha) + 1]
    data = np.frombuffer(sha.buffers()[2], np.uint8)
    if sha.null_count or not (np.diff(offsets) == 64).all():
        raise UserError("a manifest holds a sha256 that is not 64 hex digits; the shard set is damaged")
    nibbles = _HEX[data[offsets[:-1, None] + np.arange(16)]]
    packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
    return np.ascontiguousarray(packed).view(">u8").ravel().astype(np.uint64)


def _drop_cross_part_duplicates(fs, root: str, manifests: list[str], search: DuplicateSearch, source: str,
                                seed: int) -> tuple[int, dict[str, dict]]:
    """Later copies of content accepted in another part become rejections: (dropped, new entries by shard).

    The copy kept is the one in the earliest generation (an incremental addition never rewrites an
    older shard), then first in pack order, as within a part: the same whichever way the bucket was split.
    """
    def read_copies(m: int, rows: np.ndarray) -> tuple[pa.Table, int]:
        table, entry = read_manifest(fs, manifests[m])
        return table.take(pa.array(rows, pa.int32())).select(["sha256", "key", "url"]), \
            (entry or {}).get("generation", 0)

    dropped, rewritten = 0, {}
    for m, keys in search.losers(read_copies, len(source.rstrip("/")) + 1, seed):
        entry = _drop_from_shard(fs, root, manifests[m], keys)
        rewritten[entry["name"]] = entry
        dropped += len(keys)
    return dropped, rewritten


def _drop_from_shard(fs, root: str, manifest: str, keys: dict[str, str]) -> dict:
    """Rewrite one shard without `keys` (key -> the URL whose copy is kept) and mark them duplicates in its
    manifest; returns the shard's new index entry."""
    table, entry = read_manifest(fs, manifest)
    tar_path = join(root, entry["name"])
    with fs.open(tar_path, "rb") as f:
        kept = [s for s in iter_samples(f) if s["__key__"] not in keys]
    data = write_tar(kept)
    entry.update(samples=len(kept), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    write_bytes(fs, tar_path, data)
    cols = table.to_pydict()
    for i, key in enumerate(cols["key"]):
        if key in keys:
            cols["status"][i], cols["reason"][i] = REJECTED, "duplicate"
            cols["detail"][i] = f"same normalised content as {keys[key]}"
            cols["key"][i] = cols["shard"][i] = None
    new = pa.Table.from_pydict(cols, schema=table.schema.remove_metadata())
    write_bytes(fs, manifest, table_to_parquet_bytes(new.replace_schema_metadata({"shard": json.dumps(entry)})))
    log.info("dropped %d cross-part duplicate(s) from %s", len(keys), entry["name"])
    return entry


def _check_parts(dst: str, records: list[dict], manifests: list[str], num_parts: int) -> None:
    """Every part built with the same settings, and no files of another part layout."""
    base = records[0]["fingerprint"]
    for part, rec in enumerate(records[1:], start=1):
        if rec["fingerprint"] != base:
            diff = sorted(k for k in set(base["config"]) | set(rec["fingerprint"]["config"])
                          if base["config"].get(k) != rec["fingerprint"]["config"].get(k))
            what = ", ".join(diff) or "source"
            raise UserError(f"cannot merge {dst}: part {part}/{num_parts} was built with other settings than "
                            f"part 0 ({what} differ); rebuild it with the same flags")
    for m in manifests:
        parsed = layout.parse_part(m.rsplit("/", 1)[-1])
        if parsed and parsed[1] != num_parts:
            raise UserError(f"cannot merge {dst} as {num_parts} parts: it holds files of a {parsed[1]}-part "
                            f"build ({m.rsplit('/', 1)[-1]})")


def merge(dst: str, num_parts: int, options: dict | None = None, source: str | None = None,
          work_dir: str = "") -> dict:
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
    manifests = manifest_paths(fs, root)
    _check_parts(dst, records, manifests, num_parts)
    fingerprint = records[0]["fingerprint"]
    search = DuplicateSearch(work_dir) if num_parts > 1 else None
    try:
        counts, reasons, entries = _scan(fs, manifests, search)
        dropped, rewritten = (_drop_cross_part_duplicates(fs, root, manifests, search, fingerprint["source"],
                                                          fingerprint["config"].get("seed", 0))
                              if search is not None else (0, {}))
    finally:
        if search is not None:
            search.close()
    if dropped:
        counts[ACCEPTED] -= dropped
        counts[REJECTED] += dropped
        reasons["duplicate"] = reasons.get("duplicate", 0) + dropped
        entries = [rewritten.get(e["name"], e) for e in entries]
        entries = [e for e in entries if e["samples"]]
    entries = [{**{k: e[k] for k in ("name", "samples", "bytes", "sha256")}, "generation": e.get("generation", 0)}
               for e in entries]
    entries.sort(key=lambda e: e["name"])
    write_bytes(fs, join(root, layout.INDEX), to_parquet_bytes(entries, BUILT_INDEX_SCHEMA))
    record = {
        "tool": "swav-stream", "version": swav_io.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": redact_text(source or fingerprint["source"]), "config": redact(
            fingerprint["config"]),  # the settings that shape the bytes, however the parts were run
        "num_parts": num_parts, "counts": counts, "reasons": reasons, "shards": len(entries),
        "samples": sum(e["samples"] for e in entries), "bytes": sum(e["bytes"] for e in entries),
        "cross_part_duplicates": dropped,
        "generations": max(r.get("generations", 1) for r in records),
    }
    write_json(fs, join(root, layout.BUILD_RECORD), record)
    return record
