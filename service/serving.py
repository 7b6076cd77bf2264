"""Serving trained models: a memory-capped LRU of loaded (and fused) models, and micro-batching.

- **Cache.** A model is loaded once per process from its safetensors artifact, keyed by
  (run, version, sha256) so new weights are never served stale; BN is folded into the Linear
  layers at load (service.ml.fusion) and both variants are run once on zeros to warm them. Entries
  are evicted least-recently-used when the parameters and buffers of all cached variants pass
  `cache_mb` (the entry being loaded always stays, even when it alone is larger).
- **Micro-batching.** Requests for the same model variant go to one MicroBatcher: a thread that
  takes the first waiting request, then gathers more until `max_batch_size` samples or `max_wait_ms`
  after the first, runs ONE forward pass on the concatenation and hands each request its rows.
  While a forward runs, new requests queue up and form the next batch, so under load batches fill
  without waiting; at low load a lone request waits at most `max_wait_ms`. Results are identical
  with or without batching: in eval mode a sample's output never depends on its batch-mates (oracle
  4). Train-mode inference (batch statistics) is never micro-batched, since it would.
- **Threads.** Forward passes run in batcher threads or in a pool of `inference_threads` (default:
  the machine's cores), never on the event loop: routes await `asyncio.wrap_future`.

Settings come from BNLAB_SERVE_* environment variables (ServingSettings below).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain

import torch
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from torch import nn

from service import crud_models
from service.db import session_scope
from service.ml import checkpoints
from service.ml.config import ModelConfig
from service.ml.fusion import FusionReport, fuse_bn

log = logging.getLogger(__name__)


class ServingSettings(BaseSettings):
    """Serving knobs (BNLAB_SERVE_ prefix). Invalid values stop the API at start-up."""

    model_config = SettingsConfigDict(env_prefix="BNLAB_SERVE_", extra="ignore")

    micro_batching: bool = Field(True, description="Gather concurrent requests into one forward pass.")
    # 64 rows of 784 floats is ~200 kB of input: one forward of the article's MLP takes well under a
    # millisecond on one core, while HTTP + JSON cost ~1 ms per request, so larger batches gain little.
    max_batch_size: int = Field(64, ge=1, le=1024, description="Samples per forward pass, at most.")
    # Waiting longer than a forward pass takes only adds latency: under load, batches fill while the
    # previous forward runs (see bench/serve.py for the measurement).
    max_wait_ms: float = Field(1.0, ge=0, le=100, description="How long a batch waits for more requests.")
    cache_mb: int = Field(256, ge=1, le=65536, description="Memory for cached models (both variants).")
    inference_threads: int = Field(0, ge=0, le=256, description="Threads for unbatched forwards; 0 = cores.")

    def effective_inference_threads(self) -> int:
        return self.inference_threads or os.cpu_count() or 1


@lru_cache
def get_serving_settings() -> ServingSettings:
    return ServingSettings()


def forward_proba(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities in eval mode. The cached models are in eval mode and never leave it."""
    with torch.inference_mode():
        logits: torch.Tensor = model(inputs)
        return logits.softmax(dim=1)


def module_bytes(*models: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for model in models:
        for tensor in chain(model.parameters(), model.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


# ---------------------------------------------------------------------------------------- batching


@dataclass
class _Request:
    inputs: torch.Tensor
    future: Future[torch.Tensor]


_CLOSE = None


class MicroBatcher:
    """One thread gathering requests for one model into batched forward passes."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        *,
        max_batch_size: int,
        max_wait_s: float,
        name: str = "model",
    ) -> None:
        self._forward = forward
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self.batches = 0  # forward passes run
        self.requests = 0  # requests answered
        self.largest_batch = 0  # most samples in one forward
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, inputs: torch.Tensor) -> Future[torch.Tensor]:
        future: Future[torch.Tensor] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("this batcher is closed")
            self._queue.put(_Request(inputs, future))
        return future

    def close(self) -> None:
        """Stop after answering every request already submitted."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_CLOSE)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        carry: _Request | None = None
        while True:
            first = carry if carry is not None else self._queue.get()
            carry = None
            if first is None:
                return
            batch, carry, closing = self._gather(first)
            self._answer(batch)
            if closing:
                if carry is not None:
                    self._answer([carry])
                return

    def _gather(self, first: _Request) -> tuple[list[_Request], _Request | None, bool]:
        """More requests after `first`, up to max_batch_size samples or max_wait_s."""
        batch, rows = [first], len(first.inputs)
        deadline = time.monotonic() + self._max_wait_s
        while rows < self._max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, None, True
            if rows + len(item.inputs) > self._max_batch_size:
                return batch, item, False  # it starts the next batch
            batch.append(item)
            rows += len(item.inputs)
        return batch, None, False

    def _answer(self, batch: list[_Request]) -> None:
        live = [r for r in batch if r.future.set_running_or_notify_cancel()]  # skip cancelled requests
        if not live:
            return
        try:
            inputs = live[0].inputs if len(live) == 1 else torch.cat([r.inputs for r in live])
            outputs = self._forward(inputs)
        except Exception as exc:  # a failed forward fails its requests, never the thread
            for request in live:
                request.future.set_exception(exc)
            return
        self.batches += 1
        self.requests += len(live)
        self.largest_batch = max(self.largest_batch, len(inputs))
        sizes = [len(r.inputs) for r in live]
        for request, rows in zip(live, torch.split(outputs, sizes), strict=True):
            request.future.set_result(rows)


# ---------------------------------------------------------------------------------------- models


class ModelNotFound(LookupError):
    """No stored model for this run (or not this version)."""


@dataclass
class LoadedModel:
    run_id: str
    version: int
    sha256: str
    config: ModelConfig
    unfused: nn.Module
    fused: nn.Module  # the unfused module itself when fusion was impossible
    fusion: FusionReport
    nbytes: int
    batchers: dict[bool, MicroBatcher] = field(default_factory=dict)
    closed: bool = False  # evicted: requests still holding it are answered without batching

    def module(self, fused: bool) -> nn.Module:
        return self.fused if fused else self.unfused

    def close(self) -> None:
        self.closed = True
        for batcher in self.batchers.values():
            batcher.close()


def load_model(
    *, run_id: str, version: int, sha256: str, weights: bytes, config: dict[str, object]
) -> LoadedModel:
    unfused, model_config = checkpoints.load_checkpoint(weights, ModelConfig.from_dict(config))
    assert isinstance(unfused, nn.Sequential)
    fused, report = fuse_bn(unfused)
    for module in {id(unfused): unfused, id(fused): fused}.values():
        forward_proba(module, torch.zeros(2, *model_config.input_shape))  # warm: first call allocates
    return LoadedModel(
        run_id=run_id,
        version=version,
        sha256=sha256,
        config=model_config,
        unfused=unfused,
        fused=fused,
        fusion=report,
        nbytes=module_bytes(unfused, fused),
    )


class ModelServer:
    """The process's loaded models and the threads that run them."""

    def __init__(self, settings: ServingSettings) -> None:
        self.settings = settings
        self._models: OrderedDict[tuple[str, int, str], LoadedModel] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(
            settings.effective_inference_threads(), thread_name_prefix="infer"
        )
        self.loads = 0

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    def cached_keys(self) -> list[tuple[str, int, str]]:
        with self._lock:
            return list(self._models)

    def lookup(self, key: tuple[str, int, str]) -> LoadedModel | None:
        """The cached model for (run, version, sha256), marked most recently used; None if not cached."""
        return self._lookup(key)

    def load(
        self, key: tuple[str, int, str], fetch: Callable[[], tuple[bytes, dict[str, object]]]
    ) -> LoadedModel:
        """The cached model, or load it from `fetch()` (weights, config): one load at a time, so
        concurrent first requests for a model load it once."""
        with self._load_lock:
            cached = self._lookup(key)
            if cached is not None:
                return cached
            weights, config = fetch()
            run_id, version, sha256 = key
            loaded = load_model(run_id=run_id, version=version, sha256=sha256, weights=weights, config=config)
            self.loads += 1
            self._insert(key, loaded)
            return loaded

    def _lookup(self, key: tuple[str, int, str]) -> LoadedModel | None:
        with self._lock:
            loaded = self._models.get(key)
            if loaded is not None:
                self._models.move_to_end(key)
            return loaded

    def _insert(self, key: tuple[str, int, str], loaded: LoadedModel) -> None:
        with self._lock:
            self._models[key] = loaded
            self._bytes += loaded.nbytes
            cap = self.settings.cache_mb * 1024 * 1024
            while self._bytes > cap and len(self._models) > 1:
                _, evicted = self._models.popitem(last=False)
                self._bytes -= evicted.nbytes
                evicted.close()
                log.info("evicted model %s v%d from the cache", evicted.run_id, evicted.version)

    def _batcher(self, loaded: LoadedModel, fused: bool) -> MicroBatcher | None:
        with self._lock:
            if loaded.closed:
                return None
            batcher = loaded.batchers.get(fused)
            if batcher is None:
                module = loaded.module(fused)
                batcher = MicroBatcher(
                    lambda x: forward_proba(module, x),
                    max_batch_size=self.settings.max_batch_size,
                    max_wait_s=self.settings.max_wait_ms / 1000,
                    name=f"{loaded.run_id[:8]}-v{loaded.version}-{'fused' if fused else 'unfused'}",
                )
                loaded.batchers[fused] = batcher
            return batcher

    def submit(self, loaded: LoadedModel, inputs: torch.Tensor, *, fused: bool) -> Future[torch.Tensor]:
        module = loaded.module(fused)
        batcher = self._batcher(loaded, fused) if self.settings.micro_batching else None
        if batcher is not None:
            try:
                return batcher.submit(inputs)
            except RuntimeError:  # evicted meanwhile: answer this request without batching
                pass
        return self._executor.submit(forward_proba, module, inputs)

    async def predict(self, loaded: LoadedModel, inputs: torch.Tensor, *, fused: bool) -> torch.Tensor:
        """Probabilities [N, classes], computed off the event loop (batched when enabled)."""
        return await asyncio.wrap_future(self.submit(loaded, inputs, fused=fused))


@lru_cache
def get_model_server() -> ModelServer:
    return ModelServer(get_serving_settings())


def open_model(name: str, version: int | None) -> tuple[crud_models.ResolvedModel, LoadedModel]:
    """Blocking (call it off the event loop): resolve a run id or alias and return its loaded model.

    Each database read is its own short transaction, closed before any model is loaded or run:
    no request holds the database while it computes. Raises crud_models.NameNotFound (and its
    VersionNotFound), ModelNotFound, or CheckpointError for stored weights that do not load.
    """
    server = get_model_server()
    with session_scope() as session:
        resolved = crud_models.resolve_model(session=session, name=name, version=version)
        sha = crud_models.artifact_sha256(session=session, run_id=resolved.run_id, version=resolved.version)
    if sha is None:
        raise ModelNotFound(f"run {resolved.run_id} has no stored model version {resolved.version}")
    key = (resolved.run_id, resolved.version, sha)
    cached = server.lookup(key)
    if cached is not None:
        return resolved, cached

    def fetch() -> tuple[bytes, dict[str, object]]:
        with session_scope() as session:
            artifact = crud_models.get_artifact(
                session=session, run_id=resolved.run_id, version=resolved.version
            )
            if artifact is None or artifact.sha256 != sha:
                raise ModelNotFound(
                    f"run {resolved.run_id}'s model version {resolved.version} changed; retry"
                )
            return artifact.weights, dict(artifact.model_config)

    return resolved, server.load(key, fetch)
