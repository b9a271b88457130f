"""The CLI surface and the shipped job definitions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import REPO, swav_cli

from swav.config import load_config
from swav.engine import deepspeed_config
from swav.models import SwAVModel

JOBS = sorted((REPO / "jobs").glob("*.yaml"))


def test_help_lists_every_subcommand():
    r = swav_cli("--help")
    assert r.returncode == 0
    for cmd in ("shards", "pretrain", "eval", "export", "report", "demo", "compare"):
        assert cmd in r.stdout
    r = swav_cli("shards", "--help")
    for cmd in ("build", "info", "verify"):
        assert cmd in r.stdout
    for sub in (["pretrain"], ["eval", "knn"], ["eval", "linear"], ["export"], ["report"], ["demo"], ["compare"],
                ["shards", "build"]):
        h = swav_cli(*sub, "--help")
        assert h.returncode == 0 and "usage:" in h.stdout, sub


@pytest.mark.parametrize("job", JOBS, ids=[j.stem for j in JOBS])
def test_every_job_loads_and_builds_its_model_at_tiny_width(job):
    cfg = load_config(str(job))
    width = cfg.model.arch
    assert cfg.deepspeed.gradient_clipping == 0.0
    # The real architecture, counted without allocating; then a tiny-width forward of the same recipe.
    with torch.device("meta"):
        SwAVModel(width, cfg.model.hidden_mlp, cfg.model.feat_dim, cfg.model.num_prototypes)
    tiny = SwAVModel("resnet50w0.0625", 32, cfg.model.feat_dim, cfg.model.num_prototypes)
    crops = [torch.randn(n * 2, 3, 32 if i == 0 else 16, 32 if i == 0 else 16)
             for i, n in enumerate(cfg.crops.num_crops)]
    emb, scores = tiny(crops)
    assert emb.shape[0] == 2 * sum(cfg.crops.num_crops)
    r = swav_cli("pretrain", str(job), "--dry-run", "model.arch=resnet50w0.0625", "data.url=unused")
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("rendered", sorted((REPO / "jobs" / "deepspeed").glob("*.json")),
                         ids=lambda p: p.stem)
def test_committed_deepspeed_configs_match_what_the_jobs_generate(rendered):
    ds = json.loads(rendered.read_text())
    world = ds["train_batch_size"] // ds["train_micro_batch_size_per_gpu"]
    assert deepspeed_config(load_config(str(REPO / "jobs" / f"{rendered.stem}.yaml")), world) == ds
    assert ds["gradient_clipping"] == 0.0 and "bf16" not in ds


def test_override_errors_are_one_line_and_name_the_key():
    for override, words in (("model.archh=resnet50", "unknown config key 'model.archh'"),
                            ("train.batch_size=big", "'train.batch_size' expects an integer"),
                            ("precision=fp8", "precision must be"),
                            ("crops.blur_prob=1.5", "crops.blur_prob must be between 0 and 1"),
                            ("crops.blur_sigma=[2,1]", "crops.blur_sigma must be [low, high]"),
                            ("model=3", "'model' is a section"),
                            ("checkpoint.every=0", "checkpoint.every must be >= 1")):
        r = swav_cli("pretrain", "jobs/tiny.yaml", override, "--dry-run")
        assert r.returncode == 2, override
        assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_dry_run_prints_the_resolved_config_and_warns_about_settings_that_do_not_apply(tmp_path):
    r = swav_cli("pretrain", "jobs/tiny.yaml", "--dry-run", f"run_dir={tmp_path}", "precision=bf16",
                 "crops.augment_on=device")
    assert r.returncode == 0, r.stderr
    assert "resolved config" in r.stderr and "precision: bf16" in r.stderr
    assert "CPU bf16 is slow" in r.stderr
    assert (Path(tmp_path) / "config.yaml").exists()


@pytest.mark.parametrize("override, words", [
    ("train.log_every=0", "train.log_every must be >= 1"),
    ("train.sync_every=0", "train.sync_every must be >= 1"),
    ("swav.epsilon=0", "swav.epsilon must be > 0"),
    ("swav.temperature=-0.1", "swav.temperature must be > 0"),
    ("deepspeed.extra={gradient_accumulation_steps: 4}", "gradient_accumulation_steps is not supported"),
    ("deepspeed.extra={bf16: {enabled: true}}", "set precision: bf16 instead"),
])
def test_configs_that_would_crash_or_mislead_are_refused(override, words):
    # In-process: the CLI's one-line rendering of these errors is covered above.
    from swav.config import load_config
    from swav_io.errors import UserError

    with pytest.raises(UserError, match=words):
        load_config(str(REPO / "jobs" / "tiny.yaml"), [override])
