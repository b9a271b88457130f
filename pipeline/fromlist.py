"""A ready listing as the build's input (`--from-list FILE`), so N machines need not each list the bucket.

FILE is parquet or CSV (optionally .gz), local or on any fsspec store, read in batches so memory does
not grow with its length. Its objects are named by one of these columns:
- `url`: full URLs under SRC (e.g. s3://bucket/raw/a.jpg);
- `key` with `bucket`: object keys, as in an S3 Inventory report (parquet, or CSV with a header);
- `key` or `path` alone: paths relative to SRC.
A headerless file with one column is one URL (or path) per line; a headerless CSV with every field
quoted is S3 Inventory's CSV layout (bucket, key, then the optional fields its manifest.json lists),
whose keys are URL-encoded; only bucket and key are read from it. A `size` column is used when
present. Objects outside SRC, before or after normalising (``a/../../x``), are left out and counted in
the log; a list that names nothing under SRC is an error.
"""

from __future__ import annotations

import logging
import posixpath
from typing import Iterator
from urllib.parse import unquote

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv

from pipeline.listing import SourceObject
from shards.manifest import open_parquet
from swav_io.errors import UserError

log = logging.getLogger(__name__)
BATCH = 65536
_NAMES = ("url", "key", "path")


def from_list(list_url: str, src: str, fs: fsspec.AbstractFileSystem, root: str,
              options: dict | None = None, url_prefix: str | None = None) -> Iterator[SourceObject]:
    """The objects FILE names under SRC, in FILE's order (list_pos = row number).

    A row is a name from someone else: one that leaves SRC once normalised (``..``, an absolute path)
    is left out and counted, like a row under another prefix. URLs recorded start with `url_prefix`
    (SRC without credentials).
    """
    src = src.rstrip("/")
    root = root.rstrip("/")
    public = (url_prefix or src).rstrip("/")
    pos, outside, markers, example = 0, 0, 0, None
    for batch in list_batches(list_url, options):
        rels, sizes = _relative(batch, src, root, list_url)
        for rel, size in zip(rels, sizes):
            pos += 1
            if rel is None:
                outside += 1
                example = example or pos
                continue
            if not rel or rel.endswith("/"):
                markers += 1  # a folder marker, not an object
                continue
            yield SourceObject(pos=pos - 1, rel=rel, path=f"{root}/{rel}", url=f"{public}/{rel}", size=int(size or 0))
    if outside:
        log.warning("%s: %d listed object(s) are not under %s and were left out (first at row %d)",
                    list_url, outside, public, example)
    if markers:
        log.info("%s: %d folder marker(s) left out", list_url, markers)
    if pos - outside - markers == 0:
        raise UserError(f"{list_url} lists no objects under {public}")


def list_batches(list_url: str, options: dict | None) -> Iterator[pa.RecordBatch]:
    try:
        yield from _read(list_url, options)
    except pa.ArrowInvalid as e:
        raise UserError(f"--from-list {list_url}: {str(e).splitlines()[0]}") from None


def _read(list_url: str, options: dict | None) -> Iterator[pa.RecordBatch]:
    name = list_url.lower().rstrip("/")
    try:
        f = fsspec.open(list_url, "rb", compression="infer", **(options or {})).open()
    except FileNotFoundError:
        raise UserError(f"--from-list: not found: {list_url}") from None
    with f:
        if name.endswith((".parquet", ".pq")):
            yield from open_parquet(f).iter_batches(batch_size=BATCH, use_threads=False)
            return
        if not name.endswith((".csv", ".csv.gz", ".txt", ".txt.gz")):
            raise UserError(f"--from-list takes .parquet or .csv/.txt (optionally .gz), not {list_url}")
        first = f.readline().decode("utf-8", "replace").strip()
        f.seek(0)
        fields = first.split(",")
        header = [c.strip().strip('"').lower() for c in fields]
        # No reader threads: they can abort the process at exit after reading a Python file object.
        read = pacsv.ReadOptions(block_size=1 << 22, use_threads=False)
        inventory = False
        if any(c in _NAMES for c in header):
            pass
        elif len(fields) == 1:      # one URL or path per line, no header
            read = pacsv.ReadOptions(block_size=1 << 22, use_threads=False,
                                     column_names=["url" if "://" in first or first.startswith("/") else "path"])
        elif first.startswith('"'):  # S3 Inventory CSV: every field quoted, no header
            # Bucket and Key always come first; which optional fields follow, and in what order, only the
            # inventory's manifest.json (fileSchema) says, so nothing after the key is read as a size.
            inventory = True
            names = ["bucket", "key"] + [f"c{i}" for i in range(2, len(fields))]
            read = pacsv.ReadOptions(block_size=1 << 22, use_threads=False, column_names=names[:len(fields)])
        else:
            raise UserError(f"{list_url} has none of the columns url, key (with bucket) or path; its first line "
                            f"is {first[:120]!r}")
        convert = pacsv.ConvertOptions(column_types={"url": pa.string(), "key": pa.string(), "path": pa.string(),
                                                     "bucket": pa.string()})
        for batch in pacsv.open_csv(f, read_options=read, convert_options=convert):
            if inventory:   # its keys are URL-encoded
                keys = [unquote(k) for k in batch.column("key").to_pylist()]
                batch = batch.set_column(batch.schema.get_field_index("key"), "key", pa.array(keys, pa.string()))
            yield batch


def _inside(rel: str | None) -> str | None:
    """A relative name that stays under SRC once normalised (a folder marker keeps its slash), else None."""
    if rel is None or rel.endswith("/") or not rel:
        return rel
    if rel.startswith("/") or "\x00" in rel or posixpath.normpath(rel) != rel or ".." in rel.split("/"):
        return None
    return rel


def _relative(batch: pa.RecordBatch, src: str, root: str, list_url: str) -> tuple[list, list]:
    """(path relative to SRC or None when outside it, size or None) for each row."""
    rels, sizes = _relative_raw(batch, src, root, list_url)
    return [_inside(r) for r in rels], sizes


def _relative_raw(batch: pa.RecordBatch, src: str, root: str, list_url: str) -> tuple[list, list]:
    cols = {n.lower(): batch.column(i) for i, n in enumerate(batch.schema.names)}
    sizes = cols["size"].to_pylist() if "size" in cols else [None] * batch.num_rows
    if "url" in cols:
        prefix = src + "/"
        return [u[len(prefix):] if u and u.startswith(prefix) else None for u in cols["url"].to_pylist()], sizes
    if "key" in cols and "bucket" in cols:
        prefix = root + "/"
        full = (f"{b}/{k}" if b and k is not None else None
                for b, k in zip(cols["bucket"].to_pylist(), cols["key"].to_pylist()))
        return [p[len(prefix):] if p and p.startswith(prefix) else None for p in full], sizes
    for name in ("key", "path"):
        if name in cols:
            return [p.lstrip("/") if p else None for p in cols[name].to_pylist()], sizes
    raise UserError(f"{list_url} has none of the columns url, key (with bucket) or path; it has "
                    f"{', '.join(batch.schema.names)}")
