"""Small faults with large consequences: shared staging folders, partial cache downloads, a cache trim
racing a reader, and uploads to a local or NFS checkpoint URL that read whole files into memory."""

from __future__ import annotations

import os
import tracemalloc

import fsspec
from helpers import synthetic_set

from shards.index import load_index
from shards.stream import ShardStream, _trim_cache
from swav import staging
from swav_io.storage import upload_file


def test_two_nodes_sharing_a_stage_dir_get_folders_of_their_own(tmp_path):
    url = "s3://bucket/run/checkpoints"
    a = staging.stage_root(url, str(tmp_path), node="node-a")
    b = staging.stage_root(url, str(tmp_path), node="node-b")
    assert a != b and os.path.dirname(a) == os.path.dirname(b) == str(tmp_path)
    assert staging.stage_root(url, str(tmp_path), node="node-a") == a, "a rerun on the node finds its folder"
    assert staging.stage_root(url, str(tmp_path)) == staging.stage_root(url, str(tmp_path), node=os.uname().nodename)
    os.makedirs(os.path.join(b, "resume-step-000000002"))
    assert staging.sweep(a) == [] and os.path.isdir(os.path.join(b, "resume-step-000000002")), \
        "one node's sweep leaves the other's files alone"


def test_partial_cache_downloads_of_dead_processes_are_removed_and_counted(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "aaa.tar").write_bytes(b"x" * 100)
    dead = cache / "bbb.tar.tmp-999999999"          # no such pid: a killed worker's partial download
    dead.write_bytes(b"y" * 500)
    alive = cache / f"ccc.tar.tmp-{os.getpid()}"     # a download in progress: counted, never removed
    alive.write_bytes(b"z" * 80)
    _trim_cache(str(cache), 150)
    assert not dead.exists() and alive.exists()
    assert not (cache / "aaa.tar").exists(), "80 bytes in flight + 100 cached exceed the 150-byte cap"


def test_a_cache_trim_between_download_and_read_does_not_skip_the_shard(tmp_path, s3):
    fs, opts, name = s3
    root = synthetic_set(tmp_path / "set", shards=3, per_shard=4)
    fs.put(str(root) + "/", f"{name}/set/", recursive=True)
    idx = load_index(f"s3://{name}/set", opts)
    # A cap smaller than one shard: every download is trimmed the moment it lands.
    s = ShardStream(idx, 1, 0, 1, window=1, storage_options=opts, cache_dir=str(tmp_path / "cache"),
                    cache_max_bytes=1)
    got = [next(s)["__key__"] for _ in range(12)]
    assert sorted(got) == sorted(f"s{i:04d}-{j:05d}" for i in range(3) for j in range(4))
    assert s.stats.shards_skipped == 0
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]


def test_a_failed_cache_download_leaves_no_partial_file(tmp_path, s3):
    fs, opts, name = s3
    root = synthetic_set(tmp_path / "set", shards=2, per_shard=3)
    fs.put(str(root) + "/", f"{name}/set/", recursive=True)
    idx = load_index(f"s3://{name}/set", opts)
    fs.rm(f"{name}/set/{idx.name(0)}")
    s = ShardStream(idx, 1, 0, 1, window=2, storage_options=opts, cache_dir=str(tmp_path / "cache"))
    got = [next(s)["__key__"] for _ in range(3)]
    assert all(k.startswith("s0001") for k in got) and s.stats.shards_skipped >= 1
    assert [p.name for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name] == []


def test_a_local_checkpoint_upload_streams_instead_of_reading_the_file_whole(tmp_path):
    big = tmp_path / "model_states.pt"
    with open(big, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1024 * 1024))
    fs = fsspec.filesystem("file")
    dest = tmp_path / "store" / "step-1" / "model_states.pt"
    tracemalloc.start()
    upload_file(fs, str(big), str(dest))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert dest.read_bytes() == big.read_bytes()
    assert peak < 20 * 1024 * 1024, f"{peak / 2**20:.0f} MiB held for a 64 MiB file"
    assert [p.name for p in dest.parent.iterdir()] == ["model_states.pt"], "no temporary left behind"
