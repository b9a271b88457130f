"""Evaluation, export and report from real checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import swav_cli, torchrun

from swav.evaluate import evaluate, knn_accuracy
from swav.export import exported_state
from swav.models import build_trunk
from swav.weights import load_model_state, trunk_state

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    from swav.demo_bucket import digits_folder

    root = tmp_path_factory.mktemp("digits")
    digits_folder(root / "train", split="train", size=32, limit=300)
    digits_folder(root / "val", split="val", size=32, limit=150)
    return root / "train", root / "val"


@pytest.fixture(scope="module")
def rn50_run(shard_set, tmp_path_factory) -> Path:
    """A real resnet50 (full width) checkpoint after 2 steps on tiny crops."""
    run = tmp_path_factory.mktemp("rn50")
    r = swav_cli("pretrain", "jobs/tiny.yaml", f"data.url={shard_set}", f"run_dir={run}", "model.arch=resnet50",
                 "model.hidden_mlp=64", "crops.size_crops=[32,16]", "train.batch_size=4", "train.steps=2",
                 "checkpoint.every=2", "swav.freeze_prototypes_steps=0")
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def test_export_torchvision_loads_strictly_and_gives_the_checkpoint_features(rn50_run, tmp_path):
    out = tmp_path / "rn50.pt"
    r = swav_cli("export", str(rn50_run / "checkpoints"), str(out), "--format", "torchvision")
    assert r.returncode == 0, r.stderr[-2000:]
    exported = torch.load(out, weights_only=True)
    tv = torchvision.models.resnet50()
    missing, unexpected = tv.load_state_dict(exported, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    tv.fc = torch.nn.Identity()
    state, cfg, _ = load_model_state(str(rn50_run / "checkpoints"))
    trunk = build_trunk("resnet50")
    trunk.load_state_dict(trunk_state(state))
    x = torch.randn(2, 3, 64, 64)
    tv.eval()
    trunk.eval()
    assert torch.allclose(tv(x), trunk(x), atol=1e-5)
    # The checkpoint really is trained weights, not the init: BN running stats moved.
    assert not torch.allclose(trunk.bn1.running_mean, torch.zeros_like(trunk.bn1.running_mean))


def test_export_swav_format_uses_the_reference_release_keys(rn50_run, tmp_path):
    out = tmp_path / "swav.pt"
    r = swav_cli("export", str(rn50_run / "checkpoints" / "step-000000002"), str(out), "--format", "swav",
                 "--include-head")
    assert r.returncode == 0, r.stderr[-2000:]
    keys = set(torch.load(out, weights_only=True))
    assert {"module.conv1.weight", "module.layer4.2.bn3.running_var", "module.projection_head.0.weight",
            "module.prototypes.weight"} <= keys
    assert not any(k.startswith("module.trunk.") for k in keys)
    r = swav_cli("export", str(rn50_run / "checkpoints"), str(out), "--include-head")
    assert r.returncode == 2 and "--format swav" in r.stderr


@pytest.mark.parametrize("stage", [2, 3])
def test_export_from_zero_sharded_checkpoints(shard_set, tmp_path, stage):
    run = tmp_path / "run"
    r = torchrun(2, "pretrain", "jobs/tiny.yaml", f"data.url={shard_set}", f"run_dir={run}", "train.steps=2",
                 "checkpoint.every=2", f"deepspeed.zero_stage={stage}", "swav.freeze_prototypes_steps=0")
    assert r.returncode == 0, r.stderr[-3000:]
    state, cfg, ref = load_model_state(str(run / "checkpoints"))
    assert ref.manifest["zero_stage"] == stage
    trunk = build_trunk(cfg.model.arch)
    trunk.load_state_dict(trunk_state(state))  # strict: every weight present and shaped right
    protos = state["prototypes.weight"]
    assert torch.allclose(protos.norm(dim=1), torch.ones(protos.shape[0]), atol=1e-5)
    out = exported_state(state, "swav", include_head=True)
    assert "module.prototypes.weight" in out


def test_knn_and_linear_are_deterministic_and_random_init_is_one_flag_away(rn50_run, digits, tmp_path):
    train, val = digits
    ck = str(rn50_run / "checkpoints")
    a = evaluate("knn", str(train), str(val), checkpoint=ck, image_size=32, seed=0)
    b = evaluate("knn", str(train), str(val), checkpoint=ck, image_size=32, seed=0)
    assert a == b and 0 <= a["knn20_top1"] <= 100 and a["knn20_top5"] >= a["knn20_top1"]
    out = tmp_path / "rand.json"
    r = swav_cli("eval", "knn", "--checkpoint", ck, "--random-init", "--train", str(train), "--val", str(val),
                 "--image-size", "32", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rand = json.loads(out.read_text())
    assert rand["model"].startswith("random init resnet50") and rand["classes"] == 10
    lin1 = evaluate("linear", str(train), str(val), checkpoint=ck, random_init=True, image_size=32, seed=0,
                    epochs=20)
    lin2 = evaluate("linear", str(train), str(val), checkpoint=ck, random_init=True, image_size=32, seed=0,
                    epochs=20)
    assert lin1 == lin2 and lin1["linear_top1"] > 30.0, lin1  # 10 classes: chance is 10%


def test_knn_on_a_hand_made_example():
    train = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    val = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=1)
    assert knn_accuracy(train, labels, val, torch.tensor([0, 1]), k=2) == (100.0, 100.0)
    assert knn_accuracy(train, labels, val, torch.tensor([1, 0]), k=2)[0] == 0.0


def test_report_writes_plots_and_a_summary(rn50_run, tmp_path):
    r = swav_cli("report", str(rn50_run), "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr[-2000:]
    png = tmp_path / "rep" / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "| loss |" in (tmp_path / "rep" / "summary.md").read_text()
    r = swav_cli("report", str(tmp_path))
    assert r.returncode == 2 and "no metrics.jsonl" in r.stderr


def test_random_init_baseline_is_the_trunk_a_run_starts_from():
    """`--random-init --seed S` rebuilds exactly the trunk `pretrain` initialises with seed S (the demo's baseline)."""
    from helpers import REPO

    from swav.config import load_config
    from swav.engine import build_model
    from swav.evaluate import load_trunk
    from swav.train import _seed_everything

    cfg = load_config(str(REPO / "jobs" / "demo.yaml"))
    _seed_everything(cfg.seed, rank=1)
    start = build_model(cfg, on_gpu=False, world_size=2).trunk.state_dict()
    trunk, _ = load_trunk("", cfg.model.arch, random_init=True, seed=cfg.seed)
    assert start.keys() == trunk.state_dict().keys()
    assert all(torch.equal(v, trunk.state_dict()[k]) for k, v in start.items())
    other, _ = load_trunk("", cfg.model.arch, random_init=True, seed=cfg.seed + 1)
    assert not torch.equal(other.state_dict()["conv1.weight"], start["conv1.weight"])


def test_knn_over_100k_train_features_in_bounded_memory():
    """100,000 train features x 128 dims (51 MB): each val chunk costs 256 x 100k similarities, never N x N."""
    import psutil

    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(10, 128, generator=g), dim=1)
    train_y = torch.arange(100_000) % 10
    val_y = torch.arange(1_000) % 10

    def points(y):
        return torch.nn.functional.normalize(centres[y] + 0.05 * torch.randn(len(y), 128, generator=g), dim=1)

    train_f, val_f = points(train_y), points(val_y)
    rss = psutil.Process().memory_info().rss
    top1, top5 = knn_accuracy(train_f, train_y, val_f, val_y, k=200, num_classes=10)
    grown = psutil.Process().memory_info().rss - rss
    assert top1 == 100.0 and top5 == 100.0
    assert grown < 400 * 2**20, grown   # a dense val x train matrix alone would be 400 MB


def test_eval_streams_a_labelled_webdataset_set_with_each_label_source(digits, tmp_path):
    """The same images as a class-per-folder tree and as foreign WebDataset tars (labels in .cls, in a JSON
    field, and in the source URL's folder) give the same features and the same accuracy."""
    import io as _io
    import tarfile

    train, val = digits
    for split, folder in (("train", train), ("val", val)):
        src = tmp_path / split
        src.mkdir()
        with tarfile.open(src / "00000.tar", "w") as t:
            for n, p in enumerate(sorted(p for p in folder.rglob("*.png"))):
                cls = p.parent.name
                for ext, data in (("png", p.read_bytes()), ("cls", cls.encode()),
                                  ("json", json.dumps({"url": f"http://h/{cls}/{p.name}", "digit": cls}).encode())):
                    info = tarfile.TarInfo(f"{n:05d}.{ext}")
                    info.size = len(data)
                    t.addfile(info, _io.BytesIO(data))
        r = swav_cli("shards", "index", str(src), str(tmp_path / f"{split}-idx"), "--no-progress")
        assert r.returncode == 0, r.stderr
    ref = evaluate("knn", str(train), str(val), arch="resnet50w0.125", random_init=True, image_size=32, seed=1)
    for label in ("cls", "json:digit", "folder"):
        got = evaluate("knn", str(tmp_path / "train-idx"), str(tmp_path / "val-idx"), arch="resnet50w0.125",
                       random_init=True, image_size=32, seed=1, label=label)
        assert {k: v for k, v in got.items() if "top" in k} == {k: v for k, v in ref.items() if "top" in k}, label
        assert got["train_images"] == 300 and got["classes"] == 10
    r = swav_cli("eval", "knn", "--arch", "resnet50w0.125", "--random-init", "--train", str(tmp_path / "train-idx"),
                 "--val", str(tmp_path / "val-idx"), "--label", "json:nofield", "--image-size", "32")
    assert r.returncode == 2 and "no JSON field 'nofield'" in r.stderr and "Traceback" not in r.stderr, r.stderr
