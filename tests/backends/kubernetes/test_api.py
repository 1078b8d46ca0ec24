"""The run's patience with the API server (backends/kubernetes/api.py): which failures are worth
another try, how long it waits, and when it gives up. The same patience is proven against the fake
cluster's injected faults in test_faults.py and the operator tests."""

from __future__ import annotations

import asyncio
import time

import pytest
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from airflow_provider_dnntrain.backends.kubernetes.api import (
    MAX_BACKOFF_SECONDS,
    ApiPatience,
    ApiUnavailable,
    retry_after,
)


def api_error(status: int, retry: str | None = None) -> ApiException:
    error = ApiException(status=status, reason="injected")
    error.headers = {"Retry-After": retry} if retry else {}
    return error


@pytest.mark.parametrize(
    ("error", "wait"),
    [
        (api_error(429, "3"), 3.0),
        (api_error(429), 0.0),
        (api_error(503), 0.0),
        (api_error(500), 0.0),
        (api_error(404), None),
        (api_error(403), None),
        (api_error(409), None),
        (ConnectionResetError(), 0.0),
        (TimeoutError(), 0.0),
        (urllib3.exceptions.ProtocolError("cut"), 0.0),
        (FileNotFoundError("kubeconfig"), None),
        (ValueError("bad"), None),
    ],
)
def test_what_is_worth_another_try(error, wait):
    assert retry_after(error) == wait


def test_a_call_is_tried_again_with_its_timeout_until_it_succeeds():
    answers = [api_error(503), ConnectionResetError(), "listed"]
    seen = []

    def call(namespace, *, _request_timeout):
        seen.append((namespace, _request_timeout))
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert ApiPatience(request_timeout=7).call("list pods", call, "training") == "listed"
    assert seen == [("training", (7, 7))] * 3


def test_a_request_that_is_wrong_fails_at_once():
    def call(*, _request_timeout):
        raise api_error(422)

    started = time.monotonic()
    with pytest.raises(ApiException):
        ApiPatience().call("create pod", call)
    assert time.monotonic() - started < 0.1


def test_it_gives_up_once_the_api_was_unusable_too_long_naming_the_last_error():
    async def call(*, _request_timeout):
        raise api_error(503)

    started = time.monotonic()
    with pytest.raises(ApiUnavailable, match=r"unusable for 1 s .* on list pods: 503"):
        asyncio.run(ApiPatience(unavailable_timeout=1).acall("list pods", call))
    assert 1 <= time.monotonic() - started < 2


def test_waits_grow_to_a_cap_and_honour_retry_after():
    patience = ApiPatience()
    waits = [patience.backoff("list pods", api_error(503), attempt) for attempt in range(12)]
    assert waits[0] <= 0.25 and max(waits) <= MAX_BACKOFF_SECONDS and waits[-1] >= MAX_BACKOFF_SECONDS / 2
    assert patience.backoff("list pods", api_error(429, "9"), 0) == 9
    patience.succeeded()  # a success starts the unusable clock again
    assert patience._failing_since is None
