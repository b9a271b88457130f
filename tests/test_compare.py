"""`swav compare` as a user runs it: a grid file in, every cell trained and evaluated, one table out; a rerun
resumes instead of redoing; a wrong grid is one line naming what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import swav_cli

from swav.compare import load_grid
from swav.compare_table import mean_std
from swav.demo_bucket import digits_folder
from swav_io.errors import UserError


def _grid(tmp_path: Path, shard_set: Path, **extra) -> Path:
    train, val = tmp_path / "train", tmp_path / "val"
    digits_folder(train, split="train", size=64, limit=150)
    digits_folder(val, split="val", size=64, limit=100)
    grid = {"job": "tiny", "steps": 4, "ranks": 1, "seeds": [1, 2],
            "objectives": {"swav": [], "deepclusterv2": ["objective.name=deepclusterv2", "objective.period=2",
                                                         "objective.bank_size=64"]},
            "crops": {"2x64+2x32": []}, "protocols": ["knn", "linear", "finetune-0.1"],
            "data": {"shards": str(shard_set), "train": str(train), "val": str(val)},
            "eval": {"linear_epochs": 3, "image_epochs": 1}, **extra}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


@pytest.mark.slow
def test_a_mini_grid_writes_every_cell_with_top5_and_std_and_a_rerun_resumes(shard_set, tmp_path):
    grid, out = _grid(tmp_path, shard_set), tmp_path / "out"
    r = swav_cli("compare", str(grid), "--out", str(out), timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    table = json.loads((out / "table.json").read_text())
    cells = {(c["objective"], c["seed"]) for c in table["cells"]}
    assert cells == {("swav", 1), ("swav", 2), ("deepclusterv2", 1), ("deepclusterv2", 2)}
    assert len(table["rows"]) == 2 * 3, "a row per (objective, crops, protocol)"
    for row in table["rows"]:
        assert row["seeds"] == 2 and len(row["top1"]) == len(row["top5"]) == 2
        assert row["top5_mean_std"][1] is not None and row["top1_mean_std"][1] is not None
        assert all(t5 >= t1 for t1, t5 in zip(row["top1"], row["top5"]))
        assert (row["cluster_seconds"] is not None) == (row["objective"] == "deepclusterv2")
    md = (out / "table.md").read_text()
    assert md.count(" ± ") >= 6 * 2 and "| deepclusterv2 | 2x64+2x32 | finetune-0.1 |" in md
    assert sum(line.startswith(("| swav | 2x64+2x32 | 1 |", "| swav | 2x64+2x32 | 2 |",
                                "| deepclusterv2 | 2x64+2x32 | 1 |", "| deepclusterv2 | 2x64+2x32 | 2 |"))
               for line in md.splitlines()) == 4, "every seed's numbers are in the table"
    assert (out / "table.png").stat().st_size > 0
    floor = {r["protocol"]: r for r in table["random_init"]}
    assert set(floor) == {"knn", "linear", "finetune-0.1"} and all(len(r["top1"]) == 2 for r in floor.values())
    assert "| random init | - | knn |" in md
    subset = json.loads((out / "subset-0.1.json").read_text())
    finetunes = [json.loads(p.read_text()) for p in [*out.glob("cells/*/*/seed*/eval-finetune-0.1.json"),
                                                      *out.glob("random-init/seed*/eval-finetune-0.1.json")]]
    assert len(finetunes) == 4 + 2 and {f["protocol"]["subset_file"] for f in finetunes} == {str(out / "subset-0.1.json")}
    assert subset
    before = {p: p.stat().st_mtime_ns for p in [*out.glob("cells/**/*.json"), *out.glob("random-init/**/*.json")]}
    again = swav_cli("compare", str(grid), "--out", str(out), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    after = {p: p.stat().st_mtime_ns for p in [*out.glob("cells/**/*.json"), *out.glob("random-init/**/*.json")]}
    assert after == before, "done cells and baselines are not redone"
    assert json.loads((out / "table.json").read_text())["rows"] == table["rows"]


def test_a_wrong_grid_is_one_line_naming_the_problem(tmp_path, shard_set):
    grid = _grid(tmp_path, shard_set, protocols=["knn", "top9"])
    r = swav_cli("compare", str(grid), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "unknown protocol(s) top9" in r.stderr and "Traceback" not in r.stderr
    grid.write_text(yaml.safe_dump({"job": "tiny", "stepz": 3}))
    with pytest.raises(UserError, match="unknown key.*stepz"):
        load_grid(str(grid))
    r = swav_cli("compare", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "grid 'nope.yaml'" not in r.stderr and "neither a file nor a shipped grid" in r.stderr


def test_the_shipped_grid_is_the_default_and_loads():
    from swav.compare import grid_path

    grid = load_grid(grid_path(""))
    assert set(grid.objectives) == {"swav", "deepclusterv2", "selav2"} and len(grid.crops) == 2
    assert len(grid.seeds) == 3


def test_mean_and_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, None)
