"""Parquet schemas of the shard set: one manifest row per input object, one index row per shard."""

from __future__ import annotations

import io
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from swav_io.storage import read_bytes

ACCEPTED = "accepted"
REJECTED = "rejected"

# Every rejection has one of these names; a new failure mode gets a new name, never "other".
REASONS = (
    "empty",              # zero bytes
    "not_an_image",       # no image decoder recognises the bytes (HTML error page, text, ...)
    "unsupported_format", # an image format we do not take (PSD, EPS, ICO, ...)
    "truncated",          # the image data ends early
    "corrupt",            # decoder error inside the data (bad CRC, broken stream)
    "too_many_pixels",    # header claims more pixels than allowed: refused before decoding
    "too_small",          # shorter side below the minimum
    "bad_aspect",         # longer/shorter side above the maximum ratio
    "duplicate",          # same normalised content as an earlier object
    "missing",            # listed, but gone from storage when read (a failed read is a fault, never a rejection)
    "decoder_crash",      # killed its decoder process twice, the second time in a process of its own
    "name_not_utf8",      # its name is not UTF-8 (a local file system allows any bytes); the url escapes them
)

MANIFEST_SCHEMA = pa.schema([
    ("list_pos", pa.int64()),      # position in the listing this build took (store order; the snapshot keeps it)
    ("url", pa.string()),          # source object URL
    ("size", pa.int64()),          # bytes in storage
    ("status", pa.string()),       # accepted | rejected
    ("reason", pa.string()),       # one of REASONS when rejected
    ("detail", pa.string()),       # the decoder's words, for humans
    ("key", pa.string()),          # sample key when accepted
    ("shard", pa.string()),        # shard path (relative to the set) when accepted
    ("sha256", pa.string()),       # hash of the normalised JPEG bytes
    ("width", pa.int32()),         # original width (after EXIF orientation)
    ("height", pa.int32()),
    ("out_bytes", pa.int64()),     # bytes of the stored JPEG
])

INDEX_SCHEMA = pa.schema([
    ("name", pa.string()),         # shard path relative to the set
    ("samples", pa.int64()),
    ("bytes", pa.int64()),
    ("sha256", pa.string()),
])
# What a build writes: the index plus the generation that wrote each shard (sets another tool wrote
# have none; they are all generation 0).
BUILT_INDEX_SCHEMA = INDEX_SCHEMA.append(pa.field("generation", pa.int32()))

LISTING_SCHEMA = pa.schema([
    ("list_pos", pa.int64()),
    ("url", pa.string()),
    ("size", pa.int64()),
])


def to_parquet_bytes(rows: list[dict], schema: pa.Schema) -> bytes:
    return table_to_parquet_bytes(pa.Table.from_pylist(rows, schema=schema))


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def open_parquet(source) -> pq.ParquetFile:
    """A reader that never starts Arrow's I/O thread pool.

    With pre-buffering (read_table's default, even with use_threads=False) a pool thread completes the read and
    later drops its reference to a Python-owned buffer; when that happens while the interpreter exits, Python ends
    the thread mid-destructor and the process aborts ("terminate called without an active exception", about one
    run in twenty under load). Our manifests, indexes and runs are read sequentially anyway.
    """
    return pq.ParquetFile(source, pre_buffer=False)


def from_parquet_bytes(data: bytes, columns: list[str] | None = None) -> pa.Table:
    return open_parquet(pa.BufferReader(data)).read(columns=columns, use_threads=False)


def read_manifest(fs: fsspec.AbstractFileSystem, path: str) -> tuple[pa.Table, dict | None]:
    """(table, shard entry) of one committed manifest."""
    table = from_parquet_bytes(read_bytes(fs, path))
    meta = table.schema.metadata or {}
    return table, json.loads(meta[b"shard"]) if b"shard" in meta else None
