"""A deterministic, streaming walk of a bucket prefix.

Directories are listed one at a time and visited in sorted order, so memory
holds one directory's entries, never the whole bucket, and every machine that
lists the same prefix sees the same sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import fsspec

from shards.storage import with_retries


@dataclass(frozen=True)
class SourceObject:
    pos: int        # position in the full listing
    rel: str        # path relative to the source prefix ('/' separated)
    path: str       # path inside the filesystem
    url: str        # full URL, as recorded in manifests
    size: int


def _entries(fs: fsspec.AbstractFileSystem, path: str) -> list[dict]:
    def listing() -> list[dict]:
        fs.invalidate_cache(path)  # object stores cache listings; a rerun must see the bucket as it is
        return fs.ls(path, detail=True)

    return sorted(with_retries(listing, f"list {path}"), key=lambda e: e["name"])


def walk(fs: fsspec.AbstractFileSystem, root: str, url_prefix: str) -> Iterator[SourceObject]:
    """Every file under root, depth first in sorted name order, with its listing position."""
    root = root.rstrip("/")
    pos = 0
    stack: list[str] = [root]
    while stack:
        current = stack.pop()
        entries = _entries(fs, current)
        subdirs = []
        files = []
        for e in entries:
            name = e["name"].rstrip("/")
            if name == current:
                continue  # some stores list a prefix marker as its own child
            if e.get("type") == "directory":
                subdirs.append(name)
            else:
                files.append(e)
        for e in files:
            rel = e["name"][len(root) + 1:]
            yield SourceObject(pos=pos, rel=rel, path=e["name"], url=f"{url_prefix.rstrip('/')}/{rel}",
                               size=int(e.get("size") or 0))
            pos += 1
        stack.extend(reversed(subdirs))
