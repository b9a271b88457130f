"""The exception types that mean "the user asked for something we cannot do", and how storage faults map to them."""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Iterator


class UserError(Exception):
    """A mistake in input, configuration or environment.

    The CLI prints it as one line and exits 2; it never becomes a traceback (``--debug`` or
    ``SWAV_DEBUG=1`` prints the cause it hides).
    """


class AccessDenied(UserError):
    """The store refused us (credentials, permissions, an expired token, a missing bucket): true for every object."""


class NotFound(UserError):
    """The object or prefix does not exist."""


class StorageUnavailable(UserError):
    """Storage failed in a way that is neither missing nor forbidden, after retries."""


# Store error codes that hold for every object of a run, not one of them: retrying or skipping cannot help.
ACCESS_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "ExpiredToken", "InvalidAccessKeyId",
                          "SignatureDoesNotMatch", "InvalidToken", "NoSuchBucket", "AccountProblem",
                          "RequestTimeTooSkewed", "TokenRefreshRequired"})
# Codes that a store returns when it is busy or briefly broken.
TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                             "ServiceUnavailable", "RequestLimitExceeded", "503", "500", "502", "504"})
# OSError numbers that describe the request, not the moment: the same request fails the same way again.
PERMANENT_ERRNOS = frozenset({errno.EINVAL, errno.ENAMETOOLONG, errno.EMSGSIZE, errno.ENOSYS, errno.EPERM,
                              errno.EACCES, errno.ENOENT, errno.ENOSPC, errno.EROFS})


def debug_enabled() -> bool:
    """Whether one-line errors should also print the exception they replace (``--debug``, ``SWAV_DEBUG=1``)."""
    return os.environ.get("SWAV_DEBUG", "") not in ("", "0")


def causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything it was raised from or during, innermost last (no cycles)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def store_error(exc: BaseException) -> tuple[str, int]:
    """(error code, HTTP status) of the first botocore-style response in the chain; ("", 0) when none.

    s3fs turns a ClientError into a builtin exception but keeps the ClientError as its cause.
    """
    for e in causes(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = str((response.get("Error") or {}).get("Code") or "")
            status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
            return code, status
    return "", 0


def _is(exc: BaseException, module: str, names: tuple[str, ...]) -> bool:
    """isinstance against optional libraries' exception types, by their defining module (none imported here)."""
    return any(type(e).__module__.startswith(module) and any(c.__name__ in names for c in type(e).__mro__)
               for e in causes(exc))


def is_access_problem(exc: BaseException) -> bool:
    """Credentials, permissions or a missing bucket: the same for every object, so retrying cannot help."""
    if isinstance(exc, (PermissionError, AccessDenied)):
        return True
    if _is(exc, "botocore", ("NoCredentialsError", "PartialCredentialsError", "NoRegionError")):
        return True
    return store_error(exc)[0] in ACCESS_CODES


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: network hiccups, throttling, 5xx. Not: missing, forbidden, bad input."""
    if isinstance(exc, (UserError, ValueError, KeyError, TypeError, FileNotFoundError, PermissionError,
                        IsADirectoryError, NotADirectoryError, FileExistsError)) or is_access_problem(exc):
        return False
    code, status = store_error(exc)
    if code or status:
        return code in TRANSIENT_CODES or status >= 500 or status == 429
    if isinstance(exc, OSError):  # ConnectionError and TimeoutError included
        return exc.errno not in PERMANENT_ERRNOS
    # Transport errors of the libraries under fsspec, and FTP's "try again" replies.
    return (_is(exc, "botocore", ("ConnectionError", "HTTPClientError", "ReadTimeoutError", "IncompleteReadError"))
            or _is(exc, "aiohttp", ("ClientError", "ServerDisconnectedError"))
            or _is(exc, "urllib3", ("HTTPError",))
            or _is(exc, "http.client", ("HTTPException",))
            or _is(exc, "ftplib", ("error_temp", "error_reply")))


def print_cause(err: BaseException) -> None:
    """The traceback a one-line error stands for, on stderr: the exception it was raised from, if any."""
    cause = err.__cause__ or err.__context__
    if cause is None:
        print("(no underlying exception: the message above is the whole story)", file=sys.stderr)
        return
    traceback.print_exception(type(cause), cause, cause.__traceback__, file=sys.stderr)
