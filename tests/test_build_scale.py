"""Builds at scale: snapshot resume, incremental additions, ready listings, bounded listing memory,
parallel builders in one destination (part layouts, temporaries, duplicated pods, settings), and
sources a build may not read.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import REPO, moto_auth, swav_cli
from test_build_faults import jpegs, tree

from pipeline.listing import walk
from pipeline.order import order_key

FLAGS = ["--workers", "1", "--samples-per-shard", "4", "--no-progress"]


def manifest_urls(root: Path) -> list[str]:
    return [u for m in sorted((root / "manifest").glob("*.parquet")) for u in pq.read_table(m)["url"].to_pylist()]


@pytest.fixture
def src(tmp_path) -> Path:
    jpegs(tmp_path / "src", 60)
    return tmp_path / "src"


@pytest.fixture
def clean(src, tmp_path) -> Path:
    out = tmp_path / "clean"
    r = swav_cli("shards", "build", str(src), str(out), *FLAGS)
    assert r.returncode == 0, r.stderr
    return out


def _kill_after(cmd: list[str], dst: Path, manifests: int) -> None:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((dst / "manifest").glob("*.parquet"))) < manifests:
        time.sleep(0.01)
    os.killpg(proc.pid, 9)
    proc.wait()


@pytest.mark.slow
def test_resume_uses_the_snapshot_and_incremental_adds_exactly_the_new_objects(src, clean, tmp_path):
    dst = tmp_path / "set"
    cmd = [sys.executable, "-m", "swav.cli", "shards", "build", str(src), str(dst), *FLAGS, "--io-threads", "1"]
    _kill_after(cmd, dst, 3)
    assert not (dst / "build.json").exists()
    done = manifest_urls(dst)
    assert 0 < len(done) < 60
    # Ten new objects (new content), one of them ahead of the resume point in pack order.
    last_key = max(order_key(0, u.rsplit("/", 1)[1]) for u in done)
    jpegs(tmp_path / "new", 200)
    names = [f"new-{i:03d}.jpg" for i in range(100, 200)]
    early = [n for n in names if order_key(0, n) < last_key][:1]
    added = early + [n for n in names if order_key(0, n) > last_key][:9]
    assert len(added) == 10
    for n in added:
        shutil.copy(tmp_path / "new" / f"img-{int(n[4:7]):04d}.jpg", src / n)

    r = swav_cli("shards", "build", str(src), str(dst), *FLAGS)
    assert r.returncode == 0, r.stderr
    assert tree(dst) == tree(clean), "the resumed build skipped or ingested an object"
    before = tree(dst)

    r = swav_cli("shards", "build", str(src), str(dst), *FLAGS, "--incremental")
    assert r.returncode == 0, r.stderr
    assert "addition 1: 10 new object(s)" in r.stdout, r.stdout
    after = tree(dst)
    assert all(after[k] == v for k, v in before.items() if k != "index.parquet"), "an existing shard changed"
    new_urls = sorted(set(manifest_urls(dst)) - set(manifest_urls(clean)))
    assert [u.rsplit("/", 1)[1] for u in new_urls] == sorted(added)
    rec = json.loads((dst / "build.json").read_text())
    assert rec["counts"]["inputs"] == 70 and rec["generations"] == 2
    assert swav_cli("shards", "verify", str(dst), "--no-progress").returncode == 0
    again = swav_cli("shards", "build", str(src), str(dst), *FLAGS, "--incremental")
    assert again.returncode == 0 and "addition 2: 0 new object(s)" in again.stdout, again.stdout + again.stderr
    assert tree(dst) == after


@pytest.mark.slow
def test_from_list_builds_the_same_set_as_a_listing(src, clean, tmp_path):
    names = sorted(p.name for p in src.iterdir())
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [f"{src}/{n}" for n in reversed(names)] + ["/elsewhere/x.jpg"]}), urls)
    keys = tmp_path / "keys.csv"
    keys.write_text("key,size\n" + "".join(f"{n},{(src / n).stat().st_size}\n" for n in names))
    for listing, name in ((urls, "from-urls"), (keys, "from-keys")):
        out = tmp_path / name
        r = swav_cli("shards", "build", str(src), str(out), *FLAGS, "--from-list", str(listing))
        assert r.returncode == 0, r.stderr
        assert {k: v for k, v in tree(out).items() if k.endswith((".tar", ".parquet")) and "manifest" not in k} == \
               {k: v for k, v in tree(clean).items() if k.endswith((".tar", ".parquet")) and "manifest" not in k}
        assert sorted(manifest_urls(out)) == sorted(manifest_urls(clean))
    assert "1 listed object(s) are not under" in swav_cli(
        "shards", "build", str(src), str(tmp_path / "again"), *FLAGS, "--from-list", str(urls)).stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("name,bytes\nx.jpg,3\n")
    r = swav_cli("shards", "build", str(src), str(tmp_path / "bad"), *FLAGS, "--from-list", str(bad))
    assert r.returncode == 2 and "none of the columns url, key" in r.stderr and "Traceback" not in r.stderr


def test_a_flat_prefix_of_200k_objects_lists_in_bounded_memory(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(200_000):
        fd = os.open(flat / f"{i:07d}-object-with-a-realistic-name.jpg", os.O_CREAT | os.O_WRONLY)
        os.close(fd)
    import fsspec

    fs = fsspec.filesystem("file")
    gc.collect()
    me = psutil.Process()
    base = me.memory_info().rss
    peak, n = base, 0
    for _ in walk(fs, str(flat), str(flat)):
        n += 1
        if n % 5000 == 0:
            peak = max(peak, me.memory_info().rss)
    assert n == 200_000
    # Measured here: fsspec's ls(detail=True) of this folder grows RSS by 138 MiB; the streamed walk by 0.0 MiB.
    assert peak - base < 20 * 2**20, f"listing grew RSS by {(peak - base) / 2**20:.0f} MiB"


def test_s3_listing_is_paged_and_uncached(s3):
    fs, opts, name = s3
    fs.pipe({f"{name}/flat/{i:05d}.jpg": b"x" for i in range(1100)})   # more than one page of 1,000 keys
    fs.invalidate_cache()
    found = [o.rel for o in walk(fs, f"{name}/flat", f"s3://{name}/flat")]
    assert found == [f"{i:05d}.jpg" for i in range(1100)]
    assert not fs.dircache, "the listing went through the listings cache"


def test_part_layouts_do_not_mix_and_parts_clean_only_their_own_temporaries(src, tmp_path):
    dst = tmp_path / "parts"
    r = swav_cli("shards", "build", str(src), str(dst), *FLAGS, "--part", "0/2")
    assert r.returncode == 0, r.stderr
    assert all("-of-00002-" in p.name for p in (dst / "shards").iterdir())
    r = swav_cli("shards", "build", str(src), str(dst), *FLAGS, "--part", "0/3")
    assert r.returncode == 2 and "holds a 2-part build" in r.stderr and "--part I/2" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # Part 1's file in flight must survive part 0's (re)start; part 1 removes its own stale one.
    theirs = dst / "shards" / "p00001-of-00002-000000.tar.tmp-1-abcdef12"
    theirs.write_bytes(b"in flight")
    mine = dst / "shards" / "p00000-of-00002-000099.tar.tmp-1-abcdef12"
    mine.write_bytes(b"stale")
    shutil.rmtree(dst / "parts")  # part 0 starts over (its shards are kept and resumed from)
    assert swav_cli("shards", "build", str(src), str(dst), *FLAGS, "--part", "0/2").returncode == 0
    assert theirs.exists() and not mine.exists()
    assert swav_cli("shards", "build", str(src), str(dst), *FLAGS, "--part", "1/2").returncode == 0
    assert not theirs.exists()


def test_merge_names_a_part_built_with_other_settings(src, tmp_path):
    dst = tmp_path / "parts"
    assert swav_cli("shards", "build", str(src), str(dst), *FLAGS, "--part", "0/2").returncode == 0
    assert swav_cli("shards", "build", str(src), str(dst), *FLAGS, "--part", "1/2", "--seed", "7").returncode == 0
    r = swav_cli("shards", "build", str(src), str(dst), "--merge", "2")
    assert r.returncode == 2 and "part 1/2 was built with other settings" in r.stderr and "seed" in r.stderr, r.stderr
    assert not (dst / "build.json").exists()


def test_two_copies_of_one_part_publish_what_one_copy_does(src, clean, tmp_path):
    dst = tmp_path / "twice"
    cmd = [sys.executable, "-m", "swav.cli", "shards", "build", str(src), str(dst), *FLAGS]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    assert tree(dst) == tree(clean)
    assert not list(dst.rglob("*.tmp-*"))


def test_wrong_credentials_stop_with_a_named_error_and_publish_nothing(s3, tmp_path):
    fs, opts, name = s3
    jpegs(tmp_path / "src", 8)
    fs.put(str(tmp_path / "src") + "/", f"{name}/raw/", recursive=True)
    endpoint = opts["client_kwargs"]["endpoint_url"]


    dst = tmp_path / "out"
    moto_auth(endpoint, True)
    try:
        r = swav_cli("shards", "build", f"s3://{name}/raw", str(dst), "--endpoint-url", endpoint, *FLAGS,
                     env={"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG0", "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    finally:
        moto_auth(endpoint, False)
    assert r.returncode == 2, r.stderr[-1500:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: access denied to s3://"), r.stderr[-1500:]
    assert "not-the-secret" not in r.stderr
    assert not dst.exists() or not list(dst.rglob("*.tar")) and not (dst / "build.json").exists()
