"""The epochless shard stream and the multi-crop loader: exact resume, re-sizing, bad shards, S3, memory."""

from __future__ import annotations

import http.client
import http.server
import json
import threading
from pathlib import Path

import pytest
import torch
from helpers import moto_auth, noise_jpeg, synthetic_set

from shards import layout
from shards.index import load_index
from shards.manifest import INDEX_SCHEMA
from shards.stream import ShardStream, StorageAccessError, resume_plan
from swav.config import load_config
from swav.data import build_loader


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return synthetic_set(tmp_path_factory.mktemp("stream") / "set", shards=7, per_shard=5)


def keys(stream, n: int) -> list[str]:
    return [next(stream)["__key__"] for _ in range(n)]


def test_one_pass_reads_every_sample_once_whatever_the_consumer_count(small_set):
    everything = sorted(f"s{s:04d}-{i:05d}" for s in range(7) for i in range(5))
    idx = load_index(str(small_set))
    for consumers in (1, 2, 3):
        seen = []
        for c in range(consumers):
            s = ShardStream(idx, 3, c, consumers)  # the default window: 16 shards open, over 3 passes
            seen += [x["__key__"] for x in (next(s) for _ in range(400)) if x["__pass__"] == 0]
        assert sorted(seen) == everything, f"{consumers} consumer(s)"


def test_order_depends_on_seed_not_on_consumers(small_set):
    idx = load_index(str(small_set))
    a, b = ShardStream(idx, 1, 0, 1), ShardStream(idx, 2, 0, 1)
    assert keys(a, 35) != keys(b, 35)
    # A pass's order is global: consumer c of C owns every C-th position; the same piece sequence overall.
    one, two = ShardStream(idx, 1, 0, 1), ShardStream(idx, 1, 0, 2)
    assert one.layout == two.layout
    seq = [one.passes.piece_at(0, one.layout, g)[0] for g in range(7)]
    assert seq == [two.passes.piece_at(0, two.layout, g)[0] for g in range(7)]
    assert sorted(seq) == list(range(7)), "within a pass every shard is read once"


def test_state_is_small_and_restores_the_exact_sequence(small_set):
    idx = load_index(str(small_set))
    s = ShardStream(idx, 9, 1, 2)
    keys(s, 13)
    state = json.loads(json.dumps(s.state_dict()))  # plain data
    expected = keys(s, 40)
    r = ShardStream(idx, 9, 1, 2)
    r.load_state_dict(state)
    assert keys(r, 40) == expected
    keys(s, 500)
    assert len(json.dumps(s.state_dict())) < 600, "state must not grow with the number of samples read"


def test_resize_continues_the_global_order_without_loss_or_repeats(small_set):
    idx = load_index(str(small_set))
    old = [ShardStream(idx, 4, c, 2) for c in range(2)]
    read = [next(old[0]) for _ in range(6)] + [next(old[1]) for _ in range(9)]
    plan = resume_plan([s.state_dict() for s in old])
    new = [ShardStream(idx, 4, c, 3, plan=plan) for c in range(3)]
    after = [next(s) for s in new for _ in range(200)]  # the default window spans several passes
    for p in (0, 1):
        got = [x["__key__"] for x in read + after if x["__pass__"] == p]
        everything = [f"s{s:04d}-{i:05d}" for s in range(7) for i in range(5)]
        assert sorted(got) == everything, f"pass {p}: every sample exactly once across the re-size"


def loader_batches(url: str, workers: int, rank: int, world: int, n: int, state=None, cfg_over=()):
    cfg = load_config(None, [f"data.url={url}", f"data.num_workers={workers}", "train.batch_size=3",
                             "crops.size_crops=[32,16]", "crops.num_crops=[2,2]", *cfg_over])
    ld = build_loader(cfg, rank, world)
    if state is not None:
        ld.load_state_dict(state)
    it = iter(ld)
    out = [next(it) for _ in range(n)]
    return out, ld.state_dict()


@pytest.mark.parametrize("workers,world,window", [(0, 1, 2), (2, 1, 2), (0, 2, 2), (2, 2, 2), (2, 2, 16), (0, 1, 16)])
def test_loader_state_round_trip_gives_identical_batches(small_set, workers, world, window):
    rank = world - 1
    over = [f"data.shuffle_window={window}"]
    full, _ = loader_batches(str(small_set), workers, rank, world, 9, cfg_over=over)
    first, state = loader_batches(str(small_set), workers, rank, world, 4, cfg_over=over)
    rest, _ = loader_batches(str(small_set), workers, rank, world, 5, state=state, cfg_over=over)
    for a, b in zip(full, first + rest):
        assert a.keys == b.keys
        for x, y in zip(a.images, b.images):
            assert torch.equal(x, y)


def test_a_truncated_shard_is_skipped_and_counted(tmp_path, caplog):
    root = synthetic_set(tmp_path / "set", shards=4, per_shard=6)
    victim = root / layout.shard_name(0, 1, 2)
    victim.write_bytes(victim.read_bytes()[:3000])
    idx = load_index(str(root))
    s = ShardStream(idx, 0, 0, 1)
    got = keys(s, 24)
    assert s.stats.shards_skipped >= 1
    assert any("skipping the rest of shard" in r.message for r in caplog.records)
    assert {k.split("-")[0] for k in got} >= {"s0000", "s0001", "s0003"}


def test_shards_that_fail_one_after_another_stop_the_stream_with_a_named_error(tmp_path):
    root = synthetic_set(tmp_path / "set", shards=40, per_shard=3)
    for tar in (root / "shards").glob("*.tar"):
        tar.write_bytes(b"not a tar" * 100)
    s = ShardStream(load_index(str(root)), 0, 0, 1)
    with pytest.raises(StorageAccessError, match="8 shards in a row could not be read"):
        next(s)
    assert s.stats.shards_skipped == 8, "it stopped instead of walking all 40 shards"


def test_access_denied_mid_stream_is_a_named_error_within_seconds(tmp_path, s3):
    import time

    fs, opts, name = s3
    root = synthetic_set(tmp_path / "set", shards=30, per_shard=2)
    fs.put(str(root) + "/", f"{name}/set/", recursive=True)
    endpoint = opts["client_kwargs"]["endpoint_url"]
    s = ShardStream(load_index(f"s3://{name}/set", opts), 0, 0, 1, window=2, storage_options=opts)
    assert len(keys(s, 4)) == 4


    moto_auth(endpoint, True)   # the test credentials are now unknown to the store: every request is refused
    try:
        t0 = time.perf_counter()
        with pytest.raises(StorageAccessError, match="access denied|credentials"):
            keys(s, 60)
        assert time.perf_counter() - t0 < 10
    finally:
        moto_auth(endpoint, False)
    assert s.stats.shards_skipped == 0, "a refused read is not a bad shard"


class _FlakyProxy(http.server.BaseHTTPRequestHandler):
    """Loopback proxy to the S3 server that breaks the first GET of each object mid-body."""

    upstream: str = ""
    broken: set = set()
    lock = threading.Lock()

    def log_message(self, *a):  # quiet
        pass

    def _forward(self):
        host, port = self.upstream.split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        conn.request(self.command, self.path, body=body, headers={k: v for k, v in self.headers.items()})
        resp = conn.getresponse()
        data = resp.read()
        first = False
        if self.command == "GET" and self.path.split("?")[0].endswith(".tar") and resp.status in (200, 206):
            with self.lock:
                first = self.path not in self.broken
                self.broken.add(self.path)
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection"):
                self.send_header(k, v)
        self.end_headers()
        if first:  # a connection reset after half the body
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


def test_s3_stream_survives_connection_resets(tmp_path, s3):
    fs, opts, name = s3
    root = synthetic_set(tmp_path / "set", shards=3, per_shard=4)
    fs.put(str(root) + "/", f"{name}/set/", recursive=True)
    _FlakyProxy.upstream = opts["client_kwargs"]["endpoint_url"]
    _FlakyProxy.broken = set()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyProxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        popts = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{server.server_address[1]}"},
                 "default_block_size": 1 << 20, "skip_instance_cache": True}
        idx = load_index(f"s3://{name}/set", popts)
        s = ShardStream(idx, 5, 0, 1, window=2, storage_options=popts)
        got = [x["__key__"] for x in (next(s) for _ in range(60)) if x["__pass__"] == 0]
        assert sorted(got) == sorted(f"s{a:04d}-{i:05d}" for a in range(3) for i in range(4))
        assert len(_FlakyProxy.broken) == 3, "every shard's first read was broken and retried"
        assert s.stats.shards_skipped == 0
    finally:
        server.shutdown()


def test_memory_stays_flat_over_a_long_stream(tmp_path):
    import resource

    root = synthetic_set(tmp_path / "big", shards=100, per_shard=500, jpeg=noise_jpeg(0, 8))
    idx = load_index(str(root))
    s = ShardStream(idx, 1, 0, 1, window=4)
    for _ in range(5000):
        next(s)

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    before = rss()
    for _ in range(45000):
        next(s)
    growth = (rss() - before) / before
    assert growth < 0.05, f"RSS grew {growth:.1%} over 45k samples"
    assert len(json.dumps(s.state_dict())) < 600


def test_opening_a_million_shard_index_is_cheap(tmp_path):
    import time

    n = 1_000_000
    table = {"name": [f"shards/p00000-{i:07d}.tar" for i in range(n)], "samples": [1000] * n,
             "bytes": [1 << 28] * n, "sha256": ["0" * 64] * n}
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "million"
    root.mkdir()
    pq.write_table(pa.table(table, schema=INDEX_SCHEMA), root / layout.INDEX)
    (root / layout.BUILD_RECORD).write_text("{}")
    t0 = time.perf_counter()
    idx = load_index(str(root))
    s = ShardStream(idx, 0, 3, 8)
    s.passes.perm(0, s.layout)
    assert time.perf_counter() - t0 < 3.0
    assert len(idx) == n


def test_remote_shards_can_be_cached_locally_under_a_size_cap(tmp_path, s3):
    fs, opts, name = s3
    root = synthetic_set(tmp_path / "set", shards=6, per_shard=3)
    fs.put(str(root) + "/", f"{name}/set/", recursive=True)
    shard_bytes = (root / layout.shard_name(0, 1, 0)).stat().st_size
    idx = load_index(f"s3://{name}/set", opts)
    cache = tmp_path / "cache"
    s = ShardStream(idx, 2, 0, 1, window=1, storage_options=opts, cache_dir=str(cache),
                    cache_max_bytes=int(2.5 * shard_bytes))
    got = [x["__key__"] for x in (next(s) for _ in range(18))]
    assert sorted(got) == sorted(f"s{a:04d}-{i:05d}" for a in range(6) for i in range(3))
    cached = list(cache.glob("*.tar"))
    assert 1 <= len(cached) <= 2, "the cache keeps at most cache_max_bytes of shards"
    assert not list(cache.glob("*.tmp-*"))


_SHARE_AND_WAIT = """
import os, signal, sys
from shards.index import load_index, share_index
path = share_index(load_index(sys.argv[1]), sys.argv[2])
print(path, flush=True)
if sys.argv[3] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)   # as a preempted node does: no atexit, no cleanup
sys.stdin.read()                           # alive, and so using its copy, until told to go
"""


def test_shared_index_copies_left_by_killed_processes_are_removed_and_live_ones_kept(small_set, tmp_path):
    import subprocess
    import sys

    from helpers import REPO

    from shards.index import open_shared_index, release_shared, share_index

    folder = tmp_path / "tmp"

    def start(mode: str) -> tuple[subprocess.Popen, Path]:
        p = subprocess.Popen([sys.executable, "-c", _SHARE_AND_WAIT, str(small_set), str(folder), mode], cwd=REPO,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return p, Path(p.stdout.readline().strip())

    live, live_copy = start("wait")
    killed, killed_copy = start("kill")
    assert killed.wait(60) == -9
    assert killed_copy.exists() and live_copy.exists()
    mine = Path(share_index(load_index(str(small_set)), str(folder)))
    assert not killed_copy.exists(), "the killed process's copy is removed by the next process that shares one"
    assert live_copy.exists(), "a live process's copy is kept"
    assert open_shared_index(str(live_copy)).names.equals(load_index(str(small_set)).names), "and intact"
    live.stdin.close()
    assert live.wait(60) == 0
    release_shared(str(mine))
    assert not mine.exists()
    again = Path(share_index(load_index(str(small_set)), str(folder)))
    assert sorted(p.name for p in folder.iterdir()) == [again.name], "the exited process's copy went too"
    release_shared(str(again))
