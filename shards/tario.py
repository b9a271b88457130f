"""Reading and writing shard tars through webdataset, with member-name checks both ways."""

from __future__ import annotations

import io
from typing import BinaryIO, Iterator

from shards.members import UnsafeMember, split_member

# A fixed timestamp makes a rebuilt shard byte-identical to the first build.
FIXED_MTIME = 946684800  # 2000-01-01T00:00:00Z


def write_tar(samples: list[dict]) -> bytes:
    """Serialise samples ({"__key__", "jpg": bytes, "json": bytes}) into tar bytes."""
    import webdataset as wds  # here, not at import: it imports torch, which the sharding stage never needs

    buf = io.BytesIO()
    writer = wds.TarWriter(buf, mtime=FIXED_MTIME, user="swav", group="swav", mode=0o444)
    for s in samples:
        for ext in ("jpg", "json"):
            split_member(f"{s['__key__']}.{ext}")
        writer.write({"__key__": s["__key__"], "jpg": s["jpg"], "json": s["json"]})
    writer.close()
    return buf.getvalue()


def iter_samples(stream: BinaryIO) -> Iterator[dict]:
    """Samples of a shard tar in order, each {"__key__", "jpg", "json"}.

    Raises UnsafeMember for a name we would never write (``..``, absolute
    paths, separators, unknown extensions) and tarfile/OSError for a
    truncated or corrupt tar; callers decide whether that skips the shard.
    """
    from webdataset.tariterators import tar_file_iterator

    current: dict | None = None
    for member in tar_file_iterator(stream, skip_meta=None):
        key, ext = split_member(member["fname"])
        if current is not None and current["__key__"] != key:
            yield _complete(current)
            current = None
        if current is None:
            current = {"__key__": key}
        if ext in current:
            raise UnsafeMember(f"member {member['fname']!r} appears twice")
        current[ext] = member["data"]
    if current is not None:
        yield _complete(current)


def _complete(sample: dict) -> dict:
    missing = [e for e in ("jpg", "json") if e not in sample]
    if missing:
        raise UnsafeMember(f"sample {sample['__key__']!r} lacks {', '.join(missing)}")
    return sample
