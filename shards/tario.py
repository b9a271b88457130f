"""Reading and writing shard tars through webdataset, with member-name checks both ways."""

from __future__ import annotations

import io
from typing import BinaryIO, Callable, Iterator, Sequence

from shards.members import UnsafeMember, split_member, split_webdataset_member

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


def iter_samples(stream: BinaryIO, image_extensions: Sequence[str] | None = None,
                 on_reject: Callable[[str, str], None] | None = None) -> Iterator[dict]:
    """Samples of a shard tar in order, each {"__key__", "jpg", "json"}.

    With ``image_extensions`` the tar is read by WebDataset's conventions instead (a set someone else
    wrote, see iter_webdataset_samples).

    Raises UnsafeMember for a name we would never write (``..``, absolute
    paths, separators, unknown extensions) and tarfile/OSError for a
    truncated or corrupt tar; callers decide whether that skips the shard.
    """
    from webdataset.tariterators import tar_file_iterator

    if image_extensions is not None:
        yield from iter_webdataset_samples(stream, image_extensions, on_reject)
        return
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


def iter_webdataset_samples(stream: BinaryIO, image_extensions: Sequence[str],
                            on_reject: Callable[[str, str], None] | None = None) -> Iterator[dict]:
    """Samples of a tar another tool wrote, each {"__key__", "jpg": image bytes, "json" if present}.

    Consecutive members with one key form a sample (WebDataset's grouping); ``jpg`` holds the first
    member present among ``image_extensions``, whatever its format. Text, JSON and other members
    are ignored. A sample is not yielded but reported to ``on_reject(reason, name)`` when a member
    name is unsafe (``unsafe_name``), when it has no image (``no_image``) or when a member repeats
    (``repeated_member``); the rest of the tar is still read. A truncated tar raises, as above.
    """
    from webdataset.tariterators import tar_file_iterator

    wanted = [e.lower() for e in image_extensions]
    reject = on_reject or (lambda reason, name: None)
    current: dict | None = None

    def finish(sample: dict) -> dict | None:
        if sample.get("__bad__"):
            reject(sample["__bad__"], sample["__key__"])
            return None
        image = next((sample[e] for e in wanted if e in sample), None)
        if image is None:
            reject("no_image", sample["__key__"])
            return None
        out = {"__key__": sample["__key__"], "jpg": image}
        for extra in ("json", "cls"):   # metadata, and the class label evaluation may read
            if extra in sample:
                out[extra] = sample[extra]
        return out

    for member in tar_file_iterator(stream, skip_meta=None):
        name = member["fname"]
        try:
            split = split_webdataset_member(name)
        except UnsafeMember:
            reject("unsafe_name", name)
            continue
        if split is None:
            continue
        key, ext = split
        if current is not None and current["__key__"] != key:
            done = finish(current)
            if done is not None:
                yield done
            current = None
        if current is None:
            current = {"__key__": key}
        if ext in current:
            current["__bad__"] = "repeated_member"
        current[ext] = member["data"]
    if current is not None:
        done = finish(current)
        if done is not None:
            yield done
