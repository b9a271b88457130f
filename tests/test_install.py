"""A non-editable install works away from the checkout: its jobs ship as package data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow  # a training run end to end: `make test` only, not `make test-fast`


def test_a_wheel_install_finds_its_jobs_from_any_directory(tmp_path):
    wheels, env, elsewhere = tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = lambda *cmd, **kw: subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)  # noqa: E731
    r = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
            str(REPO))
    assert r.returncode == 0, r.stderr[-2000:]
    assert run(sys.executable, "-m", "venv", "--without-pip", str(env)).returncode == 0
    (wheel,) = wheels.glob("swav_stream-*.whl")
    r = run(sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "--no-deps", "-q",
            str(wheel))
    assert r.returncode == 0, r.stderr[-2000:]
    # The dependencies (torch, deepspeed, ...) come from this environment; the package itself does not.
    site = Path(run(str(env / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
                .stdout.strip())
    (site / "_deps_from_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    swav = str(env / "bin" / "swav")

    where = run(str(env / "bin" / "python"), "-c", "import swav, swav_jobs; print(swav.__file__, swav_jobs.__file__)",
                cwd=elsewhere, env=clean_env)
    assert where.returncode == 0 and str(REPO) not in where.stdout and str(env) in where.stdout, where.stdout
    jobs = run(swav, "jobs", cwd=elsewhere, env=clean_env)
    assert jobs.returncode == 0, jobs.stderr[-2000:]
    for name in ("demo", "tiny", "resnet50", "resnet50w2", "resnet50w4", "resnet50w5"):
        assert any(line.split()[0] == name for line in jobs.stdout.splitlines() if line.strip()), jobs.stdout
    dry = run(swav, "pretrain", "resnet50w2", "--dry-run", f"data.url={tmp_path}/none", f"run_dir={tmp_path}/run",
              "model.arch=resnet50w0.125", "model.hidden_mlp=64", cwd=elsewhere, env=clean_env)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "hidden_mlp: 64" in dry.stderr and "num_prototypes: 3000" in dry.stderr
    bad = run(swav, "pretrain", "resnet50w9", "--dry-run", cwd=elsewhere, env=clean_env)
    assert bad.returncode == 2 and "neither a file nor a shipped job" in bad.stderr
    assert (site / "swav_jobs" / "deepspeed" / "resnet50w5.json").is_file()

    # The whole product from the installed package, away from the checkout: bucket, shards, a stopped and
    # resumed 2-rank run, eval and report, all under the user's own directory. Overrides reach the job, and
    # the trunk is evaluated at the size of the views it was trained on.
    demo = run(swav, "demo", "--steps", "50", "crops.size_crops=[48]", cwd=elsewhere, env=clean_env)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    out = elsewhere / "demo-output"
    assert "resumes from the checkpoint" in demo.stdout and (out / "report" / "README.md").is_file(), demo.stdout
    assert json.loads((out / "run" / "checkpoints" / "latest").read_text())["tag"] == "step-000000050"
    assert "digits kNN top-1" in demo.stdout, demo.stdout
    evals = json.loads((out / "eval.json").read_text())
    assert evals["pretrained"]["image_size"] == evals["random_init"]["image_size"] == 48, evals
