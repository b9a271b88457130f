"""Tar-member safety: the same rules on write and on read."""

from __future__ import annotations

import posixpath

from shards.layout import is_safe_key

ALLOWED_EXTENSIONS = ("jpg", "json")


class UnsafeMember(ValueError):
    """A tar member whose name could escape a directory or break sample grouping."""


def split_member(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, or UnsafeMember if the name is not one we write."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        raise UnsafeMember(f"unsafe tar member name {name!r}")
    norm = posixpath.normpath(name)
    if norm != name or ".." in name.split("/") or "/" in name:
        raise UnsafeMember(f"unsafe tar member name {name!r}")
    key, dot, ext = name.partition(".")
    if not dot or not is_safe_key(key) or ext not in ALLOWED_EXTENSIONS:
        raise UnsafeMember(f"unexpected tar member name {name!r}")
    return key, ext
