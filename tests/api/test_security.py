"""Authentication, scopes and limits, checked against every route the app serves."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.api.limits import EVENT_STREAM_SUFFIX, ConcurrencyLimitMiddleware, RateLimiter
from service.api.security import SCOPE_KEY
from service.auth import create_key
from service.config import Settings
from service.main import create_app
from service.runs import events
from tests.conftest import Backend

SPEC = {"dataset": {"name": "synthetic", "limit": 200}, "train": {"epochs": 1}}


def keyed_backend(tmp_path: Path, **extra: str) -> tuple[Backend, dict[str, str]]:
    keys_file = tmp_path / "keys.txt"
    keys = {
        name: create_key(keys_file, scopes=scopes, name=name)
        for name, scopes in [
            ("reader", "read"),
            ("trainer", "train"),
            ("both", "read,train"),
            ("root", "admin"),
        ]
    }
    env = {"BNLAB_DATA_DIR": str(tmp_path / "data"), "BNLAB_API_KEYS_FILE": str(keys_file), **extra}
    return Backend("sqlite", env), keys


@pytest.fixture
def keyed(
    tmp_path: Path, use_backend: Callable[[Backend], None]
) -> Iterator[tuple[TestClient, dict[str, str]]]:
    backend, keys = keyed_backend(tmp_path)
    use_backend(backend)
    with TestClient(create_app()) as client:
        yield client, keys


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def every_route() -> list[tuple[str, str, str]]:
    """(method, concrete path, required scope) for every operation the app documents.

    Read from the OpenAPI document, where each operation carries its x-bnlab-scope when declared;
    the app has no undocumented API routes (only FastAPI's own /docs pages).
    """
    routes = []
    for template, operations in create_app().openapi()["paths"].items():
        path = re.sub(r"\{run_id\}", "0" * 32, template)
        path = re.sub(r"\{[^}]+\}", "x1", path)
        for method, operation in operations.items():
            scope = operation.get(SCOPE_KEY) or ("read" if method == "get" else "train")
            routes.append((method.upper(), path, scope))
    return routes


WITHOUT_SCOPE = {"read": "trainer", "train": "reader", "admin": "both"}


def test_the_walk_covers_the_api(keyed: tuple[TestClient, dict[str, str]]) -> None:
    walked = {(method, path) for method, path, _ in every_route()}
    assert ("POST", "/api/v1/runs") in walked
    assert ("POST", f"/api/v1/runs/{'0' * 32}/predict") in walked
    assert len(walked) >= 8


@pytest.mark.parametrize(("method", "path", "scope"), every_route())
def test_every_route_needs_a_valid_key_with_its_scope(
    keyed: tuple[TestClient, dict[str, str]], method: str, path: str, scope: str
) -> None:
    client, keys = keyed
    if scope == "public":
        assert client.request(method, path).status_code not in (401, 403)
        return
    missing = client.request(method, path)
    assert missing.status_code == 401, missing.text
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert client.request(method, path, headers=bearer("bnlab_not-a-key")).status_code == 401
    assert client.request(method, path, headers={"Authorization": f"Basic {keys['root']}"}).status_code == 401
    wrong = client.request(method, path, headers=bearer(keys[WITHOUT_SCOPE[scope]]))
    assert wrong.status_code == 403, wrong.text
    assert client.request(method, path, headers=bearer(keys["root"])).status_code not in (401, 403)


def test_scopes_in_practice(keyed: tuple[TestClient, dict[str, str]]) -> None:
    client, keys = keyed
    created = client.post("/api/v1/runs", json=SPEC, headers=bearer(keys["trainer"]))
    assert created.status_code == 202
    run_path = created.headers["location"]
    assert client.get(run_path, headers=bearer(keys["reader"])).status_code == 200
    assert client.get(run_path, headers=bearer(keys["trainer"])).status_code == 403
    assert client.post(f"{run_path}/cancel", headers=bearer(keys["reader"])).status_code == 403
    assert client.post(f"{run_path}/cancel", headers=bearer(keys["both"])).json()["status"] == "cancelled"


def test_keys_file_edits_take_effect_without_restart(
    keyed: tuple[TestClient, dict[str, str]], tmp_path: Path
) -> None:
    client, _ = keyed
    late = create_key(tmp_path / "keys.txt", scopes="read", name="late")
    assert client.get("/api/v1/runs", headers=bearer(late)).status_code == 200


def test_health_and_docs_stay_public(keyed: tuple[TestClient, dict[str, str]]) -> None:
    client, _ = keyed
    assert client.get("/health/live").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert "HTTPBearer" in client.get("/openapi.json").text


def test_the_document_says_which_operations_need_the_key(keyed: tuple[TestClient, dict[str, str]]) -> None:
    client, keys = keyed
    document = client.get("/openapi.json").json()
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    live, runs = document["paths"]["/health/live"]["get"], document["paths"]["/api/v1/runs"]["get"]
    assert live["security"] == []
    assert "401" not in live["responses"]
    assert runs["security"] == [{"HTTPBearer": []}]
    assert "401" in runs["responses"]
    # The scheme's name is case-insensitive (RFC 7235); blanks around the key do not count.
    padded = {"Authorization": f"bearer  {keys['root']} "}
    assert client.get("/api/v1/runs", headers=padded).status_code == 200
    assert client.get("/api/v1/runs", headers={"Authorization": "Bearer "}).status_code == 401


def test_no_keys_means_loopback_only() -> None:
    with pytest.raises(ValidationError, match="not a loopback address"):
        Settings(host="0.0.0.0")
    assert Settings(host="127.0.0.1").binds_loopback
    assert Settings(host="0.0.0.0", api_keys_file=Path("/tmp/keys")).host == "0.0.0.0"


def test_rate_limit_answers_429_with_retry_after(
    tmp_path: Path, use_backend: Callable[[Backend], None]
) -> None:
    backend, keys = keyed_backend(tmp_path, BNLAB_RATE_LIMIT_BURST="3", BNLAB_RATE_LIMIT_PER_MINUTE="6")
    use_backend(backend)
    with TestClient(create_app()) as client:
        codes = [client.get("/api/v1/runs", headers=bearer(keys["reader"])).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        limited = client.get("/api/v1/runs", headers=bearer(keys["reader"]))
        assert 1 <= int(limited.headers["retry-after"]) <= 10
        # Buckets are per key: another key is not slowed by the first one's flood.
        assert client.get("/api/v1/runs", headers=bearer(keys["root"])).status_code == 200


def test_rate_limiter_refills_over_time() -> None:
    limiter = RateLimiter(per_minute=60_000, burst=1)
    assert limiter.wait_time("k") == 0
    assert limiter.wait_time("k") > 0
    asyncio.run(asyncio.sleep(0.01))
    assert limiter.wait_time("k") == 0


def test_cap_on_active_runs_per_key(tmp_path: Path, use_backend: Callable[[Backend], None]) -> None:
    backend, keys = keyed_backend(tmp_path, BNLAB_MAX_ACTIVE_RUNS_PER_KEY="2")
    use_backend(backend)
    with TestClient(create_app()) as client:
        submit = [client.post("/api/v1/runs", json=SPEC, headers=bearer(keys["trainer"])) for _ in range(3)]
        assert [r.status_code for r in submit] == [202, 202, 429]
        assert "limit 2" in submit[2].json()["detail"]
        assert client.post("/api/v1/runs", json=SPEC, headers=bearer(keys["root"])).status_code == 202


def test_bodies_over_the_cap_are_413_even_when_chunked(
    tmp_path: Path, use_backend: Callable[[Backend], None]
) -> None:
    use_backend(Backend("sqlite", {"BNLAB_DATA_DIR": str(tmp_path / "d"), "BNLAB_MAX_BODY_BYTES": "65536"}))
    with TestClient(create_app()) as client:
        big = b'{"name": "' + b"x" * 100_000 + b'"}'
        assert (
            client.post("/api/v1/runs", content=big, headers={"content-type": "application/json"}).status_code
            == 413
        )

        def chunks() -> Iterator[bytes]:
            yield b'{"name": "'
            for _ in range(100):
                yield b"y" * 1024
            yield b'"}'

        chunked = client.post("/api/v1/runs", content=chunks(), headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        assert client.get("/api/v1/runs").json()["total"] == 0


def test_concurrency_limit_answers_503_past_the_cap() -> None:
    release = asyncio.Event()

    async def slow_app(scope: object, receive: object, send: Callable[[dict[str, object]], object]) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[misc]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[misc]

    async def scenario() -> list[int]:
        limited = ConcurrencyLimitMiddleware(slow_app, max_in_flight=2, max_streams=1, max_queued=0)  # type: ignore[arg-type]
        statuses: list[int] = []

        async def call() -> None:
            async def send(message: dict[str, object]) -> None:
                if message["type"] == "http.response.start":
                    statuses.append(int(message["status"]))  # type: ignore[call-overload]

            async def receive() -> dict[str, object]:
                return {"type": "http.request", "body": b""}

            await limited({"type": "http", "path": "/api/v1/runs"}, receive, send)

        tasks = [asyncio.create_task(call()) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert statuses == [503]  # the third found two in flight
        release.set()
        await asyncio.gather(*tasks)
        assert limited.in_flight == 0
        return statuses

    assert sorted(asyncio.run(scenario())) == [200, 200, 503]


async def _asgi_call(app: ConcurrencyLimitMiddleware, path: str, statuses: list[int]) -> None:
    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(int(message["status"]))  # type: ignore[call-overload]

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b""}

    await app({"type": "http", "path": path}, receive, send)  # type: ignore[arg-type]


def test_requests_past_the_cap_wait_in_order_503_only_past_the_queue_and_health_never_waits() -> None:
    release = asyncio.Event()
    served: list[str] = []

    async def slow_app(
        scope: dict[str, object], receive: object, send: Callable[[dict[str, object]], object]
    ) -> None:
        path = str(scope["path"])
        served.append(path)
        if "/health/" not in path:
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[misc]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[misc]

    async def scenario() -> list[int]:
        limited = ConcurrencyLimitMiddleware(slow_app, max_in_flight=2, max_streams=1, max_queued=3)  # type: ignore[arg-type]
        statuses: list[int] = []
        tasks = []
        for i in range(6):
            tasks.append(asyncio.create_task(_asgi_call(limited, f"/v2/models/m{i}/infer", statuses)))
            await asyncio.sleep(0.01)
        assert statuses == [503]  # two served, three queued, the sixth refused at once
        assert (limited.in_flight, limited.queued) == (2, 3)
        for probe in ("/health/live", "/v2/health/live"):  # never queued nor refused
            answered: list[int] = []
            await asyncio.wait_for(_asgi_call(limited, probe, answered), timeout=1)
            assert answered == [200]
        release.set()
        await asyncio.gather(*tasks)
        assert (limited.in_flight, limited.queued) == (0, 0)
        return statuses

    statuses = asyncio.run(scenario())
    assert sorted(statuses) == [200] * 5 + [503]
    infers = [p for p in served if p.startswith("/v2/models/")]
    assert infers == [f"/v2/models/m{i}/infer" for i in range(5)]  # first come, first served


def test_a_client_that_leaves_the_queue_gives_up_its_place() -> None:
    release = asyncio.Event()

    async def slow_app(scope: object, receive: object, send: Callable[[dict[str, object]], object]) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[misc]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[misc]

    async def scenario() -> None:
        limited = ConcurrencyLimitMiddleware(slow_app, max_in_flight=1, max_streams=1, max_queued=2)  # type: ignore[arg-type]
        statuses: list[int] = []
        first = asyncio.create_task(_asgi_call(limited, "/api/v1/runs", statuses))
        await asyncio.sleep(0.01)
        leaving = asyncio.create_task(_asgi_call(limited, "/api/v1/runs", statuses))
        staying = asyncio.create_task(_asgi_call(limited, "/api/v1/runs", statuses))
        await asyncio.sleep(0.01)
        leaving.cancel()
        await asyncio.sleep(0.01)
        assert (limited.in_flight, limited.queued) == (1, 1)
        release.set()
        await asyncio.gather(first, staying)
        assert statuses == [200, 200]
        assert (limited.in_flight, limited.queued) == (0, 0)

    asyncio.run(scenario())


def test_event_streams_have_their_own_cap_and_leave_request_slots_free() -> None:
    release = asyncio.Event()

    async def held_open(scope: object, receive: object, send: Callable[[dict[str, object]], object]) -> None:
        await release.wait()  # a stream, or a slow request: both stay in flight until released
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[misc]
        await send({"type": "http.response.body", "body": b""})  # type: ignore[misc]

    async def scenario() -> dict[str, list[int]]:
        limited = ConcurrencyLimitMiddleware(held_open, max_in_flight=1, max_streams=2)  # type: ignore[arg-type]
        statuses: dict[str, list[int]] = {}

        async def call(path: str) -> None:
            async def send(message: dict[str, object]) -> None:
                if message["type"] == "http.response.start":
                    statuses.setdefault(path, []).append(int(message["status"]))  # type: ignore[call-overload]

            async def receive() -> dict[str, object]:
                return {"type": "http.request", "body": b""}

            await limited({"type": "http", "path": path}, receive, send)

        streams = [f"/api/v1/runs/r{i}/events" for i in range(2)] + ["/api/v1/experiments/e/events"]
        tasks = [asyncio.create_task(call(path)) for path in streams]
        await asyncio.sleep(0.05)
        # Two streams open: the third stream is refused, and the one request slot is still free.
        assert (limited.streams, limited.in_flight) == (2, 0)
        assert statuses == {"/api/v1/experiments/e/events": [503]}
        tasks += [asyncio.create_task(call("/api/v1/runs")) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert statuses["/api/v1/runs"] == [503]  # the second request found the first in its slot
        release.set()
        await asyncio.gather(*tasks)
        assert (limited.streams, limited.in_flight) == (0, 0)
        return statuses

    statuses = asyncio.run(scenario())
    assert sorted(statuses["/api/v1/runs"]) == [200, 503]
    assert [statuses[f"/api/v1/runs/r{i}/events"] for i in range(2)] == [[200], [200]]


def test_the_routes_counted_as_event_streams_are_exactly_the_event_streams() -> None:
    ending = {t for t in create_app().openapi()["paths"] if t.endswith(EVENT_STREAM_SUFFIX)}
    streams = {route.path for route in events.router.routes}  # type: ignore[attr-defined]
    assert ending == streams == {"/api/v1/runs/{run_id}/events", "/api/v1/experiments/{experiment_id}/events"}


def test_readiness_probes_wait_under_the_cap_and_only_liveness_probes_bypass_it() -> None:
    # /health/ready and /v2/health/ready are sync and open a database connection: a public flood of
    # them must not take a thread and a connection each, so they are counted, queued and refused.
    release = asyncio.Event()

    async def slow_app(scope: object, receive: object, send: Callable[[dict[str, object]], object]) -> None:
        if not str(scope["path"]).endswith("/live"):  # type: ignore[index]
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[misc]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[misc]

    async def scenario() -> None:
        limited = ConcurrencyLimitMiddleware(slow_app, max_in_flight=1, max_streams=1, max_queued=1)  # type: ignore[arg-type]
        statuses: list[int] = []
        first = asyncio.create_task(_asgi_call(limited, "/health/ready", statuses))
        queued = asyncio.create_task(_asgi_call(limited, "/v2/health/ready", statuses))
        await asyncio.sleep(0.01)
        assert (limited.in_flight, limited.queued) == (1, 1)
        for probe in ("/health/ready", "/v2/health/ready"):  # the queue is full: refused at once
            refused: list[int] = []
            await asyncio.wait_for(_asgi_call(limited, probe, refused), timeout=1)
            assert refused == [503]
        for probe in ("/health/live", "/v2/health/live"):  # never queued nor refused
            answered: list[int] = []
            await asyncio.wait_for(_asgi_call(limited, probe, answered), timeout=1)
            assert answered == [200]
        release.set()
        await asyncio.gather(first, queued)
        assert statuses == [200, 200]
        assert (limited.in_flight, limited.queued) == (0, 0)

    asyncio.run(scenario())


def test_a_request_queued_past_the_wait_limit_gets_503_with_retry_after() -> None:
    release = asyncio.Event()

    async def slow_app(scope: object, receive: object, send: Callable[[dict[str, object]], object]) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[misc]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[misc]

    async def scenario() -> list[dict[str, object]]:
        limited = ConcurrencyLimitMiddleware(
            slow_app,  # type: ignore[arg-type]
            max_in_flight=1,
            max_streams=1,
            max_queued=5,
            max_queue_wait_s=0.1,
        )
        held: list[int] = []
        holder = asyncio.create_task(_asgi_call(limited, "/api/v1/runs", held))
        await asyncio.sleep(0.01)
        messages: list[dict[str, object]] = []

        async def send(message: dict[str, object]) -> None:
            messages.append(message)

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b""}

        waited = asyncio.get_running_loop().time()
        await asyncio.wait_for(limited({"type": "http", "path": "/api/v1/runs"}, receive, send), timeout=2)  # type: ignore[arg-type]
        assert asyncio.get_running_loop().time() - waited >= 0.1
        assert (limited.in_flight, limited.queued) == (1, 0)  # it left the queue; the holder still in
        release.set()
        await holder
        assert held == [200]
        assert (limited.in_flight, limited.queued) == (0, 0)
        return messages

    start, body = asyncio.run(scenario())
    assert start["status"] == 503
    assert (b"retry-after", b"1") in start["headers"]  # type: ignore[operator]
    assert json.loads(body["body"]) == {  # type: ignore[arg-type]
        "detail": "the server is at its concurrency limit and no slot freed up in 0.1 s; retry shortly",
        "errors": [],
    }


def test_the_queue_wait_limit_is_a_typed_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BNLAB_MAX_QUEUE_WAIT_S", "2.5")
    assert Settings().max_queue_wait_s == 2.5
    monkeypatch.setenv("BNLAB_MAX_QUEUE_WAIT_S", "0")
    with pytest.raises(ValidationError):
        Settings()
