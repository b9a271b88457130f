"""The endless, seeded, resumable stream of samples from a shard set.

Global order: slot g (0, 1, 2, ...) reads shard ``perm(seed, pass)[g % N]`` with
``pass = g // N``; it depends on (seed, pass, position) only. Consumer c of C
(C = ranks x DataLoader workers) takes slots ``base + c + k*C`` for k = 0, 1, ...
Its shuffle window is ``window`` shards open at once: the next sample comes from
one of them picked by a counter-based hash, so a batch mixes samples of many
shards, and the window is rebuilt after a restart from (seed, slot, offset)
alone. There is no sample buffer to save or refill.

State per consumer is a handful of integers: base, C, c, k, draws and
(slot, offset) of each open shard.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict
from typing import Iterator

import numpy as np

from shards.index import ShardIndex
from shards.members import UnsafeMember
from shards.errors import UserError
from shards.storage import explain, get_fs, is_transient
from shards.tario import iter_samples

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Shards that fail one after another in a random order mean broken storage, not bad shards: stop
# with a named error instead of walking the whole index behind a storm of warnings.
MAX_UNREADABLE_IN_A_ROW = 8


class StorageAccessError(UserError):
    """The shard set cannot be read (access denied, expired credentials, no such bucket, ...)."""
_MASK = (1 << 64) - 1


def mix64(*values: int) -> int:
    """SplitMix64 over a tuple of integers: a fast counter-based hash."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK)) & _MASK
        h = (h + 0x9E3779B97F4A7C15) & _MASK
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        h = z ^ (z >> 31)
    return h


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


class ShardOrder:
    """The seeded permutation of shards for each pass (the last few cached)."""

    def __init__(self, num_shards: int, seed: int):
        if num_shards < 1:
            raise ValueError("a shard set with no shards cannot be streamed")
        self.n, self.seed = num_shards, seed
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def perm(self, pass_index: int) -> np.ndarray:
        p = self._cache.get(pass_index)
        if p is None:
            rng = np.random.Generator(np.random.PCG64([self.seed, pass_index, 0x5EED]))
            p = rng.permutation(self.n).astype(np.int64)
            self._cache[pass_index] = p
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        return p

    def shard_at(self, slot: int) -> tuple[int, int]:
        """(shard index, pass) for a global slot."""
        pass_index, pos = divmod(slot, self.n)
        return int(self.perm(pass_index)[pos]), pass_index


class StreamStats:
    def __init__(self) -> None:
        self.samples = 0
        self.shards_opened = 0
        self.shards_skipped = 0
        self.rejected: dict[str, int] = {}   # samples of foreign tars left out, by reason


class ShardStream:
    """Iterator over one consumer's share of the global order. Lazy: opens nothing until next()."""

    def __init__(self, index: ShardIndex, seed: int, consumer: int, num_consumers: int, window: int = 16,
                 storage_options: dict | None = None, base_slot: int = 0, cache_dir: str = "",
                 cache_max_bytes: int = 10 * 1024**3, retries: int = 5, plan: dict | None = None):
        if not 0 <= consumer < num_consumers:
            raise ValueError(f"consumer {consumer} not in [0, {num_consumers})")
        self.index, self.seed = index, seed
        self.order = ShardOrder(len(index), seed)
        self.consumer, self.num_consumers = consumer, num_consumers
        self.window = max(1, window)
        self.options = storage_options or {}
        self.base = base_slot
        self.next_k = 0
        self.draws = 0
        self.open: list[list[int]] = []          # [slot, samples consumed]
        self._readers: dict[int, Iterator[dict]] = {}
        self.cache_dir, self.cache_max_bytes, self.retries = cache_dir, cache_max_bytes, retries
        self.stats = StreamStats()
        self._fs = None
        self._unreadable_in_a_row = 0
        # After a change of consumer layout: slots other consumers finished, and where open ones stood.
        plan = plan or {}
        self.base = plan.get("base", base_slot)
        self.skip = {int(x) for x in plan.get("done", [])}
        self.offsets = {int(k): int(v) for k, v in plan.get("offsets", {}).items()}

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"stream_v": STATE_VERSION, "seed": self.seed, "base": self.base, "consumer": self.consumer,
                "num_consumers": self.num_consumers, "next_k": self.next_k, "draws": self.draws,
                "open": [list(o) for o in self.open], "num_shards": len(self.index),
                "skipped": self.stats.shards_skipped, "done": sorted(self.skip),
                "offsets": {str(k): v for k, v in self.offsets.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("stream_v") != STATE_VERSION:
            raise ValueError("stream state from an incompatible version")
        if (state["consumer"], state["num_consumers"]) != (self.consumer, self.num_consumers):
            raise ValueError("stream state belongs to another consumer layout; use resume_base()")
        if state["num_shards"] != len(self.index) or state["seed"] != self.seed:
            raise ValueError("stream state belongs to another shard set or seed")
        self.base, self.next_k, self.draws = state["base"], state["next_k"], state["draws"]
        self.open = [list(o) for o in state["open"]]
        self.stats.shards_skipped = state.get("skipped", 0)
        self.skip = {int(x) for x in state.get("done", [])}
        self.offsets = {int(k): int(v) for k, v in state.get("offsets", {}).items()}
        self._readers = {}

    # -- iteration -----------------------------------------------------------------------------
    def slot(self, k: int) -> int:
        return self.base + self.consumer + k * self.num_consumers

    def __iter__(self) -> "ShardStream":
        return self

    def __next__(self) -> dict:
        attempts = 0
        while True:
            while len(self.open) < self.window:
                slot = self.slot(self.next_k)
                self.next_k += 1
                if slot in self.skip:
                    self.skip.discard(slot)
                    continue
                self.open.append([slot, self.offsets.pop(slot, 0)])
            j = mix64(self.seed, self.consumer, self.draws) % len(self.open)
            slot, offset = self.open[j]
            sample = self._next_from(slot, offset)
            if sample is None:
                self._readers.pop(slot, None)
                del self.open[j]
                attempts += 1
                if attempts > 4 * self.window + len(self.index):
                    raise RuntimeError("no readable shard in the shard set")
                continue
            self._unreadable_in_a_row = 0
            self.draws += 1
            self.open[j][1] += 1
            self.stats.samples += 1
            shard, pass_index = self.order.shard_at(slot)
            sample["__pass__"] = pass_index
            sample["__shard__"] = shard
            return sample

    def _next_from(self, slot: int, offset: int) -> dict | None:
        reader = self._readers.get(slot)
        if reader is None:
            reader = self._open_reader(slot, offset)
            self._readers[slot] = reader
        try:
            return next(reader)
        except StopIteration:
            return None
        except (UnsafeMember, OSError, ValueError, EOFError) as e:
            shard, _ = self.order.shard_at(slot)
            self.stats.shards_skipped += 1
            self._unreadable_in_a_row += 1
            if self._unreadable_in_a_row >= MAX_UNREADABLE_IN_A_ROW:
                raise StorageAccessError(f"{self._unreadable_in_a_row} shards in a row could not be read (the last: "
                                         f"{self.index.name(shard)}: {type(e).__name__}: {e}); the shard set or its "
                                         f"storage is broken") from None
            log.warning("skipping the rest of shard %s (%s: %s); %d shard(s) skipped so far",
                        self.index.name(shard), type(e).__name__, e, self.stats.shards_skipped)
            return None

    def _open_reader(self, slot: int, offset: int) -> Iterator[dict]:
        shard, _ = self.order.shard_at(slot)
        self.stats.shards_opened += 1
        return self._read_shard(shard, offset)

    def _read_shard(self, shard: int, offset: int) -> Iterator[dict]:
        """Samples of one shard from `offset` on; a transient failure reopens and skips what was read."""
        url = self.index.shard_url(shard)
        done = offset
        failures = 0
        while True:
            try:
                with self._open_url(url) as f:
                    for i, sample in enumerate(iter_samples(f, self.index.image_extensions, self._reject)):
                        if i < done:
                            continue
                        done += 1
                        yield sample
                return
            except (UnsafeMember, EOFError):
                raise
            except Exception as e:  # noqa: BLE001 - classified
                failures += 1
                named = explain(e, url)
                if isinstance(e, PermissionError) or str(named).startswith(("access denied", "no credentials")) \
                        or "NoSuchBucket" in str(e) or "ExpiredToken" in str(e):
                    # Permanent for every shard, not a property of this one: stop the run, within seconds.
                    raise StorageAccessError(f"{named}; fix the storage credentials and rerun the same command "
                                             f"to resume from the last checkpoint") from None
                if not is_transient(e) or failures > self.retries or isinstance(e, FileNotFoundError):
                    raise OSError(f"{type(e).__name__}: {e}") from e
                delay = 0.1 * 2 ** (failures - 1)
                log.warning("reading %s failed (%s); retry %d/%d from sample %d in %.1fs", url, type(e).__name__,
                            failures, self.retries, done, delay)
                time.sleep(delay)

    def _reject(self, reason: str, name: str) -> None:
        n = self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
        log.warning("left out sample %s (%s); %d %s so far", name, reason, n, reason)

    def _open_url(self, url: str):
        if self._fs is None:
            self._fs, _ = get_fs(url, self.options)
        if self.cache_dir and "://" in url and not url.startswith("file://"):
            return open(self._cached(url), "rb")
        # Every open shard of the window holds one read-ahead buffer: 4 MiB each up to 64 MiB in all.
        block = max(1024 * 1024, min(4 * 1024 * 1024, 64 * 1024 * 1024 // self.window))
        return self._fs.open(self._fs._strip_protocol(url), "rb", block_size=block)

    def _cached(self, url: str) -> str:
        os.makedirs(self.cache_dir, exist_ok=True)
        local = os.path.join(self.cache_dir, hashlib.sha1(url.encode()).hexdigest() + ".tar")
        if not os.path.exists(local):
            tmp = f"{local}.tmp-{os.getpid()}"
            self._fs.get_file(self._fs._strip_protocol(url), tmp)
            os.replace(tmp, local)
            _trim_cache(self.cache_dir, self.cache_max_bytes)
        return local


def _trim_cache(folder: str, max_bytes: int) -> None:
    files = [(e.stat().st_atime, e.stat().st_size, e.path) for e in os.scandir(folder) if e.name.endswith(".tar")]
    total = sum(f[1] for f in files)
    for _, size, path in sorted(files):
        if total <= max_bytes:
            break
        try:
            os.remove(path)
            total -= size
        except FileNotFoundError:
            pass


def resume_plan(states: list[dict]) -> dict:
    """How a re-sized set of consumers continues the same global order.

    base: the slowest old consumer's earliest unfinished slot; done: slots at or
    after base that old consumers finished (skipped); offsets: where the open
    shards stood (continued, not restarted). Only batches that were in flight
    and not yet trained on are read again.
    """
    if not states:
        return {"base": 0, "done": [], "offsets": {}}
    earliest, done, offsets = [], set(), {}
    for s in states:
        c, n, base = s["consumer"], s["num_consumers"], s["base"]
        open_slots = {o[0] for o in s["open"]}
        earliest.append(min(open_slots | {base + c + s["next_k"] * n}))
        offsets.update({o[0]: o[1] for o in s["open"]})
        done.update(base + c + k * n for k in range(s["next_k"]) if base + c + k * n not in open_slots)
        done.update(int(x) for x in s.get("done", []))
    g0 = min(earliest)
    done = sorted(x for x in done if x >= g0)
    return {"base": g0, "done": done, "offsets": {str(k): v for k, v in offsets.items() if k >= g0 and v}}
