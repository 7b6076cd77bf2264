"""Typed settings, read once from environment variables with the BNLAB_ prefix."""

from __future__ import annotations

import ipaddress
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The embedded broker: kombu's filesystem transport in a folder under BNLAB_DATA_DIR. It needs no
# server, survives restarts of either process (messages are files) and proved reliable with one
# API and one worker process on one machine.
EMBEDDED_BROKER = "filesystem://"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BNLAB_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address the API binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port the API listens on.")
    data_dir: Path = Field(
        Path("bnlab-data"), description="Datasets, the SQLite file and the embedded broker."
    )
    database_url: str = Field("", description="SQLAlchemy URL; empty means SQLite in data_dir.")
    broker_url: str = Field(
        EMBEDDED_BROKER, description="Celery broker URL; filesystem:// is the embedded one."
    )
    queue: str = Field("bnlab", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Celery queue name.")
    worker_concurrency: int = Field(1, ge=1, le=64, description="Training processes per worker.")
    torch_threads: int = Field(0, ge=0, le=256, description="Threads per training process; 0 = automatic.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        # Resolve once so the API and a worker started from the same folder agree on every path.
        return value.expanduser().resolve()

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'bnlab.db'}"

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
        return max(1, (os.cpu_count() or 1) // self.worker_concurrency)


@lru_cache
def get_settings() -> Settings:
    return Settings()
