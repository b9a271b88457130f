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


_PART_NAME = re.compile(r"^p(\d{5})-of-(\d{5})")


def part_stem(part: int, num_parts: int) -> str:
    """What every file a part writes starts with: its number and the part layout (I of N)."""
    return f"p{part:05d}-of-{num_parts:05d}"


def parse_part(basename: str) -> tuple[int, int] | None:
    """(part, num_parts) of a file a part wrote, from its name; None for other names."""
    m = _PART_NAME.match(basename)
    return (int(m.group(1)), int(m.group(2))) if m else None


def shard_name(part: int, num_parts: int, number: int) -> str:
    return f"{SHARD_DIR}/{part_stem(part, num_parts)}-{number:06d}.tar"


def manifest_name(part: int, num_parts: int, number: int) -> str:
    return f"{MANIFEST_DIR}/{part_stem(part, num_parts)}-{number:06d}.parquet"


def listing_name(part: int, num_parts: int, run: int, generation: int = 0) -> str:
    """One key-sorted run of a part's listing snapshot (generation > 0: an incremental build's additions)."""
    gen = f"-g{generation:04d}" if generation else ""
    return f"{LISTING_DIR}/{part_stem(part, num_parts)}{gen}-{run:06d}.parquet"


def snapshot_record_name(part: int, num_parts: int, generation: int = 0) -> str:
    """Written after the last run: the snapshot is complete and can be resumed from."""
    gen = f"-g{generation:04d}" if generation else ""
    return f"{LISTING_DIR}/{part_stem(part, num_parts)}{gen}.json"


def part_record_name(part: int, num_parts: int) -> str:
    return f"{PARTS_DIR}/{part_stem(part, num_parts)}.json"


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
