"""Checkpoints on any fsspec URL: staged locally, uploaded with retries, published by `latest` last.

Layout under ``checkpoint.url``::

    latest                      {"tag", "step"}: written last by rank 0; the only thing a reader trusts
    step-000000120/
        rank00000/...           each rank's DeepSpeed files, exactly as DeepSpeed wrote them
        state-rank00000.pt      per-rank state: stream position, queue, RNG (tensors and plain data only)
        config.yaml             the resolved config (credentials redacted)
        metrics.jsonl           the run's metrics up to this step (a requeue elsewhere keeps its history)
        manifest.json           every file above with its size: written after all uploads, before `latest`

A checkpoint whose manifest is missing, or whose files do not match it, is
refused with a one-line error; `latest` naming one is never half-trusted.
Loading uses ``torch.load(weights_only=True)`` for our files and for
DeepSpeed's (see SafeCheckpointEngine), so a bucket cannot make us unpickle
arbitrary objects.
"""

from __future__ import annotations

import collections
import enum
import io
import json
import logging
import os
import pickle
import shutil
from dataclasses import dataclass
from typing import Any, Callable

import torch

from swav_io.errors import UserError
from swav_io.storage import (
    explain,
    explained,
    get_fs,
    join,
    read_bytes,
    upload_file,
    with_retries,
    write_bytes,
    write_json,
)

log = logging.getLogger(__name__)

MARKER = "latest"
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"


def tag_for(step: int) -> str:
    return f"step-{step:09d}"


def rank_dir(rank: int) -> str:
    return f"rank{rank:05d}"


def state_name(rank: int) -> str:
    return f"state-rank{rank:05d}.pt"


class UnsafeName(UserError):
    """A name in a checkpoint's manifest or marker that cannot be a path inside the staging folder."""


def safe_parts(name: Any, what: str) -> list[str]:
    """The components of a relative name from a manifest or marker, refused unless plainly inside.

    On S3 a key may literally contain ``../``: a name is data until it passes here.
    """
    if not isinstance(name, str) or not name:
        raise UnsafeName(f"{what}: a file name that is not a non-empty string ({name!r})")
    if "\\" in name or "\0" in name or name.startswith("/") or any(ord(ch) < 32 for ch in name):
        raise UnsafeName(f"{what}: refusing the file name {name!r} (absolute, a backslash or a control character)")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafeName(f"{what}: refusing the file name {name!r} (an empty, '.' or '..' component)")
    return parts


def local_path(root: str, name: str, what: str = "checkpoint") -> str:
    """Where a checked name lives under `root`; its resolved path (links followed) stays under `root`."""
    path = os.path.join(root, *safe_parts(name, what))
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        raise UnsafeName(f"{what}: the file name {name!r} leads outside {root}")
    return path


@dataclass
class CheckpointRef:
    """A published checkpoint: root URL, tag, and its manifest."""

    root: str
    tag: str
    manifest: dict

    @property
    def url(self) -> str:
        return join(self.root, self.tag)

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def world_size(self) -> int:
        return int(self.manifest["world_size"])


class CheckpointStore:
    """Reads and writes checkpoints under one root URL."""

    def __init__(self, url: str, options: dict | None = None):
        self.url = url.rstrip("/")
        self.options = options or {}
        self.fs, self.root = get_fs(self.url, self.options)

    # -- writing -------------------------------------------------------------------------------
    def upload_dir(self, local_dir: str, tag: str, prefix: str) -> dict[str, int]:
        """Upload every file under local_dir to <tag>/<prefix>/...; {relative name: size}."""
        files: dict[str, int] = {}
        for folder, _, names in os.walk(local_dir):
            for name in sorted(names):
                local = os.path.join(folder, name)
                rel = os.path.relpath(local, local_dir).replace(os.sep, "/")
                remote_rel = f"{prefix}/{rel}" if prefix else rel
                self._upload(local, join(self.root, tag, remote_rel))
                files[remote_rel] = os.path.getsize(local)
        return files

    def upload_bytes(self, tag: str, name: str, data: bytes) -> dict[str, int]:
        with explained(join(self.url, tag, name)):
            write_bytes(self.fs, join(self.root, tag, name), data)
        return {name: len(data)}

    def _upload(self, local: str, remote: str) -> None:
        with explained(remote):
            upload_file(self.fs, local, remote)

    def publish(self, tag: str, step: int, world_size: int, files: dict[str, int], extra: dict | None = None) -> None:
        """Rank 0, after every rank uploaded: the manifest, then the `latest` marker."""
        manifest = {"tag": tag, "step": step, "world_size": world_size, "files": files, **(extra or {})}
        write_json(self.fs, join(self.root, tag, MANIFEST), manifest)
        write_json(self.fs, join(self.root, MARKER), {"tag": tag, "step": step})

    def prune(self, keep: int) -> list[str]:
        """Keep the newest `keep` published checkpoints (and the one `latest` names); delete older ones,
        and the folders of failed saves older than `latest`, which can never be published."""
        latest = self.latest_tag()
        if keep <= 0 or latest is None:
            return []
        tags = self.tags()
        published = [t for t in tags if self.fs.exists(join(self.root, t, MANIFEST))]
        kept = set(published[-keep:]) | {latest}
        doomed = [t for t in tags if t not in kept and (t in published or t < latest)]
        for t in doomed:
            try:
                with_retries(lambda t=t: self.fs.rm(join(self.root, t), recursive=True), f"delete {t}")
            except FileNotFoundError:
                pass
        return doomed

    def tags(self) -> list[str]:
        self.fs.invalidate_cache(self.root)  # object stores cache listings; we need what is there now
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        names = sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries})
        return [n for n in names if n.startswith("step-")]

    # -- reading -------------------------------------------------------------------------------
    def latest_tag(self) -> str | None:
        path = join(self.root, MARKER)
        with explained(join(self.url, MARKER)):
            if not with_retries(lambda: self.fs.exists(path), f"stat {path}"):
                return None
            raw = read_bytes(self.fs, path)
        try:
            tag = json.loads(raw.decode("utf-8"))["tag"]
            if not isinstance(tag, str) or len(safe_parts(tag, "latest")) != 1:
                raise ValueError(tag)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise UserError(f"checkpoint marker {join(self.url, MARKER)} is corrupted (not a JSON object with "
                            "a 'tag'); fix or delete it, or pass resume_from=<checkpoint URL>") from None
        return tag

    def latest(self, select: Callable[[dict], list[str]] | None = None) -> CheckpointRef | None:
        tag = self.latest_tag()
        return None if tag is None else self.open(tag, select)

    def open(self, tag: str, select: Callable[[dict], list[str]] | None = None) -> CheckpointRef:
        """A checkpoint by tag, verified against its manifest (the files `select(manifest)` names, else
        every file: present, sizes equal). A rank checks only what it will read: O(1) requests each."""
        url = join(self.url, tag)
        mpath = join(self.root, tag, MANIFEST)
        try:
            if not self.fs.exists(mpath):
                raise UserError(f"checkpoint {url} is incomplete or missing (no {MANIFEST}); "
                                "it was never published")
            manifest = json.loads(read_bytes(self.fs, mpath).decode("utf-8"))
            for name, size in manifest["files"].items():
                safe_parts(name, f"checkpoint manifest {join(url, MANIFEST)}")
                if not isinstance(size, int):
                    raise ValueError(name)
            int(manifest["step"]), int(manifest["world_size"])
            wanted = set(select(manifest)) if select is not None else set(manifest["files"])
            for name, size in sorted(manifest["files"].items()):
                if name not in wanted:
                    continue
                path = join(self.root, tag, name)
                if not self.fs.exists(path):
                    raise UserError(f"checkpoint {url} is damaged: {name} is missing")
                actual = self.fs.size(path)
                if actual != size:
                    raise UserError(f"checkpoint {url} is damaged: {name} has {actual} bytes, manifest says {size}")
        except UserError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise UserError(f"checkpoint manifest {join(url, MANIFEST)} is corrupted") from None
        except Exception as e:  # noqa: BLE001
            raise explain(e, url) from None
        return CheckpointRef(root=self.url, tag=tag, manifest=manifest)

    def download(self, ref: CheckpointRef, local_dir: str, names: list[str]) -> str:
        """Copy the named files of a checkpoint into local_dir (same relative layout)."""
        os.makedirs(local_dir, exist_ok=True)
        for name in names:
            dest = local_path(local_dir, name, f"checkpoint {ref.url}")
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            src = join(self.root, ref.tag, name)
            with explained(join(ref.url, name)):
                with_retries(lambda s=src, d=dest: self.fs.get_file(s, d), f"download {name}")
        return local_dir

    def read_state(self, ref: CheckpointRef, rank: int) -> dict:
        data = read_bytes(self.fs, join(self.root, ref.tag, state_name(rank)))
        return safe_load(data, what=state_name(rank))


def files_to_load(files: dict[str, int] | list[str], rank: int, same_world: bool, zero_stage: int
                  ) -> tuple[list[str], list[str]]:
    """(files every rank of a node loads, files only this rank loads) of a checkpoint's DeepSpeed files.

    DeepSpeed reads the one model-states file (ZeRO 0-2) and, with an unchanged world, only its own
    optimizer partition; after a world change under ZeRO-1/2 it loads the module only. ZeRO-3 keeps
    a model partition per rank: its own when the world is unchanged, every one (consolidated) when it
    changed. Nothing else is fetched, so a resume costs each rank O(1) files, not O(world).

    A ZeRO-3 resize restores weights only, yet needs every rank's optim_states file too: DeepSpeed
    rebuilds the module from the fp32 partitions, which live there (zero_to_fp32), not in the
    model-states files.
    """
    ds = sorted(n for n in files if n.startswith("rank") and "/ds/" in n)
    own = [n for n in ds if n.startswith(rank_dir(rank) + "/")]
    if zero_stage < 3:
        shared = [n for n in ds if n.startswith(rank_dir(0) + "/") and n.endswith("mp_rank_00_model_states.pt")
                  and "zero_pp_rank" not in n]
        mine = [n for n in own if "optim_states" in n] if same_world and zero_stage > 0 else []
        return shared, mine
    return ([], own) if same_world else (ds, [])


def resolve(url: str, options: dict | None = None, select: Callable[[dict], list[str]] | None = None
            ) -> CheckpointRef:
    """A checkpoint URL given by a user: a run's checkpoint root (uses `latest`) or one step's folder."""
    store = CheckpointStore(url, options)
    with explained(url):
        if store.fs.exists(join(store.root, MANIFEST)):
            parent, tag = store.url.rsplit("/", 1)
            return CheckpointStore(parent, options).open(tag, select)
    ref = store.latest(select)
    if ref is None:
        raise UserError(f"no checkpoint at {url} (neither a '{MARKER}' marker nor a {MANIFEST})")
    return ref


# -- safe deserialisation ------------------------------------------------------------------------
def _safe_globals() -> list:
    """Types DeepSpeed checkpoints legitimately hold besides tensors and plain containers."""
    allowed: list = [collections.OrderedDict, torch.Size, enum.Enum, set, frozenset]
    try:  # DeepSpeed stores enums like its ZeRO stage and dtype tags
        from deepspeed.runtime.zero.config import ZeroStageEnum
        allowed.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
        allowed.append(fragment_address)
    except ImportError:
        pass
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    return allowed


def safe_load(source: str | bytes, map_location: Any = "cpu", what: str = "") -> Any:
    """torch.load with weights_only=True (plus the few types DeepSpeed stores) from a path or bytes."""
    what = what or (os.path.basename(source) if isinstance(source, str) else "a checkpoint file")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(io.BytesIO(source) if isinstance(source, bytes) else source,
                              map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - say which file, and whether it is damaged or refused
        lines = str(e).splitlines()
        why = f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
        # torch's own files are zip archives; anything else (zeros, a partial write) is damage, which
        # the weights-only unpickler would otherwise report as a refused pickle.
        if isinstance(e, pickle.UnpicklingError) and _head(source) == b"PK\x03\x04":
            raise UserError(f"refusing to load {what}: it holds objects other than tensors ({why})") from None
        raise UserError(f"cannot read {what}: it is not a readable torch checkpoint file; damaged or truncated? "
                        f"({why})") from None


def _head(source: Any) -> bytes:
    if isinstance(source, bytes):
        return source[:4]
    try:
        with open(source, "rb") as f:
            return f.read(4)
    except (OSError, TypeError):
        return b""


def install_safe_loading(engine) -> None:
    """Make a DeepSpeed engine load its checkpoint files with weights_only=True."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    base = type(engine.checkpoint_engine) if engine.checkpoint_engine is not None else TorchCheckpointEngine

    class SafeCheckpointEngine(base):  # type: ignore[misc, valid-type]
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location or "cpu")

    if engine.checkpoint_engine is not None:
        engine.checkpoint_engine.__class__ = SafeCheckpointEngine


def clear_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
