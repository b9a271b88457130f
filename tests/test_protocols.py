"""Evaluation protocols that train: class-balanced subsets, held-out selection, linear on augmented views, and
fine-tuning on a fraction of the labels. The validation set is never used to choose anything."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from helpers import swav_cli

from swav.supervised import balanced_subset, choose, holdout, subset_file
from swav_io.errors import UserError

LABELS = [c for c in range(10) for _ in range(30 + 7 * c)]   # unequal classes: 30 .. 93 images


@pytest.mark.parametrize("fraction", [0.01, 0.1, 1.0])
def test_the_subset_is_class_balanced_and_the_same_for_the_same_seed(fraction):
    a, b = balanced_subset(LABELS, fraction, seed=3), balanced_subset(LABELS, fraction, seed=3)
    assert a == b
    per_class = Counter(LABELS[i] for i in a)
    sizes = Counter(LABELS)
    for c, n in sizes.items():
        assert per_class[c] == min(n, max(1, round(fraction * n))), (c, per_class[c])
    if fraction < 1.0:
        assert balanced_subset(LABELS, fraction, seed=4) != a


def test_held_out_part_is_disjoint_balanced_and_never_empties_a_class():
    positions = balanced_subset(LABELS, 0.1, seed=0)
    fit, held = holdout(positions, LABELS, 0.1, seed=0)
    assert sorted(fit + held) == positions and not set(fit) & set(held)
    assert {LABELS[i] for i in fit} == set(range(10))
    assert {LABELS[i] for i in held} == set(range(10))   # every class here has 3 or more in the subset


def test_a_recorded_subset_is_reused_and_refused_for_other_images(tmp_path):
    path = str(tmp_path / "subset.json")
    digests = [f"{i:064x}" for i in range(len(LABELS))]
    first = subset_file(path, LABELS, digests, 0.1, seed=1)
    assert subset_file(path, LABELS, digests, 0.1, seed=1) == first
    assert json.loads((tmp_path / "subset.json").read_text())["positions"] == first
    with pytest.raises(UserError, match="other images or settings"):
        subset_file(path, LABELS, list(reversed(digests)), 0.1, seed=1)
    with pytest.raises(UserError, match="other images or settings"):
        subset_file(path, LABELS, digests, 0.01, seed=1)


def test_choice_takes_the_best_held_out_score_and_breaks_ties_toward_less():
    table = {0.1: {1: 50.0, 2: 60.0, 3: 60.0, 4: 55.0}, 0.3: {1: 40.0, 2: 60.0, 3: 61.0, 4: 58.0},
             0.9: {1: 61.0, 2: 10.0, 3: 10.0, 4: 10.0}}
    seen = []

    def run(lr, score_at):
        seen.append(score_at)
        return {e: table[lr][e] for e in score_at}

    c = choose(run, [0.1, 0.3, 0.9], epochs=4)
    assert seen == [[1, 2, 3, 4]] * 3
    assert (c.lr, c.epoch, c.heldout_top1) == (0.3, 3, 61.0)   # ties 0.9 at epoch 1: the smaller lr wins
    assert c.grid["0.9"] == table[0.9]
    tie = choose(lambda lr, at: {e: 50.0 for e in at}, [0.1, 0.3], epochs=4)
    assert (tie.lr, tie.epoch) == (0.1, 1)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from swav.demo_bucket import digits_folder

    root = tmp_path_factory.mktemp("digits")
    digits_folder(root / "train", split="train", size=32)
    digits_folder(root / "val", split="val", size=32)
    return root / "train", root / "val"


def _eval(kind, digits, tmp_path, *extra):
    train, val = digits
    out = tmp_path / f"{kind}.json"
    r = swav_cli("eval", kind, "--arch", "resnet50w0.125", "--random-init", "--train", str(train), "--val", str(val),
                 "--image-size", "32", "--no-progress", "--out", str(out), *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text()), r


@pytest.mark.slow
def test_finetune_on_a_tenth_of_the_labels_records_its_subset_and_choice_and_repeats(digits, tmp_path):
    subset = tmp_path / "subset.json"
    args = ("--fraction", "0.1", "--epochs", "2", "--subset-file", str(subset), "--batch-size", "32")
    a, r = _eval("finetune", digits, tmp_path, *args)
    assert "finetune_top1" in r.stdout and "finetune_top5" in r.stdout
    assert 0 <= a["finetune_top1"] <= a["finetune_top5"] <= 100
    rec = json.loads(subset.read_text())
    assert a["labelled_images"] == len(rec["positions"]) < a["train_images"] / 5
    p = a["protocol"]
    assert p["fraction"] == 0.1 and p["subset_file"] == str(subset) and p["augment"] is True
    assert p["choice"]["epoch"] in (1, 2) and set(p["choice"]["grid"]) == {"0.0333333", "0.1", "0.3"}
    b, _ = _eval("finetune", digits, tmp_path, *args)
    assert json.loads(subset.read_text()) == rec and b == a   # same subset, same result


@pytest.mark.slow
def test_linear_with_augmentation_chooses_on_held_out_train_images(digits, tmp_path):
    res, _ = _eval("linear", digits, tmp_path, "--augment", "--epochs", "2", "--batch-size", "64")
    assert 0 <= res["linear_top1"] <= res["linear_top5"] <= 100
    assert res["protocol"]["augment"] is True and res["protocol"]["selection"].startswith("held-out")
    frozen, _ = _eval("linear", digits, tmp_path, "--epochs", "4")
    assert frozen["protocol"]["augment"] is False and frozen["protocol"]["choice"]["epoch"] in (1, 2, 3, 4)
