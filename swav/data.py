"""The training input: shard stream -> multi-crop batches, through torchdata's StatefulDataLoader.

Each DataLoader worker is one consumer of the global shard order and builds
whole batches, so a batch's contents and the stream state after it are one
worker's business; StatefulDataLoader records that state per delivered batch.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import signal
import tempfile
import warnings
from typing import Any, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from shards.index import load_index, open_shared_index, release_shared, share_index
from shards.stream import ShardStream, check_resume
from swav.augment import CropBatch
from swav.multicrop import CropBatcher, MultiCrop
from swav_io.errors import UserError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class WorkerError:
    """A named error raised in a DataLoader worker, delivered as data so it keeps its type and words."""

    kind: type
    message: str


def next_batch(it: Iterator) -> CropBatch | dict:
    """The loader's next batch; a worker's named error is raised here as itself, one line."""
    batch = next(it)
    if isinstance(batch, WorkerError):
        raise batch.kind(batch.message)
    return batch


class _Batches:
    """Iterator of CropBatch over one consumer's ShardStream; its state is the stream's.

    With ``describe`` it yields what a batch holds instead (each sample's source URL and shard),
    for ``swav shards peek``: the same samples in the same batches, without decoding.
    """

    def __init__(self, stream: ShardStream, multicrop: MultiCrop, batch_size: int, augment: bool,
                 describe: bool = False):
        self.stream, self.mc, self.batch_size, self.augment = stream, multicrop, batch_size, augment
        self.describe = describe
        self.bad_samples = 0

    def __iter__(self) -> "_Batches":
        return self

    def __next__(self) -> CropBatch | dict | WorkerError:
        try:
            return self._next()
        except UserError as e:
            if get_worker_info() is None:
                raise
            # The DataLoader would re-raise it with the worker's traceback as its message.
            return WorkerError(type(e), str(e))

    def _next(self) -> CropBatch | dict:
        self.stream.begin_batch()
        if self.describe:
            samples = [next(self.stream) for _ in range(self.batch_size)]
            self.stream.end_batch()
            return {"urls": [source_url(s, self.stream.index) for s in samples],
                    "shards": [int(s["__shard__"]) for s in samples],
                    "ids": [[int(s["__shard__"]), int(s["__ordinal__"])] for s in samples],
                    "passes": [int(s["__pass__"]) for s in samples]}
        batch = CropBatcher(self.mc, self.batch_size)
        ids = []
        while not batch.full:
            s = next(self.stream)
            try:
                batch.add(s["jpg"], s["__key__"], s["__pass__"])
            except Exception as e:  # noqa: BLE001 - one undecodable sample must not stop training
                self.bad_samples += 1
                log.warning("skipping undecodable sample %s (%s); %d so far", s["__key__"], e, self.bad_samples)
                continue
            ids.append(sample_id(s))
        self.stream.end_batch()
        out = batch.finish(self.augment)
        out.ids = torch.tensor(ids, dtype=torch.int64)
        return out

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "bad_samples": self.bad_samples}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.bad_samples = state.get("bad_samples", 0)


def sample_id(sample: dict) -> int:
    """A sample's id, stable across passes, resumes and a set that grows: its shard and its place in it."""
    return (int(sample["__shard__"]) << 32) | int(sample["__ordinal__"])


def source_url(sample: dict, index) -> str:
    """The URL a sample came from: its JSON sidecar's ``url``, else ``<shard URL>#<key>``."""
    meta = sample.get("json")
    if meta:
        try:
            url = json.loads(meta).get("url")
        except (ValueError, AttributeError):
            url = None
        if isinstance(url, str) and url:
            return url
    return f"{index.shard_url(sample['__shard__'])}#{sample['__key__']}"


class MultiCropStream(IterableDataset):
    """Endless multi-crop batches for one rank; each DataLoader worker is its own stream consumer."""

    def __init__(self, url: str, storage_options: dict | None, seed: int, rank: int, world_size: int,
                 batch_size: int, multicrop: MultiCrop, augment: bool, window: int = 16, cache_dir: str = "",
                 cache_max_bytes: int = 10 * 1024**3, num_workers: int = 0, plan: dict | None = None,
                 describe: bool = False):
        self.url, self.options, self.seed = url, storage_options, seed
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.mc, self.augment, self.window = multicrop, augment, window
        self.cache_dir, self.cache_max_bytes = cache_dir, cache_max_bytes
        self.num_workers = max(1, num_workers)
        self.plan, self.describe = plan, describe
        # Loaded once per rank, here; workers memory-map the copy (see share_index).
        self._shared = share_index(load_index(url, storage_options), tempfile.gettempdir())
        atexit.register(release_shared, self._shared)
        self._index = None

    def check_resume(self, states: list[dict] | None, plan: dict | None) -> None:
        """Saved stream positions that no longer fit the set fail here, by name, not in a worker."""
        check_resume(open_shared_index(self._shared), states, plan)

    def __iter__(self) -> Iterator[CropBatch]:
        info = get_worker_info()
        worker = info.id if info else 0
        if self._index is None:
            self._index = open_shared_index(self._shared)
        consumer = self.rank * self.num_workers + worker
        stream = ShardStream(self._index, self.seed, consumer, self.world_size * self.num_workers, self.window,
                             self.options, cache_dir=self.cache_dir, cache_max_bytes=self.cache_max_bytes,
                             plan=self.plan)
        return _Batches(stream, self.mc, self.batch_size, self.augment, self.describe)


# Workers hand each batch's tensors to the trainer as file descriptors, over a Unix socket that
# multiprocessing creates at TEMP/pymp-XXXXXXXX/listener-XXXXXXXX. Linux caps a socket path at 107 bytes;
# past it the socket cannot be bound, and the loader waits forever instead of failing.
_SOCKET_PATH_MAX = 107
_SOCKET_SUFFIX = len("/pymp-XXXXXXXX/listener-XXXXXXXX")


def check_temp_dir_for_workers(num_workers: int) -> None:
    """A clear error, before any worker starts, where a long temp dir would hang the loader."""
    if num_workers == 0 or torch.multiprocessing.get_sharing_strategy() != "file_descriptor":
        return
    temp = tempfile.gettempdir()
    room = _SOCKET_PATH_MAX - _SOCKET_SUFFIX
    if len(os.fsencode(temp)) > room:
        raise UserError(f"the temp dir {temp} is {len(os.fsencode(temp))} bytes long; DataLoader workers pass "
                        f"batches through Unix sockets created inside it, whose paths Linux caps at "
                        f"{_SOCKET_PATH_MAX} bytes, so it must be at most {room}: set TMPDIR to a shorter "
                        f"folder (e.g. TMPDIR=/tmp), or data.num_workers=0")


def build_loader(cfg: Any, rank: int, world_size: int, pin_memory: bool = False,
                 plan: dict | None = None, describe: bool = False) -> StatefulDataLoader:
    check_temp_dir_for_workers(cfg.data.num_workers)
    mc = MultiCrop.from_config(cfg.crops, cfg.seed, cfg.data.max_pixels)
    ds = MultiCropStream(cfg.data.url, cfg.data.storage_options, cfg.seed, rank, world_size, cfg.train.batch_size,
                         mc, augment=cfg.crops.augment_on == "cpu", window=cfg.data.shuffle_window,
                         cache_dir=cfg.data.cache_dir, cache_max_bytes=cfg.data.cache_max_bytes,
                         num_workers=cfg.data.num_workers, plan=plan, describe=describe)
    kw: dict[str, Any] = {}
    if cfg.data.num_workers > 0:
        kw.update(prefetch_factor=cfg.data.prefetch_factor, persistent_workers=False,
                  multiprocessing_context="fork" if not torch.cuda.is_available() else "spawn",
                  worker_init_fn=ignore_preemption_signals)
    warnings.filterwarnings("ignore", message=".*set_vital.*")  # torchdata's own deprecation noise
    return StatefulDataLoader(ds, batch_size=None, num_workers=cfg.data.num_workers, pin_memory=pin_memory,
                              collate_fn=_identity, **kw)


def ignore_preemption_signals(_worker_id: int) -> None:
    """Loader workers leave preemption to the trainer.

    SLURM, Kubernetes and a terminal's Ctrl-C signal the whole process group. A worker that died of
    SIGTERM would take the trainer down with it before its end-of-step checkpoint; ignoring the signal
    lets the trainer finish the step, save, and shut its workers down itself.
    """
    for name in ("SIGTERM", "SIGINT", "SIGUSR1"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


def _identity(x):
    return x


def stream_states(loader_state: Any) -> list[dict]:
    """Every stream state inside a StatefulDataLoader state_dict (one per worker)."""
    found: list[dict] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if "stream_v" in x:
                found.append(x)
                return
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(loader_state)
    return found
