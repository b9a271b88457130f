"""Checkpoint uploads that overlap training.

Staging stays synchronous (DeepSpeed writes the files, the per-rank state is serialised at the step
it describes); each rank then uploads its own files in a background thread while training goes on.
Publication is collective: at the ranks' next agreement step where every rank's upload is done
(or at once, when the run stops), rank 0 writes config, metrics copy, manifest and `latest`, in that
order, so `latest` never names a checkpoint whose files are not all in place.

A periodic checkpoint whose upload fails (after the per-file retries with backoff) is logged and
skipped; the run goes on, and fails only after `checkpoint.max_failures` consecutive failed saves,
or when the final save fails.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist

from swav import checkpoint as ckpt
from swav import distributed, staging
from swav_io.errors import UserError

log = logging.getLogger("swav.train")


@dataclass
class _Pending:
    tag: str
    step: int
    future: Future
    rank0_files: dict[str, bytes]   # config and metrics as they were at the step (rank 0 only)
    t0: float
    staged: str


class CheckpointUploads:
    def __init__(self, store: ckpt.CheckpointStore, rank: int, world: int, keep: int, max_failures: int,
                 extra: dict):
        self.store, self.rank, self.world, self.keep = store, rank, world, keep
        self.max_failures, self.extra = max_failures, extra
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-upload")
        self.pending: _Pending | None = None
        self.failures = 0
        self.last_published = ""

    def submit(self, tag: str, step: int, staged: str, rank0_files: dict[str, bytes]) -> None:
        """Upload this rank's staged folder (its DeepSpeed files and its state file) in the background."""
        assert self.pending is None, "publish the previous checkpoint first"
        self.pending = _Pending(tag, step, self.pool.submit(self._upload, tag, staged), rank0_files,
                                time.perf_counter(), staged)

    def _upload(self, tag: str, staged: str) -> dict[str, int]:
        try:
            files = self.store.upload_dir(os.path.join(staged, ckpt.rank_dir(self.rank)), tag,
                                          ckpt.rank_dir(self.rank))
            state = os.path.join(staged, ckpt.state_name(self.rank))
            with open(state, "rb") as f:
                files.update(self.store.upload_bytes(tag, ckpt.state_name(self.rank), f.read()))
            return files
        finally:
            # Only this rank's files: ranks of a node share the staging folder (swav/train.py).
            shutil.rmtree(os.path.join(staged, ckpt.rank_dir(self.rank)), ignore_errors=True)
            try:
                os.remove(os.path.join(staged, ckpt.state_name(self.rank)))
            except FileNotFoundError:
                pass

    def publish_if_done(self, device: torch.device) -> None:
        """At an agreement step: publish the pending checkpoint if every rank's upload has finished."""
        if self.pending is None:
            return
        done = self.pending.future.done()
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([1.0 if done else 0.0], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            done = bool(t.item() > 0)
        if done:
            self._publish(final=False)

    def wait_and_publish(self, final: bool) -> str:
        """Block until the pending upload ends, then publish it; the URL of the last published one."""
        if self.pending is not None:
            self.pending.future.exception()   # waits; the outcome is read in _publish
            self._publish(final)
        return self.last_published

    def _publish(self, final: bool) -> None:
        p, self.pending = self.pending, None
        err = p.future.exception()
        mine = {"error": f"{type(err).__name__}: {err}"} if err is not None else {"files": p.future.result()}
        every = distributed.all_gather_object(mine)
        # Every rank's upload has ended, and each removed its own files when it did.
        staging.remove_if_empty(p.staged)
        errors = [f"rank {r}: {x['error']}" for r, x in enumerate(every) if "error" in x]
        if not errors:
            # Rank 0 alone writes the manifest and `latest`; whatever happens there reaches every rank
            # before anyone waits on another, so a failure is a failed save everywhere, never a hang.
            outcome = self._rank0_publish(p, every) if self.rank == 0 else None
            outcome = distributed.all_gather_object(outcome)[0]
            if outcome:
                errors = [f"rank 0, publishing: {outcome}"]
        if errors:
            self.failures += 1
            msg = (f"checkpoint {self.store.url}/{p.tag} was not published: {errors[0]}"
                   f"{f'; and {len(errors) - 1} more rank(s)' if len(errors) > 1 else ''}")
            if final or self.failures >= self.max_failures:
                raise UserError(f"{msg}; {self.failures} failed save(s) in a row, stopping; the last published "
                                f"checkpoint is {self.last_published or 'none'}")
            log.warning("%s; training goes on (%d of %d consecutive failures allowed), the next save retries",
                        msg, self.failures, self.max_failures - 1)
            return
        self.failures = 0
        distributed.barrier()
        self.last_published = self.store.url + "/" + p.tag

    def _rank0_publish(self, p: _Pending, every: list[dict]) -> str:
        """Config, metrics, manifest, `latest`, then prune; '' when published, else why not."""
        try:
            merged: dict[str, int] = {}
            for x in every:
                merged.update(x["files"])
            for name, data in p.rank0_files.items():
                merged.update(self.store.upload_bytes(p.tag, name, data))
            self.store.publish(p.tag, p.step, self.world, merged, self.extra)
        except Exception as e:  # noqa: BLE001 - any failure here is a failed save, shared with every rank
            return f"{type(e).__name__}: {e}"
        try:
            pruned = self.store.prune(self.keep)
        except Exception as e:  # noqa: BLE001 - a bucket that refuses deletes keeps old checkpoints, no more
            log.warning("checkpoint %s published, but older checkpoints could not be deleted (%s: %s); they stay "
                        "until a later save manages to, or you remove them", self.store.url + "/" + p.tag,
                        type(e).__name__, e)
            pruned = []
        log.info("checkpoint %s published (%.1fs after its step)%s", self.store.url + "/" + p.tag,
                 time.perf_counter() - p.t0, f"; deleted {', '.join(pruned)}" if pruned else "")
        return ""

    def close(self) -> None:
        self.pool.shutdown(wait=True)
