"""Open a published shard set: its build record and its index, never a bucket listing."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from shards import layout
from shards.manifest import from_parquet_bytes
from shards.members import IMAGE_EXTENSIONS
from swav_io.errors import UserError
from swav_io.storage import explained, get_fs, join, read_bytes, read_json

log = logging.getLogger(__name__)


@dataclass
class ShardIndex:
    """Shard names and sample counts as compact arrays (a million shards fit in tens of MB)."""

    url: str
    names: object          # arrow string array of relative paths: no Python object per shard
    samples: np.ndarray    # int64
    nbytes: np.ndarray     # int64
    sha256: object         # arrow array (loaded lazily by verify)
    record: dict
    # Which build generation wrote each shard (0: the first build; g: the g-th `--incremental`
    # addition). A run's pass in progress keeps to the generations it started with.
    generations: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.generations is None:
            self.generations = np.zeros(len(self.samples), dtype=np.int32)

    def __len__(self) -> int:
        return len(self.samples)

    def shard_url(self, i: int) -> str:
        # An indexed set's tars stay where their writer put them: names are relative to shard_root.
        return join(self.record.get("shard_root") or self.url, self.name(i))

    @property
    def image_extensions(self) -> list[str] | None:
        """WebDataset member rules for a set someone else wrote; None for the strict rules of ours."""
        if self.record.get("format") == "webdataset":
            return list(self.record.get("image_extensions") or IMAGE_EXTENSIONS)
        return None

    def name(self, i: int) -> str:
        return self.names[int(i)].as_py()


def load_index(url: str, options: dict | None = None, require_record: bool = True) -> ShardIndex:
    fs, root = get_fs(url, options)
    record_path = join(root, layout.BUILD_RECORD)
    with explained(url):
        if not fs.exists(record_path):
            if require_record:
                if fs.exists(join(root, layout.INDEX)) or fs.exists(join(root, layout.MANIFEST_DIR)):
                    raise UserError(f"{url} is not a finished shard set (no {layout.BUILD_RECORD}); "
                                    "rerun the build or merge")
                raise UserError(f"no shard set at {url}")
            record = {}
        else:
            record = read_json(fs, record_path)
        table = from_parquet_bytes(read_bytes(fs, join(root, layout.INDEX)))
    return ShardIndex(url=url.rstrip("/"), names=table.column("name").combine_chunks(),
                      samples=table.column("samples").to_numpy(), nbytes=table.column("bytes").to_numpy(),
                      sha256=table.column("sha256"), record=record, generations=_generations(table))


def _generations(table: pa.Table) -> np.ndarray:
    if "generation" not in table.column_names:
        return np.zeros(table.num_rows, dtype=np.int32)
    return table.column("generation").fill_null(0).to_numpy().astype(np.int32)


SHARED_PREFIX = "swav-index-"
_held: dict[str, int] = {}   # path -> the descriptor whose lock marks the file as in use


def share_index(idx: ShardIndex, folder: str) -> str:
    """Write the index as an Arrow IPC file for other processes to memory-map (open_shared_index).

    DataLoader workers then share one copy through the page cache instead of each loading their own
    (about 240 MB apiece at a million shards); with the spawn start method they receive only the path.
    The file stays locked while its process (or a forked worker) lives, so that copies left by killed
    processes, which never ran their cleanup, are recognised and removed here (the temp dir is often
    RAM-backed, and a preempted node runs the job again and again).
    """
    stale = remove_stale_shared(folder)
    if stale:
        log.info("removed %d shard-index copies that killed processes left in %s", len(stale), folder)
    table = pa.table({"name": idx.names, "samples": pa.array(idx.samples), "bytes": pa.array(idx.nbytes),
                      "generation": pa.array(idx.generations, type=pa.int32()),
                      "sha256": idx.sha256.combine_chunks() if hasattr(idx.sha256, "combine_chunks") else idx.sha256})
    table = table.replace_schema_metadata({"url": idx.url, "record": json.dumps(idx.record)})
    os.makedirs(folder, exist_ok=True)
    while True:
        path = os.path.join(folder, f"{SHARED_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}.arrow")
        fd = os.open(path + ".tmp", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        # Another process's sweep can take the file in the instant before the lock; once locked and
        # still under its name, it is ours (the lock follows the file through the rename).
        try:
            if os.stat(path + ".tmp").st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    with open(fd, "wb", closefd=False) as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)
    os.replace(path + ".tmp", path)
    _held[path] = fd
    return path


def release_shared(path: str) -> None:
    """Delete a file from share_index and drop its lock (at exit of the process that wrote it)."""
    try:
        os.remove(path)
    except OSError:
        pass
    fd = _held.pop(path, None)
    if fd is not None:
        os.close(fd)


def remove_stale_shared(folder: str) -> list[str]:
    """Remove the files of share_index whose writers are gone (nobody holds their lock); their names."""
    removed = []
    try:
        names = [n for n in os.listdir(folder) if n.startswith(SHARED_PREFIX) and n.endswith((".arrow", ".tmp"))]
    except FileNotFoundError:
        return removed
    for name in names:
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:   # removed meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:   # in use
            os.close(fd)
            continue
        try:
            os.remove(path)
            removed.append(name)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def open_shared_index(path: str) -> ShardIndex:
    """A ShardIndex over a memory-mapped file from share_index: its columns are the mapped pages."""
    table = pa.ipc.open_file(pa.memory_map(path, "r")).read_all()
    meta = table.schema.metadata
    return ShardIndex(url=meta[b"url"].decode(), names=table.column("name").chunk(0),
                      samples=table.column("samples").chunk(0).to_numpy(zero_copy_only=True),
                      nbytes=table.column("bytes").chunk(0).to_numpy(zero_copy_only=True),
                      sha256=table.column("sha256").chunk(0), record=json.loads(meta[b"record"]),
                      generations=table.column("generation").chunk(0).to_numpy(zero_copy_only=True))
