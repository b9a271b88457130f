"""Build a shard set from a bucket: list, read, normalise, deduplicate, pack, commit.

Objects are packed in a seeded pseudo-random order (pipeline/order.py), so each
shard is an i.i.d. sample of the part, never a run of one folder. The listing is
first written as a snapshot (key-sorted runs plus a record); the pack order is a
streaming merge of those runs.

Restart rule: shard k of a part is committed when its manifest exists (the tar
is written first, the manifest second and it records the tar's hash). A rerun
keeps the committed prefix, rebuilds its dedup state from those manifests, and
continues in the snapshot's pack order after the objects already committed, so
the output is byte-identical to an uninterrupted build.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow.compute as pc
from tqdm import tqdm

from pipeline.fromlist import from_list
from pipeline.listing import BAD_NAME, SourceObject, walk
from pipeline.merge import merge
from pipeline.normalise import NormaliseConfig, decode_job
from pipeline.order import in_order, write_additions, write_snapshot
from pipeline.seen import SeenHashes, manifest_digest, seen_path
from shards import layout
from shards.manifest import (
    ACCEPTED,
    MANIFEST_SCHEMA,
    REJECTED,
    from_parquet_bytes,
    table_to_parquet_bytes,
    to_parquet_bytes,
)
from shards.tario import write_tar
from swav_io.errors import AccessDenied, UserError
from swav_io.storage import (
    explain,
    explained,
    get_fs,
    join,
    read_bytes,
    read_json,
    redact,
    redact_text,
    remove_stale_temporaries,
    with_retries,
    write_bytes,
    write_json,
)
from swav_io.system import usable_cpus

log = logging.getLogger(__name__)


@dataclass
class BuildConfig:
    samples_per_shard: int = 1000
    shard_max_bytes: int = 256 * 1024 * 1024
    workers: int = 0            # decode processes; 0 = one per core
    io_threads: int = 16        # concurrent reads from the source
    part: int = 0
    num_parts: int = 1
    seed: int = 0               # pack order; part of the output, recorded in build.json
    normalise: NormaliseConfig = field(default_factory=NormaliseConfig)
    incremental: bool = False   # a finished part gains the objects its snapshots do not hold yet
    from_list: str | None = None  # a ready listing (parquet/CSV of URLs or keys) instead of listing SRC
    work_dir: str = ""          # local folder for the part's accepted-hash file (default: the temp dir)

    def fingerprint(self) -> dict:
        """The settings that change output bytes (workers, threads and how the listing is obtained do not)."""
        d = dataclasses.asdict(self)
        for k in ("workers", "io_threads", "part", "incremental", "from_list", "work_dir"):
            d.pop(k)
        return d


@dataclass
class PartResult:
    part: int
    inputs: int = 0
    accepted: int = 0
    reasons: dict = field(default_factory=dict)
    shards: list = field(default_factory=list)   # dicts of INDEX_SCHEMA
    resumed_shards: int = 0
    seconds: float = 0.0
    already_complete: bool = False
    generation: int = 0         # 0: the first build; g > 0: the g-th incremental addition
    added_inputs: int = 0       # inputs of this generation (all of them for generation 0)

    @property
    def rejected(self) -> int:
        return sum(self.reasons.values())


def in_part(rel: str, part: int, num_parts: int) -> bool:
    if num_parts == 1:
        return True
    return int(hashlib.sha1(rel.encode("utf-8")).hexdigest()[:8], 16) % num_parts == part


def _check_part(cfg: BuildConfig) -> None:
    if cfg.num_parts < 1 or not 0 <= cfg.part < cfg.num_parts:
        raise UserError(f"--part {cfg.part}/{cfg.num_parts} is not a valid part (need 0 <= I < N)")
    if cfg.samples_per_shard < 1:
        raise UserError("samples_per_shard must be >= 1")


class _PartWriter:
    """Accumulates rows and samples for the shard being built and commits it."""

    def __init__(self, fs, root: str, cfg: BuildConfig, number: int, seen: SeenHashes, result: PartResult,
                 generation: int = 0):
        self.fs, self.root, self.cfg = fs, root, cfg
        self.number, self.seen, self.result = number, seen, result
        self.generation = generation
        self.rows: list[dict] = []
        self.samples: list[dict] = []
        self.nbytes = 0

    def add(self, obj: SourceObject, out: dict) -> None:
        self.result.inputs += 1
        self.result.added_inputs += 1
        row = {"list_pos": obj.pos, "url": obj.url, "size": out.get("size", obj.size), "status": REJECTED,
               "reason": out.get("reason"), "detail": out.get("detail"), "key": None, "shard": None,
               "sha256": out.get("sha256"), "width": out.get("width"), "height": out.get("height"),
               "out_bytes": None}
        if out["status"] == "accepted" and out["sha256"] in self.seen:
            row.update(reason="duplicate", detail="same normalised content as an earlier object")
        elif out["status"] == "accepted":
            key = layout.sample_key(obj.rel)
            meta = {"url": obj.url, "width": out["width"], "height": out["height"],
                    "sha256": out["sha256"], "format": out["format"], "frames": out["frames"]}
            self.samples.append({"__key__": key, "jpg": out["jpg"],
                                 "json": json.dumps(meta, sort_keys=True).encode("utf-8")})
            self.nbytes += len(out["jpg"])
            self.seen.add(out["sha256"])
            row.update(status=ACCEPTED, key=key, shard=self._name(),
                       out_bytes=len(out["jpg"]))
            self.result.accepted += 1
        if row["status"] == REJECTED:
            self.result.reasons[row["reason"]] = self.result.reasons.get(row["reason"], 0) + 1
        self.rows.append(row)
        if len(self.samples) >= self.cfg.samples_per_shard or self.nbytes >= self.cfg.shard_max_bytes:
            self.commit()

    def commit(self) -> None:
        if not self.rows:
            return
        name = self._name()
        entry = {"name": name, "samples": len(self.samples), "bytes": 0, "sha256": None}
        if self.generation:
            entry["generation"] = self.generation  # merge keeps an earlier generation's copy of a duplicate
        if self.samples:
            data = write_tar(self.samples)
            entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
            write_bytes(self.fs, join(self.root, name), data)
        manifest = to_parquet_bytes(self.rows, MANIFEST_SCHEMA)
        # The manifest's key-value metadata carries the shard entry: committing it commits the shard.
        table = from_parquet_bytes(manifest).replace_schema_metadata({"shard": json.dumps(entry)})
        data = table_to_parquet_bytes(table)
        write_bytes(self.fs, join(self.root, layout.manifest_name(self.cfg.part, self.cfg.num_parts, self.number)),
                    data)
        self.seen.commit(self.number + 1, manifest_digest(data))
        if entry["samples"]:
            self.result.shards.append(entry)
        self.number += 1
        self.rows, self.samples, self.nbytes = [], [], 0

    def _name(self) -> str:
        return layout.shard_name(self.cfg.part, self.cfg.num_parts, self.number)


def _recover(fs, root: str, cfg: BuildConfig, result: PartResult, seen: SeenHashes) -> int:
    """The next shard number, from committed manifests: `result` counts their inputs, and `seen` catches
    up with their accepted hashes (or is rebuilt from them when it holds another build's)."""
    held = seen.manifests
    if held:
        last = join(root, layout.manifest_name(cfg.part, cfg.num_parts, held - 1))
        if not with_retries(lambda: fs.exists(last), f"stat {last}") or \
                manifest_digest(read_bytes(fs, last)) != seen.tail:
            seen.reset()
            held = 0
    number = 0
    while True:
        path = join(root, layout.manifest_name(cfg.part, cfg.num_parts, number))
        if not with_retries(lambda p=path: fs.exists(p), f"stat {path}"):
            break
        data = read_bytes(fs, path)
        table = from_parquet_bytes(data)
        meta = table.schema.metadata or {}
        entry = json.loads(meta[b"shard"]) if b"shard" in meta else None
        if entry is None:
            break
        if entry["samples"]:
            tar_path = join(root, entry["name"])
            if not fs.exists(tar_path) or fs.size(tar_path) != entry["bytes"]:
                break
            result.shards.append(entry)
        accepted = pc.equal(table["status"], ACCEPTED)
        if number >= held:
            seen.commit(number + 1, manifest_digest(data), table["sha256"].filter(accepted).to_pylist())
        result.inputs += table.num_rows
        result.accepted += pc.sum(accepted).as_py() or 0
        for item in pc.value_counts(table["reason"].filter(pc.invert(accepted))).to_pylist():
            result.reasons[item["values"]] = result.reasons.get(item["values"], 0) + item["counts"]
        number += 1
    result.resumed_shards = number
    if seen.manifests > number:
        # It holds manifests past the last complete shard (whose tar went missing): those are redone,
        # so their hashes must go. Rare; refill from the manifests that stand.
        seen.reset()
        for n in range(number):
            data = read_bytes(fs, join(root, layout.manifest_name(cfg.part, cfg.num_parts, n)))
            table = from_parquet_bytes(data, columns=["status", "sha256"])
            seen.commit(n + 1, manifest_digest(data),
                        table["sha256"].filter(pc.equal(table["status"], ACCEPTED)).to_pylist())
    return number


def _read_object(fs, obj: SourceObject) -> bytes:
    return read_bytes(fs, obj.path, f"read {obj.url}")


class ReadFault(UserError):
    """A read that still failed after its retries: the build stops, and the rerun retries the object."""


def _read_failure(obj: SourceObject, exc: Exception) -> dict:
    """A vanished object is a rejection; anything else stops the build with a one-line error.

    A fault is not a property of the object: committing it as a rejection would make two runs that
    met different throttling publish different shard sets. Stopping keeps every committed shard, and
    the rerun continues from the first uncommitted one.
    """
    if isinstance(exc, FileNotFoundError):
        return {"status": "rejected", "reason": "missing", "detail": "listed, but gone when read"}
    err = explain(exc, obj.url)
    if isinstance(err, AccessDenied):
        raise err from exc
    raise ReadFault(f"reading {obj.url} failed after retries ({type(exc).__name__}); the shards committed so far "
                    f"are kept: rerun the same command to continue") from None


class _Processor:
    """Reads with threads and decodes with processes, yielding results in pack order.

    A decoder process that dies (OOM killer, a segfault in a codec) breaks the whole pool, so every
    object in flight sees the crash. The pool is replaced, and each of those objects is decoded once
    more in a process of its own: a bystander decodes there as usual, and only an object that kills
    its decoder a second time is rejected (decoder_crash).
    """

    def __init__(self, fs, cfg: BuildConfig):
        self.fs, self.ncfg = fs, cfg.normalise
        self.workers = cfg.workers or usable_cpus()
        # forkserver: workers fork from a clean server that has already imported the decoder, so they
        # start in milliseconds (spawn re-imports everything per worker) and inherit none of our threads.
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["pipeline.normalise"])
        self._check_decoders_start()
        self.procs = ProcessPoolExecutor(self.workers, mp_context=self.ctx)
        self.threads = ThreadPoolExecutor(max(cfg.io_threads, self.workers))
        self.window = max(4 * self.workers, cfg.io_threads * 2)
        self.lock = threading.Lock()
        self.broken_workers: list[dict] = []

    def _task(self, obj: SourceObject) -> tuple[SourceObject, dict]:
        if obj.rel.startswith(BAD_NAME):
            return obj, {"status": "rejected", "reason": "name_not_utf8",
                         "detail": "the object's name is not UTF-8; rename it to include it"}
        try:
            data = _read_object(self.fs, obj)
        except Exception as e:  # noqa: BLE001 - classified: a rejection, or a stop
            return obj, _read_failure(obj, e)
        return obj, {**self._decode(data, obj), "size": len(data)}

    def _decode(self, data: bytes, obj: SourceObject) -> dict:
        pool = self.procs
        try:
            return pool.submit(decode_job, data, self.ncfg).result()
        except BrokenProcessPool:
            self._replace(pool)
        with ProcessPoolExecutor(1, mp_context=self.ctx) as solo:
            try:
                return solo.submit(decode_job, data, self.ncfg).result()
            except BrokenProcessPool:
                # Only an object that kills a decoder which can otherwise run is at fault.
                self._check_decoders_start()
                log.warning("%s killed its decoder twice; rejected as decoder_crash", obj.url)
                return {"status": "rejected", "reason": "decoder_crash",
                        "detail": "the decoder process died on this object twice"}

    def _check_decoders_start(self) -> None:
        """Raise a UserError when fresh decoder processes die before running anything.

        Then no object is at fault, and rejecting the objects in flight as decoder_crash would lose them.
        The common cause is a user's own script that calls build() outside an `if __name__ == "__main__":`
        guard: forkserver imports the main module again in the new process, which then starts a build of
        its own during its bootstrap and dies.
        """
        for _ in range(3):   # a probe killed from outside (the OOM killer) is a fault: try a new one
            with ProcessPoolExecutor(1, mp_context=self.ctx) as probe:
                try:
                    probe.submit(os.getpid).result()
                    return
                except BrokenProcessPool:
                    pass
        raise UserError(
            "decoder processes cannot start: a new one died before decoding anything, so no object was "
            "rejected for it. If you call pipeline.build.build() from a script of your own, put the call "
            "under `if __name__ == \"__main__\":` (decoders start through multiprocessing's forkserver, "
            "which imports your script again in each new process); otherwise check the memory and process "
            "limits (ulimit -u). Committed shards are kept: rerun the same command to continue")

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self.lock:
            if self.procs is broken:
                log.warning("a decoder process died; starting new ones and retrying the objects in flight")
                # A worker that another thread's submit() started while the pool was breaking is never
                # stopped by the executor, which then waits for it forever and holds up interpreter
                # exit. Keep the pool's process table to stop stragglers (now, and in close()).
                self.broken_workers.append(getattr(broken, "_processes", None) or {})
                _stop(self.broken_workers)
                broken.shutdown(wait=False, cancel_futures=True)
                self.procs = ProcessPoolExecutor(self.workers, mp_context=self.ctx)

    def run(self, objects: Iterator[SourceObject]) -> Iterator[tuple[SourceObject, dict]]:
        pending: collections.deque[Future] = collections.deque()
        for obj in objects:
            pending.append(self.threads.submit(self._task, obj))
            if len(pending) >= self.window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self) -> None:
        self.threads.shutdown(wait=True, cancel_futures=True)
        _stop(self.broken_workers)
        self.procs.shutdown(wait=True, cancel_futures=True)


def _stop(tables: list[dict]) -> None:
    for table in tables:
        for proc in list(table.values()):
            if proc.is_alive():
                proc.kill()


def open_source(src: str, options: dict | None, listed: bool = True):
    """(filesystem, root) of the source; with listed, also checks that it is a prefix holding objects."""
    fs, root = get_fs(src, options)
    if not listed:
        return fs, root.rstrip("/")
    with explained(src):
        if not with_retries(lambda: fs.isdir(root), f"stat {src}"):
            if with_retries(lambda: fs.exists(root), f"stat {src}"):
                raise UserError(f"source {src} is a file, not a prefix of images")
            raise UserError(f"source not found: {src}")
        if next(iter(walk(fs, root, src.rstrip("/"))), None) is None:
            raise UserError(f"source {src} holds no objects")
    return fs, root


def build_part(src: str, dst: str, cfg: BuildConfig, src_options: dict | None = None,
               dst_options: dict | None = None, progress: bool = True) -> PartResult:
    """Build one part (all of it when num_parts == 1) of a shard set. Idempotent.

    With cfg.incremental, a finished part lists the source again and packs only the objects that no
    earlier snapshot of it holds, as new shards after its last one (a new generation).
    """
    _check_part(cfg)
    start = time.time()
    fs, root = open_source(src, src_options, listed=cfg.from_list is None)
    dfs, droot = get_fs(dst, dst_options)
    result = PartResult(part=cfg.part)
    record_path = join(droot, layout.part_record_name(cfg.part, cfg.num_parts))
    config_path = record_path.replace(".json", ".config.json")
    # Through JSON once, so it compares equal to the copy read back from storage (tuples become lists).
    # Credentials in the source URL reach the store through get_fs, never a record, manifest or sidecar.
    public = redact_text(src).rstrip("/")
    fingerprint = json.loads(json.dumps({"source": public, "config": cfg.fingerprint()}))
    generation = 0
    with explained(dst):
        _check_layout(dfs, droot, dst, cfg)
        if dfs.exists(record_path):
            rec = read_json(dfs, record_path)
            if rec.get("fingerprint") != fingerprint:
                raise UserError(f"{dst} already holds part {cfg.part}/{cfg.num_parts} built with other settings")
            if not cfg.incremental:
                done = PartResult(**{k: rec[k] for k in ("part", "inputs", "accepted", "reasons", "shards")})
                done.already_complete = True
                return done
            generation = rec.get("generations", 1)
        elif dfs.exists(config_path) and read_json(dfs, config_path) != fingerprint:
            raise UserError(f"{dst} holds a partial build with other settings; use a new destination")
        else:
            write_json(dfs, config_path, fingerprint)

    # Only this part's own leftovers: another part (or a copy of this one) may be writing right now.
    remove_stale_temporaries(dfs, droot, layout.part_stem(cfg.part, cfg.num_parts))

    def listing() -> Iterator[SourceObject]:
        if cfg.from_list:
            return from_list(cfg.from_list, src, fs, root, src_options, url_prefix=public)
        return walk(fs, root, public)

    snapshots = [_snapshot(listing, src, dfs, droot, cfg, fingerprint, g) for g in range(generation + 1)]
    seen = SeenHashes(seen_path(dst, cfg.part, cfg.num_parts, cfg.work_dir))
    number = _recover(dfs, droot, cfg, result, seen)
    earlier = sum(s["rows"] for s in snapshots[:-1])
    current = snapshots[-1]
    done_here = result.inputs - earlier
    if not 0 <= done_here <= current["rows"]:
        raise UserError(f"{dst}: part {cfg.part}/{cfg.num_parts} has {result.inputs} committed inputs, which its "
                        f"listing snapshots ({earlier} + {current['rows']} objects) cannot explain; use a new "
                        f"destination")
    if number:
        log.info("part %d: resuming after %d committed shard(s), %d inputs done", cfg.part, number, result.inputs)
    result.generation = generation
    writer = _PartWriter(dfs, droot, cfg, number, seen, result, generation)

    def todo() -> Iterator[SourceObject]:
        with explained(dst):
            yield from in_order(dfs, droot, cfg.part, cfg.num_parts, current["runs"], root, public, skip=done_here,
                                generation=generation)

    bar = tqdm(desc=f"shards build part {cfg.part}/{cfg.num_parts}" + (f" (addition {generation})" if generation else ""),
               unit="img", disable=not progress, total=current["rows"], initial=done_here,
               mininterval=1.0, smoothing=0.1)
    _pack(todo(), _Processor(fs, cfg), writer, seen, bar)
    result.seconds = time.time() - start
    write_json(dfs, record_path, {"fingerprint": fingerprint, "part": cfg.part, "inputs": result.inputs,
                                  "accepted": result.accepted, "reasons": result.reasons,
                                  "shards": result.shards, "generations": generation + 1})
    return result


def _pack(objects: Iterator[SourceObject], processor: "_Processor", writer: "_PartWriter", seen: SeenHashes,
          bar: tqdm) -> None:
    """Decode and write every object in order, committing shards as they fill; then commit the last one."""
    result = writer.result
    finished = False
    try:
        for obj, out in processor.run(objects):
            writer.add(obj, out)
            bar.update(1)
            bar.set_postfix(accepted=result.accepted, rejected=result.rejected, shards=len(result.shards),
                            refresh=False)
        writer.commit()
        finished = True
    finally:
        bar.close()
        processor.close()
        # Kept for a rerun to resume from; a finished part (or a later --incremental) rebuilds it.
        seen.close(remove=finished)


def _check_layout(dfs, droot: str, dst: str, cfg: BuildConfig) -> None:
    """Refuse to mix part layouts (I/2 with I/3) in one destination: their names and hash splits differ."""
    for folder in (layout.PARTS_DIR, layout.LISTING_DIR):  # small folders; every part writes to both first
        path = join(droot, folder)
        if not dfs.exists(path):
            continue
        for name in dfs.ls(path, detail=False):
            parsed = layout.parse_part(name.rsplit("/", 1)[-1])
            if parsed and parsed[1] != cfg.num_parts:
                raise UserError(f"{dst} holds a {parsed[1]}-part build ({folder}/{name.rsplit('/', 1)[-1]}); "
                                f"--part {cfg.part}/{cfg.num_parts} would mix part layouts: use --part I/{parsed[1]} "
                                f"or a new destination")


def _snapshot(listing, src: str, dfs, droot: str, cfg: BuildConfig, fingerprint: dict, generation: int) -> dict:
    """A generation's listing snapshot record (written once, then reused by every rerun): runs, rows, seed.

    Generation 0 holds the whole part; a later one holds only what the earlier ones do not.
    """
    path = join(droot, layout.snapshot_record_name(cfg.part, cfg.num_parts, generation))
    if dfs.exists(path):
        rec = read_json(dfs, path)
        if rec.get("fingerprint") == fingerprint:
            return rec
    with explained(src):
        objects = (o for o in listing() if in_part(o.rel, cfg.part, cfg.num_parts))
        if generation == 0:
            rec = write_snapshot(dfs, droot, cfg.part, cfg.num_parts, objects, cfg.seed)
        else:
            rec = write_additions(dfs, droot, cfg.part, cfg.num_parts, objects, cfg.seed, generation)
    log.info("part %d: listed %d %sobject(s) into %d sorted run(s)", cfg.part, rec["rows"],
             "new " if generation else "", rec["runs"])
    write_json(dfs, path, {"fingerprint": fingerprint, **rec})
    return rec


def build(src: str, dst: str, cfg: BuildConfig, src_options: dict | None = None,
          dst_options: dict | None = None, progress: bool = True) -> PartResult:
    """Build a part; a single-part build also publishes the index and build record."""
    result = build_part(src, dst, cfg, src_options, dst_options, progress)
    if cfg.num_parts == 1:
        merge(dst, 1, dst_options, source=src)
    return result


def summary_lines(result: PartResult) -> list[str]:
    lines = [f"{'inputs':<28}{result.inputs:>12}", f"{'accepted':<28}{result.accepted:>12}"]
    for reason, n in sorted(result.reasons.items(), key=lambda kv: -kv[1]):
        lines.append(f"{'rejected: ' + reason:<28}{n:>12}")
    total_bytes = sum(s["bytes"] for s in result.shards)
    lines.append(f"{'shards':<28}{len(result.shards):>12}")
    lines.append(f"{'shard bytes':<28}{total_bytes:>12}")
    if result.seconds:
        lines.append(f"{'seconds':<28}{result.seconds:>12.1f}")
    if result.resumed_shards:
        lines.append(f"{'resumed shards':<28}{result.resumed_shards:>12}")
    return lines


__all__ = ["BuildConfig", "PartResult", "build", "build_part", "summary_lines", "redact"]
