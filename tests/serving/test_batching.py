"""Micro-batching and the model cache: gathered forwards, scattered answers, LRU under a memory cap."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from service import serving
from service.main import create_app
from service.ml import datasets
from service.schemas import RunCreate
from service.serving import MicroBatcher, ModelServer, ServingSettings
from tests.conftest import Backend
from tests.serving.conftest import BN_SPEC, _trained_weights, oracle_probabilities, store_trained_run

BN_SPEC_JSON = RunCreate.model_validate(BN_SPEC).model_dump_json()


class RecordingForward:
    """x → 2x, recording each batch's size; the first call can be held to let requests pile up."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.release.wait(5)
        self.sizes.append(len(x))
        return x * 2


def rows(n: int, start: float) -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.float32).reshape(n, 1)


def test_concurrent_requests_share_forward_passes_and_get_their_own_rows() -> None:
    forward = RecordingForward()
    forward.release.clear()  # the first forward waits: the next requests queue up behind it
    batcher = MicroBatcher(forward, max_batch_size=8, max_wait_s=0.0)
    futures = [batcher.submit(rows(1, float(i))) for i in range(1)]
    time.sleep(0.05)
    futures += [batcher.submit(rows(1 + i % 3, 100.0 * i)) for i in range(1, 20)]
    forward.release.set()
    for i, future in enumerate(futures):
        expected = rows(1, 0.0) * 2 if i == 0 else rows(1 + i % 3, 100.0 * i) * 2
        assert torch.equal(future.result(timeout=5), expected)
    assert sum(forward.sizes) == sum(1 + i % 3 for i in range(1, 20)) + 1
    assert len(forward.sizes) < 20  # gathered
    assert max(forward.sizes) <= 8
    assert batcher.requests == 20
    batcher.close()
    batcher.join(5)


def test_max_wait_gathers_requests_that_arrive_a_little_later() -> None:
    forward = RecordingForward()
    batcher = MicroBatcher(forward, max_batch_size=64, max_wait_s=0.2)
    first = batcher.submit(rows(1, 0.0))
    time.sleep(0.02)
    second = batcher.submit(rows(2, 10.0))
    assert torch.equal(first.result(5), rows(1, 0.0) * 2)
    assert torch.equal(second.result(5), rows(2, 10.0) * 2)
    assert forward.sizes == [3]
    batcher.close()


def test_oversized_request_runs_alone_and_a_full_batch_does_not_wait() -> None:
    forward = RecordingForward()
    batcher = MicroBatcher(forward, max_batch_size=4, max_wait_s=10.0)
    started = time.monotonic()
    assert torch.equal(batcher.submit(rows(9, 0.0)).result(5), rows(9, 0.0) * 2)
    assert time.monotonic() - started < 5  # a request that fills the batch never waits max_wait
    assert forward.sizes == [9]
    batcher.close()


def test_cancelled_requests_are_skipped_and_errors_reach_only_their_batch() -> None:
    forward = RecordingForward()
    forward.release.clear()
    batcher = MicroBatcher(forward, max_batch_size=8, max_wait_s=0.0)
    held = batcher.submit(rows(1, 0.0))
    time.sleep(0.05)
    cancelled = batcher.submit(rows(5, 50.0))
    assert cancelled.cancel()
    kept = batcher.submit(rows(1, 7.0))
    forward.release.set()
    assert torch.equal(kept.result(5), rows(1, 7.0) * 2)
    held.result(5)
    assert 5 not in forward.sizes
    assert sum(forward.sizes) == 2

    def failing(x: torch.Tensor) -> torch.Tensor:
        if float(x[0, 0]) < 0:
            raise RuntimeError("boom")
        return x

    broken = MicroBatcher(failing, max_batch_size=1, max_wait_s=0.0)
    with pytest.raises(RuntimeError, match="boom"):
        broken.submit(rows(1, -1.0)).result(5)
    assert torch.equal(broken.submit(rows(1, 3.0)).result(5), rows(1, 3.0))  # the thread lives on
    broken.close()


def test_close_answers_what_was_submitted_then_refuses() -> None:
    forward = RecordingForward()
    forward.release.clear()
    batcher = MicroBatcher(forward, max_batch_size=2, max_wait_s=0.0)
    pending = [batcher.submit(rows(1, float(i))) for i in range(5)]
    batcher.close()
    forward.release.set()
    assert [float(f.result(5)[0, 0]) for f in pending] == [0.0, 2.0, 4.0, 6.0, 8.0]
    batcher.join(5)
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(rows(1, 0.0))


def test_cache_is_lru_under_its_memory_cap_and_keyed_by_sha() -> None:
    weights, config = _trained_weights(BN_SPEC_JSON)
    server = ModelServer(ServingSettings(cache_mb=1))
    loads: list[str] = []

    def fetch_for(name: str) -> Callable[[], tuple[bytes, dict[str, object]]]:
        def fetch() -> tuple[bytes, dict[str, object]]:
            loads.append(name)
            return weights, config

        return fetch

    first = server.load(("run0", 1, "sha"), fetch_for("run0"))
    per_model = first.nbytes
    assert per_model > 2 * 784 * 32 * 4  # the fused and the unfused variant both count
    fits = (1024 * 1024) // per_model
    server.submit(first, torch.zeros(2, 1, 28, 28), fused=True).result(5)  # start its batcher
    for i in range(1, fits + 3):
        server.load((f"run{i}", 1, "sha"), fetch_for(f"run{i}"))
        assert server.lookup(("run1", 1, "sha")) is not None  # touched after every load: never the LRU
    assert server.cached_bytes <= 1024 * 1024
    keys = {key[0] for key in server.cached_keys()}
    assert "run0" not in keys
    assert "run1" in keys
    assert first.closed
    assert all(b._closed for b in first.batchers.values())
    # An evicted model still answers the requests that hold it, without batching.
    assert server.submit(first, torch.zeros(1, 1, 28, 28), fused=True).result(5).shape == (1, 10)
    assert server.lookup(("run1", 1, "other-sha")) is None  # new weights under the same version: reload
    assert len(loads) == fits + 3


def test_concurrent_http_requests_are_batched_and_each_gets_its_answer(
    sqlite_backend: Backend, use_backend: Callable[[Backend], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BNLAB_SERVE_MAX_WAIT_MS", "30")
    use_backend(sqlite_backend)
    serving.get_serving_settings.cache_clear()
    serving.get_model_server.cache_clear()
    run_id = store_trained_run(BN_SPEC)
    pixels = datasets.make_synthetic(24, seed=11).x.numpy() / 255.0
    expected = oracle_probabilities(run_id, pixels)

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=create_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            body = {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": None}]}

            async def one(i: int) -> httpx.Response:
                request = {"inputs": [body["inputs"][0] | {"data": pixels[i].reshape(-1).tolist()}]}
                return await client.post(f"/v2/models/{run_id}/infer", json=request)

            await client.get(f"/v2/models/{run_id}/ready")  # load and warm first
            return await asyncio.gather(*(one(i) for i in range(len(pixels))))

    try:
        responses = asyncio.run(scenario())
        for i, response in enumerate(responses):
            assert response.status_code == 200, response.text
            probabilities = response.json()["outputs"][0]["data"]
            np.testing.assert_allclose(probabilities, expected[i], atol=1e-5)
        server = serving.get_model_server()
        (key,) = [k for k in server.cached_keys() if k[0] == run_id]
        loaded = server.lookup(key)
        assert loaded is not None
        batcher = loaded.batchers[True]
        assert batcher.requests == 24
        assert batcher.batches < 24
        assert batcher.largest_batch > 1
    finally:
        serving.get_serving_settings.cache_clear()
        serving.get_model_server.cache_clear()


def test_unbatched_server_answers_in_its_thread_pool() -> None:
    weights, config = _trained_weights(BN_SPEC_JSON)
    server = ModelServer(ServingSettings(micro_batching=False, inference_threads=2))
    loaded = server.load(("r", 1, "s"), lambda: (weights, config))
    with ThreadPoolExecutor(8) as pool:
        futures: list[Future[torch.Tensor]] = list(
            pool.map(lambda _: server.submit(loaded, torch.rand(3, 1, 28, 28), fused=True), range(16))
        )
    assert all(f.result(5).shape == (3, 10) for f in futures)
    assert loaded.batchers == {}
