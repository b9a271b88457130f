"""The endless, seeded, resumable stream of samples from a shard set.

Work comes in passes (shards/passes.py): pass p cuts its shards into pieces (ranges of samples),
permutes them by (seed, p), and consumer c of C (C = ranks x DataLoader workers) owns every C-th
position. A consumer finishes its pieces of a pass before it opens any of the next, so within a
pass every sample is delivered exactly once across all consumers, however few shards there are.

Its shuffle window is up to ``window`` pieces open at once: the next sample comes from one of them,
picked by a counter-based hash with odds proportional to what each has left (so the open pieces run
out together and a batch keeps mixing to the end of a pass). A sample already in the batch being
built is never drawn again for it: at a pass boundary the next pass's pieces can hold samples the
batch has just seen. The window is rebuilt after a restart from (seed, position, offset) alone.

State per consumer is a handful of integers: the pass and its layout, the cursor, the draws and
(position, offset) of each open piece; after a change of consumer layout, also the positions of the
pass in progress that others finished, until the consumer passes them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Callable, Iterator

import numpy as np

from shards.index import ShardIndex
from shards.members import UnsafeMember
from shards.passes import PassLayout, PassOrder
from shards.tario import iter_samples
from swav_io import retry
from swav_io.errors import UserError, is_access_problem, is_transient
from swav_io.storage import explain, get_fs
from swav_io.system import pid_alive

log = logging.getLogger(__name__)

STATE_VERSION = 2
# Shards that fail one after another in a random order mean broken storage, not bad shards: stop
# with a named error instead of walking the whole index behind a storm of warnings.
MAX_UNREADABLE_IN_A_ROW = 8
# Layouts of recent passes kept in each state, so that a resize plan can name what fast consumers
# finished while slow ones had not started (consumers drift apart by a piece or two, not by passes).
HISTORY_PASSES = 8


class StorageAccessError(UserError):
    """The shard set cannot be read (access denied, expired credentials, no such bucket, ...)."""


class SetChanged(UserError):
    """The shard set no longer holds the shards a saved stream position refers to."""


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


class StreamStats:
    def __init__(self) -> None:
        self.samples = 0
        self.shards_opened = 0
        self.shards_skipped = 0
        self.rejected: dict[str, int] = {}   # samples of foreign tars left out, by reason


def set_changed_error(url: str, pass_index: int, layout: PassLayout, holds: int) -> SetChanged:
    return SetChanged(
        f"the shard set {url} no longer holds the {layout.n} shard(s) the run's pass {pass_index} reads (it holds "
        f"{holds} of those generations): shards added by `swav shards build --incremental` join at the next pass, "
        f"but shards removed or rebuilt cannot be resumed exactly; rerun with data.restart_pass=true to keep the "
        f"weights and start a fresh pass over the set as it is now")


# A reader yields the samples of one shard from a sample ordinal on (the stream stops it at the
# piece's end); tests and simulations give one that needs no tar.
Reader = Callable[[int, int], Iterator[dict]]


class ShardStream:
    """Iterator over one consumer's share of every pass. Lazy: opens nothing until next()."""

    def __init__(self, index: ShardIndex, seed: int, consumer: int, num_consumers: int, window: int = 16,
                 storage_options: dict | None = None, cache_dir: str = "",
                 cache_max_bytes: int = 10 * 1024**3, retries: int = 5, plan: dict | None = None,
                 reader: Reader | None = None):
        if not 0 <= consumer < num_consumers:
            raise ValueError(f"consumer {consumer} not in [0, {num_consumers})")
        if len(index) == 0:
            raise UserError(f"the shard set {index.url} holds no shards: nothing to stream")
        self.index, self.seed = index, seed
        self.passes = PassOrder(seed, index.samples, index.generations)
        self.consumer, self.num_consumers = consumer, num_consumers
        self.window = max(1, window)
        self.options = storage_options or {}
        self.cache_dir, self.cache_max_bytes, self.retries = cache_dir, cache_max_bytes, retries
        self._reader = reader
        self.stats = StreamStats()
        self._fs = None
        self._unreadable_in_a_row = 0
        self._readers: dict[int, Iterator[dict]] = {}
        self._pieces: dict[int, tuple[int, int, int | None]] = {}   # position -> (shard, start, end)
        self._batch: set[tuple[int, int]] = set()                  # (shard, ordinal) in the batch being built
        self._batching = False                                      # begin_batch() was called: keep _batch
        self.pass_index = 0
        self.layout = self.passes.fresh(0, num_consumers, self.window)
        self.next_k = 0
        self.draws = 0
        self.open: list[list[int]] = []          # [position, samples read from its piece]
        self.skip: set[int] = set()              # positions of this pass that other consumers finished
        self.offsets: dict[int, int] = {}        # positions of this pass to start mid-piece
        self.future: dict[int, dict] = {}        # pass -> {layout, skip, offsets} from a resize plan
        self.history: dict[int, list[int]] = {}
        if plan:
            self._apply_plan(plan)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"stream_v": STATE_VERSION, "seed": self.seed, "consumer": self.consumer,
                "num_consumers": self.num_consumers, "pass": self.pass_index, "layout": self.layout.to_list(),
                "next_k": self.next_k, "draws": self.draws, "open": [list(o) for o in self.open],
                "skip": sorted(self.skip), "offsets": {str(k): v for k, v in self.offsets.items()},
                "future": {str(p): f for p, f in self.future.items()},
                "history": {str(p): v for p, v in self.history.items()},
                "skipped": self.stats.shards_skipped,
                "batch": sorted([list(x) for x in self._batch]) if self._batching else None}

    def load_state_dict(self, state: dict) -> None:
        check_state_version(state)
        if (state["consumer"], state["num_consumers"]) != (self.consumer, self.num_consumers):
            raise ValueError("stream state belongs to another consumer layout; use resume_plan()")
        if state["seed"] != self.seed:
            raise ValueError("stream state belongs to another seed")
        layout = PassLayout.from_list(state["layout"])
        self._check(state["pass"], layout)
        for p, f in state.get("future", {}).items():
            self._check(int(p), PassLayout.from_list(f["layout"]))
        self.pass_index, self.layout = int(state["pass"]), layout
        self.next_k, self.draws = state["next_k"], state["draws"]
        self.open = [list(o) for o in state["open"]]
        self.skip = {int(x) for x in state.get("skip", [])}
        self.offsets = {int(k): int(v) for k, v in state.get("offsets", {}).items()}
        self.future = {int(p): f for p, f in state.get("future", {}).items()}
        self.history = {int(p): list(v) for p, v in state.get("history", {}).items()}
        self.stats.shards_skipped = state.get("skipped", 0)
        self._readers, self._pieces = {}, {}
        batch = state.get("batch")
        self._batching = batch is not None
        self._batch = {(int(a), int(b)) for a, b in batch or []}

    def _check(self, pass_index: int, layout: PassLayout) -> None:
        if not self.passes.check(layout):
            raise set_changed_error(self.index.url, pass_index, layout, self.passes.shard_count(layout.gens))

    def _apply_plan(self, plan: dict) -> None:
        passes = {int(p): e for p, e in plan.get("passes", {}).items()}
        first = int(plan["first_pass"])
        for p, e in passes.items():
            layout = PassLayout.from_list(e["layout"])
            self._check(p, layout)
            mine = layout.first_position(self.consumer, self.num_consumers)
            done = np.asarray(e.get("done", []), dtype=np.int64)
            skip = done[(done - mine) % self.num_consumers == 0].tolist()
            offsets = {str(k): int(v) for k, v in e.get("offsets", {}).items()
                       if (int(k) - mine) % self.num_consumers == 0}
            self.future[p] = {"layout": layout.to_list(), "skip": skip, "offsets": offsets}
        self.history = {int(p): list(v) for p, v in plan.get("history", {}).items()}
        if first in self.future:
            self._switch(first)
        else:
            self.layout = self.passes.fresh(int(plan.get("start", 0)), self.num_consumers, self.window)
            self.pass_index, self.next_k = first, 0

    # -- passes --------------------------------------------------------------------------------
    def _enter(self, pass_index: int) -> None:
        """Leave the current pass (remembered for a later resize plan) for `pass_index`."""
        self.history[self.pass_index] = self.layout.to_list()
        for old in sorted(self.history)[:-HISTORY_PASSES]:
            del self.history[old]
        self._switch(pass_index)

    def _switch(self, pass_index: int) -> None:
        """The layout a resize plan named for the pass, else a fresh one from the index as it is now."""
        planned = self.future.pop(pass_index, None)
        if planned is not None:
            self.layout = PassLayout.from_list(planned["layout"])
            self.skip = {int(x) for x in planned["skip"]}
            self.offsets = {int(k): int(v) for k, v in planned["offsets"].items()}
        else:
            self.layout = self.passes.fresh(self.layout.start + self.layout.pieces, self.num_consumers, self.window)
            self.skip, self.offsets = set(), {}
        self.pass_index, self.next_k = pass_index, 0
        self._pieces.clear()   # positions name other pieces in another pass

    def position(self, k: int) -> int:
        return self.layout.first_position(self.consumer, self.num_consumers) + k * self.num_consumers

    def _piece(self, position: int) -> tuple[int, int, int | None]:
        p = self._pieces.get(position)
        if p is None:
            p = self._pieces[position] = self.passes.piece_at(self.pass_index, self.layout, position)
        return p

    def _open_one(self) -> bool:
        """Open this consumer's next piece of the pass; False when none is left."""
        while True:
            pos = self.position(self.next_k)
            if pos >= self.layout.pieces:
                return False
            self.next_k += 1
            if pos in self.skip:
                self.skip.discard(pos)
                continue
            self.open.append([pos, self.offsets.pop(pos, 0)])
            return True

    # -- iteration -----------------------------------------------------------------------------
    def begin_batch(self) -> None:
        """A new batch starts: samples of the last one may be drawn again.

        A stream whose caller never marks batches draws without this rule."""
        self._batching = True
        self._batch.clear()

    def end_batch(self) -> None:
        """The batch is complete: nothing of it needs remembering (a state saved now stays small)."""
        self._batch.clear()

    def __iter__(self) -> "ShardStream":
        return self

    def __next__(self) -> dict:
        attempts = 0
        while True:
            while len(self.open) < self.window and self._open_one():
                pass
            if not self.open:
                self._enter(self.pass_index + 1)
                attempts += 1
                if attempts > 4 * self.window + 2 * self.layout.pieces + 8:
                    raise RuntimeError("no readable shard in the shard set")
                continue
            j = self._pick()
            pos, offset = self.open[j]
            shard, start, end = self._piece(pos)
            sample = None if end is not None and start + offset >= end else self._next_from(pos, shard, start + offset)
            if sample is None:
                self._readers.pop(pos, None)
                self._pieces.pop(pos, None)
                del self.open[j]
                attempts += 1
                if attempts > 4 * self.window + 2 * self.layout.pieces + 8:
                    raise RuntimeError("no readable shard in the shard set")
                continue
            self._unreadable_in_a_row = 0
            self.draws += 1
            self.open[j][1] += 1
            self.stats.samples += 1
            if self._batching:
                self._batch.add((shard, start + offset))
            sample["__pass__"] = self.pass_index
            sample["__shard__"] = shard
            sample["__ordinal__"] = start + offset
            return sample

    def _next_id(self, pos: int, offset: int) -> tuple[int, int]:
        """(shard, ordinal) of the sample a piece delivers next."""
        shard, start, _ = self._piece(pos)
        return shard, start + offset

    def _remaining(self, pos: int, offset: int) -> int:
        shard, start, end = self._piece(pos)
        stop = end if end is not None else max(int(self.index.samples[shard]), start + offset + 1)
        return max(1, stop - start - offset)

    def _pick(self) -> int:
        """An open piece, with odds proportional to what it has left, whose next sample is not in the batch."""
        while True:
            free = [j for j, (pos, off) in enumerate(self.open) if self._next_id(pos, off) not in self._batch]
            if free or not self._open_one():
                break
        # Nothing else is left in this pass for this consumer: a set smaller than a batch repeats.
        candidates = free or list(range(len(self.open)))
        weights = [self._remaining(*self.open[j]) for j in candidates]
        u = mix64(self.seed, self.consumer, self.draws) % sum(weights)
        for j, w in zip(candidates, weights):
            if u < w:
                return j
            u -= w
        return candidates[-1]

    def _next_from(self, pos: int, shard: int, ordinal: int) -> dict | None:
        reader = self._readers.get(pos)
        if reader is None:
            self.stats.shards_opened += 1
            reader = (self._reader or self._read_shard)(shard, ordinal)
            self._readers[pos] = reader
        try:
            return next(reader)
        except StopIteration:
            return None
        except (UnsafeMember, OSError, ValueError, EOFError) as e:
            self.stats.shards_skipped += 1
            self._unreadable_in_a_row += 1
            if self._unreadable_in_a_row >= MAX_UNREADABLE_IN_A_ROW:
                raise StorageAccessError(f"{self._unreadable_in_a_row} shards in a row could not be read (the last: "
                                         f"{self.index.name(shard)}: {type(e).__name__}: {e}); the shard set or its "
                                         f"storage is broken") from None
            log.warning("skipping the rest of shard %s from sample %d on (%s: %s); %d piece(s) skipped so far",
                        self.index.name(shard), ordinal, type(e).__name__, e, self.stats.shards_skipped)
            return None

    def _read_shard(self, shard: int, offset: int) -> Iterator[dict]:
        """Samples of one shard from ordinal `offset` on; a transient failure reopens and skips what was read.

        Samples a foreign tar's rules leave out are reported once per pass: by the piece that reads
        past them after its own first sample, never by one that only skips over them.
        """
        url = self.index.shard_url(shard)
        done = offset

        def retryable(e: BaseException) -> bool:
            return isinstance(e, Exception) and not isinstance(e, (UnsafeMember, EOFError)) and is_transient(e)

        try:
            for attempt in retry.policy(f"reading {url}", attempts=self.retries + 1, base_delay=0.1,
                                        retry_on=retryable):
                with attempt:
                    # A retry reopens the shard and skips the `done` samples already delivered.
                    yielded = 0

                    def reject(reason: str, name: str) -> None:
                        # Late binding is the point: a left-out sample is reported only once this attempt has
                        # caught up with what earlier ones delivered, so each is reported once per pass.
                        if yielded >= done:  # noqa: B023
                            self._reject(reason, name)

                    with self._open_url(url) as f:
                        for sample in iter_samples(f, self.index.image_extensions, reject):
                            yielded += 1
                            if yielded <= done:
                                continue
                            done += 1
                            yield sample
        except (UnsafeMember, EOFError):
            raise
        except Exception as e:  # noqa: BLE001 - classified
            if is_access_problem(e):
                # Permanent for every shard, not a property of this one: stop the run, within seconds.
                raise StorageAccessError(f"{explain(e, url)}; fix the storage credentials and rerun the same command "
                                         f"to resume from the last checkpoint") from None
            raise OSError(f"{type(e).__name__}: {e}") from e

    def _reject(self, reason: str, name: str) -> None:
        n = self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
        log.warning("left out sample %s (%s); %d %s so far", name, reason, n, reason)

    def _open_url(self, url: str):
        if self._fs is None:
            self._fs, _ = get_fs(url, self.options)
        if self.cache_dir and "://" in url and not url.startswith("file://"):
            return self._cached(url)
        # Every open piece of the window holds one read-ahead buffer: 4 MiB each up to 64 MiB in all.
        block = max(1024 * 1024, min(4 * 1024 * 1024, 64 * 1024 * 1024 // self.window))
        return self._fs.open(self._fs._strip_protocol(url), "rb", block_size=block)

    def _cached(self, url: str):
        """The shard's local copy, opened: an open file outlives a trim by another worker."""
        os.makedirs(self.cache_dir, exist_ok=True)
        local = os.path.join(self.cache_dir, hashlib.sha1(url.encode()).hexdigest() + ".tar")
        try:
            return open(local, "rb")
        except FileNotFoundError:
            pass
        tmp = f"{local}{TMP_MARK}{os.getpid()}"
        try:
            self._fs.get_file(self._fs._strip_protocol(url), tmp)
            os.replace(tmp, local)
        finally:
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass
        f = open(local, "rb")
        _trim_cache(self.cache_dir, self.cache_max_bytes)
        return f


TMP_MARK = ".tmp-"


def _trim_cache(folder: str, max_bytes: int) -> None:
    """Keep the cache under max_bytes, oldest access first; partial downloads of dead processes go first."""
    files = []
    for e in os.scandir(folder):
        try:
            st = e.stat()
        except FileNotFoundError:
            continue
        if TMP_MARK in e.name:
            pid = e.name.rsplit(TMP_MARK, 1)[1]
            if pid.isdigit() and not pid_alive(int(pid)):
                try:
                    os.remove(e.path)
                except FileNotFoundError:
                    pass
                continue
            files.append((float("inf"), st.st_size, ""))   # in progress: counted, never removed
        elif e.name.endswith(".tar"):
            files.append((st.st_atime, st.st_size, e.path))
    total = sum(f[1] for f in files)
    for _, size, path in sorted(files):
        if total <= max_bytes or not path:
            break
        try:
            os.remove(path)
            total -= size
        except FileNotFoundError:
            pass


def check_state_version(state: dict) -> None:
    if state.get("stream_v") != STATE_VERSION:
        raise UserError(f"the checkpoint's stream position was saved by an earlier version of swav-stream "
                        f"(stream state v{state.get('stream_v')}, this one reads v{STATE_VERSION}); rerun with "
                        f"data.restart_pass=true to keep the weights and start a fresh pass")


def restart_plan(states: list[dict]) -> dict:
    """Start a fresh pass after the furthest one any consumer reached (data.restart_pass)."""
    last, end = 0, 0
    for s in states:
        layout = s.get("layout")
        if s.get("stream_v") == STATE_VERSION and layout:
            last = max(last, int(s["pass"]))
            end = max(end, int(layout[0]) + int(layout[2]) * int(layout[3]))
    return {"first_pass": last + 1 if states else 0, "passes": {}, "start": end}


def resume_plan(states: list[dict]) -> dict:
    """How a re-sized set of consumers continues the same passes.

    For every pass some old consumer was in or had planned: its layout, the positions old consumers
    finished (new ones skip them) and where unfinished pieces stood (continued, not restarted).
    Carries what an earlier plan handed the old consumers for positions they had not reached yet, so
    resizes in a row repeat nothing. Only batches in flight, not yet trained on, are read again.
    """
    if not states:
        return {"first_pass": 0, "passes": {}}
    for s in states:
        check_state_version(s)
    layouts: dict[int, list[int]] = {}
    for s in states:
        layouts.update({int(p): v for p, v in s.get("history", {}).items()})
        layouts.update({int(p): f["layout"] for p, f in s.get("future", {}).items()})
        layouts[int(s["pass"])] = s["layout"]
    first = min(int(s["pass"]) for s in states)
    last = max([int(s["pass"]) for s in states] + [int(p) for s in states for p in s.get("future", {})])
    passes = {}
    for p in range(first, last + 1):
        if p not in layouts:
            raise UserError(f"cannot plan the resize: no saved stream state knows the layout of pass {p} (its "
                            f"consumers drifted more than {HISTORY_PASSES} passes apart); rerun with "
                            f"data.restart_pass=true")
        layout = PassLayout.from_list(layouts[p])
        done = np.zeros(layout.pieces, dtype=bool)
        offsets: dict[int, int] = {}
        for s in states:
            c, n, at = int(s["consumer"]), int(s["num_consumers"]), int(s["pass"])
            mine = layout.first_position(c, n)
            if p < at:
                done[mine::n] = True
            elif p == at:
                done[mine:mine + int(s["next_k"]) * n:n] = True
                done[[int(x) for x in s.get("skip", [])]] = True
                for pos, off in s["open"]:
                    done[int(pos)] = False
                    offsets[int(pos)] = int(off)
                offsets.update({int(k): int(v) for k, v in s.get("offsets", {}).items()})
            else:
                planned = s.get("future", {}).get(str(p)) or s.get("future", {}).get(p)
                if planned:
                    done[[int(x) for x in planned["skip"]]] = True
                    offsets.update({int(k): int(v) for k, v in planned["offsets"].items()})
        passes[str(p)] = {"layout": layout.to_list(), "done": np.flatnonzero(done).tolist(),
                          "offsets": {str(k): v for k, v in offsets.items() if v and not done[k]}}
    history = {str(p): v for p, v in layouts.items() if p < first}
    return {"first_pass": first, "passes": passes, "history": history}


def check_resume(index: ShardIndex, states: list[dict] | None = None, plan: dict | None = None) -> None:
    """Before any reader starts: the saved stream positions (or a resize plan) still fit this index.

    Raises a named UserError (SetChanged, or an old state version) instead of a worker's traceback.
    """
    order = PassOrder(0, index.samples, index.generations)
    layouts: list[tuple[int, list[int]]] = []
    for s in states or []:
        check_state_version(s)
        layouts.append((int(s["pass"]), s["layout"]))
        layouts += [(int(p), f["layout"]) for p, f in s.get("future", {}).items()]
    for p, e in (plan or {}).get("passes", {}).items():
        layouts.append((int(p), e["layout"]))
    for p, v in layouts:
        layout = PassLayout.from_list(v)
        if not order.check(layout):
            raise set_changed_error(index.url, p, layout, order.shard_count(layout.gens))
