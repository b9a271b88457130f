"""Open a published shard set: its build record and its index, never a bucket listing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from shards import layout
from shards.errors import UserError
from shards.manifest import from_parquet_bytes
from shards.storage import explain, get_fs, join, read_bytes, read_json


@dataclass
class ShardIndex:
    """Shard names and sample counts as compact arrays (a million shards fit in tens of MB)."""

    url: str
    names: object          # arrow string array of relative paths: no Python object per shard
    samples: np.ndarray    # int64
    nbytes: np.ndarray     # int64
    sha256: object         # arrow array (loaded lazily by verify)
    record: dict

    def __len__(self) -> int:
        return len(self.samples)

    def shard_url(self, i: int) -> str:
        return join(self.url, self.name(i))

    def name(self, i: int) -> str:
        return self.names[int(i)].as_py()


def load_index(url: str, options: dict | None = None, require_record: bool = True) -> ShardIndex:
    fs, root = get_fs(url, options)
    record_path = join(root, layout.BUILD_RECORD)
    try:
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
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise explain(e, url) from None
    return ShardIndex(url=url.rstrip("/"), names=table.column("name").combine_chunks(),
                      samples=table.column("samples").to_numpy(), nbytes=table.column("bytes").to_numpy(),
                      sha256=table.column("sha256"), record=record)
