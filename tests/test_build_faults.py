"""Faults lose nothing: a killed decoder, a poison object, a storage outage.

A fault is not a property of an object, so it never becomes a rejection: the build either recovers
(a decoder process is replaced and the objects it held are decoded again) or stops with a one-line
error and keeps every committed shard, and the rerun publishes what a clean build publishes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from helpers import REPO, fault_env, flat_jpeg, swav_cli

from pipeline.build import BuildConfig, build


def tree(root: Path) -> dict[str, bytes]:
    """Published bytes of a shard set: tars, manifests and index (build.json has a timestamp)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and (p.suffix == ".tar" or p.parent.name == "manifest" or p.name == "index.parquet")}


def reasons(root: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in (root / "manifest").glob("*.parquet"):
        for r in pq.read_table(m).column("reason").to_pylist():
            if r is not None:
                out[r] = out.get(r, 0) + 1
    return out


def jpegs(folder: Path, n: int, side: int = 48) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"img-{i:04d}.jpg").write_bytes(flat_jpeg(i, side))


def test_a_sigkilled_decoder_loses_no_object(bucket, shard_set, tmp_path):
    killed: list[int] = []
    done = threading.Event()

    def kill_one_decoder() -> None:
        # Decoders are the forkserver's children, i.e. this process's grandchildren.
        me = psutil.Process()
        while not done.is_set() and not killed:
            for p in me.children(recursive=True):
                try:
                    if p.ppid() != me.pid:
                        os.kill(p.pid, signal.SIGKILL)
                        killed.append(p.pid)
                        break
                except (psutil.Error, ProcessLookupError):
                    pass
            time.sleep(0.002)

    killer = threading.Thread(target=kill_one_decoder)
    killer.start()
    dst = tmp_path / "set"
    try:
        result = build(str(bucket[0]), str(dst), BuildConfig(samples_per_shard=4, workers=2), progress=False)
    finally:
        done.set()
        killer.join()
    assert killed, "no decoder process was running to be killed"
    # No decoder outlives the build (a broken pool's idle workers would hold up the exit of this process).
    me = psutil.Process()
    deadline = time.time() + 10
    while [p for p in me.children(recursive=True) if p.ppid() != me.pid] and time.time() < deadline:
        time.sleep(0.1)
    assert not [p for p in me.children(recursive=True) if p.ppid() != me.pid]
    assert "decoder_crash" not in result.reasons
    # The same bytes as the clean single-worker build of the same bucket: nothing lost, nothing blamed.
    assert tree(dst) == tree(shard_set)


def test_an_object_that_kills_its_decoder_twice_is_rejected_by_name(tmp_path):
    src = tmp_path / "src"
    jpegs(src, 10)
    (src / "poison.jpg").write_bytes(b"POISON" + b"\xff" * 100)
    dst = tmp_path / "set"
    r = swav_cli("shards", "build", str(src), str(dst), "--workers", "2", env=fault_env(SWAV_FAULT_KILL_DECODER="POISON"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert reasons(dst) == {"decoder_crash": 1}
    assert json.loads((dst / "build.json").read_text())["counts"]["accepted"] == 10


def _serve(port: int = 0):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, server.get_host_and_port()[1]


@pytest.mark.slow
def test_a_storage_outage_mid_build_stops_it_and_the_rerun_equals_a_clean_build(tmp_path):
    import s3fs

    server, port = _serve()
    endpoint = f"http://127.0.0.1:{port}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.mkdir("outage")
    jpegs(tmp_path / "src", 160)
    fs.put(str(tmp_path / "src") + "/", "outage/raw/", recursive=True)
    src = "s3://outage/raw"
    flags = ["--endpoint-url", endpoint, "--workers", "1", "--samples-per-shard", "4",
             "--storage-option", "config_kwargs={\"retries\": {\"max_attempts\": 1}}"]
    clean = tmp_path / "clean"
    assert swav_cli("shards", "build", src, str(clean), *flags).returncode == 0

    dst = tmp_path / "set"
    cmd = [sys.executable, "-m", "swav.cli", "shards", "build", src, str(dst), *flags, "--io-threads", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((dst / "manifest").glob("*.parquet")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    server.stop()                      # the outage: every read from now on fails
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, "the build went on without its source"
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "rerun the same command to continue" in lines[0], err[-2000:]
    assert not (dst / "build.json").exists(), "an incomplete set was published"
    committed = list((dst / "manifest").glob("*.parquet"))
    assert committed and "read_error" not in reasons(dst)

    server, _ = _serve(port)           # the store is back, with the same objects
    try:
        r = swav_cli("shards", "build", src, str(dst), *flags)
        assert r.returncode == 0, r.stderr[-2000:]
    finally:
        server.stop()
    assert tree(dst) == tree(clean)
    assert not {"read_error", "missing"} & set(reasons(dst))


def test_a_script_without_a_main_guard_gets_a_clear_error_and_loses_nothing(tmp_path):
    # Decoders start through forkserver, which imports the calling script again in each new process: an
    # unguarded build() there dies during that process's bootstrap. It used to cost every object a
    # decoder_crash rejection; no object is at fault, so the build must stop and say what to change.
    src = tmp_path / "src"
    jpegs(src, 12)
    dst = tmp_path / "set"
    call = (f"r = build({str(src)!r}, {str(dst)!r}, BuildConfig(samples_per_shard=4, workers=2), progress=False)\n"
            f"print('accepted', r.accepted, r.reasons)\n")
    head = "from pipeline.build import BuildConfig, build\n"
    script = tmp_path / "make_shards.py"
    script.write_text(head + call)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode != 0
    assert "UserError: decoder processes cannot start" in r.stderr, r.stderr[-3000:]
    assert 'put the call under `if __name__ == "__main__":`' in r.stderr
    assert reasons(dst) == {} and not list(dst.rglob("*.tar"))

    # With the guard, the same destination completes and equals a clean build of the same bucket.
    script.write_text(head + 'if __name__ == "__main__":\n' + "".join("    " + line for line in call.splitlines(True)))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "accepted 12 {}" in r.stdout
    clean = tmp_path / "clean"
    build(str(src), str(clean), BuildConfig(samples_per_shard=4, workers=2), progress=False)
    assert tree(dst) == tree(clean) and tree(dst)
