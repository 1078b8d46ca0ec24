"""Patience with the API server. Real control planes answer 429 while they shed load and 5xx while
they are upgraded, and drop or stall connections; none of that may end a healthy job.

Every call a run makes - from the task (:meth:`ApiPatience.call`) or the triggerer
(:meth:`ApiPatience.acall`) - carries a request timeout, and a transient failure is retried with
capped exponential backoff and jitter, honouring ``Retry-After``. A run gives up for the API's sake
only once the API has been unusable for ``unavailable_timeout`` on end, naming the last error: one
clock per run, which any successful call resets.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
FIRST_BACKOFF_SECONDS = 0.25
MAX_BACKOFF_SECONDS = 15.0
_WARN_AFTER_SECONDS = 30.0  # an outage this long is worth a line in the task log


class ApiUnavailable(RuntimeError):
    """The API server has been unusable for longer than the run allows."""


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Dropped, refused and timed-out connections, as both clients raise them."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror]
    try:
        import urllib3.exceptions

        errors.append(urllib3.exceptions.HTTPError)
    except ImportError:  # pragma: no cover - the kubernetes client needs it
        pass
    try:
        import aiohttp

        errors.append(aiohttp.ClientError)
    except ImportError:  # pragma: no cover - kubernetes_asyncio needs it
        pass
    return tuple(errors)


def retry_after(error: BaseException) -> float | None:
    """How long the server asked to wait (0: no preference) when ``error`` is worth another try;
    ``None`` when it is not (a 4xx other than 429 says the request itself is wrong)."""
    status = getattr(error, "status", None)
    if isinstance(status, int) and hasattr(error, "reason"):  # an ApiException, either client's
        if status not in TRANSIENT_STATUSES:
            return None
        header = (getattr(error, "headers", None) or {}).get("Retry-After", "")
        return float(header) if str(header).isdigit() else 0.0
    if status is None and isinstance(error, _transport_errors()):
        return 0.0
    return None


def describe(error: BaseException) -> str:
    status = getattr(error, "status", None)
    if isinstance(status, int):
        return f"{status} {getattr(error, 'reason', '') or ''}".strip()
    return f"{type(error).__name__}: {error}"


@dataclass
class ApiPatience:
    """How long one call may take (``request_timeout``), and how long the API may stay unusable
    before the run fails (``unavailable_timeout``)."""

    request_timeout: float = 30.0
    unavailable_timeout: float = 600.0
    _failing_since: float | None = field(default=None, init=False, repr=False)
    _warned: bool = field(default=False, init=False, repr=False)

    def arguments(self) -> dict[str, float]:
        """What makes the same patience elsewhere (the trigger's)."""
        return {"request_timeout": self.request_timeout, "unavailable_timeout": self.unavailable_timeout}

    @property
    def timeout(self) -> tuple[float, float]:
        """``_request_timeout`` for both clients: (connect, read)."""
        return (self.request_timeout, self.request_timeout)

    def call(self, what: str, function, *args, **kwargs):
        """``function(*args, **kwargs)`` with the request timeout, until it succeeds or fails for good."""
        attempt = 0
        while True:
            try:
                result = function(*args, _request_timeout=self.timeout, **kwargs)
            except Exception as error:
                time.sleep(self.backoff(what, error, attempt))
                attempt += 1
                continue
            self.succeeded()
            return result

    async def acall(self, what: str, function, *args, **kwargs):
        """:meth:`call` on an event loop: ``function`` is a coroutine function."""
        attempt = 0
        while True:
            try:
                result = await function(*args, _request_timeout=self.timeout, **kwargs)
            except Exception as error:
                await asyncio.sleep(self.backoff(what, error, attempt))
                attempt += 1
                continue
            self.succeeded()
            return result

    def backoff(self, what: str, error: BaseException, attempt: int) -> float:
        """How long to wait before trying ``what`` again after ``error``; raises ``error`` itself when
        it is not transient, :class:`ApiUnavailable` when the API has been unusable for too long."""
        hint = retry_after(error)
        if hint is None:
            raise error
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        failing_for = now - self._failing_since
        if failing_for >= self.unavailable_timeout:
            raise ApiUnavailable(
                f"the Kubernetes API has been unusable for {failing_for:.0f} s "
                f"(api_unavailable_timeout={self.unavailable_timeout:.0f}); last error, on {what}: "
                f"{describe(error)}"
            ) from error
        if failing_for >= _WARN_AFTER_SECONDS and not self._warned:
            self._warned = True
            log.warning("The Kubernetes API has failed for %.0f s (%s: %s); still trying",
                        failing_for, what, describe(error))  # fmt: skip
        log.debug("Kubernetes API: %s failed (%s); trying again", what, describe(error))
        capped = min(MAX_BACKOFF_SECONDS, FIRST_BACKOFF_SECONDS * 2**attempt)
        wait = max(hint, capped * random.uniform(0.5, 1.0))
        return min(wait, max(0.0, self.unavailable_timeout - failing_for) + 0.01)

    def succeeded(self) -> None:
        if self._warned:
            log.info("The Kubernetes API answers again after %.0f s", time.monotonic() - self._failing_since)
        self._failing_since, self._warned = None, False
