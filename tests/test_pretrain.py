"""`swav pretrain` as users run it: real shards, DeepSpeed on gloo, kill -9, S3 checkpoints, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port, swav_cli, torchrun
from swav.metrics import read_metrics

pytestmark = pytest.mark.slow
STEPS = 8


def args(shard_set: Path, run: Path, *extra: str) -> list[str]:
    return ["pretrain", "jobs/tiny.yaml", f"data.url={shard_set}", f"run_dir={run}", f"train.steps={STEPS}",
            "checkpoint.every=2", "swav.queue_length=32", "swav.queue_start_step=3", *extra]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(run / "metrics.jsonl"))}


def launch(nproc: int, argv: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "swav.cli", *argv]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.fixture(scope="module")
def baselines(shard_set, tmp_path_factory) -> dict[int, dict[int, float]]:
    """Uninterrupted runs with 1 and 2 ranks."""
    out = {}
    for n in (1, 2):
        run = tmp_path_factory.mktemp(f"base{n}")
        r = torchrun(n, *args(shard_set, run))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        out[n] = losses(run)
        assert sorted(out[n]) == list(range(1, STEPS + 1))
    return out


@pytest.mark.parametrize("nproc", [1, 2])
def test_kill_9_mid_run_then_rerun_reproduces_the_losses_bitwise(shard_set, tmp_path, baselines, nproc):
    run = tmp_path / "run"
    proc = launch(nproc, args(shard_set, run))
    target = 5 + nproc % 2  # a step that is not a checkpoint step, and differs per case
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and max(losses(run), default=0) >= target:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(losses(run)) < STEPS, "the run was killed before it finished"
    r = torchrun(nproc, *args(shard_set, run))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    assert losses(run) == baselines[nproc]


def test_kill_during_checkpoint_upload_resumes_from_the_last_published_one(shard_set, tmp_path, baselines):
    run = tmp_path / "run"
    # Fault injection: rank 0 SIGKILLs itself after its first file upload of the step-4 checkpoint.
    r = torchrun(2, *args(shard_set, run), env={"SWAV_FAULT_KILL_UPLOAD": "4:1"})
    assert r.returncode != 0
    ckpts = run / "checkpoints"
    assert json.loads((ckpts / "latest").read_text())["tag"] == "step-000000002"
    assert (ckpts / "step-000000004").exists() and not (ckpts / "step-000000004" / "manifest.json").exists()
    r = torchrun(2, *args(shard_set, run))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr and "step-000000002" in r.stderr
    assert losses(run) == baselines[2]
    kept = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-"))
    assert kept == ["step-000000006", "step-000000008"], "checkpoint.keep=2, the half-written one cleaned up"


def test_s3_checkpoints_resume_and_never_leak_credentials(shard_set, tmp_path, baselines, s3):
    fs, opts, name = s3
    endpoint = opts["client_kwargs"]["endpoint_url"]
    secret = "s3cr3t-from-config-0123"
    store = json.dumps({"client_kwargs": {"endpoint_url": endpoint}, "key": "AKIDFROMCONFIG", "secret": secret})
    run = tmp_path / "run"
    a = args(shard_set, run, f"checkpoint.url=s3://{name}/ckpt", f"checkpoint.storage_options={store}")
    first = torchrun(2, *a, "train.stop_after=4")
    assert first.returncode == 0, first.stderr[-3000:]
    fs.invalidate_cache()
    assert json.loads(fs.cat_file(f"{name}/ckpt/latest"))["tag"] == "step-000000004"
    second = torchrun(2, *a)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from s3://" in second.stderr
    assert losses(run) == baselines[2]
    fs.invalidate_cache()
    for text in (first.stdout + first.stderr, second.stdout + second.stderr):
        assert secret not in text and "AKIDFROMCONFIG" not in text
    for path in run.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    for key in fs.find(f"{name}/ckpt"):
        assert secret.encode() not in fs.cat_file(key), key


def test_resume_with_another_world_size_continues_with_a_notice(shard_set, tmp_path):
    run = tmp_path / "run"
    r = torchrun(2, *args(shard_set, run, "train.stop_after=4", "deepspeed.zero_stage=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(1, *args(shard_set, run, "deepspeed.zero_stage=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size changed (2 -> 1)" in r.stderr
    assert "consumer layout changed" in r.stderr
    assert max(losses(run)) == STEPS


def test_damaged_checkpoints_are_clear_errors(shard_set, tmp_path):
    run = tmp_path / "run"
    r = swav_cli(*args(shard_set, run, "train.stop_after=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = run / "checkpoints"
    model_file = ckpts / "step-000000002" / "rank00000" / "ds" / "mp_rank_00_model_states.pt"
    saved = model_file.read_bytes()
    model_file.unlink()
    r = swav_cli(*args(shard_set, run))
    assert r.returncode == 2 and "damaged" in r.stderr and "mp_rank_00_model_states.pt is missing" in r.stderr
    model_file.write_bytes(saved)
    (ckpts / "latest").write_text("{not json")
    r = swav_cli(*args(shard_set, run))
    assert r.returncode == 2 and "is corrupted" in r.stderr and "Traceback" not in r.stderr
    r = swav_cli(*args(shard_set, run, f"resume_from={ckpts / 'step-000000002'}"))
    assert r.returncode == 0, r.stderr[-3000:]


def test_a_pickle_in_the_bucket_is_refused(shard_set, tmp_path):
    import torch

    run = tmp_path / "run"
    r = swav_cli(*args(shard_set, run, "train.stop_after=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    state = run / "checkpoints" / "step-000000002" / "state-rank00000.pt"
    size = state.stat().st_size

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"x": Evil()}, state)
    # keep the manifest's size check satisfied so only the unpickling guard stands in the way
    data = state.read_bytes()
    state.write_bytes(data[:size] if len(data) >= size else data + b"\0" * (size - len(data)))
    r = swav_cli(*args(shard_set, run))
    assert r.returncode == 2 and "refusing to load" in r.stderr
    assert not (tmp_path / "pwned").exists()


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(shard_set, tmp_path):
    run = tmp_path / "run"
    r = swav_cli(*args(shard_set, run, "optim.name=sgd", "optim.base_lr=1e38", "optim.warmup_steps=0",
                       "checkpoint.every=1", "swav.freeze_prototypes_steps=0"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "loss is nan at step" in r.stderr.lower()
    step = int(r.stderr.lower().split("loss is nan at step")[1].split(";")[0])
    latest = json.loads((run / "checkpoints" / "latest").read_text())
    assert latest["step"] == step - 1


def test_config_errors_name_the_key(tmp_path):
    r = swav_cli("pretrain", "jobs/tiny.yaml", "train.stepz=3")
    assert r.returncode == 2 and "unknown config key 'train.stepz'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = swav_cli("pretrain", "jobs/tiny.yaml", "train.steps=many")
    assert r.returncode == 2 and "'train.steps' expects an integer" in r.stderr
    r = swav_cli("pretrain", "jobs/tiny.yaml")
    assert r.returncode == 2 and "data.url is not set" in r.stderr


def test_sigterm_checkpoints_at_the_end_of_the_step_and_the_rerun_continues(shard_set, tmp_path, baselines):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "swav.cli", *args(shard_set, run, "checkpoint.every=100")]
    # As SLURM and Kubernetes do, the signal goes to the whole process group: the trainer and its
    # data-loader worker (jobs/tiny.yaml has one) alike.
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and max(losses(run), default=0) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "checkpointing at the end of the step" in out
    latest = json.loads((run / "checkpoints" / "latest").read_text())
    assert 3 <= latest["step"] < STEPS and latest["step"] == max(losses(run))
    r = swav_cli(*args(shard_set, run, "checkpoint.every=100"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(run) == baselines[1]


def test_losses_read_every_few_steps_equal_the_per_step_ones(shard_set, tmp_path, baselines):
    # sync_every=3, log_every=4: the host reads the device losses at steps 3, 4, 6, 8 (and agrees on
    # preemption there) instead of every step; the training itself must not change.
    run = tmp_path / "run"
    r = swav_cli(*args(shard_set, run, "train.log_every=4", "train.sync_every=3", "checkpoint.every=100"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(run) == {s: baselines[1][s] for s in (4, 8)}


def test_resume_names_each_setting_that_changes_the_training(shard_set, tmp_path):
    run = tmp_path / "run"
    r = swav_cli(*args(shard_set, run, "train.steps=1", "checkpoint.every=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = swav_cli(*args(shard_set, run, "train.steps=2", "optim.base_lr=0.3", "train.log_every=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stderr.splitlines() if "differ from the checkpoint's config" in x)
    assert "train.steps: 1 -> 2" in line and "optim.base_lr: 0.6 -> 0.3" in line, line
    assert "log_every" not in line and "2 setting(s)" in line, line
