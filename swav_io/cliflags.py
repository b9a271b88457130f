"""The storage flags every command that reads or writes a URL takes, and the options they make."""

from __future__ import annotations

import argparse
import json

from swav_io.errors import UserError
from swav_io.storage import merge_options, options_from_env, s3_options


def add_storage_flags(p: argparse.ArgumentParser) -> None:
    """--endpoint-url, --profile, --anon and --storage-option KEY=JSON, in a group of their own."""
    g = p.add_argument_group("storage (applies to s3:// and other object-store URLs)")
    g.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:9000 (else AWS_ENDPOINT_URL)")
    g.add_argument("--profile", help="credentials profile from ~/.aws/credentials")
    g.add_argument("--anon", action="store_true", help="anonymous access to a public bucket")
    g.add_argument("--storage-option", action="append", default=[], metavar="KEY=JSON",
                   help="extra fsspec storage option, repeatable; values parsed as JSON when they parse. "
                        "SWAV_STORAGE_OPTIONS (a JSON object) is read too")


def storage_options(args: argparse.Namespace) -> dict:
    """SWAV_STORAGE_OPTIONS, then the S3 flags, then each --storage-option: later wins."""
    extra = {}
    for item in args.storage_option:
        if "=" not in item:
            raise UserError(f"--storage-option {item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        try:
            extra[k] = json.loads(v)
        except json.JSONDecodeError:
            extra[k] = v
    return merge_options(options_from_env(), s3_options(args.endpoint_url, args.profile, args.anon), extra)
