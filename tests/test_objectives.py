"""Streaming DeepCluster-v2 and SeLa-v2 as users run them: `objective.name=...` on real shards, 2 DeepSpeed ranks
with a loader worker each, a stop between clusterings while the banks are still filling, and a bitwise resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import sigterm_after_step, swav_cli, torchrun

from swav import checkpoint as ckpt
from swav.metrics import read_metrics
from swav.weights import load_model_state

pytestmark = pytest.mark.slow
STEPS = 8
# Banks of up to 40 rows per rank, 8 added a step, clustered every 3 steps (before steps 4 and 7): the stop
# after step 4 lands mid-period, before the banks have reached their size.
BANK = ["objective.bank_size=40", "objective.period=3", "data.num_workers=1"]
CASES = {
    "deepclusterv2": ["objective.name=deepclusterv2", "model.num_prototypes=[20,30]", "deepspeed.zero_stage=1"],
    "selav2": ["objective.name=selav2", "deepspeed.zero_stage=3"],
}


def args(shard_set: Path, run: Path, name: str, *extra: str) -> list[str]:
    return ["pretrain", "jobs/tiny.yaml", f"data.url={shard_set}", f"run_dir={run}", f"train.steps={STEPS}",
            "checkpoint.every=2", *BANK, *CASES[name], *extra]


def rows(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(str(run / "metrics.jsonl"))}


def assert_prototypes_are_the_centroids(run: Path) -> None:
    """The run's last checkpoint: every head's prototype layer holds that head's centroids, exactly."""
    model, _, ref = load_model_state(str(run / "checkpoints"))
    centroids = ckpt.CheckpointStore(ref.root).read_state(ref, 0)["centroids"]
    protos = [model[f"prototypes.prototypes{h}.weight"] for h in range(len(centroids))]
    assert len(protos) == 2 and all(torch.equal(p, c.float()) for p, c in zip(protos, centroids))


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_stop_mid_period_and_mid_fill_resumes_bitwise(shard_set, tmp_path, name):
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    r = torchrun(2, *args(shard_set, whole, name))
    assert r.returncode == 0, r.stderr[-3000:]
    base = rows(whole)
    assert sorted(base) == list(range(1, STEPS + 1))
    assert [base[s]["clusterings"] for s in (3, 4, 6, 7, 8)] == [0, 1, 1, 2, 2], "clustered before steps 4 and 7"
    # The test set holds a few dozen images, so samples come back within a few steps and keep one row each.
    assert all(0 < base[s]["bank_filled"] <= 40 for s in base)
    assert [base[s]["targets_from_bank"] for s in (1, 2, 3)] == [0.0] * 3, "nothing is assigned before clustering"
    if name == "deepclusterv2":   # the steps before the first k-means only fill the banks
        assert [base[s]["loss"] for s in (1, 2, 3)] == [0.0] * 3 and base[4]["loss"] > 0
    assert max(base[s]["targets_from_bank"] for s in (4, 5, 6, 7, 8)) > 0, "samples seen again: bank targets"
    first = torchrun(2, *args(shard_set, parted, name, "train.stop_after=4"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(2, *args(shard_set, parted, name))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr and f"{name}: bank" in second.stderr
    resumed = rows(parted)
    assert {s: v["loss"] for s, v in resumed.items()} == {s: v["loss"] for s, v in base.items()}
    assert resumed[8]["clusterings"] == 2 and resumed[8]["bank_filled"] == base[8]["bank_filled"]
    if name == "deepclusterv2":
        assert_prototypes_are_the_centroids(whole)
        assert_prototypes_are_the_centroids(parted)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepclusterv2_writes_its_centroids_into_the_prototypes_under_every_zero_stage(shard_set, tmp_path, stage):
    """ZeRO-1 is the resume test's; the others keep the optimizer's copy of the prototypes elsewhere (none,
    fp32 partitions, partitions of the module too). A clustering before step 4, then steps on the frozen
    prototypes: the checkpoint after step 5 holds the centroids in the model."""
    run = tmp_path / "run"
    r = torchrun(2, *args(shard_set, run, "deepclusterv2", "train.steps=5", f"deepspeed.zero_stage={stage}"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert rows(run)[5]["clusterings"] == 1
    assert_prototypes_are_the_centroids(run)



def test_deepclusterv2_continues_on_another_world_size(shard_set, tmp_path):
    """2 ranks -> 1: the rank keeps its own bank and the centroids every rank shared; the run finishes."""
    run = tmp_path / "run"
    r = torchrun(2, *args(shard_set, run, "deepclusterv2", "train.stop_after=4"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(1, *args(shard_set, run, "deepclusterv2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size changed (2 -> 1)" in r.stderr
    seen = rows(run)
    assert max(seen) == STEPS and seen[STEPS]["clusterings"] == 2
    assert all(math.isfinite(v["loss"]) for v in seen.values())


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_sigterm_after_a_clustering_checkpoints_the_bank_and_the_rerun_continues_bitwise(shard_set, tmp_path, name):
    """A preemption as schedulers send it (SIGTERM to the process group, a loader worker included) once the
    first clustering has run: the rerun's losses equal an uninterrupted run's."""
    run, full = tmp_path / "run", tmp_path / "full"
    stopped = sigterm_after_step(args(shard_set, run, name, "checkpoint.every=100"), run, 4)
    assert stopped.returncode == 0, stopped.stdout[-3000:]
    latest = json.loads((run / "checkpoints" / "latest").read_text())
    assert 4 <= latest["step"] < STEPS and rows(run)[latest["step"]]["clusterings"] == 1
    r = swav_cli(*args(shard_set, run, name, "checkpoint.every=100"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = swav_cli(*args(shard_set, full, name, "checkpoint.every=100"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert {s: v["loss"] for s, v in rows(run).items()} == {s: v["loss"] for s, v in rows(full).items()}
    assert sorted(rows(full)) == list(range(1, STEPS + 1)) and rows(full)[STEPS]["clusterings"] == 2
