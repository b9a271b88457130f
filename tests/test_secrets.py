"""Credentials never reach a log line, an error or a saved record."""

from __future__ import annotations

from conftest import swav_cli
from shards.storage import redact, redact_text

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
