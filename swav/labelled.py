"""Labelled images for evaluation, streamed: a class-per-folder tree, or a shard set (ours or an indexed
WebDataset set) whose class comes from the parent folder of each source URL, a JSON field, or a
`.cls` member. Images are read one at a time, in a fixed order, and never held as a list."""

from __future__ import annotations

import json
import os
from typing import Iterator

from shards.index import load_index
from shards.tario import iter_samples
from swav_io.errors import UserError
from swav_io.storage import get_fs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LABEL_SOURCES = "folder | json:FIELD | cls"


def is_folder(where: str) -> bool:
    return os.path.isdir(where) and not os.path.exists(os.path.join(where, "build.json"))


def iter_labelled(where: str, label: str = "folder", options: dict | None = None) -> Iterator[tuple[bytes, str]]:
    """(encoded image, class name) pairs of a labelled folder or shard set, in a fixed order."""
    if is_folder(where):
        if label != "folder":
            raise UserError(f"--label {label} needs a shard set; {where} is a folder (its class is the sub-folder)")
        yield from _folder(where)
    else:
        yield from _shard_set(where, label, options)


def _folder(path: str) -> Iterator[tuple[bytes, str]]:
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise UserError(f"{path} has no class sub-folders (expected {path}/<class>/<image>)")
    found = 0
    for c in classes:
        for name in sorted(os.listdir(os.path.join(path, c))):
            if name.lower().endswith(IMAGE_SUFFIXES):
                with open(os.path.join(path, c, name), "rb") as f:
                    yield f.read(), c
                found += 1
    if not found:
        raise UserError(f"no images under {path}")


def _shard_set(url: str, label: str, options: dict | None) -> Iterator[tuple[bytes, str]]:
    pick = _labeller(label, url)
    idx = load_index(url, options)
    fs, _ = get_fs(idx.shard_url(0), options)
    for i in range(len(idx)):
        with fs.open(fs._strip_protocol(idx.shard_url(i)), "rb") as f:
            for s in iter_samples(f, idx.image_extensions):
                yield s["jpg"], pick(s)


def _labeller(label: str, url: str):
    def meta(s: dict) -> dict:
        try:
            return json.loads(s.get("json") or b"{}")
        except ValueError:
            raise UserError(f"{url}: sample {s['__key__']} has a JSON member that is not JSON") from None

    if label == "folder":
        def by_folder(s: dict) -> str:
            source = meta(s).get("url") or s["__key__"]
            parts = str(source).rstrip("/").rsplit("/", 2)
            if len(parts) < 2:
                raise UserError(f"{url}: sample {s['__key__']} has no parent folder to take a class from; "
                                f"use --label json:FIELD or --label cls")
            return parts[-2]
        return by_folder
    if label.startswith("json:") and len(label) > 5:
        field = label[5:]

        def by_field(s: dict) -> str:
            value = meta(s).get(field)
            if value is None:
                raise UserError(f"{url}: sample {s['__key__']} has no JSON field {field!r}")
            return str(value)
        return by_field
    if label == "cls":
        def by_cls(s: dict) -> str:
            if "cls" not in s:
                raise UserError(f"{url}: sample {s['__key__']} has no .cls member")
            return s["cls"].decode("utf-8").strip()
        return by_cls
    raise UserError(f"--label {label!r}: use one of {LABEL_SOURCES}")
