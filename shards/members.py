"""Tar-member names: the strict rules of the sets we write, and WebDataset's conventions for sets
that other tools wrote. Unsafe names (absolute, ``..``, backslashes, NUL) are refused under both."""

from __future__ import annotations

import posixpath

from shards.layout import is_safe_key

ALLOWED_EXTENSIONS = ("jpg", "json")
# What an indexed WebDataset set takes as the image, first present wins (webdataset's own names).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class UnsafeMember(ValueError):
    """A tar member whose name could escape a directory or break sample grouping."""


def check_safe(name: str) -> None:
    """UnsafeMember for a name that could escape the directory it is extracted into."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        raise UnsafeMember(f"unsafe tar member name {name!r}")
    if posixpath.normpath(name) != name or ".." in name.split("/"):
        raise UnsafeMember(f"unsafe tar member name {name!r}")


def split_member(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, or UnsafeMember if the name is not one we write."""
    check_safe(name)
    if "/" in name:
        raise UnsafeMember(f"unsafe tar member name {name!r}")
    key, dot, ext = name.partition(".")
    if not dot or not is_safe_key(key) or ext not in ALLOWED_EXTENSIONS:
        raise UnsafeMember(f"unexpected tar member name {name!r}")
    return key, ext


def split_webdataset_member(name: str) -> tuple[str, str] | None:
    """(key, extension) by WebDataset's convention, or None for a member that belongs to no sample.

    The key may hold folders; the extension runs from the first dot of the base name, so
    ``a/b.c/x.seg.png`` is key ``a/b.c/x`` with extension ``seg.png``. Names without a dot in the
    base name, and ``__``-prefixed ones (webdataset's metadata), are not sample members. A leading
    ``./`` (what ``tar -C dir -cf x.tar .`` writes) is not part of the key.
    """
    while name.startswith("./"):
        name = name[2:]
    check_safe(name)
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or base.startswith("__"):
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()
