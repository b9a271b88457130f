"""`swav pretrain`: the training loop over a DeepSpeed engine, read top to bottom.

One step: lr/freeze for this step -> next multi-crop batch -> forward all crops
(and whatever rows the objective wants scored with the current prototypes, e.g.
SwAV's queue) -> the objective's loss (swav/objective.py) -> DeepSpeed
backward/step (LARS, prototype renormalisation in the optimizer's copy) -> the
objective's state update -> log -> maybe checkpoint.

Nothing is an epoch: schedules are arrays indexed by optimizer step, data is an
endless stream whose position is checkpointed with everything else.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from shards.stream import restart_plan, resume_plan
from swav import checkpoint as ckpt
from swav import distributed, reshard, staging
from swav.config import Config, to_dict, to_yaml
from swav.config_diff import schedule_changes
from swav.data import build_loader, next_batch, stream_states
from swav.engine import apply_channels_last, build_engine, build_model, set_step_hyperparams, write_prototypes
from swav.metrics import MetricsWriter, assignment_stats, read_metrics
from swav.objective import Objective, build_objective
from swav.schedules import warmup_cosine
from swav.uploads import CheckpointUploads
from swav_io.errors import UserError
from swav_io.logs import setup_logging
from swav_io.storage import join, read_bytes, redact

log = logging.getLogger("swav.train")


class NonFiniteLoss(UserError):
    """The loss became NaN or inf: the run stops; the last good checkpoint stays published."""


@dataclass
class RunResult:
    step: int                      # optimizer steps completed
    stopped_early: bool            # preempted (signal) or train.stop_after
    losses: dict[int, float] = field(default_factory=dict)
    checkpoint: str = ""           # URL of the last published checkpoint


class _Preemption:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next agreement step and exits."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict = {}

    def __enter__(self) -> "_Preemption":
        for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)):
            if sig is not None:
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread
                    pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        log.warning("received signal %d: checkpointing at the end of the step the ranks next agree on (at most "
                    "train.sync_every steps away), then exiting", signum)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _read_losses(pending: list[tuple[int, torch.Tensor]], result: "RunResult") -> None:
    """Move the pending losses to the host in one transfer; a non-finite one stops the run.

    The mean is the same on every rank, so all ranks stop together, before anything is logged or saved:
    the last checkpoint stays the last good one.
    """
    if not pending:
        return
    values = torch.stack([v for _, v in pending]).tolist()
    steps = [s for s, _ in pending]
    pending.clear()
    for step, value in zip(steps, values):
        if not math.isfinite(value):
            raise NonFiniteLoss(f"loss is {value} at step {step}; stopping without saving a checkpoint. "
                                f"The last good checkpoint is {result.checkpoint or '(none yet)'}; "
                                "lower optim.base_lr or check the data")
        result.losses[step] = value


def _agree(flag: bool, device: torch.device) -> bool:
    """True on every rank when any rank says True (preemption arrives at different moments)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)),
                                                    "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                                                    "cached": float(np_state[4])},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed)  # same init on every rank; DeepSpeed also broadcasts rank 0's weights


def _warn_inapplicable(cfg: Config, on_gpu: bool) -> None:
    if cfg.crops.augment_on == "device" and not on_gpu:
        log.info("crops.augment_on=device on CPU: the photometric augmentation runs in the training process")
    if cfg.precision == "bf16" and not on_gpu:
        log.warning("precision=bf16 on CPU: autocast runs, but CPU bf16 is slow; fp32 is the CPU default")
    if cfg.swav.queue_length and cfg.swav.queue_length < cfg.train.batch_size * _world():
        log.warning("swav.queue_length=%d is shorter than the global batch %d: no queue will be used",
                    cfg.swav.queue_length, cfg.train.batch_size * _world())


def _objective_status(name: str, row: dict) -> str:
    if name == "swav":
        return "queue " + ("on" if row.get("queue_in_use") else "off")
    return (f"{name}: bank {row['bank_filled']} rows, {row['clusterings']} clusterings "
            f"({row['cluster_seconds']:.1f} s), {row['targets_from_bank']:.0%} of targets from the bank")


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _checkpoint_url(cfg: Config) -> str:
    return cfg.checkpoint.url or os.path.join(cfg.run_dir, "checkpoints")


def pretrain(cfg: Config, dry_run: bool = False) -> RunResult:
    """Run (or resume) pretraining as configured; returns when train.steps are done or on preemption."""
    trainer = Trainer.setup(cfg, dry_run)
    return trainer if isinstance(trainer, RunResult) else trainer.run()


class Trainer:
    """One run, read top to bottom: `setup` builds everything and resumes; `run` loops `train_step`, then
    `sync` (the only host syncs), `log` and `checkpoint` at the steps that call for them."""

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device, engine, optimizer,
                 objective: Objective, loader, store: ckpt.CheckpointStore, stage_root: str,
                 result: RunResult) -> None:
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.engine, self.optimizer, self.objective, self.loader = engine, optimizer, objective, loader
        self.store, self.stage_root, self.result = store, stage_root, result
        self.lr_schedule = warmup_cosine(cfg.optim.base_lr, cfg.optim.final_lr, cfg.train.steps,
                                         cfg.optim.warmup_steps, cfg.optim.start_warmup)
        self.autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                         else contextlib.nullcontext())
        self.pending: list[tuple[int, torch.Tensor]] = []   # (step, global mean loss) not yet read on the host
        self.window = {"t0": time.perf_counter(), "wait": 0.0, "steps": 0}
        self.last_saved = result.step

    # -- setup -------------------------------------------------------------------------------------
    @classmethod
    def setup(cls, cfg: Config, dry_run: bool = False) -> "Trainer | RunResult":
        """Processes, model, engine, objective, checkpoint store, resume and loader; a RunResult when there
        is nothing to train (a dry run, or a checkpoint already at train.steps)."""
        rank, world, local_rank = distributed.init()
        setup_logging(rank)
        on_gpu = torch.cuda.is_available()
        device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
        if on_gpu:
            torch.cuda.set_device(device)
        if rank == 0:
            log.info("resolved config:\n%s", to_yaml(cfg).rstrip())
            os.makedirs(cfg.run_dir, exist_ok=True)
            with open(os.path.join(cfg.run_dir, "config.yaml"), "w", encoding="utf-8") as f:
                f.write(to_yaml(cfg))
        _warn_inapplicable(cfg, on_gpu)
        if not cfg.data.url and not dry_run:
            raise UserError("data.url is not set: give the shard set to train on, e.g. data.url=s3://bucket/shards")
        _seed_everything(cfg.seed, rank)

        model = build_model(cfg, on_gpu, world).to(device)
        if dry_run:
            n = sum(p.numel() for p in model.trunk.parameters())
            log.info("dry run: %s trunk with %d parameters, feature width %d", cfg.model.arch, n, model.trunk.out_dim)
            return RunResult(step=0, stopped_early=False)
        engine, optimizer = build_engine(cfg, model, world)
        _log_layout(cfg, engine, on_gpu)
        objective = build_objective(cfg, cfg.train.batch_size, world, device)
        store = ckpt.CheckpointStore(_checkpoint_url(cfg), cfg.checkpoint.storage_options)
        stage_root = _sweep_staging(cfg, store)
        try:
            start_step, loader_state, plan, last_url = _resume(cfg, engine, objective, store, stage_root, rank, world)
            loader = build_loader(cfg, rank, world, pin_memory=on_gpu, plan=plan)
            if loader_state is not None or plan is not None:
                loader.dataset.check_resume(stream_states(loader_state) if loader_state is not None else None, plan)
        except BaseException:
            staging.tidy(stage_root)
            raise
        if loader_state is not None:
            loader.load_state_dict(loader_state)
        result = RunResult(step=start_step, stopped_early=False, checkpoint=last_url)
        if start_step >= cfg.train.steps:
            log.info("nothing to do: the checkpoint is at step %d of %d", start_step, cfg.train.steps)
            staging.tidy(stage_root)
            return result
        return cls(cfg, rank, world, device, engine, optimizer, objective, loader, store, stage_root, result)

    # -- one step ----------------------------------------------------------------------------------
    def train_step(self, step: int, it) -> tuple[float, bool, list[torch.Tensor]]:
        """(lr, prototypes frozen, the objective's assignments for the health signals) of optimizer step
        `step`; its loss stays on the device in self.pending."""
        cfg, objective, engine = self.cfg, self.objective, self.engine
        lr = float(self.lr_schedule[step])
        frozen = step < cfg.swav.freeze_prototypes_steps or not objective.learns_prototypes
        set_step_hyperparams(self.optimizer, lr, freeze_prototypes=frozen)

        t_wait = time.perf_counter()
        batch = next_batch(it)
        self.window["wait"] += time.perf_counter() - t_wait
        objective.set_batch(batch.ids)
        crops = batch.augment(self.device)
        if cfg.model.channels_last:
            crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]

        extra = objective.forward_inputs(step)
        values = objective.new_prototypes()
        if values is not None:
            write_prototypes(engine, values)
        with self.autocast:
            if extra is not None:
                emb, scores, extra_scores = engine(crops, extra)
            else:
                (emb, scores), extra_scores = engine(crops), None
        loss, qs = objective.loss(step, emb, scores, extra_scores)
        self.pending.append((step + 1, distributed.all_reduce_mean(loss)))  # stays on the device
        engine.backward(loss)
        engine.step()
        objective.after_step(step, emb)
        self.result.step = step + 1
        self.window["steps"] += 1
        return lr, frozen, qs

    # -- the host syncs ----------------------------------------------------------------------------
    def sync(self, uploads: CheckpointUploads, preempt: "_Preemption") -> bool:
        """Read the losses since the last agreement (checked before anything is logged or saved) and agree
        on preemption across ranks; True when the run stops after this step."""
        result = self.result
        try:
            _read_losses(self.pending, result)
        except NonFiniteLoss as e:
            # Every rank raises here, at the same step (the loss is the global mean), so the upload in
            # flight, the last good state, can still be published collectively.
            published = uploads.wait_and_publish(final=True) if uploads.pending else ""
            if published:
                raise NonFiniteLoss(str(e).replace(result.checkpoint or "(none yet)", published, 1)) from None
            raise
        return _agree(preempt.requested, self.device) or result.step == self.cfg.train.stop_after

    # -- logging -----------------------------------------------------------------------------------
    def log(self, metrics: MetricsWriter, bar: tqdm, lr: float, frozen: bool, qs: list[torch.Tensor]) -> None:
        cfg, result, window = self.cfg, self.result, self.window
        loss_value = result.losses.get(result.step, float("nan"))
        entropy, in_use = assignment_stats(qs[0])
        elapsed = time.perf_counter() - window["t0"]
        row = {"step": result.step, "loss": loss_value, "lr": lr,
               "images_per_s": window["steps"] * cfg.train.batch_size * self.world / max(elapsed, 1e-9),
               "data_wait": window["wait"] / max(elapsed, 1e-9),
               "assign_entropy": entropy, "prototypes_in_use": in_use,
               "entropy_max": math.log(self.engine.module.num_prototypes[0]),
               **self.objective.log_fields(), "prototypes_frozen": frozen}
        metrics.write(row)
        bar.set_postfix(loss=f"{loss_value:.3f}", ips=f"{row['images_per_s']:.0f}",
                        wait=f"{row['data_wait']:.0%}", protos=in_use, refresh=False)
        log.info("step %d/%d loss %.4f lr %.4g | %.1f img/s, data wait %.0f%% | assignment entropy "
                 "%.2f/%.2f nats, %d prototypes in use | %s", result.step, cfg.train.steps,
                 loss_value, lr, row["images_per_s"], 100 * row["data_wait"], entropy,
                 row["entropy_max"], in_use, _objective_status(self.objective.name, row))
        self.window = {"t0": time.perf_counter(), "wait": 0.0, "steps": 0}

    # -- checkpointing -----------------------------------------------------------------------------
    def checkpoint(self, uploads: CheckpointUploads, sync_now: bool, due: bool, stop: bool) -> None:
        """Publish a finished upload at an agreed step; stage and submit this step's checkpoint when due."""
        result = self.result
        if uploads.pending is not None and sync_now and not (due or stop):
            uploads.publish_if_done(self.device)   # a collective, at a step every rank agrees on
            result.checkpoint = uploads.last_published or result.checkpoint
        if due or stop:
            # One upload at a time: the previous one is published before this step's is staged.
            result.checkpoint = uploads.wait_and_publish(final=False) or result.checkpoint
            tag, staged, small = stage_checkpoint(self.cfg, self.engine, self.objective, self.loader,
                                                  self.stage_root, result.step, self.rank)
            uploads.submit(tag, result.step, staged, small)
            self.last_saved = result.step
            if stop or result.step == self.cfg.train.steps:
                result.checkpoint = uploads.wait_and_publish(final=True)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> RunResult:
        cfg, result = self.cfg, self.result
        it = iter(self.loader)
        self.window = {"t0": time.perf_counter(), "wait": 0.0, "steps": 0}
        bar = tqdm(total=cfg.train.steps, initial=result.step, desc="pretrain", unit="step",
                   disable=self.rank != 0, mininterval=2.0, dynamic_ncols=True)
        metrics = MetricsWriter(cfg.run_dir, enabled=self.rank == 0)
        uploads = CheckpointUploads(self.store, self.rank, self.world, cfg.checkpoint.keep,
                                    cfg.checkpoint.max_failures, _manifest_extra(cfg, self.engine))
        with _Preemption() as preempt:
            try:
                for step in range(result.step, cfg.train.steps):
                    lr, frozen, qs = self.train_step(step, it)
                    bar.update(1)
                    done = result.step
                    log_now = done % cfg.train.log_every == 0 or done == cfg.train.steps
                    due = done % cfg.checkpoint.every == 0 or done == cfg.train.steps
                    sync_now = log_now or due or done % cfg.train.sync_every == 0 or done == cfg.train.stop_after
                    stop = self.sync(uploads, preempt) if sync_now else False
                    if log_now:
                        self.log(metrics, bar, lr, frozen, qs)
                    self.checkpoint(uploads, sync_now, due, stop)
                    if stop:
                        result.stopped_early = True
                        log.warning("stopping after step %d (%s); rerun the same command to resume from %s",
                                    done, "signal" if preempt.requested else "train.stop_after", result.checkpoint)
                        break
            finally:
                bar.close()
                metrics.close()
                uploads.close()
                staging.tidy(self.stage_root)
                del it
        if self.rank == 0 and not result.stopped_early:
            log.info("done: %d steps, last checkpoint %s (saved at step %d)", result.step, result.checkpoint,
                     self.last_saved)
        return result


def _log_layout(cfg: Config, engine, on_gpu: bool) -> None:
    if on_gpu and cfg.model.channels_last:
        convs, nhwc = apply_channels_last(engine)
        log.info("channels_last after deepspeed.initialize: %d of %d conv weights NHWC%s, inputs NHWC",
                 nhwc, convs, "" if nhwc == convs else " (ZeRO keeps weights in its flat buffers; cuDNN still "
                 "picks NHWC kernels from the inputs)")
    elif cfg.model.channels_last:
        # NHWC inputs alone select oneDNN's NHWC kernels (1.35x per step, bench/cpu_layout.py, at coarser
        # rounding); the weights stay NCHW so that every ZeRO stage runs the same kernels and stays comparable.
        log.info("channels_last on CPU: inputs NHWC, conv weights left NCHW")


def _sweep_staging(cfg: Config, store: ckpt.CheckpointStore) -> str:
    """One staging folder per run and node (ranks use sub-folders of their own): a resume downloads the
    files every rank needs once per node, not once per rank. What a killed run left there goes first."""
    stage_root = staging.stage_root(store.url, cfg.checkpoint.stage_dir)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        swept = staging.sweep(stage_root)
        if swept:
            log.info("removed %d staging folder(s) a killed run left in %s: %s", len(swept), stage_root,
                     ", ".join(swept))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()   # swept before any rank of the node stages or downloads into it
    return stage_root


# -- checkpoints ---------------------------------------------------------------------------------
def stage_checkpoint(cfg: Config, engine, objective: Objective, loader, stage_root: str, step: int,
                     rank: int) -> tuple[str, str, dict[str, bytes]]:
    """Write this rank's checkpoint files locally (synchronous: they describe this step); returns
    (tag, staged folder, the small files rank 0 adds at publication)."""
    tag = ckpt.tag_for(step)
    staged = os.path.join(stage_root, tag)
    local = os.path.join(staged, ckpt.rank_dir(rank))
    ckpt.clear_dir(local)
    engine.save_checkpoint(local, tag="ds", save_latest=False)
    state = {"step": step, "rank": rank, "world_size": _world(),
             "loader": loader.state_dict(), **objective.state_dict(), "rng": _rng_state()}
    torch.save(state, os.path.join(staged, ckpt.state_name(rank)))
    small: dict[str, bytes] = {}
    if rank == 0:
        small[ckpt.CONFIG] = to_yaml(cfg).encode("utf-8")
        history = os.path.join(cfg.run_dir, "metrics.jsonl")
        if os.path.exists(history):   # mirrored with the checkpoint: a requeue on another node keeps it
            with open(history, "rb") as f:
                small[ckpt.METRICS] = f.read()
    return tag, staged, small


def _manifest_extra(cfg: Config, engine) -> dict:
    extra = {"zero_stage": cfg.deepspeed.zero_stage, "arch": cfg.model.arch, "num_workers": cfg.data.num_workers}
    if cfg.deepspeed.zero_stage in (1, 2):   # what a resume on another world size needs to reshard momentum
        extra["zero_partition_sizes"] = reshard.partition_sizes(engine.optimizer)
    return extra


def _restore_metrics(cfg: Config, src: ckpt.CheckpointStore, ref) -> None:
    """A run directory without the history up to the checkpoint (a requeue on another node, a fresh
    run_dir) gets the copy saved with the checkpoint; steps logged after it are logged again."""
    path = os.path.join(cfg.run_dir, "metrics.jsonl")
    if ckpt.METRICS not in ref.manifest["files"]:
        return
    if os.path.exists(path) and any(r["step"] == ref.step for r in read_metrics(path)):
        return
    data = read_bytes(src.fs, join(src.root, ref.tag, ckpt.METRICS))
    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    log.info("metrics history up to step %d restored into %s from the checkpoint", ref.step, path)


def _warn_about_config_changes(cfg: Config, store: ckpt.CheckpointStore, ref) -> None:
    """Name every setting that differs from the checkpoint's config and changes what is trained."""
    try:
        saved = read_bytes(store.fs, join(store.root, ref.tag, ckpt.CONFIG)).decode("utf-8")
    except Exception:  # noqa: BLE001 - an older checkpoint without its config: nothing to compare
        return
    changes = schedule_changes(saved, redact(to_dict(cfg)))
    if changes:
        log.warning("resuming with %d setting(s) that differ from the checkpoint's config and change the "
                    "training: %s", len(changes), "; ".join(changes))


def _reshard_momentum(engine, src: ckpt.CheckpointStore, ref, local: str, rank: int) -> None:
    """Momentum for this rank's new ZeRO slice, from the old partitions that overlap it (swav/reshard.py)."""
    sizes = ref.manifest["zero_partition_sizes"]
    old = reshard.old_ranks_needed(engine.optimizer, rank, sizes, ref.world_size)
    names = {i: next(n for n in ref.manifest["files"] if n.startswith(ckpt.rank_dir(i) + "/ds/")
                     and "optim_states" in n) for i in old}
    folder = os.path.join(local, "old-partitions")
    src.download(ref, folder, sorted(names.values()))
    states = {i: ckpt.safe_load(ckpt.local_path(folder, n))["optimizer_state_dict"]
              for i, n in names.items()}
    restored = reshard.restore_momentum(engine.optimizer, states, sizes, rank)
    log.info("momentum resharded from %d old partition(s) for %d param group(s)", len(old), restored)


def _load_engine(cfg: Config, engine, src: ckpt.CheckpointStore, ref, stage_root: str, rank: int,
                 same_world: bool, load_optimizer: bool):
    """DeepSpeed's load_checkpoint on just the files this rank needs; files several ranks of a node need
    are downloaded once per node (by its local rank 0) into the node's staging folder."""
    shared_names, own_names = ckpt.files_to_load(ref.manifest["files"], rank, same_world, cfg.deepspeed.zero_stage)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    node = os.path.join(stage_root, "resume-" + ref.tag)
    mine = os.path.join(node, ckpt.rank_dir(rank))
    try:
        if local_rank == 0:
            ckpt.clear_dir(os.path.join(node, "shared"))
            src.download(ref, os.path.join(node, "shared"), shared_names)
        ckpt.clear_dir(mine)
        src.download(ref, mine, own_names)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()   # the node's shared files are complete
        # DeepSpeed expects every file it reads side by side in one tag folder: link them there.
        tagdir = os.path.join(mine, "merged", "ds")
        os.makedirs(tagdir, exist_ok=True)
        for where, names in ((os.path.join(node, "shared"), shared_names), (mine, own_names)):
            for name in names:
                parts = ckpt.safe_parts(name, f"checkpoint {ref.url}")
                if len(parts) >= 3 and parts[1] == "ds":
                    os.symlink(ckpt.local_path(where, name), ckpt.local_path(tagdir, "/".join(parts[2:])))
        try:
            path, _ = engine.load_checkpoint(os.path.join(mine, "merged"), tag="ds",
                                             load_optimizer_states=load_optimizer, load_lr_scheduler_states=False,
                                             load_module_only=not load_optimizer)
        except UserError as e:   # a file refused or damaged (checkpoint.safe_load): say which checkpoint
            raise UserError(f"checkpoint {ref.url}: {e}") from None
        except Exception as e:  # noqa: BLE001
            first = str(e).splitlines()[0][:300] if str(e) else ""
            raise UserError(f"cannot load checkpoint {ref.url}: {type(e).__name__}: {first}") from None
        if not same_world and cfg.deepspeed.zero_stage in (1, 2) and "zero_partition_sizes" in ref.manifest:
            _reshard_momentum(engine, src, ref, mine, rank)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()   # nobody reads the shared files any more
    finally:
        # Loaded or not, nothing stays behind. The node's shared files go with local rank 0: after the
        # barrier above when the load worked; when it failed, that rank's failure ends the node's run
        # (torchrun stops the others).
        shutil.rmtree(mine, ignore_errors=True)
        if local_rank == 0:
            shutil.rmtree(os.path.join(node, "shared"), ignore_errors=True)
        staging.remove_if_empty(node)
    return path


def _resume(cfg: Config, engine, objective: Objective, store: ckpt.CheckpointStore, stage_root: str,
            rank: int, world: int):
    """(start step, this rank's loader state or None, stream plan or None, checkpoint URL)."""
    def reads(manifest: dict) -> list[str]:
        """What this rank will read; rank 0 may read any state file, so it checks them all."""
        if rank == 0:
            return list(manifest["files"])
        shared, own = ckpt.files_to_load(manifest["files"], rank, int(manifest["world_size"]) == world,
                                         cfg.deepspeed.zero_stage)
        return [*shared, *own, ckpt.state_name(rank)]

    if cfg.resume_from:
        ref = ckpt.resolve(cfg.resume_from, cfg.checkpoint.storage_options, reads)
        src = ckpt.CheckpointStore(ref.root, cfg.checkpoint.storage_options)
    else:
        ref = store.latest(reads)
        src = store
        if ref is None:
            return 0, None, None, ""
    log.info("resuming from %s (step %d, saved by %d rank(s))", ref.url, ref.step, ref.world_size)
    if rank == 0:
        _warn_about_config_changes(cfg, src, ref)
        _restore_metrics(cfg, src, ref)
    same_world = ref.world_size == world
    load_optimizer = same_world or cfg.deepspeed.zero_stage == 0
    if not load_optimizer:
        keeps = cfg.deepspeed.zero_stage in (1, 2) and "zero_partition_sizes" in ref.manifest
        log.warning("world size changed (%d -> %d) under ZeRO-%d: model weights are restored, %s",
                    ref.world_size, world, cfg.deepspeed.zero_stage,
                    "optimizer momentum is resharded to the new partitions" if keeps
                    else "optimizer momentum restarts from zero")
    path = _load_engine(cfg, engine, src, ref, stage_root, rank, same_world, load_optimizer)
    if path is None:
        raise UserError(f"cannot load checkpoint {ref.url}: DeepSpeed found no model states in it")
    old_workers = ref.manifest.get("num_workers", cfg.data.num_workers)
    mine = src.read_state(ref, rank) if same_world else None   # only our own state file
    if mine is not None:
        _set_rng_state(mine["rng"])
        objective.load_state(mine, ref.world_size, world, rank)
        if old_workers == cfg.data.num_workers and not cfg.data.restart_pass:
            return ref.step, mine["loader"], None, ref.url
    # The consumer layout changed: the plan needs every stream's state. Rank 0 reads them all and
    # shares the plan, so the reads stay O(world). Its outcome, error included, reaches every rank
    # before anyone waits on another.
    shared: list = [None, None]
    if rank == 0:
        try:
            states = [mine if (r == 0 and mine is not None) else src.read_state(ref, r)
                      for r in range(ref.world_size)]
            streams = [s for st in states for s in stream_states(st["loader"])]
            del states
            shared[0] = restart_plan(streams) if cfg.data.restart_pass else resume_plan(streams)
        except UserError as e:
            shared[1] = str(e)
    if world > 1:
        dist.broadcast_object_list(shared, src=0)
    plan, failed = shared
    if failed:
        raise UserError(failed)
    if mine is None:
        objective.load_state(src.read_state(ref, rank) if rank < ref.world_size else None, ref.world_size, world,
                             rank)
    if cfg.data.restart_pass:
        log.warning("data.restart_pass: the stream starts a fresh pass (%d) over the set as it is now; the rest "
                    "of the saved pass is not read", plan["first_pass"])
    else:
        log.warning("consumer layout changed (%d rank(s) x %d worker(s) -> %d x %d): the stream continues pass %d "
                    "where the old consumers left it; samples that were in flight may be seen again",
                    ref.world_size, old_workers, world, cfg.data.num_workers, plan["first_pass"])
    return ref.step, None, plan, ref.url
