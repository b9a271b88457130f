"""Credentials never reach a log line, an error or a saved record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, free_port, moto_auth, swav_cli

from swav_io.storage import redact, redact_text

AZURE = "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=c2VjcmV0LWtleQ==;EndpointSuffix=core.windows.net"


def test_redact_covers_keys_connection_strings_and_url_credentials():
    out = redact({"key": "AKIA1", "client_kwargs": {"aws_secret_access_key": "s3cr3t", "endpoint_url": "http://h"},
                  "connection_string": AZURE, "note": f"conn {AZURE}",
                  "url": "s3://AKIA2:s3cr3t2@bucket/raw", "list": ["https://u:pw@example.invalid/x"]})
    text = repr(out)
    for secret in ("AKIA1", "s3cr3t", "c2VjcmV0LWtleQ", "AKIA2", "s3cr3t2", ":pw@"):
        assert secret not in text, secret
    assert out["client_kwargs"]["endpoint_url"] == "http://h"
    assert out["url"] == "s3://<redacted>@bucket/raw"
    assert out["note"] == ("conn DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=<redacted>;"
                           "EndpointSuffix=core.windows.net")
    assert redact_text("https://example.invalid/a?sig=abc&sv=1") == "https://example.invalid/a?sig=<redacted>&sv=1"


def test_an_error_about_a_url_with_credentials_does_not_print_them(tmp_path, s3):
    endpoint = s3[1]["client_kwargs"]["endpoint_url"]
    r = swav_cli("shards", "build", "s3://AKIAEXAMPLE:VERYSECRETVALUE@no-such-bucket-x/raw", str(tmp_path / "o"),
                 "--endpoint-url", endpoint)
    assert r.returncode == 2, r.stderr[-1500:]
    assert "VERYSECRETVALUE" not in r.stderr + r.stdout and "Traceback" not in r.stderr, r.stderr[-1500:]


@pytest.mark.slow
def test_the_deepspeed_launcher_with_a_secret_in_the_environment_leaks_it_nowhere(shard_set, s3, tmp_path):
    """The multi-node recipe the README gives: credentials in the environment (never on the command line),
    storage settings in SWAV_STORAGE_OPTIONS, launched by DeepSpeed's own runner. The store enforces
    credentials, so the secret is really used, for the data and for the checkpoints."""
    import boto3

    fs, opts, name = s3
    endpoint = opts["client_kwargs"]["endpoint_url"]
    fs.put(f"{shard_set}/", f"{name}/set/", recursive=True)
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    iam.create_user(UserName="trainer")
    iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    secret = key["SecretAccessKey"]
    run, stage = tmp_path / "run", tmp_path / "stage"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": secret,
           "SWAV_STORAGE_OPTIONS": json.dumps({"client_kwargs": {"endpoint_url": endpoint}})}
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "--no_local_rank", "--module", "swav.cli", "pretrain", "jobs/tiny.yaml", f"data.url=s3://{name}/set",
           f"checkpoint.url=s3://{name}/ckpt", f"checkpoint.stage_dir={stage}", f"run_dir={run}",
           "train.steps=2", "checkpoint.every=2"]
    moto_auth(endpoint, True)
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        moto_auth(endpoint, False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "cmd = " in out   # the runner's own launch line, the one that would carry exported variables
    assert secret not in out
    fs.invalidate_cache()
    assert json.loads(fs.cat_file(f"{name}/ckpt/latest"))["tag"] == "step-000000002"
    for key_ in fs.find(f"{name}/ckpt"):
        assert secret.encode() not in fs.cat_file(key_), key_
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "metrics.jsonl" for p in written)
    for p in written:
        assert secret.encode() not in p.read_bytes(), p
