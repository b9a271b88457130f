"""`swav shards index`: make WebDataset tars that another tool wrote (img2dataset, LAION, DataComp,
a team's own writer) a shard set, without rewriting them.

Only the index and the build record are written, at DST; the tars stay where they are and are named
in the index relative to their common folder (`shard_root` in the record). Sample counts come from
img2dataset's per-shard `<shard>_stats.json` when it is there (no tar is read), else from a
parallel scan of each tar by the same member rules the stream uses, which also records the tar's
size and sha256 and counts the samples it would leave out, by reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, Sequence

import fsspec
import pyarrow as pa

import swav_io
from pipeline.fromlist import list_batches
from pipeline.listing import walk
from shards import layout
from shards.manifest import INDEX_SCHEMA, table_to_parquet_bytes
from shards.members import IMAGE_EXTENSIONS
from shards.tario import iter_webdataset_samples
from swav_io.errors import UserError
from swav_io.storage import explained, get_fs, join, read_json, redact_text, with_retries, write_bytes, write_json

log = logging.getLogger(__name__)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
LIST_SUFFIXES = (".txt", ".csv", ".parquet", ".txt.gz", ".csv.gz")


@dataclass
class ShardEntry:
    name: str                 # relative to the shard root
    samples: int = 0
    nbytes: int = -1          # -1: not known yet
    sha256: str | None = None
    counted_by: str = ""      # "sidecar" | "scan"
    rejected: dict = field(default_factory=dict)
    missing: bool = False


def index_webdataset(source: str, dst: str, options: dict | None = None, threads: int = 16,
                     image_extensions: Sequence[str] = IMAGE_EXTENSIONS, scan: bool = False,
                     skip_missing: bool = False, progress: bool = True) -> dict:
    """Write DST/index.parquet and DST/build.json for the tars SOURCE names; returns the record.

    SOURCE is a brace pattern (``s3://b/laion/{00000..41455}.tar``), a prefix (every tar under it)
    or a list file (.txt/.csv/.parquet: one tar URL per line, or a url column).
    """
    from tqdm import tqdm

    root, names, sizes = _resolve(source, options)
    root = _absolute(root)
    if not names:
        raise UserError(f"{source} names no tar (looked for {', '.join(TAR_SUFFIXES)})")
    fs, root_path = get_fs(root, options)
    dfs, dst_path = get_fs(dst, options)
    _refuse_built_set(dfs, dst_path, dst)
    exts = [e.lower().lstrip(".") for e in image_extensions]
    entries = [ShardEntry(name=n, nbytes=sizes.get(n, -1)) for n in names]

    def one(e: ShardEntry) -> ShardEntry:
        path = join(root_path, e.name)
        try:
            if e.nbytes < 0:
                e.nbytes = int(with_retries(lambda: fs.info(path), f"stat {e.name}")["size"])
            stats = None if scan else _sidecar_stats(fs, path)
            if stats is not None:
                e.samples, e.counted_by = stats, "sidecar"
            else:
                e.samples, e.nbytes, e.sha256, e.rejected = _scan(fs, path, exts)
                e.counted_by = "scan"
        except FileNotFoundError:
            e.missing = True
        return e

    t0 = time.time()
    with ThreadPoolExecutor(max(1, threads)) as pool:
        done = list(tqdm(pool.map(one, entries), total=len(entries), desc="index", unit="tar",
                         disable=not progress, smoothing=0.05))
    missing = [e.name for e in done if e.missing]
    if missing and not skip_missing:
        raise UserError(f"{len(missing)} of {len(done)} tars named by {redact_text(source)} do not exist (first: "
                        f"{missing[0]}); pass --skip-missing to index the rest")
    kept = [e for e in done if not e.missing and e.samples > 0]
    empty = sum(1 for e in done if not e.missing and e.samples == 0)
    rejected: dict[str, int] = {}
    for e in done:
        for reason, n in e.rejected.items():
            rejected[reason] = rejected.get(reason, 0) + n
    if not kept:
        left = ", ".join(f"{n} {reason}" for reason, n in sorted(rejected.items())) or "none"
        raise UserError(f"none of the {len(done)} tar(s) named by {redact_text(source)} holds a sample the stream "
                        f"can read (samples left out by reason: {left}); nothing was published at {redact_text(dst)}")
    table = pa.table({"name": [e.name for e in kept], "samples": [e.samples for e in kept],
                      "bytes": [e.nbytes for e in kept], "sha256": [e.sha256 for e in kept]}, schema=INDEX_SCHEMA)
    write_bytes(dfs, join(dst_path, layout.INDEX), table_to_parquet_bytes(table))
    record = {
        "tool": "swav-stream", "version": swav_io.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "format": "webdataset", "source": redact_text(source), "shard_root": redact_text(root),
        "image_extensions": exts, "shards": len(kept), "samples": sum(e.samples for e in kept),
        "bytes": sum(e.nbytes for e in kept),
        "counted_by": {"sidecar": sum(1 for e in kept if e.counted_by == "sidecar"),
                       "scan": sum(1 for e in kept if e.counted_by == "scan")},
        "left_out": rejected, "empty_tars": empty, "missing_tars": len(missing),
        "seconds": round(time.time() - t0, 1),
    }
    write_json(dfs, join(dst_path, layout.BUILD_RECORD), record)   # last: the set is now published
    return record


def summary_lines(record: dict) -> list[str]:
    by = record["counted_by"]
    lines = [f"indexed {record['shards']} tars, {record['samples']} samples, {record['bytes'] / 1e9:.2f} GB "
             f"({by['sidecar']} counted from img2dataset stats, {by['scan']} scanned) in {record['seconds']} s"]
    if record["left_out"]:
        lines.append("samples the stream will leave out: " +
                     ", ".join(f"{n} {reason}" for reason, n in sorted(record["left_out"].items())))
    if record["empty_tars"]:
        lines.append(f"{record['empty_tars']} tar(s) hold no sample and are not in the index")
    if record["missing_tars"]:
        lines.append(f"{record['missing_tars']} named tar(s) do not exist and are not in the index")
    return lines



def _refuse_built_set(fs: fsspec.AbstractFileSystem, path: str, dst: str) -> None:
    record_path = join(path, layout.BUILD_RECORD)
    with explained(dst):
        if fs.exists(record_path) and read_json(fs, record_path).get("format") != "webdataset":
            raise UserError(f"{dst} holds a shard set that `swav shards build` wrote; index into another prefix")
        if fs.exists(join(path, layout.MANIFEST_DIR)):
            raise UserError(f"{dst} holds a shard set being built (manifest/); index into another prefix")


def _resolve(source: str, options: dict | None) -> tuple[str, list[str], dict[str, int]]:
    """(shard root URL, tar names relative to it, sizes already known)."""
    if "{" in source:
        from braceexpand import braceexpand

        urls = list(braceexpand(source))
        return _common_root(urls) + (_no_sizes(),)
    fs, path = get_fs(source, options)
    with explained(source):
        is_file = fs.isfile(path)
    if is_file and source.lower().endswith(LIST_SUFFIXES):
        return _common_root(list(_listed(source, options))) + (_no_sizes(),)
    if is_file and source.lower().endswith(TAR_SUFFIXES):   # one tar, as webdataset itself accepts
        folder, _, name = source.rstrip("/").rpartition("/")
        return (folder or "."), [name], _no_sizes()
    if is_file:
        raise UserError(f"{source} is a file but neither a tar ({', '.join(TAR_SUFFIXES)}) nor a list of tars "
                        f"({', '.join(LIST_SUFFIXES)})")
    prefix = source.rstrip("/")
    names, sizes = [], {}
    with explained(source):
        for obj in walk(fs, path, prefix):
            if obj.rel.lower().endswith(TAR_SUFFIXES):
                names.append(obj.rel)
                sizes[obj.rel] = obj.size
    names.sort()
    return prefix, names, sizes


def _absolute(root: str) -> str:
    """A local root as an absolute path: the set must stream from any current directory."""
    if "://" in root and not root.startswith("file://"):
        return root
    path = root[len("file://"):] if root.startswith("file://") else root
    return os.path.abspath(path)


def _no_sizes() -> dict[str, int]:
    return {}


def _common_root(urls: list[str]) -> tuple[str, list[str]]:
    urls = [u.strip() for u in urls if u.strip()]
    if not urls:
        return "", []
    root = urls[0].rsplit("/", 1)[0]
    for u in urls[1:]:
        while not u.startswith(root + "/"):
            if "/" not in root.rstrip("/") or root.endswith("://"):
                raise UserError(f"the tars share no folder ({urls[0]}, {u})")
            root = root.rsplit("/", 1)[0]
    return root, [u[len(root) + 1:] for u in urls]


def _listed(list_url: str, options: dict | None) -> Iterator[str]:
    for batch in list_batches(list_url, options):
        names = batch.schema.names
        col = batch.column(names.index("url") if "url" in names else 0)
        for v in col.to_pylist():
            if v:
                yield str(v)


def _sidecar_stats(fs: fsspec.AbstractFileSystem, tar_path: str) -> int | None:
    """Samples in a tar by img2dataset's `<shard>_stats.json` ("successes"), or None without one."""
    stem = tar_path
    for suffix in TAR_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    try:
        stats = json.loads(with_retries(lambda: fs.cat_file(f"{stem}_stats.json"), f"read {stem}_stats.json"))
    except FileNotFoundError:
        return None
    except ValueError:
        log.warning("%s_stats.json is not JSON; scanning the tar instead", stem)
        return None
    n = stats.get("successes") if isinstance(stats, dict) else None
    return int(n) if isinstance(n, int) and n >= 0 else None


class _Hashing:
    """A read-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha.update(data)
        self.n += len(data)
        return data


def _scan(fs: fsspec.AbstractFileSystem, path: str, exts: list[str]) -> tuple[int, int, str, dict]:
    """(samples, bytes, sha256, left out by reason) of one tar, read once, streaming."""
    def read() -> tuple[int, int, str, dict]:
        rejected: dict[str, int] = {}

        def reject(reason: str, _name: str) -> None:
            rejected[reason] = rejected.get(reason, 0) + 1

        with fs.open(path, "rb", block_size=8 * 1024 * 1024) as f:
            h = _Hashing(f)
            n = sum(1 for _ in iter_webdataset_samples(h, exts, reject))
            while h.read(1024 * 1024):   # the tar's end padding: the hash covers the whole file
                pass
        return n, h.n, h.sha.hexdigest(), rejected

    try:
        return with_retries(read, f"scan {path}")
    except (OSError, ValueError, EOFError, tarfile.TarError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        log.warning("%s is not a readable tar (%s: %s); left out of the index", path, type(e).__name__, e)
        return 0, 0, "", {"unreadable_tar": 1}
