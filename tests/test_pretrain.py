"""`swav pretrain` as users run it: real shards, DeepSpeed on gloo, kill -9, S3 checkpoints, resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
from helpers import REPO, fault_env, free_port, kill_group, sigterm_after_step, swav_cli, torchrun

from swav.metrics import read_metrics

pytestmark = pytest.mark.slow
STEPS = 8


def args(shard_set: Path, run: Path, *extra: str) -> list[str]:
    return ["pretrain", "jobs/tiny.yaml", f"data.url={shard_set}", f"run_dir={run}", f"train.steps={STEPS}",
            "checkpoint.every=2", "swav.queue_length=32", "swav.queue_start_step=3", *extra]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(run / "metrics.jsonl"))}


def launch(nproc: int, argv: list[str], env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "swav.cli", *argv]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})


@pytest.fixture
def own_temp() -> Iterator[tuple[Path, dict]]:
    """A temp dir of the run's own (TMPDIR), to see what a run leaves in it. Short: the loader's worker
    sockets live in it, and pytest's own folders can be too long for them (swav/data.py)."""
    folder = Path(tempfile.mkdtemp(prefix="t"))
    yield folder, {"TMPDIR": str(folder)}
    shutil.rmtree(folder, ignore_errors=True)


def ours(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("swav-*"))


def left_in(stage: Path) -> list[str]:
    """Everything a run left in its checkpoint.stage_dir."""
    return sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))


@pytest.fixture(scope="module")
def baselines(shard_set, tmp_path_factory) -> dict[int, dict[int, float]]:
    """Uninterrupted runs with 1 and 2 ranks."""
    out = {}
    for n in (1, 2):
        run = tmp_path_factory.mktemp(f"base{n}")
        r = torchrun(n, *args(shard_set, run))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        out[n] = losses(run)
        assert sorted(out[n]) == list(range(1, STEPS + 1))
    return out


@pytest.mark.parametrize("nproc", [1, 2])
def test_kill_9_mid_run_then_rerun_reproduces_the_losses_bitwise(shard_set, tmp_path, baselines, nproc, own_temp):
    run = tmp_path / "run"
    temp, env = own_temp
    proc = launch(nproc, args(shard_set, run), env)
    target = 5 + nproc % 2  # a step that is not a checkpoint step, and differs per case
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and max(losses(run), default=0) >= target:
            break
        time.sleep(0.05)
    kill_group(proc)
    assert max(losses(run)) < STEPS, "the run was killed before it finished"
    assert len([n for n in ours(temp) if n.startswith("swav-index-")]) == nproc, ours(temp)
    r = torchrun(nproc, *args(shard_set, run), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    assert losses(run) == baselines[nproc]
    assert ours(temp) == [], ("the rerun removes what the killed run left in the temp dir, and leaves nothing",
                              r.stderr[-5000:])


def test_kill_during_checkpoint_upload_resumes_from_the_last_published_one(shard_set, tmp_path, baselines,
                                                                           own_temp):
    run = tmp_path / "run"
    temp, env = own_temp
    # Fault injection: rank 0 SIGKILLs itself after its first file upload of the step-4 checkpoint.
    r = torchrun(2, *args(shard_set, run), env={**fault_env(SWAV_FAULT_KILL_UPLOAD="4:1"), **env})
    assert r.returncode != 0
    staged = [p for p in temp.glob("swav-stage-*/step-000000004/**/*") if p.is_file()]
    assert staged, f"the killed rank's staged files are left behind: {ours(temp)}"
    ckpts = run / "checkpoints"
    assert json.loads((ckpts / "latest").read_text())["tag"] == "step-000000002"
    assert (ckpts / "step-000000004").exists() and not (ckpts / "step-000000004" / "manifest.json").exists()
    r = torchrun(2, *args(shard_set, run), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr and "step-000000002" in r.stderr
    assert "removed 1 staging folder(s) a killed run left" in r.stderr
    assert losses(run) == baselines[2]
    assert ours(temp) == [], "staged and resume folders are removed once uploaded or loaded"
    kept = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-"))
    assert kept == ["step-000000006", "step-000000008"], "checkpoint.keep=2, the half-written one cleaned up"


def test_s3_checkpoints_resume_and_never_leak_credentials(shard_set, tmp_path, baselines, s3):
    fs, opts, name = s3
    proxy = _CountingProxy(opts["client_kwargs"]["endpoint_url"])   # counts the resume's reads on the wire
    secret = "s3cr3t-from-config-0123"
    store = json.dumps({"client_kwargs": {"endpoint_url": proxy.url}, "key": "AKIDFROMCONFIG", "secret": secret})
    run = tmp_path / "run"
    a = args(shard_set, run, f"checkpoint.url=s3://{name}/ckpt", f"checkpoint.storage_options={store}")
    first = torchrun(2, *a, "train.stop_after=4")
    assert first.returncode == 0, first.stderr[-3000:]
    fs.invalidate_cache()
    assert json.loads(fs.cat_file(f"{name}/ckpt/latest"))["tag"] == "step-000000004"
    proxy.gets.clear()
    second = torchrun(2, *a)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from s3://" in second.stderr
    assert losses(run) == baselines[2]
    assert resume_reads(proxy, "ckpt/step-000000004") == expected_resume_reads(2, zero_stage=0)
    fs.invalidate_cache()
    for text in (first.stdout + first.stderr, second.stdout + second.stderr):
        assert secret not in text and "AKIDFROMCONFIG" not in text
    for path in run.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    for key in fs.find(f"{name}/ckpt"):
        assert secret.encode() not in fs.cat_file(key), key


def test_resume_with_another_world_size_continues_with_a_notice(shard_set, tmp_path):
    run = tmp_path / "run"
    r = torchrun(2, *args(shard_set, run, "train.stop_after=4", "deepspeed.zero_stage=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(1, *args(shard_set, run, "deepspeed.zero_stage=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size changed (2 -> 1)" in r.stderr
    assert "consumer layout changed" in r.stderr
    assert max(losses(run)) == STEPS


def test_damaged_checkpoints_are_clear_errors_and_leave_nothing_staged(shard_set, tmp_path):
    run, stage = tmp_path / "run", tmp_path / "stage"
    staged = f"checkpoint.stage_dir={stage}"
    r = swav_cli(*args(shard_set, run, "train.stop_after=2", staged))
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = run / "checkpoints"
    model_file = ckpts / "step-000000002" / "rank00000" / "ds" / "mp_rank_00_model_states.pt"
    saved = model_file.read_bytes()
    model_file.unlink()
    r = swav_cli(*args(shard_set, run, staged))
    assert r.returncode == 2 and "damaged" in r.stderr and "mp_rank_00_model_states.pt is missing" in r.stderr
    # Present and of the right size, but not a checkpoint: found when DeepSpeed loads the downloaded copy.
    model_file.write_bytes(b"\0" * len(saved))
    r = swav_cli(*args(shard_set, run, staged))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"checkpoint {ckpts / 'step-000000002'}: cannot read mp_rank_00_model_states.pt: it is not a readable " \
           "torch checkpoint file; damaged or truncated?" in r.stderr, r.stderr[-3000:]
    assert left_in(stage) == []
    model_file.write_bytes(saved)
    (ckpts / "latest").write_text("{not json")
    r = swav_cli(*args(shard_set, run, staged))
    assert r.returncode == 2 and "is corrupted" in r.stderr and "Traceback" not in r.stderr
    r = swav_cli(*args(shard_set, run, f"resume_from={ckpts / 'step-000000002'}", staged))
    assert r.returncode == 0, r.stderr[-3000:]
    assert left_in(stage) == []


def test_a_pickle_in_the_bucket_is_refused(shard_set, tmp_path):
    import torch

    run = tmp_path / "run"
    r = swav_cli(*args(shard_set, run, "train.stop_after=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    state = run / "checkpoints" / "step-000000002" / "state-rank00000.pt"
    size = state.stat().st_size

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"x": Evil()}, state)
    # keep the manifest's size check satisfied so only the unpickling guard stands in the way
    data = state.read_bytes()
    state.write_bytes(data[:size] if len(data) >= size else data + b"\0" * (size - len(data)))
    r = swav_cli(*args(shard_set, run))
    assert r.returncode == 2 and "refusing to load" in r.stderr
    assert not (tmp_path / "pwned").exists()


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(shard_set, tmp_path):
    run = tmp_path / "run"
    stage = tmp_path / "stage"
    r = swav_cli(*args(shard_set, run, "optim.name=sgd", "optim.base_lr=1e38", "optim.warmup_steps=0",
                       "checkpoint.every=1", "swav.freeze_prototypes_steps=0", f"checkpoint.stage_dir={stage}"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert left_in(stage) == []
    assert "loss is nan at step" in r.stderr.lower()
    step = int(r.stderr.lower().split("loss is nan at step")[1].split(";")[0])
    latest = json.loads((run / "checkpoints" / "latest").read_text())
    assert latest["step"] == step - 1


def test_config_errors_name_the_key(tmp_path):
    r = swav_cli("pretrain", "jobs/tiny.yaml", "train.stepz=3")
    assert r.returncode == 2 and "unknown config key 'train.stepz'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = swav_cli("pretrain", "jobs/tiny.yaml", "train.steps=many")
    assert r.returncode == 2 and "'train.steps' expects an integer" in r.stderr
    r = swav_cli("pretrain", "jobs/tiny.yaml")
    assert r.returncode == 2 and "data.url is not set" in r.stderr


def test_sigterm_checkpoints_at_the_end_of_the_step_and_the_rerun_continues(shard_set, tmp_path, baselines):
    run = tmp_path / "run"
    # The signal goes to the trainer and its two data-loader workers alike.
    stopped = sigterm_after_step(args(shard_set, run, "checkpoint.every=100", "data.num_workers=2"), run, 3)
    out = stopped.stdout
    assert stopped.returncode == 0, out[-3000:]
    assert "checkpointing at the end of the step" in out
    latest = json.loads((run / "checkpoints" / "latest").read_text())
    assert 3 <= latest["step"] < STEPS and latest["step"] == max(losses(run))
    r = swav_cli(*args(shard_set, run, "checkpoint.every=100", "data.num_workers=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    full = tmp_path / "uninterrupted"
    r = swav_cli(*args(shard_set, full, "checkpoint.every=100", "data.num_workers=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(run) == losses(full) and sorted(losses(full)) == list(range(1, STEPS + 1))


def test_losses_read_every_few_steps_equal_the_per_step_ones(shard_set, tmp_path, baselines):
    # sync_every=3, log_every=4: the host reads the device losses at steps 3, 4, 6, 8 (and agrees on
    # preemption there) instead of every step; the training itself must not change.
    run = tmp_path / "run"
    r = swav_cli(*args(shard_set, run, "train.log_every=4", "train.sync_every=3", "checkpoint.every=100"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(run) == {s: baselines[1][s] for s in (4, 8)}


def test_resume_names_each_setting_that_changes_the_training(shard_set, tmp_path):
    run = tmp_path / "run"
    r = swav_cli(*args(shard_set, run, "train.steps=1", "checkpoint.every=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    copy = tmp_path / "copy"   # the same shards at another URL: resumable, and named
    shutil.copytree(shard_set, copy)
    r = swav_cli(*args(copy, run, "train.steps=2", "optim.base_lr=0.3", "train.log_every=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stderr.splitlines() if "differ from the checkpoint's config" in x)
    assert "train.steps: 1 -> 2" in line and "optim.base_lr: 0.6 -> 0.3" in line, line
    assert f"data.url: '{shard_set}' -> '{copy}'" in line, line
    assert "log_every" not in line and "3 setting(s)" in line, line


class _CountingProxy:
    """An HTTP proxy on 127.0.0.1 in front of the S3 server that counts object GETs by key."""

    def __init__(self, upstream: str, put_delay: float = 0.0, fail_puts: bool = False, fail_deletes: bool = False,
                 fail_put_suffix: str = ""):
        import collections
        import http.client
        import http.server
        import threading
        from urllib.parse import urlparse

        up = urlparse(upstream)
        self.put_delay, self.fail_puts = put_delay, fail_puts
        self.fail_deletes, self.fail_put_suffix = fail_deletes, fail_put_suffix
        self.gets: collections.Counter = collections.Counter()
        self.requests = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                refused = (self.command in ("PUT", "POST") and proxy.fail_puts) \
                    or (proxy.fail_deletes and (self.command == "DELETE" or "?delete" in self.path)) \
                    or (self.command == "PUT" and proxy.fail_put_suffix
                        and self.path.split("?")[0].endswith(proxy.fail_put_suffix))
                if refused:
                    self.send_response(403)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.command in ("PUT", "POST"):
                    time.sleep(proxy.put_delay)   # a slow store: every write takes this long
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                conn.request(self.command, self.path, body=body,
                             headers={k: v for k, v in self.headers.items() if k.lower() != "host"}
                             | {"Host": f"{up.hostname}:{up.port}"})
                resp = conn.getresponse()
                data = resp.read()
                proxy.requests += 1
                if self.command == "GET" and "?" not in self.path:
                    proxy.gets[self.path.split("/", 2)[-1]] += 1
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # a HEAD's length is the object's, not that of its (empty) body
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def resume_reads(proxy: "_CountingProxy", tag: str) -> dict[str, int]:
    """Object GETs under one checkpoint, by file name."""
    return {k[len(tag) + 1:]: n for k, n in proxy.gets.items() if k.startswith(tag + "/")}


def expected_resume_reads(world: int, zero_stage: int) -> dict[str, int]:
    """Each rank: the manifest, its state file and (ZeRO-1/2) its optimizer partition; the node: the model
    file once; rank 0: the config (to name changed settings). Nothing grows with the world per rank."""
    want = {"rank00000/ds/mp_rank_00_model_states.pt": 1, "manifest.json": world, "config.yaml": 1}
    for r in range(world):
        want[f"state-rank{r:05d}.pt"] = 1
        if zero_stage:
            want[f"rank{r:05d}/ds/zero_pp_rank_{r}_mp_rank_00_optim_states.pt"] = 1
    return want


def test_a_resume_at_4_ranks_reads_each_file_once_per_rank_or_node(shard_set, tmp_path, s3, world=4):
    """Storage requests of a resume, counted on the wire (2 ranks: the S3 test above): each rank fetches its
    own optimizer partition and state file, the node fetches the shared model file once."""
    fs, opts, name = s3
    proxy = _CountingProxy(opts["client_kwargs"]["endpoint_url"])
    store = json.dumps({"client_kwargs": {"endpoint_url": proxy.url}})
    a = ["pretrain", "jobs/tiny.yaml", f"data.url={shard_set}", f"run_dir={tmp_path / 'run'}", "train.steps=2",
         "checkpoint.every=2", "deepspeed.zero_stage=1", "data.num_workers=0", f"checkpoint.url=s3://{name}/ckpt",
         f"checkpoint.storage_options={store}"]
    first = torchrun(world, *a)
    assert first.returncode == 0, first.stderr[-3000:]
    proxy.gets.clear()
    proxy.requests = 0
    again = torchrun(world, *a)            # loads the step-2 checkpoint, then has nothing to do
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr[-3000:]
    assert resume_reads(proxy, "ckpt/step-000000002") == expected_resume_reads(world, zero_stage=1)
    print(f"resume at {world} ranks: {proxy.requests} requests, {sum(proxy.gets.values())} object GETs")


def test_the_metrics_history_follows_the_checkpoint_to_another_node(shard_set, tmp_path):
    """A requeue elsewhere: same checkpoint URL, an empty run_dir. The history up to the checkpoint
    comes back from the copy saved with it, and the run continues it."""
    ck = tmp_path / "ckpt"
    first = swav_cli(*args(shard_set, tmp_path / "a", f"checkpoint.url={ck}", "train.stop_after=4"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = swav_cli(*args(shard_set, tmp_path / "b", f"checkpoint.url={ck}"))
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == list(range(1, STEPS + 1))
    assert all(b[k] == a[k] for k in a)


def test_uploads_overlap_training_and_a_failed_periodic_save_does_not_end_the_run(shard_set, tmp_path, s3):
    """A store where every write takes 1 s: the steps after a checkpoint run while it uploads, and
    `latest` is published later. Then a store that refuses writes: periodic saves fail, are logged,
    and the run stops only after checkpoint.max_failures of them in a row."""
    fs, opts, name = s3
    slow = _CountingProxy(opts["client_kwargs"]["endpoint_url"], put_delay=1.0)
    store = json.dumps({"client_kwargs": {"endpoint_url": slow.url}})
    run = tmp_path / "run"
    r = swav_cli(*args(shard_set, run, f"checkpoint.url=s3://{name}/ckpt", f"checkpoint.storage_options={store}",
                       "checkpoint.every=4", "train.log_every=1", "data.num_workers=0"))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stderr.splitlines()
    at = {k: next(i for i, line in enumerate(lines) if k in line)
          for k in ("step 4/8", "step 5/8", "step 6/8", "step-000000004 published")}
    # steps 5 and 6 were logged while step 4's files were still uploading, and the upload took seconds
    assert at["step 4/8"] < at["step 5/8"] < at["step 6/8"] < at["step-000000004 published"], lines[-40:]
    took = float(lines[at["step-000000004 published"]].split("published (")[1].split("s")[0])
    assert took >= 3.0, took
    fs.invalidate_cache()
    assert json.loads(fs.cat_file(f"{name}/ckpt/latest"))["tag"] == "step-000000008"

    refusing = _CountingProxy(opts["client_kwargs"]["endpoint_url"], fail_puts=True)
    store = json.dumps({"client_kwargs": {"endpoint_url": refusing.url}})
    stage = tmp_path / "stage"
    r = swav_cli(*args(shard_set, tmp_path / "run2", f"checkpoint.url=s3://{name}/other",
                       f"checkpoint.storage_options={store}", "checkpoint.every=2", "checkpoint.max_failures=3",
                       "data.num_workers=0", f"checkpoint.stage_dir={stage}"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert left_in(stage) == []   # the files of three saves that were never published
    assert r.stderr.count("was not published") >= 3 and "training goes on (1 of 2" in r.stderr, r.stderr[-3000:]
    assert "3 failed save(s) in a row, stopping" in r.stderr.splitlines()[-1], r.stderr[-2000:]
    # Saves at 2 and 4 failed and training went on; 6 was the third. A failure is known at the first
    # agreement step after its upload ends (step 7, or the save at 8 that waits for it).
    assert 7 <= max(losses(tmp_path / "run2")) <= 8


def test_a_hostile_manifest_or_marker_in_the_bucket_writes_nothing_outside_staging(shard_set, tmp_path, s3):
    """Someone who can write the checkpoint bucket names a file `../../<anywhere>`: refused by name."""
    import boto3

    fs, opts, name = s3
    run, stage = tmp_path / "run", tmp_path / "stage"
    a = args(shard_set, run, f"checkpoint.url=s3://{name}/ckpt", f"checkpoint.storage_options={json.dumps(opts)}",
             "deepspeed.zero_stage=1", f"checkpoint.stage_dir={stage}")
    r = swav_cli(*a, "train.stop_after=2")
    assert r.returncode == 0, r.stderr[-3000:]
    victim = tmp_path / "victim" / "pwned.pth"
    evil = "rank00000/ds/optim_states/" + "../" * 40 + str(victim).lstrip("/")
    client = boto3.client("s3", endpoint_url=opts["client_kwargs"]["endpoint_url"], region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="x")
    prefix = "ckpt/step-000000002/"
    client.put_object(Bucket=name, Key=prefix + evil, Body=b"import os")
    assert any(k["Key"] == prefix + evil for k in client.list_objects_v2(Bucket=name, Prefix=prefix)["Contents"]), \
        "the store keeps '../' in a key literally"
    manifest = json.loads(client.get_object(Bucket=name, Key=prefix + "manifest.json")["Body"].read())
    manifest["files"][evil] = len(b"import os")
    client.put_object(Bucket=name, Key=prefix + "manifest.json", Body=json.dumps(manifest).encode())
    r = swav_cli(*a)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "refusing the file name" in r.stderr and "'..' component" in r.stderr, r.stderr[-2000:]
    assert not victim.exists() and not victim.parent.exists()
    # A `latest` marker that names a folder elsewhere is refused the same way.
    client.put_object(Bucket=name, Key="ckpt/latest", Body=json.dumps({"tag": "../../elsewhere", "step": 2}).encode())
    r = swav_cli(*a)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "refusing the file name" in r.stderr, r.stderr[-2000:]
    assert left_in(stage) == []


def test_a_bucket_that_refuses_deletes_keeps_checkpoints_and_the_run_goes_on(shard_set, tmp_path, s3):
    """Object lock or put-only credentials: pruning fails, which is a warning; every save is published."""
    fs, opts, name = s3
    proxy = _CountingProxy(opts["client_kwargs"]["endpoint_url"], fail_deletes=True)
    store = json.dumps({"client_kwargs": {"endpoint_url": proxy.url}})
    run = tmp_path / "run"
    a = args(shard_set, run, f"checkpoint.url=s3://{name}/ckpt", f"checkpoint.storage_options={store}",
             "checkpoint.keep=2", "data.num_workers=0")
    r = torchrun(2, *a)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "older checkpoints could not be deleted" in r.stderr, r.stderr[-3000:]
    fs.invalidate_cache()
    assert json.loads(fs.cat_file(f"{name}/ckpt/latest"))["tag"] == "step-000000008"
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{name}/ckpt") if "step-" in p) == \
        [f"step-00000000{s}" for s in (2, 4, 6, 8)]
    r = torchrun(2, *a, "train.steps=10")
    assert r.returncode == 0 and "resuming from s3://" in r.stderr, r.stderr[-3000:]


def test_a_publication_that_fails_on_rank_0_is_a_failed_save_on_every_rank_not_a_hang(shard_set, tmp_path, s3):
    fs, opts, name = s3
    proxy = _CountingProxy(opts["client_kwargs"]["endpoint_url"], fail_put_suffix="/manifest.json")
    store = json.dumps({"client_kwargs": {"endpoint_url": proxy.url}})
    t0 = time.monotonic()
    r = torchrun(2, *args(shard_set, tmp_path / "run", f"checkpoint.url=s3://{name}/ckpt",
                          f"checkpoint.storage_options={store}", "checkpoint.max_failures=2", "data.num_workers=0"))
    assert time.monotonic() - t0 < 300
    assert r.returncode != 0
    # Both ranks stop on the same one-line error (torchrun then reports the failed workers).
    stops = [line for line in r.stderr.splitlines() if line.startswith("error: ") and "rank 0, publishing: " in line
             and "2 failed save(s) in a row, stopping" in line]
    assert len(stops) == 2, r.stderr[-3000:]
    fs.invalidate_cache()
    assert not fs.exists(f"{name}/ckpt/latest")


def test_prune_keeps_published_checkpoints_only_counting_published_ones(tmp_path):
    from swav.checkpoint import CheckpointStore

    store = CheckpointStore(str(tmp_path / "ckpt"))
    for step, published in ((2, True), (4, True), (6, False), (8, True), (10, False)):
        store.upload_bytes(f"step-{step:09d}", "state-rank00000.pt", b"x")
        if published:
            store.publish(f"step-{step:09d}", step, 1, {"state-rank00000.pt": 1})
    # step 10 failed after step 8 was published: a save in the future of `latest`, kept for nothing
    # else to delete but never counted; step 6 failed before `latest`: never publishable, deleted.
    assert store.prune(2) == ["step-000000002", "step-000000006"]
    assert store.tags() == ["step-000000004", "step-000000008", "step-000000010"]


def test_a_run_continues_after_its_set_grew_and_names_a_set_that_lost_shards(tmp_path):
    from test_build_faults import jpegs

    bucket, shards, run = tmp_path / "bucket", tmp_path / "set", tmp_path / "run"
    jpegs(bucket / "a", 40, side=72)
    build = ("shards", "build", str(bucket), str(shards), "--no-progress", "--workers", "1", "--samples-per-shard", "8")
    assert swav_cli(*build).returncode == 0
    a = ["pretrain", "jobs/tiny.yaml", f"data.url={shards}", f"run_dir={run}", "train.steps=6", "checkpoint.every=2",
         "data.num_workers=1"]
    r = swav_cli(*a, "train.stop_after=2")
    assert r.returncode == 0, r.stderr[-3000:]
    jpegs(bucket / "b", 24, side=80)
    r = swav_cli(*build, "--incremental")
    assert r.returncode == 0 and "addition 1" in r.stdout, r.stdout + r.stderr
    r = swav_cli(*a, "train.stop_after=4")
    assert r.returncode == 0 and "resuming from" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    # A set rebuilt smaller under the run: a one-line error that says how to go on.
    shutil.rmtree(shards)
    jpegs(tmp_path / "small", 16, side=72)
    assert swav_cli("shards", "build", str(tmp_path / "small"), str(shards), "--no-progress", "--workers", "1",
                    "--samples-per-shard", "8").returncode == 0
    r = swav_cli(*a)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "no longer holds the" in r.stderr and "data.restart_pass=true" in r.stderr, r.stderr[-2000:]
    r = swav_cli(*a, "data.restart_pass=true")
    assert r.returncode == 0 and "starts a fresh pass" in r.stderr, r.stderr[-3000:]


def test_after_a_world_size_change_each_rank_keeps_its_own_queue_or_starts_empty(shard_set, tmp_path):
    """queue_length 24 at batch 8 is 8 rows per rank on 2 ranks and on 3: shapes fit, so only the rule
    decides. Ranks 0 and 1 take their own rows; rank 2 had none and starts empty (never rank 0's)."""
    over = [f"data.url={shard_set}", f"run_dir={tmp_path / 'run'}", "train.steps=4", "checkpoint.every=2",
            "swav.queue_length=24", "swav.queue_start_step=0", "data.num_workers=0"]
    r = torchrun(2, "pretrain", "jobs/tiny.yaml", *over, "train.stop_after=2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(3, "pretrain", "jobs/tiny.yaml", *over)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 2 had no queue in the checkpoint (world 2): its queue restarts empty" in r.stderr, r.stderr[-3000:]
    assert "rank 0 had no queue" not in r.stderr and "rank 1 had no queue" not in r.stderr
    assert "queue shape" not in r.stderr, "the shapes fit: nothing was dropped for a shape change"
