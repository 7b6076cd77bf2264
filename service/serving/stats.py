"""Triton's statistics extension: counts and cumulative durations per model version.

Kept in memory per API process, since it started (several API processes count separately), for
the inference requests answered on /v2. Per request: `success` is the whole request from its
arrival to its answer, `queue` the wait until its input is prepared (model lookup and load
included), `compute_input` preparing its input (parsing the body, checking and converting the
tensor), `compute_infer` the forward pass that answered it, `compute_output` writing the answer.
Per forward pass (`execution_count`, `batch_stats` by the pass's number of samples): the time to
stack its requests' inputs, run the model and hand out the rows. `fail` counts the requests that
failed once their model was known (bad input, non-finite outputs).
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field

from service.serving.schemas import V2BatchStat, V2DurationStat, V2InferenceStats, V2ModelStat
from service.serving.server import Execution

ModelKey = tuple[str, int]  # (run id, version)


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns

    def public(self) -> V2DurationStat:
        return V2DurationStat(count=self.count, ns=self.ns)


@dataclass
class _BatchStat:
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)


@dataclass
class _ModelStat:
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)
    batches: dict[int, _BatchStat] = field(default_factory=dict)


@dataclass
class RequestTimes:
    """One request's steps, in nanoseconds of time.perf_counter_ns."""

    total_ns: int
    queue_ns: int
    input_ns: int
    output_ns: int


class Statistics:
    """The process's statistics; safe to record from the event loop while a thread reads them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[ModelKey, _ModelStat] = {}
        # A forward pass is counted once, by the first of its requests to be recorded.
        self._counted: weakref.WeakSet[Execution] = weakref.WeakSet()

    def record_success(self, key: ModelKey, samples: int, times: RequestTimes, execution: Execution) -> None:
        with self._lock:
            stat = self._models.setdefault(key, _ModelStat())
            stat.last_inference_ms = time.time_ns() // 1_000_000
            stat.inference_count += samples
            stat.success.add(times.total_ns)
            stat.queue.add(times.queue_ns)
            stat.compute_input.add(times.input_ns)
            stat.compute_infer.add(execution.infer_ns)
            stat.compute_output.add(times.output_ns)
            if execution not in self._counted:
                self._counted.add(execution)
                stat.execution_count += 1
                batch = stat.batches.setdefault(execution.samples, _BatchStat())
                batch.compute_input.add(execution.input_ns)
                batch.compute_infer.add(execution.infer_ns)
                batch.compute_output.add(execution.output_ns)

    def record_failure(self, key: ModelKey, total_ns: int) -> None:
        with self._lock:
            stat = self._models.setdefault(key, _ModelStat())
            stat.last_inference_ms = time.time_ns() // 1_000_000
            stat.fail.add(total_ns)

    def recorded_keys(self) -> list[ModelKey]:
        with self._lock:
            return sorted(self._models)

    def model_stat(self, name: str, key: ModelKey) -> V2ModelStat:
        """The statistics of one model version under `name` (zeros for a version not used yet)."""
        with self._lock:
            stat = self._models.get(key, _ModelStat())
            return V2ModelStat(
                name=name,
                version=str(key[1]),
                last_inference=stat.last_inference_ms,
                inference_count=stat.inference_count,
                execution_count=stat.execution_count,
                inference_stats=V2InferenceStats(
                    success=stat.success.public(),
                    fail=stat.fail.public(),
                    queue=stat.queue.public(),
                    compute_input=stat.compute_input.public(),
                    compute_infer=stat.compute_infer.public(),
                    compute_output=stat.compute_output.public(),
                    cache_hit=V2DurationStat(count=0, ns=0),
                ),
                batch_stats=[
                    V2BatchStat(
                        batch_size=size,
                        compute_input=batch.compute_input.public(),
                        compute_infer=batch.compute_infer.public(),
                        compute_output=batch.compute_output.public(),
                    )
                    for size, batch in sorted(stat.batches.items())
                ],
            )


STATISTICS = Statistics()
