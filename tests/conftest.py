"""Shared fixtures: a real uncurated bucket, a shard set built from it, an S3 server on loopback.

Helpers that tests import (subprocess runners, JPEG factories, synthetic sets) live in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Fake credentials for the loopback S3 server; real ones must never be needed by a test.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing-key-id")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing-secret-value")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

@pytest.fixture(scope="session")
def bucket(tmp_path_factory) -> tuple[Path, dict]:
    """Odd cases plus 24 photos at realistic sizes; returns (root, {relative path: expected reason})."""
    from swav.demo_bucket import odd_cases, photo_bucket

    root = tmp_path_factory.mktemp("bucket")
    expected = odd_cases(root)
    for p in photo_bucket(root / "photos", 24, seed=1, min_side=300, max_side=1200):
        expected[str(p.relative_to(root))] = None
    return root, expected


@pytest.fixture(scope="session")
def shard_set(bucket, tmp_path_factory) -> Path:
    from pipeline.build import BuildConfig, build

    dst = tmp_path_factory.mktemp("shards") / "set"
    build(str(bucket[0]), str(dst), BuildConfig(samples_per_shard=4, workers=1), progress=False)
    return dst


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint (moto) on 127.0.0.1; yields its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server):
    """(s3fs filesystem, storage options, fresh bucket name)."""
    import uuid

    import s3fs

    opts = {"client_kwargs": {"endpoint_url": s3_server}}
    fs = s3fs.S3FileSystem(**opts)
    name = f"b-{uuid.uuid4().hex[:10]}"
    fs.mkdir(name)
    fs.invalidate_cache()
    return fs, opts, name


# `make test` runs two files at a time (pytest-xdist, --dist loadfile, in this order). The longest files go
# first, so that the two workers finish together instead of one running the demo test alone at the end.
LONGEST_FIRST = ("test_demo_learning.py", "test_pretrain.py", "test_zero.py", "test_install.py")


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))

