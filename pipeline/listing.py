"""A streaming walk of a bucket prefix, in bounded memory.

A flat prefix of a billion objects is the usual bucket layout, so no listing may hold a whole
directory: S3 is paged (one page of 1,000 keys at a time, in key order, no listings cache), a local
disk is read entry by entry. Other stores fall back to fsspec's per-directory listing.

The order is the store's own (key order on S3, directory order on a disk); it only sets the
`list_pos` the manifests record. The pack order is a keyed hash of each path (pipeline/order.py),
and a build resumes from its own snapshot of the listing, never from positions in a live bucket.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import fsspec
from fsspec.asyn import sync

from swav_io.storage import with_retries

# A name that is not UTF-8 (a local file system allows any bytes) cannot be a manifest string or a
# hash input as it is. Its listing entry carries this mark, then the name with the bad bytes escaped
# (\\xff); the build rejects it as `name_not_utf8`. No real name holds a NUL.
BAD_NAME = "\x00"


def listed_name(rel: str) -> str:
    """The name as the listing records it: itself, or BAD_NAME + an escaped form when not UTF-8."""
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return BAD_NAME + rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def printable(rel: str) -> str:
    """A listed name without its mark, for URLs in manifests and messages."""
    return rel[1:] if rel.startswith(BAD_NAME) else rel


@dataclass(frozen=True)
class SourceObject:
    pos: int        # position in the listing this build took
    rel: str        # path relative to the source prefix ('/' separated)
    path: str       # path inside the filesystem
    url: str        # full URL, as recorded in manifests
    size: int


def walk(fs: fsspec.AbstractFileSystem, root: str, url_prefix: str) -> Iterator[SourceObject]:
    """Every object under root, with its listing position."""
    root = root.rstrip("/")
    url_prefix = url_prefix.rstrip("/")
    if _protocol(fs) in ("file", "local"):
        entries = _local(root)
    elif hasattr(fs, "_iterdir") and _protocol(fs) in ("s3", "s3a"):
        entries = _s3_pages(fs, root)
    else:
        entries = _by_directory(fs, root)
    for pos, (path, size) in enumerate(entries):
        rel = listed_name(path[len(root) + 1:])
        yield SourceObject(pos=pos, rel=rel, path=path, url=f"{url_prefix}/{printable(rel)}", size=size)


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def _local(root: str) -> Iterator[tuple[str, int]]:
    """Depth first; os.scandir yields one entry at a time, so a flat folder is never held whole."""
    stack = [root]
    while stack:
        folder = stack.pop()
        subdirs = []
        with os.scandir(folder) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    subdirs.append(e.path)
                elif e.is_file():
                    yield e.path, e.stat().st_size
        stack.extend(sorted(subdirs, reverse=True))


def _s3_pages(fs, root: str) -> Iterator[tuple[str, int]]:
    """All keys under the prefix, page by page (s3fs retries each page), without the listings cache."""
    bucket, _, key = root.partition("/")
    pages = fs._iterdir(bucket, delimiter="", prefix=f"{key}/" if key else "")
    while True:
        try:
            entry = sync(fs.loop, pages.__anext__)
        except StopAsyncIteration:
            return
        if entry.get("type") == "file" and not entry["name"].endswith("/"):  # "folder/" markers are not objects
            yield entry["name"], int(entry.get("size") or 0)


def _by_directory(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[tuple[str, int]]:
    stack = [root]
    while stack:
        current = stack.pop()

        def listing(current: str = current) -> list[dict]:
            fs.invalidate_cache(current)  # object stores cache listings; a rerun must see the bucket as it is
            return fs.ls(current, detail=True)

        subdirs = []
        for e in sorted(with_retries(listing, f"list {current}"), key=lambda e: e["name"]):
            name = e["name"].rstrip("/")
            if name == current:
                continue  # some stores list a prefix marker as its own child
            if e.get("type") == "directory":
                subdirs.append(name)
            else:
                yield name, int(e.get("size") or 0)
        stack.extend(reversed(subdirs))
