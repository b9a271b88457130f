"""Cross-part duplicate search in bounded memory: hash-partitioned spill files on local disk.

Merging parts of a billion-object bucket cannot hold a record per accepted row (16 B each, plus a
sorted copy), nor a Python tuple per duplicate (uncurated web data is 10-30% duplicates). Every step
here streams its input into partition files and then works one partition at a time:

1. the scan spills (64-bit hash prefix, manifest, row) of each accepted row, by the prefix's top bits;
2. each hash partition is sorted; rows whose prefix occurs twice become candidates, spilled by manifest;
3. each manifest with candidates is read once for their full hash, key and URL, spilled by hash;
4. each hash partition groups the copies of one content: the earliest generation, then the first in
   pack order, is kept; the others are losers, spilled by manifest;
5. each manifest's losers are dropped from its shard (the caller's rewrite).

Memory is one partition of one step, whatever the number of rows; the files go in a temporary folder
under `work_dir` and are removed at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.order import order_key

ROW = np.dtype([("h", "<u8"), ("m", "<i4"), ("row", "<i4")])
CAND = np.dtype([("m", "<i4"), ("row", "<i4")])
HASH_PARTS = 256            # step 1: 16 B x 1e9 rows / 256 = 62 MB a partition
MANIFEST_PARTS = 64
# What a copy costs in step 3's and 4's partitions (hash, key, URL, ...), to size them at ~128 MB.
COPY_BYTES = 256
PARTITION_BYTES = 128 * 1024 * 1024
BUFFER_BYTES = 16 * 1024 * 1024


class _Spill:
    """Items appended to one file per partition, through one bounded buffer (a subclass says how)."""

    suffix = ""

    def __init__(self, folder: str, parts: int):
        self.folder, self.parts = folder, parts
        os.makedirs(folder, exist_ok=True)
        self.buf: list[tuple[np.ndarray, object]] = []
        self.buffered = 0
        self.count = 0

    def add(self, part: np.ndarray, items) -> None:
        if len(items):
            self.buf.append((part, items))
            self.buffered += items.nbytes
            self.count += len(items)
            if self.buffered >= BUFFER_BYTES:
                self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        part = np.concatenate([p for p, _ in self.buf])
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(self.parts + 1))
        items = self._take(self._concat([x for _, x in self.buf]), order)
        for p in range(self.parts):
            if bounds[p] < bounds[p + 1]:
                with open(self._path(p), "ab") as f:
                    self._write(f, items[bounds[p]:bounds[p + 1]])
        self.buf, self.buffered = [], 0

    def _path(self, p: int) -> str:
        return os.path.join(self.folder, f"{p:05d}{self.suffix}")


class _Records(_Spill):
    """Fixed-size numpy records."""

    suffix = ".bin"

    def __init__(self, folder: str, parts: int, dtype: np.dtype):
        super().__init__(folder, parts)
        self.dtype = dtype

    _concat = staticmethod(np.concatenate)

    @staticmethod
    def _take(recs: np.ndarray, order: np.ndarray) -> np.ndarray:
        return recs[order]

    @staticmethod
    def _write(f, recs: np.ndarray) -> None:
        f.write(recs.tobytes())

    def read(self, p: int) -> np.ndarray:
        path = self._path(p)
        return np.fromfile(path, dtype=self.dtype) if os.path.exists(path) else np.zeros(0, self.dtype)


class _Tables(_Spill):
    """Arrow tables; each flush appends one IPC stream per partition, read back one after another."""

    suffix = ".arrows"

    def __init__(self, folder: str, parts: int, schema: pa.Schema):
        super().__init__(folder, parts)
        self.schema = schema

    _concat = staticmethod(pa.concat_tables)

    @staticmethod
    def _take(table: pa.Table, order: np.ndarray) -> pa.Table:
        return table.take(pa.array(order))

    def _write(self, f, table: pa.Table) -> None:
        with pa.ipc.new_stream(f, self.schema) as w:
            w.write_table(table)

    def read(self, p: int) -> pa.Table:
        path = self._path(p)
        if not os.path.exists(path):
            return self.schema.empty_table()
        tables = []
        with open(path, "rb") as f:
            while f.tell() < os.fstat(f.fileno()).st_size:
                tables.append(pa.ipc.open_stream(f).read_all())
        return pa.concat_tables(tables)


COPY_SCHEMA = pa.schema([("sha", pa.string()), ("gen", pa.int32()), ("okey", pa.uint64()), ("rel", pa.string()),
                         ("key", pa.string()), ("url", pa.string()), ("m", pa.int32())])
LOSER_SCHEMA = pa.schema([("m", pa.int32()), ("key", pa.string()), ("winner", pa.string())])


class DuplicateSearch:
    """Feed every manifest's accepted rows (`add`), then `losers()` yields each manifest's later copies."""

    def __init__(self, work_dir: str = ""):
        self.folder = tempfile.mkdtemp(prefix="swav-dupsearch-", dir=work_dir or None)
        self.rows = _Records(os.path.join(self.folder, "rows"), HASH_PARTS, ROW)

    def add(self, manifest: int, rows: np.ndarray, prefixes: np.ndarray) -> None:
        recs = np.empty(len(rows), ROW)
        recs["h"], recs["m"], recs["row"] = prefixes, manifest, rows
        self.rows.add(((prefixes >> np.uint64(32)) % np.uint64(HASH_PARTS)).astype(np.int64), recs)

    def losers(self, read_copies: Callable[[int, np.ndarray], tuple[pa.Table, int]], source_prefix: int,
               seed: int) -> Iterator[tuple[int, dict[str, str]]]:
        """(manifest, {key: URL of the copy kept}) for every manifest holding a later copy, by manifest.

        `read_copies(m, rows)` returns manifest m's rows (sha256, key, url columns) and its generation.
        """
        self.rows.flush()
        cands = _Records(os.path.join(self.folder, "cands"), MANIFEST_PARTS, CAND)
        for p in range(HASH_PARTS):
            recs = self.rows.read(p)
            recs.sort(order="h", kind="stable")
            same = recs["h"][1:] == recs["h"][:-1]
            hit = np.zeros(len(recs), bool)
            hit[1:] |= same
            hit[:-1] |= same
            picked = recs[hit]
            out = np.empty(len(picked), CAND)
            out["m"], out["row"] = picked["m"], picked["row"]
            cands.add(picked["m"].astype(np.int64) % MANIFEST_PARTS, out)
            del recs
        cands.flush()
        shutil.rmtree(self.rows.folder, ignore_errors=True)
        copy_parts = max(64, -(-cands.count * COPY_BYTES // PARTITION_BYTES))
        copies = _Tables(os.path.join(self.folder, "copies"), copy_parts, COPY_SCHEMA)
        for p in range(MANIFEST_PARTS):
            recs = cands.read(p)
            recs.sort(order=["m", "row"])
            starts = np.flatnonzero(np.r_[True, recs["m"][1:] != recs["m"][:-1]]) if len(recs) else []
            for s, e in zip(starts, [*starts[1:], len(recs)]):
                m = int(recs["m"][s])
                table, gen = read_copies(m, recs["row"][s:e])
                urls = table.column("url").to_pylist()
                rels = [u[source_prefix:] for u in urls]
                okeys = np.fromiter((order_key(seed, r) for r in rels), np.uint64, len(rels))
                batch = pa.table({"sha": table.column("sha256"), "gen": pa.array(np.full(len(rels), gen, np.int32)),
                                  "okey": pa.array(okeys), "rel": pa.array(rels, pa.string()),
                                  "key": table.column("key"), "url": table.column("url"),
                                  "m": pa.array(np.full(len(rels), m, np.int32))}, schema=COPY_SCHEMA)
                copies.add(_hash_part(table.column("sha256"), copy_parts), batch)
        copies.flush()
        shutil.rmtree(cands.folder, ignore_errors=True)
        losers = _Tables(os.path.join(self.folder, "losers"), copy_parts, LOSER_SCHEMA)
        for p in range(copy_parts):
            t = copies.read(p).sort_by([("sha", "ascending"), ("gen", "ascending"), ("okey", "ascending"),
                                        ("rel", "ascending")])
            sha = t.column("sha").to_numpy(zero_copy_only=False)
            if not len(sha):
                continue
            first = np.r_[True, sha[1:] != sha[:-1]]
            group = np.cumsum(first) - 1
            winner_row = np.flatnonzero(first)[group]
            lose = ~first      # a group of one is a 64-bit prefix collision, not a duplicate
            idx = pa.array(np.flatnonzero(lose))
            urls = t.column("url").take(pa.array(winner_row[lose]))
            m = t.column("m").take(idx)
            losers.add(m.to_numpy().astype(np.int64) % copy_parts,
                       pa.table({"m": m, "key": t.column("key").take(idx), "winner": urls}, schema=LOSER_SCHEMA))
        losers.flush()
        shutil.rmtree(copies.folder, ignore_errors=True)
        for p in range(copy_parts):
            t = losers.read(p)
            if not t.num_rows:
                continue
            t = t.sort_by([("m", "ascending"), ("key", "ascending")])
            ms = t.column("m").to_numpy()
            starts = np.flatnonzero(np.r_[True, ms[1:] != ms[:-1]])
            keys, winners = t.column("key").to_pylist(), t.column("winner").to_pylist()
            for s, e in zip(starts, [*starts[1:], len(ms)]):
                yield int(ms[s]), dict(zip(keys[s:e], winners[s:e]))

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _hash_part(sha: pa.ChunkedArray | pa.Array, parts: int) -> np.ndarray:
    """A partition per content hash, from its first 8 hex digits (uniform: it is a hash)."""
    head = pc.utf8_slice_codeunits(sha, 0, 8).to_pylist()
    return np.fromiter((int(h, 16) % parts for h in head), np.int64, len(head))
