"""Where things live inside a shard set, and what a safe sample key looks like."""

from __future__ import annotations

import hashlib
import re

INDEX = "index.parquet"
BUILD_RECORD = "build.json"
SHARD_DIR = "shards"
MANIFEST_DIR = "manifest"
LISTING_DIR = "listing"
PARTS_DIR = "parts"

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_KEY_OK = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def shard_name(part: int, number: int) -> str:
    return f"{SHARD_DIR}/p{part:05d}-{number:06d}.tar"


def manifest_name(part: int, number: int) -> str:
    return f"{MANIFEST_DIR}/p{part:05d}-{number:06d}.parquet"


def listing_name(part: int, num_parts: int, run: int) -> str:
    """One key-sorted run of a part's listing snapshot."""
    return f"{LISTING_DIR}/p{part:05d}-of-{num_parts:05d}-{run:06d}.parquet"


def snapshot_record_name(part: int, num_parts: int) -> str:
    """Written after the last run: the snapshot is complete and can be resumed from."""
    return f"{LISTING_DIR}/p{part:05d}-of-{num_parts:05d}.json"


def part_record_name(part: int, num_parts: int) -> str:
    return f"{PARTS_DIR}/p{part:05d}-of-{num_parts:05d}.json"


def sample_key(relative_path: str) -> str:
    """A stable, unique, tar-safe key for a source object.

    Readable prefix from the path (dots and separators flattened) plus a hash of
    the full path, so two names that flatten alike never collide.
    """
    digest = hashlib.sha1(relative_path.encode("utf-8")).hexdigest()[:12]
    stem = _UNSAFE.sub("_", relative_path).strip("_")[-60:] or "x"
    return f"{stem}-{digest}"


def is_safe_key(key: str) -> bool:
    return bool(_KEY_OK.match(key))
