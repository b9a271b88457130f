"""The demo's recipe really learns: the first 500 of jobs/demo.yaml's 1,200 steps, on the digits, leaves SwAV's
trivial solution (loss ln K, every prototype predicted equally) and keeps its prototypes in use.

The full demo adds the kNN comparison against the random init the run started from.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import torchrun

STEPS = 500


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    from pipeline.build import BuildConfig, build
    from pipeline.samplebucket import digits_folder

    root = tmp_path_factory.mktemp("digits-bucket")
    digits_folder(root / "digits", size=64)
    dst = root / "shards"
    build(str(root / "digits"), str(dst), BuildConfig(samples_per_shard=128, workers=1), progress=False)
    return dst


def test_demo_recipe_leaves_the_uniform_solution(digit_shards, tmp_path):
    run = tmp_path / "run"
    # The demo's own schedule (a shorter train.steps would shrink its warmup, cosine and queue start),
    # stopped early the way a preemption stops it.
    r = torchrun(2, "pretrain", "jobs/demo.yaml", f"data.url={digit_shards}", f"run_dir={run}",
                 f"train.stop_after={STEPS}", "checkpoint.every=1000", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ln_k = math.log(30)
    early = [x["loss"] for x in rows if x["step"] <= 50]
    late = [x["loss"] for x in rows if x["step"] > STEPS - 50]
    # Early on the loss sits at ln K (views do not yet agree); by the end it is well below.
    assert abs(sum(early[-3:]) / 3 - ln_k) < 0.05
    assert sum(late) / len(late) < ln_k - 0.2, late
    assert min(x["prototypes_in_use"] for x in rows if x["step"] > STEPS - 50) >= 15
