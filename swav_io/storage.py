"""Every location is an fsspec URL plus storage options; this module is the only door.

It adds what plain fsspec lacks for our use: retries (``swav_io.retry``) on transient
errors, publish-style writes that are never seen half-done, one-line errors for
missing buckets and credentials, and redaction of secrets before anything is
printed or saved.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import fsspec
from fsspec.core import url_to_fs

from swav_io.errors import (
    AccessDenied,
    NotFound,
    StorageUnavailable,
    UserError,
    causes,
    is_access_problem,
    store_error,
)
from swav_io.retry import with_retries
from swav_io.trees import deep_merge

log = logging.getLogger(__name__)

_SECRET_WORDS = ("secret", "token", "password", "passwd", "credential", "session", "connection_string",
                 "connectionstring")
_SECRET_KEYS = {"key", "aws_access_key_id", "access_key", "account_key", "sas_token"}
# user:password@ in a URL, and the secret parts of an Azure connection string (AccountKey=...;)
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_CONN_SECRET = re.compile(r"(?P<name>AccountKey|SharedAccessSignature|SharedAccessKey|sig|password|pwd)=[^;&\s]+",
                          re.IGNORECASE)


def redact_text(text: str) -> str:
    """A string with URL-embedded credentials and connection-string secrets replaced."""
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}<redacted>@", text)
    return _CONN_SECRET.sub(lambda m: f"{m.group('name')}=<redacted>", text)


def redact(value: Any) -> Any:
    """A copy of a config/options tree with every credential-looking value replaced."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            lk = str(k).lower()
            if lk in _SECRET_KEYS or any(w in lk for w in _SECRET_WORDS):
                out[k] = "<redacted>" if v not in (None, "") else v
            else:
                out[k] = redact(v)
        return out
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def options_from_env() -> dict:
    """Storage options from SWAV_STORAGE_OPTIONS (a JSON object), for jobs launched by schedulers."""
    raw = os.environ.get("SWAV_STORAGE_OPTIONS", "").strip()
    if not raw:
        return {}
    try:
        opts = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"SWAV_STORAGE_OPTIONS is not valid JSON: {e}") from None
    if not isinstance(opts, dict):
        raise UserError("SWAV_STORAGE_OPTIONS must be a JSON object")
    return opts


def s3_options(endpoint_url: str | None = None, profile: str | None = None, anon: bool = False) -> dict:
    """Storage options for S3-compatible stores from the common CLI flags."""
    opts: dict[str, Any] = {}
    if endpoint_url:
        opts["client_kwargs"] = {"endpoint_url": endpoint_url}
    if profile:
        opts["profile"] = profile
    if anon:
        opts["anon"] = True
    return opts


def merge_options(*parts: dict | None) -> dict:
    """Storage options layered: later parts win, nested dicts (client_kwargs) merge."""
    return deep_merge(*parts)


def options_for(url: str, options: dict | None) -> dict:
    """Only object-store URLs take storage options; local paths ignore them."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    return {} if protocol in ("file", "local") else dict(options or {})


def get_fs(url: str, options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a URL; unknown protocols become a one-line error."""
    try:
        return url_to_fs(url, **options_for(url, options))
    except (ImportError, ValueError) as e:
        raise UserError(f"cannot open {url!r}: {e}") from None


def join(url: str, *parts: str) -> str:
    out = url.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def explain(exc: BaseException, url: str) -> UserError:
    """Turn storage exceptions a user can fix into a one-line error (credentials never in it)."""
    name = type(exc).__name__
    text = redact_text(str(exc))
    first = text.splitlines()[0] if text else name
    url = redact_text(url)
    if any(type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError") for e in causes(exc)):
        return AccessDenied(f"no credentials for {url}: set AWS_* variables, --profile, or --anon")
    if isinstance(exc, FileNotFoundError) and store_error(exc)[0] == "NoSuchBucket":
        return AccessDenied(f"not found: {url} (no such bucket)")
    if is_access_problem(exc):
        return AccessDenied(f"access denied to {url}: {first}")
    if isinstance(exc, FileNotFoundError):
        return NotFound(f"not found: {url}")
    return StorageUnavailable(f"cannot access {url}: {name}: {first if text else ''}")


@contextmanager
def explained(url: str) -> Iterator[None]:
    """Inside, a storage failure becomes a one-line error naming `url`; a UserError passes through as it is."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure is named; --debug shows the original
        raise explain(e, url) from e


def read_bytes(fs: fsspec.AbstractFileSystem, path: str, what: str | None = None) -> bytes:
    return with_retries(lambda: fs.cat_file(path), what or f"read {path}")


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a whole object so readers see either nothing or all of it.

    Object stores give that with a single PUT; on a local disk we write a
    temporary sibling and rename it over the target.
    """
    if _is_local(fs):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        for attempt in (1, 2):
            # Unique per writer: two copies of one part (a duplicated pod) on a shared disk never share one.
            tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                return
            except FileNotFoundError:
                # A copy of this part that (re)started just now cleaned up our temporary; write it again.
                if attempt == 2:
                    raise
        return
    with_retries(lambda: fs.pipe_file(path, data), f"write {path}")


def upload_file(fs: fsspec.AbstractFileSystem, local_path: str, path: str) -> None:
    """Copy a local file to `path`, streamed (a w5 ZeRO-0 save is GBs per file): readers see all or nothing."""
    if _is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(local_path, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, UPLOAD_CHUNK)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with_retries(lambda: fs.put_file(local_path, path), f"upload {path}")


UPLOAD_CHUNK = 8 * 1024 * 1024


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    return with_retries(lambda: fs.exists(path), f"stat {path}")


def remove_stale_temporaries(fs: fsspec.AbstractFileSystem, root: str, stem: str = "") -> int:
    """Delete temporaries that a killed local write_bytes left behind (object stores have none).

    Only names starting with `stem`: a build part passes its own, so it never removes another
    part's file in flight.
    """
    if not _is_local(fs) or not os.path.isdir(root):
        return 0
    removed = 0
    for folder, _, names in os.walk(root):
        for name in names:
            if ".tmp-" in name and name.startswith(stem):
                try:
                    os.remove(os.path.join(folder, name))
                    removed += 1
                except FileNotFoundError:
                    pass  # its writer finished (or another cleaner got there first)
    return removed


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    return json.loads(read_bytes(fs, path).decode("utf-8"))


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    write_bytes(fs, path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))
