"""Serving trained models: a memory-capped LRU of loaded (and fused) models, and micro-batching.

- **Cache.** A model is loaded once per process from its safetensors artifact, keyed by
  (run, version, sha256) so new weights are never served stale; BN is folded into the Linear
  layers at load (service.ml.fusion) and both variants are run once on zeros to warm them. Entries
  are evicted least-recently-used when the parameters and buffers of all cached variants pass
  `cache_mb` (the entry being loaded always stays, even when it alone is larger).
- **Micro-batching.** An inference request is a model name (run id or alias), a version, a
  variant (fused or not) and a `prepare` function that turns the request's body into an input
  tensor once the model is known. Requests with the same (name, version, variant) are gathered
  into one batch: up to `max_batch_size` requests, waiting at most `max_wait_ms` after the first.
  A batch costs one thread hand-off, one lookup of the name (see Names), and one forward pass on the
  concatenated inputs; each request gets its own rows back, or its own error. At most
  `inference_threads` batches run at once: while they run, new requests queue up, so under load the
  next batches are fuller without anyone waiting longer. Answers are identical with or without
  batching: in eval mode a sample's output does not depend on its batch-mates (bn-semantics oracle
  4). Train-mode inference (batch statistics) is never batched with other requests, since it would.
- **Names.** What a name means (run id or alias, and version) is read from the database once and
  reused for `serve_name_cache_ms` (1 s by default): a lookup costs more than the article's model's
  forward pass. Every commit in this process, or in another API process forked from the same
  parent (`BNLAB_API_PROCESSES`), that writes an alias, a model version, a recalibration, or
  deletes rows drops the reused answers at once; changes made by other processes (an experiment
  alias's best run as workers finish, an API replica elsewhere) are seen within that time.
- **Threads.** Everything above runs in a pool of `inference_threads` threads (default: the
  machine's cores): routes await `asyncio.wrap_future`. Without micro-batching each request runs
  the same steps alone in that pool. One exception: a request that is alone (no batch waits or
  runs, no other request arrived meanwhile) for a cached model whose two-sample forward pass takes at
  most `inline_max_us` is answered on the event loop, the same steps without the hand-offs.

Settings come from BNLAB_SERVE_* environment variables (config.Settings' serve_* fields).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
import time
import timeit
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from ctypes import Array, c_uint64
from dataclasses import dataclass
from functools import lru_cache, partial
from itertools import chain
from typing import Generic, TypeVar

import torch
from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, Session
from torch import nn

from service import telemetry
from service.config import Settings, get_settings
from service.db import session_scope
from service.ml import checkpoints
from service.ml.config import ModelConfig
from service.ml.fusion import FusionReport, fuse_bn
from service.models import ModelAlias, ModelArtifact, Recalibration, Run
from service.serving import repository as model_repo

log = logging.getLogger(__name__)

# A request answered on the event loop has its body parsed there too: only small ones (the article's
# model's one-image V2 body is about 10 KiB; 64 KiB of JSON parse in a fraction of a millisecond).
INLINE_MAX_BODY_BYTES = 64 * 1024
# Forward passes timed at load, the fastest kept. A model often loads while other requests, or
# another API process loading it too, share the cores, and all of them may be slowed: the small
# batches it then serves time it again (ModelServer._process), so more timings here would buy nothing.
LOAD_TIMINGS = 5

# The batch whose forward pass decides whether a model is cheap enough for the event loop: two rows (a
# BN without running statistics normalises each batch by itself, and cannot take one sample).
SMALL_BATCH_ROWS = 2

# Rows per forward pass, at most: a batch of large requests runs in chunks of this many samples.
MAX_FORWARD_ROWS = 1024


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

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: Future[R]
    arrived: float


class Batcher(Generic[K, T, R]):
    """Gathers items submitted under the same key into batches for `process(key, items)`, which
    returns one result or exception per item. `workers` threads each take the batch of the key that
    has waited longest, process it, and come back for the next: while they are busy, requests queue
    up, so under load batches fill by themselves."""

    def __init__(
        self,
        process: Callable[[K, list[T]], list[R | BaseException]],
        *,
        workers: int,
        max_batch_size: int,
        max_wait_s: float,
    ) -> None:
        self._process = process
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._pending: dict[K, deque[_Pending[T, R]]] = {}
        self._cond = threading.Condition()
        self._closed = False
        self.batches = 0  # batches processed
        self.requests = 0  # items answered
        self.largest_batch = 0
        self._running = 0  # batches being processed
        self._threads = [
            threading.Thread(target=self._work, name=f"batcher-{i}", daemon=True) for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, key: K, item: T) -> Future[R]:
        future: Future[R] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._pending.setdefault(key, deque()).append(_Pending(item, future, time.monotonic()))
            self._cond.notify()
        return future

    @property
    def idle(self) -> bool:
        """Nothing waits and nothing runs (read without the lock: a hint, stale by a moment at most)."""
        return not self._pending and not self._running

    def close(self, timeout: float | None = None) -> None:
        """Stop once every item already submitted has been answered."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def _work(self) -> None:
        while (taken := self._take()) is not None:
            try:
                self._run(*taken)
            finally:
                with self._cond:
                    self._running -= 1

    def _take(self) -> tuple[K, list[_Pending[T, R]]] | None:
        with self._cond:
            while True:
                if not self._pending:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                key, waiting = min(self._pending.items(), key=lambda kv: kv[1][0].arrived)
                remaining = waiting[0].arrived + self._max_wait_s - time.monotonic()
                if len(waiting) >= self._max_batch_size or remaining <= 0 or self._closed:
                    batch = [waiting.popleft() for _ in range(min(len(waiting), self._max_batch_size))]
                    if not waiting:
                        del self._pending[key]
                    if self._pending:
                        self._cond.notify()  # more is waiting: another free worker may take it
                    self._running += 1
                    return key, batch
                self._cond.wait(remaining)

    def _run(self, key: K, batch: list[_Pending[T, R]]) -> None:
        live = [p for p in batch if p.future.set_running_or_notify_cancel()]  # skip cancelled ones
        if not live:
            return
        try:
            results = self._process(key, [p.item for p in live])
        except BaseException as exc:  # a failed batch fails its requests, never the worker
            results = [exc] * len(live)
        for pending, result in zip(live, results, strict=True):
            if isinstance(result, BaseException):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)
        with self._cond:
            self.batches += 1
            self.requests += len(live)
            self.largest_batch = max(self.largest_batch, len(live))


# ---------------------------------------------------------------------------------------- names

# Rows whose change can change what a name resolves to.
_NAMING_ROWS = (ModelAlias, ModelArtifact, Recalibration, Run)
_CHANGED = "bnlab_serving_names_changed"


class NamingGeneration:
    """A count that every commit which can change a name's meaning moves on (the listeners below).
    A plain number in one process. Across API processes forked from one parent, one slot each in
    shared memory, made before the fork (`share_with_forks`): a process adds to its own slot only,
    and the count is the sum of all, so a commit in any of them is seen by every one at once, with
    no lock (a process killed while holding a shared lock would stall the others for good)."""

    def __init__(self) -> None:
        self._own = 0
        self._slots: Array[c_uint64] | None = None
        self._slot: int | None = None

    @property
    def value(self) -> int:
        # Each slot an aligned 8-byte word with one writer: never torn.
        return self._own if self._slots is None else self._own + sum(self._slots)

    def advance(self) -> None:
        if self._slots is not None and self._slot is not None:
            self._slots[self._slot] += 1
        else:
            self._own += 1

    def share_with_forks(self, processes: int) -> None:
        """Before forking `processes` API processes: a naming change committed by any of them then
        empties every one's name cache, not only its own."""
        if self._slots is None:
            self._slots = multiprocessing.get_context("fork").RawArray(c_uint64, processes)

    def use_slot(self, slot: int) -> None:
        """In a forked API process: its place among those `share_with_forks` counted."""
        self._slot = slot


NAMING = NamingGeneration()


class NameCache:
    """(name, version) → ResolvedModel for `ttl_s`; the NAMING generation moves on every naming
    commit (see the listeners below), which empties it. A lookup that started before a commit
    stores nothing, so an answer read before a change never outlives it."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[tuple[str, int | None], tuple[model_repo.ResolvedModel, float, int]] = {}
        self._lock = threading.Lock()

    def get(self, name: str, version: int | None) -> model_repo.ResolvedModel | None:
        entry = self._entries.get((name, version))
        if entry is None:
            return None
        resolved, expires, generation = entry
        if generation != NAMING.value or time.monotonic() >= expires:
            return None
        return resolved

    def put(self, resolved: model_repo.ResolvedModel, version: int | None, generation: int) -> None:
        if self.ttl_s <= 0 or generation != NAMING.value:
            return
        with self._lock:
            if len(self._entries) > 4096:  # many names, most stale: start over
                self._entries.clear()
            self._entries[(resolved.name, version)] = (resolved, time.monotonic() + self.ttl_s, generation)


@event.listens_for(Session, "after_flush")
def _note_naming_rows(session: Session, _context: object) -> None:
    if any(isinstance(row, _NAMING_ROWS) for row in chain(session.new, session.dirty, session.deleted)):
        session.info[_CHANGED] = True


@event.listens_for(Session, "do_orm_execute")
def _note_bulk_writes(state: ORMExecuteState) -> None:
    if state.is_update or state.is_delete:  # delete(ModelArtifact)… as delete_runs does; any counts
        state.session.info[_CHANGED] = True


@event.listens_for(Session, "after_commit")
def _forget_names(session: Session) -> None:
    if session.info.pop(_CHANGED, False):
        NAMING.advance()


@event.listens_for(Session, "after_rollback")
def _nothing_changed(session: Session) -> None:
    session.info.pop(_CHANGED, None)


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
    # Seconds of a SMALL_BATCH_ROWS forward pass through the variant served by default, timed at load,
    # then the fastest forward pass of a batch of at most that many samples served since.
    small_forward_s: float = float("inf")

    def module(self, fused: bool) -> nn.Module:
        return self.fused if fused and self.fusion.fused else self.unfused


def load_model(
    *, run_id: str, version: int, sha256: str, weights: bytes, config: dict[str, object]
) -> LoadedModel:
    unfused, model_config = checkpoints.load_checkpoint(weights, ModelConfig.from_dict(config))
    assert isinstance(unfused, nn.Sequential)
    fused, report = fuse_bn(unfused)
    small = torch.zeros(SMALL_BATCH_ROWS, *model_config.input_shape)
    for module in {id(unfused): unfused, id(fused): fused}.values():
        forward_proba(module, small)  # warm: first call allocates
    timings = timeit.repeat(partial(forward_proba, fused, small), number=1, repeat=LOAD_TIMINGS)
    return LoadedModel(
        run_id=run_id,
        version=version,
        sha256=sha256,
        config=model_config,
        unfused=unfused,
        fused=fused,
        fusion=report,
        nbytes=module_bytes(unfused, fused),
        small_forward_s=min(timings),
    )


Prepare = Callable[[LoadedModel], torch.Tensor]  # a request's body → input tensor, once the model is known
InferKey = tuple[str, int | None, bool]  # (name, version or None for the default, fused)


@dataclass(eq=False)
class Execution:
    """One forward pass, shared by the requests it answered: what the statistics extension reports."""

    samples: int
    requests: int
    input_ns: int  # preparing the requests' inputs
    infer_ns: int  # the forward pass
    output_ns: int = 0  # handing each request its rows


@dataclass(frozen=True)
class Answer:
    resolved: model_repo.ResolvedModel
    loaded: LoadedModel
    probabilities: torch.Tensor  # [N, classes]
    fused: bool  # whether the fused variant answered
    execution: Execution
    # The same rows as Python values, made in one call per batch by whoever ran it (per request,
    # on the event loop under load, these torch calls were a fifth of its time).
    rows: list[list[float]]
    predictions: list[int]  # each row's argmax
    finite: bool  # every value finite


class ModelServer:
    """The process's loaded models, and the threads and batcher that run them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._models: OrderedDict[tuple[str, int, str], LoadedModel] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self.names = NameCache(settings.serve_name_cache_ms / 1000)
        threads = settings.effective_inference_threads()
        self.batcher: Batcher[InferKey, Prepare, Answer] | None = None
        self._pool: ThreadPoolExecutor | None = None
        if not settings.serve_micro_batching:
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="infer")
        else:
            self.batcher = Batcher(
                self._process,
                workers=threads,
                max_batch_size=settings.serve_max_batch_size,
                max_wait_s=settings.serve_max_wait_ms / 1000,
            )
        self.loads = 0
        self._arrivals = 0  # inference requests so far (on the event loop: no lock)

    # -- cache

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    def cached_keys(self) -> list[tuple[str, int, str]]:
        with self._lock:
            return list(self._models)

    def lookup(self, key: tuple[str, int, str]) -> LoadedModel | None:
        """The cached model for (run, version, sha256), marked most recently used; None if not cached."""
        with self._lock:
            loaded = self._models.get(key)
            if loaded is not None:
                self._models.move_to_end(key)
            return loaded

    def load(
        self, key: tuple[str, int, str], fetch: Callable[[], tuple[bytes, dict[str, object]]]
    ) -> LoadedModel:
        """The cached model, or load it from `fetch()` (weights, config): one load at a time, so
        concurrent first requests for a model load it once."""
        with self._load_lock:
            cached = self.lookup(key)
            if cached is not None:
                return cached
            weights, config = fetch()
            run_id, version, sha256 = key
            loaded = load_model(run_id=run_id, version=version, sha256=sha256, weights=weights, config=config)
            self.loads += 1
            with self._lock:
                self._models[key] = loaded
                self._bytes += loaded.nbytes
                cap = self.settings.serve_cache_mb * 1024 * 1024
                while self._bytes > cap and len(self._models) > 1:
                    _, evicted = self._models.popitem(last=False)
                    self._bytes -= evicted.nbytes
                    log.info("evicted model %s v%d from the cache", evicted.run_id, evicted.version)
            return loaded

    def open(self, name: str, version: int | None) -> tuple[model_repo.ResolvedModel, LoadedModel]:
        """Blocking: resolve a run id or alias and return its loaded model.

        The name is resolved in one short transaction, closed before any model is loaded or run: no
        request holds the database while it computes. Raises model_repo.NameNotFound (and its
        VersionNotFound), ModelNotFound, or CheckpointError for stored weights that do not load.
        """
        resolved = self.names.get(name, version)
        if resolved is None:
            generation = NAMING.value
            with session_scope(read_only=True) as session:  # SQLite: no write lock for a read
                resolved = model_repo.resolve_model(session=session, name=name, version=version)
            self.names.put(resolved, version, generation)
        key = (resolved.run_id, resolved.version, resolved.sha256)
        cached = self.lookup(key)
        if cached is not None:
            return resolved, cached

        def fetch() -> tuple[bytes, dict[str, object]]:
            with session_scope() as session:
                artifact = model_repo.get_artifact(session=session, run_id=key[0], version=key[1])
                if artifact is None or artifact.sha256 != key[2]:
                    raise ModelNotFound(f"run {key[0]}'s model version {key[1]} changed meanwhile; retry")
                return artifact.weights, dict(artifact.model_config)

        return resolved, self.load(key, fetch)

    # -- inference

    def submit(self, name: str, version: int | None, *, fused: bool, prepare: Prepare) -> Future[Answer]:
        """Answer one request: batched with others for the same model when micro-batching is on."""
        key: InferKey = (name, version, fused)
        if self.batcher is not None:
            return self.batcher.submit(key, prepare)
        assert self._pool is not None
        return self._pool.submit(self._process_one, key, prepare)

    async def infer(
        self, name: str, version: int | None, *, fused: bool, prepare: Prepare, body_bytes: int | None = None
    ) -> Answer:
        """Answer one request on the event loop's behalf. `body_bytes`: the size of what `prepare`
        parses, when a JSON body (None: never on the event loop, say an image to decode)."""
        started = time.perf_counter()
        self._arrivals += 1
        small = body_bytes is not None and body_bytes <= INLINE_MAX_BODY_BYTES
        if small and await self._answer_inline(name, version):
            answer = self._process_one((name, version, fused), prepare)
        else:
            answer = await asyncio.wrap_future(self.submit(name, version, fused=fused, prepare=prepare))
        telemetry.INFERENCE_LATENCY.labels(answer.loaded.run_id).observe(time.perf_counter() - started)
        return answer

    async def _answer_inline(self, name: str, version: int | None) -> bool:
        """Whether to run this small request on the event loop: its model is cached, cheap (a two-sample
        forward pass within serve_inline_max_us) and nothing else is being inferred, not even a
        request read in the same turn of the loop (those run first while this one yields once).
        A lone client then skips the two thread hand-offs, a third of its latency for the article's
        model; under load every request still goes to the batcher, which keeps the p99 fair."""
        if not self._cheap_and_idle(name, version):
            return False
        arrivals = self._arrivals
        await asyncio.sleep(0)
        return arrivals == self._arrivals and self._cheap_and_idle(name, version)

    def _cheap_and_idle(self, name: str, version: int | None) -> bool:
        limit = self.settings.serve_inline_max_us / 1e6
        if limit <= 0 or self.batcher is None or not self.batcher.idle:
            return False
        resolved = self.names.get(name, version)  # never the database on the event loop
        if resolved is None:
            return False
        loaded = self.lookup((resolved.run_id, resolved.version, resolved.sha256))
        return loaded is not None and loaded.small_forward_s <= limit

    def _process_one(self, key: InferKey, prepare: Prepare) -> Answer:
        (result,) = self._process(key, [prepare])
        if isinstance(result, BaseException):
            raise result
        return result

    def _process(self, key: InferKey, prepares: list[Prepare]) -> list[Answer | BaseException]:
        """One batch: resolve the name once, prepare each request's input, one forward pass, scatter."""
        name, version, fused = key
        try:
            resolved, loaded = self.open(name, version)
        except Exception:
            telemetry.INFERENCE_REQUESTS.labels(telemetry.UNRESOLVED_MODEL, "error").inc(len(prepares))
            raise
        model = resolved.run_id
        telemetry.INFERENCE_BATCH_SIZE.labels(model).observe(len(prepares))
        results: list[Answer | BaseException | None] = [None] * len(prepares)
        inputs: list[torch.Tensor] = []
        started = time.perf_counter_ns()
        for i, prepare in enumerate(prepares):
            try:
                inputs.append(prepare(loaded))
            except Exception as exc:  # this request's input is bad: only it fails
                results[i] = exc
                telemetry.INFERENCE_REQUESTS.labels(model, "error").inc()
        if inputs:
            module = loaded.module(fused)
            batch = inputs[0] if len(inputs) == 1 else torch.cat(inputs)
            prepared = time.perf_counter_ns()
            probabilities = torch.cat(
                [forward_proba(module, chunk) for chunk in torch.split(batch, MAX_FORWARD_ROWS)]
            )
            computed = time.perf_counter_ns()
            if len(batch) <= SMALL_BATCH_ROWS and module is loaded.fused:
                # Timed again by every small batch: the load-time timings ran while the model loaded,
                # often with both cores busy (each API process loading it under load), and a cheap
                # model timed slow then would never be answered on the event loop.
                loaded.small_forward_s = min(loaded.small_forward_s, (computed - prepared) / 1e9)
            execution = Execution(len(batch), len(inputs), prepared - started, computed - prepared)
            served_fused = fused and loaded.fusion.fused
            answers = _answers(probabilities, [len(x) for x in inputs])
            for i, result in enumerate(results):
                if result is None:
                    tensor, rows, predictions, finite = next(answers)
                    results[i] = Answer(
                        resolved, loaded, tensor, served_fused, execution, rows, predictions, finite
                    )
            execution.output_ns = time.perf_counter_ns() - computed
            telemetry.INFERENCE_REQUESTS.labels(model, "ok").inc(len(inputs))
        return [r for r in results if r is not None]


def _answers(
    probabilities: torch.Tensor, sizes: list[int]
) -> Iterator[tuple[torch.Tensor, list[list[float]], list[int], bool]]:
    """Each request's share of the batch's probabilities: the tensor, its rows as lists, their
    argmax and whether all of it is finite."""
    rows = probabilities.tolist()
    predictions = probabilities.argmax(dim=1).tolist()
    finite = torch.isfinite(probabilities).all(dim=1).tolist()
    start = 0
    for tensor, size in zip(torch.split(probabilities, sizes), sizes, strict=True):
        end = start + size
        yield tensor, rows[start:end], predictions[start:end], all(finite[start:end])
        start = end


@lru_cache
def get_model_server() -> ModelServer:
    return ModelServer(get_settings())


def open_model(name: str, version: int | None) -> tuple[model_repo.ResolvedModel, LoadedModel]:
    """Blocking (call it off the event loop): see ModelServer.open."""
    return get_model_server().open(name, version)
