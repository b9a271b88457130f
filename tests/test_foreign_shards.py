"""WebDataset tars that other tools wrote, as a shard set: `swav shards index`, WebDataset member rules,
the decoder's pixel cap, and a real img2dataset run over HTTP on loopback."""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import struct
import subprocess
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, swav_cli
from PIL import Image

from shards.index import load_index
from shards.stream import ShardStream, resume_plan
from swav.config import load_config
from swav.data import build_loader
from swav.multicrop import ImageTooLarge, MultiCrop
from swav.peek import peek_batches

IMG2DATASET = REPO / ".venv" / "tools" / "img2dataset" / "bin" / "img2dataset"


def encode(seed: int, fmt: str = "JPEG", size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def jpeg_bomb() -> bytes:
    """A small, valid JPEG whose header claims 12,000 x 12,000 pixels (a decompression bomb's header)."""
    data = bytearray(encode(0))
    sof = data.find(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", 12000, 12000)
    return bytes(data)


def write_foreign_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> tuple[Path, set[str]]:
    """Three tars as another writer might lay them out, and the keys a pass must deliver."""
    root = tmp_path_factory.mktemp("foreign") / "tars"
    root.mkdir()
    want = set()
    for t in range(3):
        members = []
        for i in range(6):
            key = f"crawl.v2/{t}/img{i:03d}" if i % 2 else f"{t}-{i:03d}"   # folders (dots allowed) in keys
            ext = ("jpg", "png", "webp")[i % 3]
            members += [(f"{key}.{ext}", encode(t * 10 + i, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext])),
                        (f"{key}.json", json.dumps({"url": f"http://example.invalid/{t}/{i}.{ext}"}).encode()),
                        (f"{key}.txt", b"a caption")]
            want.add(key)
        members += [(f"{t}-nomedia.txt", b"caption only"),               # no image: left out, counted
                    ("../escape.jpg", encode(99)),                       # unsafe: refused, counted
                    (f"{t}-seg.mask.png", encode(7, "PNG"))]             # ext "mask.png": no image, counted
        write_foreign_tar(root / f"{t:05d}.tar", members)
    return root, want


def one_pass(idx, consumers: int, window: int) -> list[str]:
    """Every consumer's samples of pass 0 (read until each has moved on to pass 1)."""
    got = []
    for c in range(consumers):
        s = ShardStream(idx, 5, c, consumers, window)
        while True:
            x = next(s)
            if x["__pass__"] > 0:
                break
            got.append(x["__key__"])
    return got


def test_index_scans_foreign_tars_and_the_stream_reads_each_sample_once(foreign, tmp_path):
    root, want = foreign
    dst = tmp_path / "idx"
    r = swav_cli("shards", "index", f"{root}/{{00000..00002}}.tar", str(dst), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "indexed 3 tars, 18 samples" in r.stdout and "6 no_image, 3 unsafe_name" in r.stdout, r.stdout
    rec = json.loads((dst / "build.json").read_text())
    assert rec["format"] == "webdataset" and rec["shard_root"] == str(root) and rec["counted_by"]["scan"] == 3
    idx = load_index(str(dst))
    assert list(idx.samples) == [6, 6, 6]
    # no tar was copied or rewritten: the index names them where they are
    assert not list(dst.glob("*.tar")) and idx.shard_url(0) == f"{root}/00000.tar"
    for consumers, window in ((1, 2), (2, 3)):
        got = one_pass(idx, consumers, window)
        assert sorted(got) == sorted(want), (consumers, window)
    v = swav_cli("shards", "verify", str(dst), "--no-progress")
    assert v.returncode == 0 and "18 samples: OK" in v.stdout, v.stdout + v.stderr
    i = swav_cli("shards", "info", str(dst))
    assert i.returncode == 0 and "WebDataset tars at" in i.stdout and "unsafe_name" in i.stdout, i.stdout + i.stderr
    # the same tars named by their prefix, or by a list file, give the same index
    for source in (str(root), str(tmp_path / "tars.txt")):
        (tmp_path / "tars.txt").write_text("".join(f"{root}/{t:05d}.tar\n" for t in range(3)))
        again = swav_cli("shards", "index", source, str(tmp_path / "again"), "--no-progress")
        assert again.returncode == 0, again.stderr
        assert list(load_index(str(tmp_path / "again")).samples) == [6, 6, 6]


def test_a_world_size_change_on_an_indexed_set_loses_no_sample(foreign, tmp_path):
    """2 readers stop mid-pass, 3 take over from their states: each pass still delivers every key once."""
    root, want = foreign
    r = swav_cli("shards", "index", str(root), str(tmp_path / "idx"), "--no-progress")
    assert r.returncode == 0, r.stderr
    idx = load_index(str(tmp_path / "idx"))
    old = [ShardStream(idx, 5, c, 2, 2) for c in range(2)]
    read = [next(old[0]) for _ in range(4)] + [next(old[1]) for _ in range(7)]
    new = [ShardStream(idx, 5, c, 3, 2, plan=resume_plan([s.state_dict() for s in old])) for c in range(3)]
    after = [next(s) for s in new for _ in range(40)]
    for p in (0, 1):
        got = [x["__key__"] for x in read + after if x["__pass__"] == p]
        assert sorted(got) == sorted(want), f"pass {p}"


def test_index_errors_are_one_line(foreign, tmp_path, shard_set):
    root, _ = foreign
    r = swav_cli("shards", "index", f"{root}/{{00000..00004}}.tar", str(tmp_path / "a"), "--no-progress")
    assert r.returncode != 0 and "2 of 5 tars" in r.stderr and "--skip-missing" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    ok = swav_cli("shards", "index", f"{root}/{{00000..00004}}.tar", str(tmp_path / "a"), "--skip-missing",
                  "--no-progress")
    assert ok.returncode == 0 and "2 named tar(s) do not exist" in ok.stdout, ok.stdout + ok.stderr
    r = swav_cli("shards", "index", str(root), str(shard_set), "--no-progress")
    assert r.returncode != 0 and "swav shards build" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_decoder_refuses_a_pixel_bomb_from_its_header():
    mc = MultiCrop([32], [2], [0.5], [1.0])
    with pytest.raises(ImageTooLarge):
        mc.crops_u8(jpeg_bomb(), "bomb", 0)
    assert len(mc(encode(1), "fine", 0)) == 2


def test_a_bomb_in_a_foreign_shard_is_counted_and_skipped(tmp_path):
    src = tmp_path / "tars"
    src.mkdir()
    members = [(f"k{i}.jpg", encode(i)) for i in range(5)]
    members.insert(2, ("bomb.jpg", jpeg_bomb()))
    write_foreign_tar(src / "a.tar", members)
    r = swav_cli("shards", "index", str(src), str(tmp_path / "idx"), "--no-progress")
    assert r.returncode == 0, r.stderr
    cfg = load_config(None, [f"data.url={tmp_path / 'idx'}", "data.num_workers=0", "train.batch_size=3",
                             "data.shuffle_window=1", "crops.size_crops=[32]", "crops.num_crops=[2]", "crops.min_scale_crops=[0.5]",
                             "crops.max_scale_crops=[1.0]"])
    loader = build_loader(cfg, 0, 1)
    it = iter(loader)
    # Six good samples take the whole first pass (five, and the bomb) and one of the next; a piece of
    # the next pass starts at sample 0 or 3, never at the bomb (sample 2).
    batches = [next(it), next(it)]
    state = loader.state_dict()
    keys = [k for b in batches for k in b.keys]
    assert not any("bomb" in k for k in keys) and len(keys) == 6
    assert [s["bad_samples"] for s in _dataset_states(state)] == [1]


def _dataset_states(state) -> list[dict]:
    found = []

    def walk(x):
        if isinstance(x, dict):
            if "bad_samples" in x:
                found.append(x)
            for v in x.values():
                walk(v)
    walk(state)
    return found


@pytest.fixture(scope="module")
def img2dataset_output(tmp_path_factory) -> tuple[Path, list[str]]:
    """img2dataset, run as its users run it, on a URL list served from 127.0.0.1."""
    assert IMG2DATASET.exists(), f"{IMG2DATASET} is missing: run `make test` (it installs img2dataset there)"
    from skimage import data as skdata

    base = tmp_path_factory.mktemp("i2d")
    www = base / "www"
    www.mkdir()
    names = []
    for name in ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "page"):
        img = np.asarray(getattr(skdata, name)())
        for j, (y, x) in enumerate(((0, 0), (40, 60), (90, 20))):   # three views of each real photo
            crop = Image.fromarray(img[y:y + 200, x:x + 260])
            fname = f"{name}-{j}.{'png' if j == 1 else 'jpg'}"
            crop.save(www / fname)
            names.append(fname)
    handler = functools.partial(_QuietHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    urls = [f"http://127.0.0.1:{port}/{n}" for n in names] + [f"http://127.0.0.1:{port}/absent.jpg"]
    (base / "urls.txt").write_text("\n".join(urls) + "\n")
    out = base / "out"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "NO_PROXY": "127.0.0.1"}
    r = subprocess.run([str(IMG2DATASET), "--url_list", str(base / "urls.txt"), "--input_format", "txt",
                        "--output_format", "webdataset", "--output_folder", str(out), "--processes_count", "1",
                        "--thread_count", "4", "--image_size", "96", "--resize_mode", "keep_ratio",
                        "--number_sample_per_shard", "10", "--retries", "0", "--timeout", "5",
                        "--enable_wandb", "False"], capture_output=True, text=True, env=env, timeout=300)
    server.shutdown()
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out, [u for u in urls if "absent" not in u]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_img2dataset_output_indexes_from_its_stats_streams_once_and_trains(img2dataset_output, tmp_path):
    out, urls = img2dataset_output
    tars = sorted(out.glob("*.tar"))
    assert len(tars) == 3 and all(t.with_name(f"{t.stem}_stats.json").exists() for t in tars)
    written = []
    for t in tars:
        with tarfile.open(t) as tf:
            written += [m.name.rsplit(".", 1)[0] for m in tf.getmembers() if m.name.endswith(".jpg")]
    assert len(written) == len(urls)          # the absent URL is img2dataset's failure, not a sample
    dst = tmp_path / "idx"
    r = swav_cli("shards", "index", f"{out}/{{00000..00002}}.tar", str(dst), "--no-progress")
    assert r.returncode == 0, r.stderr
    rec = json.loads((dst / "build.json").read_text())
    assert rec["counted_by"] == {"sidecar": 3, "scan": 0} and rec["samples"] == len(urls)
    idx = load_index(str(dst))
    for consumers, window in ((1, 1), (3, 2)):
        assert sorted(one_pass(idx, consumers, window)) == sorted(written), (consumers, window)
    # peek names samples by the URL in their JSON sidecar, through the training loader's split
    cfg = load_config(None, [f"data.url={dst}", "data.num_workers=2", "train.batch_size=4"])
    rows = peek_batches(cfg, 2, 2)
    assert {u for row in rows for u in row["urls"]} <= set(urls) and len(rows) == 4
    # a resumed loader continues bitwise on the indexed set, with workers and the shuffle window
    over = [f"data.url={dst}", "data.num_workers=2", "train.batch_size=3", "data.shuffle_window=2",
            "crops.size_crops=[32,16]", "crops.num_crops=[2,2]"]
    full = _batches(load_config(None, over), 6)
    first, state = _batches(load_config(None, over), 2, with_state=True)
    rest = _batches(load_config(None, over), 4, state=state)
    for a, b in zip(full, first + rest):
        assert a.keys == b.keys and all(torch.equal(x, y) for x, y in zip(a.images, b.images))
    run = tmp_path / "run"
    p = swav_cli("pretrain", "jobs/tiny.yaml", f"data.url={dst}", f"run_dir={run}", "train.steps=3",
                 "checkpoint.every=3")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert (run / "checkpoints" / "latest").exists()


def _batches(cfg, n: int, state=None, with_state: bool = False):
    ld = build_loader(cfg, 0, 1)
    if state is not None:
        ld.load_state_dict(state)
    it = iter(ld)
    got = [next(it) for _ in range(n)]
    return (got, ld.state_dict()) if with_state else got


def test_tars_written_by_the_tar_command_have_dot_slash_names_and_stream_whole(tmp_path):
    """`tar -C dir -cf x.tar .` names members ./000.jpg: with img2dataset's stats or a scan, N samples each."""
    src = tmp_path / "files"
    src.mkdir()
    for i in range(5):
        (src / f"{i:03d}.jpg").write_bytes(encode(i))
        (src / f"{i:03d}.json").write_text(json.dumps({"url": f"http://x/{i}"}))
    tars = tmp_path / "tars"
    tars.mkdir()
    # --sort=name keeps a sample's members together, as WebDataset requires (directory order may not).
    subprocess.run(["tar", "--sort=name", "-C", str(src), "-cf", str(tars / "00000.tar"), "."], check=True)
    (tars / "00000_stats.json").write_text(json.dumps({"successes": 5}))
    with tarfile.open(tars / "00000.tar") as t:
        assert "./000.jpg" in t.getnames()
    for scan in (False, True):
        dst = tmp_path / f"idx-{scan}"
        r = swav_cli("shards", "index", str(tars), str(dst), "--no-progress", *(["--scan"] if scan else []))
        assert r.returncode == 0, r.stderr
        idx = load_index(str(dst))
        assert idx.samples.tolist() == [5]
        s = ShardStream(idx, 0, 0, 1)
        got = [next(s) for _ in range(5)]
        assert sorted(x["__key__"] for x in got) == [f"{i:03d}" for i in range(5)] and s.stats.rejected == {}


def test_an_index_with_nothing_to_stream_is_refused_not_published(tmp_path):
    tars = tmp_path / "tars"
    tars.mkdir()
    write_foreign_tar(tars / "a.tar", [("../evil.jpg", encode(1)), ("/abs.jpg", encode(2)), ("readme.txt", b"hi")])
    dst = tmp_path / "idx"
    r = swav_cli("shards", "index", str(tars), str(dst), "--no-progress", "--scan")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "holds a sample the stream can read" in r.stderr and "2 unsafe_name" in r.stderr, r.stderr
    assert not (dst / "build.json").exists()
    r = swav_cli("shards", "peek", str(dst), "--batches", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr


def test_one_tar_is_a_source_and_a_relative_source_streams_from_any_directory(tmp_path):
    work = tmp_path / "work"
    (work / "src").mkdir(parents=True)
    write_foreign_tar(work / "src" / "one.tar", [(f"k{i}.jpg", encode(i)) for i in range(4)])
    r = subprocess.run([os.fspath(REPO / ".venv" / "bin" / "swav"), "shards", "index", "src/one.tar", "idx",
                        "--no-progress"], cwd=work, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rec = json.loads((work / "idx" / "build.json").read_text())
    assert rec["shard_root"] == str(work / "src") and rec["shards"] == 1
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run([os.fspath(REPO / ".venv" / "bin" / "swav"), "shards", "peek", str(work / "idx"),
                        "train.batch_size=4"], cwd=elsewhere, capture_output=True, text=True)
    assert r.returncode == 0 and "coverage: 4 distinct of 4 delivered" in r.stdout, r.stdout + r.stderr
