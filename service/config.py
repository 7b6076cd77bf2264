"""Typed settings, read once from environment variables with the BNLAB_ prefix."""

from __future__ import annotations

import ipaddress
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The embedded broker: kombu's filesystem transport in a folder under BNLAB_DATA_DIR. It needs no
# server, survives restarts of either process (messages are files) and proved reliable with one
# API and one worker process on one machine.
EMBEDDED_BROKER = "filesystem://"
# The built-in datasets a training process keeps once loaded (all but synthetic, which is generated
# per run); named here, not imported, so that reading settings does not import torch.
PRELOADABLE = ("fashion-mnist", "mnist", "cifar10", "mnist1d")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BNLAB_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address the API binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port the API listens on.")
    # 1 by default: the rate limits, the concurrency cap and the serving statistics are each
    # process's own, so a second process doubles what a key may do; make run and the compose file
    # ask for one per core, where a single process would leave cores idle under inference load.
    api_processes: int = Field(
        1, ge=0, le=64, description="API processes sharing the port (Linux); 0 = one per core."
    )
    data_dir: Path = Field(
        Path("bnlab-data"), description="Datasets, the SQLite file and the embedded broker."
    )
    database_url: str = Field("", description="SQLAlchemy URL; empty means SQLite in data_dir.")
    broker_url: str = Field(
        EMBEDDED_BROKER, description="Celery broker URL; filesystem:// is the embedded one."
    )
    queue: str = Field("bnlab", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Celery queue name.")
    # 1 by default (the tests' workers rely on it); make run and the compose file ask for one per core.
    worker_concurrency: int = Field(
        1, ge=0, le=64, description="Training processes per worker; 0 = one per core."
    )
    torch_threads: int = Field(0, ge=0, le=256, description="Threads per training process; 0 = automatic.")
    # Empty by default (tests and small deployments start no sooner for it); make run and the compose
    # file name fashion-mnist, the article's dataset.
    preload_datasets: str = Field(
        "",
        description="Built-in datasets (comma-separated, e.g. fashion-mnist) each training process"
        " decodes as it starts, so that its first run on one does not wait for the files (about a"
        " second for Fashion-MNIST); those not on disk are skipped.",
    )
    # cpu by default: bit-for-bit reproducible runs; auto picks a GPU when the worker process sees one.
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu", description="Where workers train: cpu, cuda or auto."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # JSON lines carry the request id (API) and run id (worker) as fields for a log collector.
    log_format: Literal["json", "text"] = Field("json", description="json: one object per line; text.")

    # Leases: a running run proves its worker alive every heartbeat interval; the reaper treats a run
    # whose heartbeat is older than the lease timeout as orphaned (worker killed, OOM, machine lost).
    heartbeat_interval_s: float = Field(5.0, gt=0, le=300, description="Seconds between heartbeats.")
    lease_timeout_s: float = Field(30.0, gt=0, le=3600, description="Heartbeat age that orphans a run.")
    reaper_interval_s: float = Field(5.0, gt=0, le=600, description="Seconds between reaper passes.")
    max_attempts: int = Field(3, ge=1, le=20, description="Claims of one run before it fails for good.")
    requeue_after_s: float = Field(
        120.0, gt=0, le=86400, description="A run queued this long is published to the broker again."
    )
    # Checkpoint retention. "epoch" (the default): every finished epoch's training state (weights and
    # optimizer, about 3x the model) is written with its metrics, so that a run whose worker died or
    # shut down resumes after that epoch. "final": none is written, only a succeeded run's final
    # model; an interrupted run starts over. Either way an ended run keeps no checkpoint. The figures
    # are in docs/lifecycle.md.
    keep_checkpoints: Literal["epoch", "final"] = Field(
        "epoch",
        description="epoch: store each epoch's training state so an interrupted run resumes; final: "
        "store only a succeeded run's final model (an interrupted run starts over).",
    )
    max_run_seconds: int = Field(
        6 * 3600, ge=5, le=7 * 86400, description="Cap on any run's time limit, whatever its spec."
    )

    max_body_bytes: int = Field(
        16 << 20, ge=1024, le=1 << 30, description="Largest request body (413 above)."
    )
    max_concurrent_requests: int = Field(
        64, ge=1, le=10_000, description="Requests served at once; more wait in the queue below."
    )
    max_queued_requests: int = Field(
        256, ge=0, le=100_000, description="Requests waiting for a slot, first come first served, before 503."
    )
    max_queue_wait_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Longest a queued request waits for a slot before 503 with Retry-After.",
    )
    max_event_streams: int = Field(
        256, ge=1, le=10_000, description="Open event streams (SSE) before 503; not counted as requests."
    )
    rate_limit_per_minute: int = Field(600, ge=1, le=1_000_000, description="Sustained requests per key.")
    rate_limit_burst: int = Field(60, ge=1, le=100_000, description="Requests a key may send at once.")
    max_active_runs_per_key: int = Field(50, ge=1, le=100_000, description="Queued + running runs per key.")

    # Datasets: uploads (.npz, stored in the database) and optional downloads of the built-ins.
    max_dataset_bytes: int = Field(
        64 << 20,
        ge=1024,
        le=1 << 31,
        description="Largest uploaded .npz, and its unpacked arrays (413 above).",
    )
    allow_download: bool = Field(
        False,
        description="Workers may download MNIST, Fashion-MNIST and CIFAR-10 when missing (SHA-256 checked).",
    )
    # Server settings, never client input: where the downloads come from (tests point them at 127.0.0.1).
    mnist_mirror: str = Field(
        "https://ossci-datasets.s3.amazonaws.com/mnist/", description="MNIST files' base URL."
    )
    fashion_mnist_mirror: str = Field(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", description="Fashion-MNIST's base URL."
    )
    cifar10_mirror: str = Field(
        "https://www.cs.toronto.edu/~kriz/", description="CIFAR-10 archive's base URL."
    )
    download_sha256: dict[str, str] = Field(
        default_factory=dict,
        description='Expected SHA-256 per "<dataset>/<file>", replacing the built-in digest (a mirror that '
        "republished a file; tests).",
    )
    max_download_bytes: int = Field(
        256 << 20, ge=1024, le=1 << 34, description="Largest file a download may be."
    )

    api_keys_file: Path | None = Field(
        None,
        description="API keys: one '<sha256 hex> <scopes> <name>' per line; unset = no auth, loopback only.",
    )

    # Serving (BNLAB_SERVE_*): invalid values stop the API at start-up.
    serve_micro_batching: bool = Field(
        True, description="Gather concurrent requests for a model into one batch."
    )
    serve_max_batch_size: int = Field(64, ge=1, le=1024, description="Requests per batch, at most.")
    # 0: a batch is formed as soon as a thread is free. Under load batches fill by themselves while
    # the threads are busy; waiting for stragglers only delays a lone request (0.5 ms of wait cost
    # 0.6 ms of p50 latency at one client and gained nothing at 64, on the article's model).
    serve_max_wait_ms: float = Field(
        0.0, ge=0, le=100, description="How long a batch may wait for more requests."
    )
    # A request alone with a model this cheap is answered on the event loop, without the batcher's two
    # thread hand-offs (article's model, one client: p50 1.1-1.4 -> 0.8-1.0 ms). 0: always the batcher.
    serve_inline_max_us: float = Field(
        100.0,
        ge=0,
        le=10_000,
        description="Answer a lone request on the event loop when its model's two-sample forward pass"
        " takes at most this many microseconds (0: never).",
    )
    # A name's lookup (alias → run → newest version) costs more than the article's forward pass.
    # Changes committed by this process apply at once; others' within this time.
    serve_name_cache_ms: float = Field(
        1000.0, ge=0, le=60_000, description="How long a resolved model name is reused; 0: read every batch."
    )
    serve_cache_mb: int = Field(256, ge=1, le=65536, description="Memory for cached models (both variants).")
    serve_inference_threads: int = Field(
        0, ge=0, le=256, description="Threads running batches; 0 = the cores."
    )

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        # Resolve once so the API and a worker started from the same folder agree on every path.
        return value.expanduser().resolve()

    @field_validator("preload_datasets")
    @classmethod
    def _known_preloads(cls, value: str) -> str:
        unknown = [name for name in _names(value) if name not in PRELOADABLE]
        if unknown:
            raise ValueError(
                f"unknown dataset(s) {', '.join(unknown)}; expected some of {', '.join(PRELOADABLE)}"
            )
        return value

    @field_validator("mnist_mirror", "fashion_mnist_mirror", "cifar10_mirror")
    @classmethod
    def _http_base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")) or not value.endswith("/"):
            raise ValueError(f"a mirror must be an http(s) base URL ending in '/', got {value!r}")
        return value

    @field_validator("download_sha256")
    @classmethod
    def _hex_digests(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [key for key, digest in value.items() if not re.fullmatch(r"[0-9a-f]{64}", digest)]
        if bad:
            raise ValueError(f"download_sha256 values must be 64 lowercase hex digits; check {bad}")
        return value

    @model_validator(mode="after")
    def _refuse_open_network_binding(self) -> Self:
        # Without API keys anyone who reaches the port can train and read models: loopback only.
        if self.api_keys_file is None and not self.binds_loopback:
            raise ValueError(
                f"BNLAB_HOST={self.host} is not a loopback address and no BNLAB_API_KEYS_FILE is set: "
                "create keys with `bnlab keys create` before exposing the API"
            )
        if self.lease_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("BNLAB_LEASE_TIMEOUT_S must be longer than BNLAB_HEARTBEAT_INTERVAL_S")
        return self

    @property
    def broker_visibility_timeout_s(self) -> int:
        # Redis redelivers an unacked message after this long; it must exceed every run's hard time
        # limit, or a long run would be handed to a second worker while the first still trains it.
        return self.max_run_seconds + 3600

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'bnlab.db'}"

    @property
    def preload_dataset_names(self) -> list[str]:
        return _names(self.preload_datasets)

    @property
    def broker_folder(self) -> Path:
        return self.data_dir / "broker"

    @property
    def uses_embedded_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    @property
    def binds_loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"

    def effective_torch_threads(self) -> int:
        if self.torch_threads:
            return self.torch_threads
        # Small models train fastest on one thread per process; share the cores between processes.
        return max(1, (os.cpu_count() or 1) // self.training_processes)

    def effective_inference_threads(self) -> int:
        # The cores, in each API process: a process with one thread stalled its batches behind each
        # other while its peer's were idle (8 clients on 2 processes of 2 cores: 0.3x the rate).
        return self.serve_inference_threads or os.cpu_count() or 1

    @property
    def api_process_count(self) -> int:
        return self.api_processes or os.cpu_count() or 1

    @property
    def training_processes(self) -> int:
        """BNLAB_WORKER_CONCURRENCY, with 0 read as the number of cores this process sees."""
        return self.worker_concurrency or os.cpu_count() or 1


def _names(listed: str) -> list[str]:
    return [name.strip() for name in listed.split(",") if name.strip()]


@lru_cache
def get_settings() -> Settings:
    return Settings()
