"""The one retry policy for storage: jittered exponential backoff on transient errors (tenacity)."""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

import tenacity

from swav_io.errors import is_transient

log = logging.getLogger(__name__)
T = TypeVar("T")


def policy(what: str, attempts: int = 5, base_delay: float = 0.2,
           retry_on: Callable[[BaseException], bool] = is_transient) -> tenacity.Retrying:
    """A Retrying that re-raises the last error as itself once `attempts` are spent or it is not retryable."""

    def announce(state: tenacity.RetryCallState) -> None:
        e = state.outcome.exception() if state.outcome else None
        log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(e).__name__, e,
                    state.attempt_number, attempts - 1, state.upcoming_sleep)

    return tenacity.Retrying(stop=tenacity.stop_after_attempt(attempts),
                             wait=tenacity.wait_exponential(multiplier=base_delay) + tenacity.wait_random(0, base_delay),
                             retry=tenacity.retry_if_exception(retry_on), before_sleep=announce, reraise=True)


def with_retries(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.2) -> T:
    """fn(), retried under `policy`."""
    return policy(what, attempts, base_delay)(fn)
