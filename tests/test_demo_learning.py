"""The demo's recipe learns on a seed it was not tuned on.

jobs/demo.yaml's own schedule, on the demo's own bucket (digits, photos and the odd cases), stopped at step
STOP the way a preemption stops it: the loss leaves SwAV's uniform solution (ln K), the codes keep many
prototypes in use, and the trunk's digits kNN beats the very random init the run started from.

The recipe was tuned and its figures reported (README) on seeds 1-5; this test runs seed 6. Every bound
below comes from the spread measured over seeds 1-5 at step STOP on this machine kind, with room left
for another seed and another CPU's rounding (see the comment at the bounds).
"""

from __future__ import annotations

import json
import math

import pytest
from helpers import torchrun

pytestmark = pytest.mark.slow  # a training run end to end: `make test` only, not `make test-fast`

SEED = 6
STOP = 600
LN_K = math.log(30)
# Measured at steps 551-600 of seeds 1-5 on the 2-core CI machine kind (NHWC inputs; mean loss; fewest
# prototypes in use; kNN k=20 gain at step 600 over the same-seed init): loss 1.25-1.71 against ln K = 3.40 (a
# drop of 1.69 or more); 10-16 prototypes of 30; gain +2.1 to +10.9 points. At step 400 the gain was -0.7 to
# +8.5 (seeds 3 and 5, whose inits are the strongest, had not yet passed them), and at step 500 +1.4 to +9.6,
# so the test runs to 600. Bounds: a drop under a third of the smallest measured, half the fewest prototypes
# in use, and a third of the smallest gain. The failure they catch is not subtle: a run that never leaves
# ln K (the old recipe on seed 4) scores 3.40, and its trunk drops 25-28 points below its init.
# Rechecked with every sample once per pass (seeds 1-5, steps 551-600): mean loss 1.49-1.68, fewest prototypes
# 11-18; kNN at step 1000 +5.7 to +12.8 (docs/demo.md).
MIN_LOSS_DROP = 0.4
MIN_PROTOTYPES = 5
MIN_KNN_GAIN = 0.7


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from pipeline.build import BuildConfig, build
    from swav.demo import make_bucket
    from swav.demo_bucket import digits_folder

    root = tmp_path_factory.mktemp("demo")
    make_bucket(root / "bucket")
    build(str(root / "bucket"), str(root / "shards"), BuildConfig(samples_per_shard=128, workers=1), progress=False)
    digits_folder(root / "digits-train", split="train", size=64)
    digits_folder(root / "digits-val", split="val", size=64)
    return root


def test_demo_recipe_learns_on_a_held_out_seed(demo_data, tmp_path):
    from swav.evaluate import evaluate

    run = tmp_path / "run"
    r = torchrun(2, "pretrain", "jobs/demo.yaml", f"data.url={demo_data / 'shards'}", f"run_dir={run}",
                 f"seed={SEED}", f"train.stop_after={STOP}", "checkpoint.every=1000", timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == STOP
    early = [x["loss"] for x in rows if x["step"] <= 50]
    late = [x for x in rows if x["step"] > STOP - 50]
    # At first the views' codes disagree and the loss sits at ln K (every prototype predicted equally).
    assert abs(sum(early[-3:]) / 3 - LN_K) < 0.05, early
    assert sum(x["loss"] for x in late) / len(late) < LN_K - MIN_LOSS_DROP, late
    assert min(x["prototypes_in_use"] for x in late) >= MIN_PROTOTYPES, late

    train, val = str(demo_data / "digits-train"), str(demo_data / "digits-val")
    ckpt = str(run / "checkpoints")
    pre = evaluate("knn", train, val, checkpoint=ckpt, image_size=64, seed=0)["knn20_top1"]
    init = evaluate("knn", train, val, checkpoint=ckpt, random_init=True, image_size=64, seed=SEED)["knn20_top1"]
    assert pre > init + MIN_KNN_GAIN, (pre, init)
