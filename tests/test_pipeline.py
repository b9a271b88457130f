"""The sharding stage on a real uncurated bucket: every input accounted for, restartable, splittable."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import REPO, kill_group, swav_cli
from PIL import Image

from pipeline.build import BuildConfig, build, build_part
from pipeline.inspect import verify
from pipeline.merge import merge
from shards.index import load_index
from shards.members import UnsafeMember
from shards.tario import iter_samples, write_tar


def manifest_rows(root: Path) -> list[dict]:
    rows = []
    for p in sorted((root / "manifest").glob("*.parquet")):
        rows += pq.read_table(p).to_pylist()
    return rows


def samples(root: Path) -> dict[str, dict]:
    out = {}
    for tar in sorted((root / "shards").glob("*.tar")):
        with open(tar, "rb") as f:
            for s in iter_samples(f):
                out[s["__key__"]] = s
    return out


def test_every_input_is_accounted_for_with_the_right_reason(bucket, shard_set):
    root, expected = bucket
    rows = manifest_rows(shard_set)
    by_url = {r["url"][len(str(root)) + 1:]: r for r in rows}
    assert len(rows) == len(by_url) == len(expected), "each input object appears exactly once"
    wrong = {rel: (by_url[rel]["reason"], reason) for rel, reason in expected.items()
             if (by_url[rel]["reason"] if by_url[rel]["status"] == "rejected" else None) != reason}
    assert not wrong, f"(got, expected) reasons: {wrong}"
    record = json.loads((shard_set / "build.json").read_text())
    c = record["counts"]
    assert c["inputs"] == c["accepted"] + c["rejected"] == len(expected)
    assert sum(record["reasons"].values()) == c["rejected"]
    assert len(samples(shard_set)) == c["accepted"] == int(load_index(str(shard_set)).samples.sum())
    assert len([r for r in expected.values() if r is None]) == c["accepted"]


def test_stored_images_are_upright_rgb_jpegs_within_limits(bucket, shard_set):
    root, expected = bucket
    by_url = {json.loads(s["json"])["url"]: s for s in samples(shard_set).values()}
    for url, s in by_url.items():
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB", url
        assert max(img.size) <= 512, url
        meta = json.loads(s["json"])
        assert meta["sha256"] == hashlib.sha256(s["jpg"]).hexdigest()
    # Stored sideways with EXIF orientation 6: must come out upright (portrait), no EXIF needed.
    rot = Image.open(io.BytesIO(by_url[f"{root}/odd/exif-rotated.jpg"]["jpg"]))
    assert rot.size[1] > rot.size[0]
    # Transparency is flattened onto white, not black.
    rgba = Image.open(io.BytesIO(by_url[f"{root}/odd/rgba.png"]["jpg"]))
    assert rgba.getpixel((1, rgba.size[1] // 2))[0] > 200
    # A JPEG already within limits and upright RGB keeps its original bytes.
    kept = next(rel for rel, reason in expected.items() if rel.startswith("odd/dups/") and reason is None)
    assert by_url[f"{root}/{kept}"]["jpg"] == (root / kept).read_bytes()
    # Keys are tar-safe whatever the source name (unicode, spaces, nested prefixes).
    for key in samples(shard_set):
        assert "." not in key and "/" not in key and key.isascii()


def test_rerun_is_a_no_op_and_info_and_verify_agree(bucket, shard_set):
    before = {p: p.read_bytes() for p in (shard_set / "shards").glob("*.tar")}
    r = swav_cli("shards", "build", str(bucket[0]), str(shard_set), "--samples-per-shard", "4", "--no-progress")
    assert r.returncode == 0 and "already complete" in r.stdout, r.stderr
    r = swav_cli("shards", "build", str(bucket[0]), str(shard_set), "--samples-per-shard", "5", "--no-progress")
    assert r.returncode == 2 and "other settings" in r.stderr
    info = swav_cli("shards", "info", str(shard_set), "--json")
    assert info.returncode == 0, info.stderr
    d = json.loads(info.stdout)
    assert d["inputs"] == sum(d["by_status"].values()) and d["by_reason"]["duplicate"] == 2
    v = swav_cli("shards", "verify", str(shard_set), "--no-progress")
    assert v.returncode == 0 and "OK" in v.stdout
    assert before == {p: p.read_bytes() for p in (shard_set / "shards").glob("*.tar")}


def test_reading_a_set_starts_no_arrow_io_thread(shard_set, tmp_path):
    # A CI run once saw `swav shards info` print its JSON and then abort at exit: an Arrow I/O thread still
    # finishing a pre-buffered parquet read when the interpreter shut down. Too rare (about 1 in 20 under load)
    # to catch by rerunning, so this checks the cause: reading manifests, the index and the build's sorted runs
    # must leave no thread behind.
    code = f"""if True:
        import os, threading
        import pyarrow as pa
        from pipeline.inspect import info, verify
        from pipeline.order import _run_rows
        from shards.manifest import table_to_parquet_bytes
        from swav_io.storage import get_fs
        native = lambda: len(os.listdir("/proc/self/task")) - threading.active_count()
        before = native()
        info({str(shard_set)!r}); verify({str(shard_set)!r}, progress=False)
        run = {str(tmp_path / "run.parquet")!r}
        with open(run, "wb") as f:
            f.write(table_to_parquet_bytes(pa.table({{"order": [1], "rel": ["a"], "list_pos": [0], "size": [3]}})))
        assert list(_run_rows(get_fs(run)[0], run)) == [(1, "a", 0, 3)]
        print(before, native())
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    before, after = map(int, r.stdout.split())
    assert after == before, f"{after - before} native thread(s) started by reading the set"


def test_verify_catches_a_damaged_shard(shard_set, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shard_set, copy)
    victim = sorted((copy / "shards").glob("*.tar"))[1]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = swav_cli("shards", "verify", str(copy), "--no-progress")
    assert r.returncode == 1
    assert victim.name in r.stderr and "sha256" in r.stderr


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "build.json" and "parts" not in p.parts}


def test_kill_9_mid_build_then_rerun_is_byte_identical(bucket, tmp_path):
    src = str(bucket[0])
    clean = tmp_path / "clean"
    build(src, str(clean), BuildConfig(samples_per_shard=2, workers=1), progress=False)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "swav.cli", "shards", "build", src, str(killed), "--samples-per-shard", "2",
           "--workers", "1", "--io-threads", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / "manifest").glob("*.parquet"))) < 3:
        time.sleep(0.02)
    kill_group(proc)
    assert not (killed / "build.json").exists(), "a killed build must not look finished"
    committed = len(list((killed / "manifest").glob("*.parquet")))
    assert committed >= 3
    r = swav_cli("shards", "build", src, str(killed), "--samples-per-shard", "2", "--workers", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "resumed shards" in r.stdout
    assert _tree_bytes(killed) == _tree_bytes(clean)


@pytest.mark.slow
def test_parts_merged_equal_the_single_build(bucket, shard_set, tmp_path):
    src = str(bucket[0])
    dst = tmp_path / "parts"
    for part in range(3):
        r = swav_cli("shards", "build", src, str(dst), "--part", f"{part}/3", "--samples-per-shard", "4",
                     "--workers", "1", "--no-progress")
        assert r.returncode == 0, r.stderr
    assert not (dst / "build.json").exists()
    r = swav_cli("shards", "build", src, str(dst), "--merge", "3")
    assert r.returncode == 0, r.stderr

    def content(root):
        return sorted(json.loads(s["json"])["sha256"] for s in samples(root).values())

    assert content(dst) == content(shard_set)
    a = json.loads((dst / "build.json").read_text())["counts"]
    b = json.loads((shard_set / "build.json").read_text())["counts"]
    assert a == b
    assert verify(str(dst), progress=False).ok


def test_merge_refuses_missing_parts(bucket, tmp_path):
    dst = tmp_path / "half"
    build_part(str(bucket[0]), str(dst), BuildConfig(part=0, num_parts=2, workers=1), progress=False)
    r = swav_cli("shards", "build", str(bucket[0]), str(dst), "--merge", "2")
    assert r.returncode == 2 and "part(s) 1 of 2 not finished" in r.stderr


def test_user_mistakes_are_one_line_errors(tmp_path, s3):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, words in ((["shards", "build", str(empty), str(tmp_path / "o")], "holds no objects"),
                        (["shards", "build", str(tmp_path / "nope"), str(tmp_path / "o")], "source not found"),
                        (["shards", "build", "s3://no-such-bucket-here/x", str(tmp_path / "o"), "--endpoint-url",
                          s3[1]["client_kwargs"]["endpoint_url"]], "not found"),
                        (["shards", "build", str(empty), str(tmp_path / "o"), "--part", "3/2"], "not a valid part"),
                        (["shards", "info", str(tmp_path)], "no shard set")):
        r = swav_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert words in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_s3_bucket_to_s3_shard_set(bucket, s3):
    fs, opts, name = s3
    root, expected = bucket
    fs.put(str(root) + "/", f"{name}/raw/", recursive=True)
    endpoint = opts["client_kwargs"]["endpoint_url"]
    r = swav_cli("shards", "build", f"s3://{name}/raw", f"s3://{name}/shards", "--endpoint-url", endpoint,
                 "--samples-per-shard", "8", "--workers", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    rec = json.loads(fs.cat_file(f"{name}/shards/build.json"))
    assert rec["counts"]["inputs"] == len(expected)
    assert rec["counts"]["accepted"] == sum(1 for v in expected.values() if v is None)
    v = swav_cli("shards", "verify", f"s3://{name}/shards", "--endpoint-url", endpoint, "--no-progress")
    assert v.returncode == 0, v.stderr


def test_tar_member_names_are_checked_on_write_and_read(tmp_path):
    with pytest.raises(UnsafeMember):
        write_tar([{"__key__": "../evil", "jpg": b"x", "json": b"{}"}])
    for bad in ("../evil.jpg", "/abs.jpg", "a/b.jpg", "ok.exe"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            info = tarfile.TarInfo(bad)
            info.size = 1
            t.addfile(info, io.BytesIO(b"x"))
        buf.seek(0)
        with pytest.raises(UnsafeMember):
            list(iter_samples(buf))


def test_a_decoder_crash_is_a_rejection_not_a_crash(tmp_path):
    from pipeline.normalise import NormaliseConfig, normalise

    # A valid header whose image data is garbage: the decoder raises deep inside.
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(png, format="PNG")
    data = bytearray(png.getvalue())
    idat = data.find(b"IDAT")
    data[idat + 4: idat + 20] = b"\x00" * 16
    out = normalise(bytes(data), NormaliseConfig())
    assert out["status"] == "rejected" and out["reason"] in ("corrupt", "truncated")


def test_merge_is_idempotent(shard_set):
    first = json.loads((shard_set / "build.json").read_text())
    again = merge(str(shard_set), 1)
    assert {k: v for k, v in first.items() if k != "created"} == {k: v for k, v in again.items() if k != "created"}
