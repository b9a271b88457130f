"""What real buckets and real tools hand the build: names that are not UTF-8, list files that point
outside SRC, S3 Inventory CSVs, credentials inside a source URL. Each is a counted, named outcome."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import swav_cli
from test_build_faults import jpegs, reasons, tree

FLAGS = ("--no-progress", "--workers", "1", "--samples-per-shard", "4")


def manifest_rows(root: Path) -> list[dict]:
    return [r for m in sorted((root / "manifest").glob("*.parquet")) for r in pq.read_table(m).to_pylist()]


def test_a_name_that_is_not_utf8_is_a_counted_rejection_and_the_rerun_is_identical(tmp_path):
    src = tmp_path / "src"
    jpegs(src, 6)
    bad = os.fsencode(src) + b"/caf\xe9-latin1.jpg"          # a Latin-1 name, as old cameras and zips write
    with open(bad, "wb") as f:
        f.write((src / "img-0000.jpg").read_bytes()[:-2] + b"\xff\xd9")
    dst = tmp_path / "dst"
    for attempt in range(2):
        r = swav_cli("shards", "build", str(src), str(dst), *FLAGS)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        if attempt == 0:
            first = tree(dst)
    assert tree(dst) == first
    assert reasons(dst) == {"name_not_utf8": 1}
    row = next(r for r in manifest_rows(dst) if r["reason"] == "name_not_utf8")
    assert row["url"] == f"{src}/caf\\xe9-latin1.jpg"
    info = swav_cli("shards", "info", str(dst))
    assert "name_not_utf8" in info.stdout, info.stdout


def test_from_list_rows_outside_src_after_normalising_are_left_out_and_counted(tmp_path):
    src = tmp_path / "src"
    jpegs(src, 5)
    outside = tmp_path / "secret.jpg"
    outside.write_bytes((src / "img-0001.jpg").read_bytes())
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([f"{src}/img-{i:04d}.jpg" for i in range(5)] +
                                 [f"{src}/../secret.jpg", f"{src}/sub/../../secret.jpg"]) + "\n")
    dst = tmp_path / "dst"
    r = swav_cli("shards", "build", str(src), str(dst), *FLAGS, "--from-list", str(listing))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 listed object(s) are not under" in r.stderr, r.stderr[-2000:]
    urls = [row["url"] for row in manifest_rows(dst)]
    assert len(urls) == 5 and not any("secret" in u for u in urls)
    paths = tmp_path / "paths.csv"
    paths.write_text("path\n" + "\n".join([f"img-{i:04d}.jpg" for i in range(5)] + ["../secret.jpg"]) + "\n")
    r = swav_cli("shards", "build", str(src), str(tmp_path / "dst2"), *FLAGS, "--from-list", str(paths))
    assert r.returncode == 0 and "1 listed object(s) are not under" in r.stderr, r.stderr[-2000:]


def test_a_headerless_s3_inventory_csv_is_read_by_its_documented_columns(tmp_path, s3):
    """Inventory CSVs hold Bucket, Key, then whichever optional fields were configured (here
    VersionId, IsLatest, IsDeleteMarker, Size): column 3 is not the size."""
    fs, opts, name = s3
    jpegs(tmp_path / "raw", 3)
    fs.put(str(tmp_path / "raw") + "/", f"{name}/raw/", recursive=True)
    inv = tmp_path / "inventory.csv"
    inv.write_text("".join(f'"{name}","raw/img-{i:04d}.jpg","v{i}","true","false","{999 + i}"\n' for i in range(3)))
    dst = tmp_path / "dst"
    r = swav_cli("shards", "build", f"s3://{name}/raw", str(dst), *FLAGS, "--from-list", str(inv),
                 "--endpoint-url", opts["client_kwargs"]["endpoint_url"])
    assert r.returncode == 0, r.stderr[-2000:]
    rows = manifest_rows(dst)
    assert sorted(row["url"] for row in rows) == [f"s3://{name}/raw/img-{i:04d}.jpg" for i in range(3)]
    sizes = {row["url"]: row["size"] for row in rows}
    assert sizes == {f"s3://{name}/raw/img-{i:04d}.jpg": (tmp_path / "raw" / f"img-{i:04d}.jpg").stat().st_size
                     for i in range(3)}, "sizes are the objects' own, not the inventory's third column"


@pytest.fixture
def ftp_server(tmp_path):
    """A real FTP server on 127.0.0.1 whose login is user `alice`, password `pw-in-url-123`."""
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.servers import FTPServer

    home = tmp_path / "ftp"
    home.mkdir()
    auth = DummyAuthorizer()
    auth.add_user("alice", "pw-in-url-123", str(home), perm="elr")
    handler = type("Handler", (FTPHandler,), {"authorizer": auth, "passive_ports": None})
    server = FTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"timeout": 0.2, "blocking": True}, daemon=True)
    thread.start()
    yield home, server.address[1]
    server.close_all()


def test_credentials_in_a_source_url_are_never_written_or_printed(tmp_path, ftp_server):
    home, port = ftp_server
    jpegs(home / "raw", 6)
    secret = "pw-in-url-123"
    src = f"ftp://alice:{secret}@127.0.0.1:{port}/raw"
    dst = tmp_path / "dst"
    # One connection: fsspec's FTP file system is not safe to share between reader threads.
    r = swav_cli("shards", "build", src, str(dst), *FLAGS, "--io-threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert secret not in r.stdout + r.stderr
    rows = manifest_rows(dst)
    assert len(rows) == 6 and all(row["url"].startswith(f"ftp://<redacted>@127.0.0.1:{port}/raw/") for row in rows)
    for path in dst.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    r = swav_cli("shards", "build", src, str(dst), *FLAGS, "--io-threads", "1")   # the rerun compares its records, still no secret
    assert r.returncode == 0 and "already complete" in r.stdout and secret not in r.stdout + r.stderr, r.stderr
