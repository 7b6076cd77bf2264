"""There is no Docker engine on the build machines: the compose file and Dockerfile are checked by parsing."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.cli import COMMANDS
from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"api", "worker", "redis", "postgres", "migrate"}


def test_only_the_api_is_published_and_only_on_loopback(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["api"]["ports"] == ["127.0.0.1:8000:8000"]
    for name in ("worker", "redis", "postgres", "migrate"):
        assert "ports" not in services[name], f"{name} must not be published"


def test_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("api", "worker", "redis", "postgres"):
        assert services[name]["healthcheck"]["test"], f"{name} needs a healthcheck"
    assert "/health/ready" in " ".join(services["api"]["healthcheck"]["test"])


def test_api_and_worker_share_their_settings(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]["environment"]
    worker = compose["services"]["worker"]["environment"]
    for key in ("BNLAB_DATABASE_URL", "BNLAB_BROKER_URL", "BNLAB_DATA_DIR"):
        assert api[key] == worker[key], key
    assert worker["BNLAB_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert worker["BNLAB_BROKER_URL"].startswith("redis://")
    assert compose["services"]["api"]["image"] == compose["services"]["worker"]["image"]


def test_the_worker_trains_like_make_run(compose: dict[str, Any]) -> None:
    # One training process per core (0), each decoding Fashion-MNIST as it starts; values Settings takes.
    worker = compose["services"]["worker"]["environment"]
    settings = Settings(
        worker_concurrency=int(worker["BNLAB_WORKER_CONCURRENCY"]),
        preload_datasets=worker["BNLAB_PRELOAD_DATASETS"],
    )
    assert settings.training_processes == (os.cpu_count() or 1)
    assert settings.preload_dataset_names == ["fashion-mnist"]


def test_one_image_whose_command_picks_the_role(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for role in ("api", "worker", "migrate"):
        assert services[role]["command"] == [role]
        assert role in COMMANDS
    assert services["migrate"]["restart"] == "no"
    for role in ("api", "worker"):
        assert services[role]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_the_exposed_api_requires_api_keys(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    assert api["environment"]["BNLAB_HOST"] == "0.0.0.0"
    assert api["environment"]["BNLAB_API_KEYS_FILE"] == "/run/secrets/bnlab_keys"
    assert "bnlab_keys" in api["secrets"]
    assert compose["secrets"]["bnlab_keys"]["file"] == "./bnlab-keys.txt"


def test_redis_needs_a_password(compose: dict[str, Any]) -> None:
    assert "--requirepass" in compose["services"]["redis"]["command"]


def test_dockerfile_installs_like_the_makefile() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-e '\.\[dev\]'", makefile)
    assert re.search(r"pip install .* \.\s*$", dockerfile, re.MULTILINE), (
        "the image installs the project itself"
    )
    assert 'ENTRYPOINT ["bnlab"]' in dockerfile
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "torch==2.13.0" in project["dependencies"]
    assert project["scripts"]["bnlab"] == "service.cli:main"
    for folder in ("service", "workers", "migrations"):
        assert f"COPY {folder} ./{folder}" in dockerfile
