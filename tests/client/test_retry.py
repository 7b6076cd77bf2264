"""The client waits as the API asks: a 429 with Retry-After (the key's rate limit) is sent again
after that wait, within a bound, so that a long export or listing slows down instead of failing.
A real API (uvicorn in a thread) with a small rate limit."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from service.client import http
from service.client.http import ApiError, Client
from tests.conftest import Backend
from tests.runs.test_concurrent_submits import serving

# A burst of 2, then one request a second: the third request of a quick series gets 429 + Retry-After 1.
SMALL_LIMIT = {"BNLAB_RATE_LIMIT_PER_MINUTE": "60", "BNLAB_RATE_LIMIT_BURST": "2"}


def test_requests_past_the_rate_limit_wait_for_retry_after_and_succeed(
    sqlite_backend: Backend, use_backend: Callable[[Backend], None]
) -> None:
    with serving(sqlite_backend, SMALL_LIMIT, use_backend) as url, Client(url) as client:
        started = time.monotonic()
        for _ in range(4):
            assert client.list_runs()["items"] == []
        assert time.monotonic() - started >= 1.5  # two of the four waited about a second each


def test_a_wait_longer_than_the_bound_raises_the_429(
    sqlite_backend: Backend, use_backend: Callable[[Backend], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http, "MAX_RETRY_WAIT_S", 0.5)  # less than the one second the API asks for
    with serving(sqlite_backend, SMALL_LIMIT, use_backend) as url, Client(url) as client:
        client.list_runs()
        client.list_runs()
        with pytest.raises(ApiError) as refused:
            client.list_runs()
        assert refused.value.status == 429


def test_a_write_past_the_rate_limit_is_refused_at_once(
    sqlite_backend: Backend, use_backend: Callable[[Backend], None]
) -> None:
    with serving(sqlite_backend, SMALL_LIMIT, use_backend) as url, Client(url) as client:
        client.list_runs()
        client.list_runs()
        started = time.monotonic()
        with pytest.raises(ApiError) as refused:
            client.submit_run({"dataset": {"name": "synthetic", "limit": 100}})
        assert refused.value.status == 429
        assert time.monotonic() - started < 0.5  # not sent again: the caller decides
