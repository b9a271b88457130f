"""What tests share besides fixtures: running the CLI and launchers, JPEG factories, synthetic shard sets,
and the environment that turns on test-only fault injection (tests/faults)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from shards import layout
from shards.manifest import INDEX_SCHEMA, to_parquet_bytes
from shards.tario import write_tar

REPO = Path(__file__).resolve().parent.parent
FAULTS = Path(__file__).resolve().parent / "faults"


def fault_env(**faults: str) -> dict:
    """Environment for a subprocess with faults on, e.g. fault_env(SWAV_FAULT_KILL_UPLOAD="4:1")."""
    path = os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, **faults}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def swav_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swav.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=timeout)


def torchrun(nproc: int, *args: str, module: bool = True, env: dict | None = None,
             timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port())]
    cmd += ["-m", "swav.cli", *args] if module else list(args)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})},
                          timeout=timeout)


def moto_auth(endpoint: str, enforce: bool) -> None:
    """moto's credential check: on, every request needs credentials the store knows; off, none is checked."""
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth",
                                                  data=b"0" if enforce else b"inf",
                                                  headers={"Content-Type": "text/plain"}, method="POST")).read()


def sigterm_after_step(args: list[str], run: Path, step: int, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `swav ARGS` in its own process group and, once its metrics.jsonl has logged `step`, send SIGTERM to
    the whole group, as SLURM and Kubernetes do (the trainer and its data-loader workers alike). Returns the
    finished process with stdout and stderr merged."""
    from swav.metrics import read_metrics

    metrics = run / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "swav.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and max((r["step"] for r in read_metrics(str(metrics))), default=0) >= step:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def kill_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGKILL the process group `proc` leads and return once every member is gone: the signal lands
    asynchronously, and a process that has not yet taken it can still write or delete a file while a test
    looks at the folder. (The leader is reaped first: a zombie still counts as a member.)"""
    pgid = proc.pid
    os.killpg(pgid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process group {pgid} still has members {timeout} s after SIGKILL")


def noise_jpeg(seed: int, size: int = 40, quality: int = 70) -> bytes:
    """Random pixels: every seed a different image, which no two-sample dedup can merge."""
    rng = np.random.default_rng(seed)
    return _encode(Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)), quality)


def flat_jpeg(i: int, side: int = 48, quality: int = 90) -> bytes:
    """One flat colour per i, at side + i % 7 by side pixels: cheap to decode, distinct sizes and hashes."""
    colour = ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)
    return _encode(Image.new("RGB", (side + i % 7, side), colour), quality)


def photo_jpeg(name: str = "astronaut", size: tuple[int, int] = (400, 300), quality: int = 90) -> bytes:
    """A real photograph shipped with scikit-image, resized: what crops and colour ops should be tested on."""
    from swav.demo_bucket import packaged_photos

    return _encode(dict(packaged_photos())[name].resize(size), quality)


def _encode(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def synthetic_set(root: Path, shards: int, per_shard: int, jpeg: bytes | None = None) -> Path:
    """A published shard set written directly (the stream only needs tars, an index and a record)."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for s in range(shards):
        samples = [{"__key__": f"s{s:04d}-{i:05d}", "jpg": jpeg or noise_jpeg(s * 1000 + i),
                    "json": json.dumps({"url": f"mem://{s}/{i}"}).encode()} for i in range(per_shard)]
        data = write_tar(samples)
        name = layout.shard_name(0, 1, s)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        entries.append({"name": name, "samples": per_shard, "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    (root / layout.INDEX).write_bytes(to_parquet_bytes(entries, INDEX_SCHEMA))
    (root / layout.BUILD_RECORD).write_text(json.dumps({"counts": {}}))
    return root
