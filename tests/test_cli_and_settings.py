"""The `bnlab` command and the typed settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.cli import worker_command
from service.config import Settings
from tests.conftest import clear_setting_caches


def test_bnlab_help_lists_every_role() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    for command in ("api", "worker", "migrate", "run"):
        assert command in result.stdout


def test_defaults_are_the_embedded_database_and_broker(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BNLAB_DATA_DIR", str(tmp_path))
    settings = Settings()
    assert settings.sqlalchemy_url == f"sqlite:///{tmp_path / 'bnlab.db'}"
    assert settings.uses_embedded_broker
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.binds_loopback


def test_settings_read_the_bnlab_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BNLAB_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    monkeypatch.setenv("BNLAB_BROKER_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("BNLAB_PORT", "9001")
    settings = Settings()
    assert settings.sqlalchemy_url.startswith("postgresql+psycopg://")
    assert not settings.uses_embedded_broker
    assert settings.port == 9001


@pytest.mark.parametrize(
    ("name", "value"), [("BNLAB_PORT", "0"), ("BNLAB_QUEUE", "a b"), ("BNLAB_LOG_LEVEL", "loud")]
)
def test_bad_settings_fail_fast(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_worker_command_runs_celery_on_the_workers_package_and_queue() -> None:
    command = worker_command()
    assert command[1:5] == ["-m", "celery", "-A", "workers.celery_app"]
    assert "--queues" in command


def test_worker_concurrency_0_starts_one_training_process_per_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BNLAB_WORKER_CONCURRENCY", "0")
    cores = os.cpu_count() or 1
    settings = Settings()
    assert settings.training_processes == cores
    assert settings.effective_torch_threads() == 1  # the cores shared out: one thread each
    clear_setting_caches()
    try:
        command = worker_command()
    finally:
        clear_setting_caches()
    assert command[command.index("--concurrency") + 1] == str(cores)
    monkeypatch.setenv("BNLAB_WORKER_CONCURRENCY", "3")
    assert Settings().training_processes == 3
