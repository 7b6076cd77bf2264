"""The compose file and Dockerfile, checked by parsing; `make compose-test` (drive_compose.py) builds and
runs them for real with Podman."""

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
    # Port 8000 on the host unless BNLAB_API_PORT says otherwise; the address is always loopback.
    assert services["api"]["ports"] == ["127.0.0.1:${BNLAB_API_PORT:-8000}:8000"]
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
    # pyproject.toml's dependencies in a layer of their own, then the project itself without them.
    assert '["project"]["dependencies"]' in dockerfile
    assert re.search(r"pip install --no-deps \.(\s|$)", dockerfile, re.MULTILINE), (
        "the image installs the project itself"
    )
    assert "[dev]" not in dockerfile
    assert 'ENTRYPOINT ["bnlab"]' in dockerfile
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "torch==2.13.0" in project["dependencies"]
    assert project["scripts"]["bnlab"] == "service.cli:main"
    for folder in ("service", "workers", "migrations"):
        assert f"COPY {folder} ./{folder}" in dockerfile


def test_the_image_builds_on_the_public_base_by_default_and_runs_as_a_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", dockerfile, re.MULTILINE)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", dockerfile, re.MULTILINE)
    users = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert users
    assert users[-1] not in ("root", "0")
    healthcheck = dockerfile[dockerfile.index("HEALTHCHECK") :]
    assert "/health/ready" in healthcheck.split("ENTRYPOINT")[0]


def test_the_build_context_is_only_what_the_image_needs() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # everything else (.venv, build/, bnlab-data, keys) stays out
    for needed in ("pyproject.toml", "README.md", "service/", "workers/", "migrations/"):
        assert f"!{needed}" in ignore


def test_compose_test_images_carry_the_names_the_compose_file_uses(compose: dict[str, Any]) -> None:
    # drive_compose.py builds stand-ins for postgres and redis under the compose file's own names,
    # so the file runs unchanged; Podman resolves short names to these.
    from tests.deploy import drive_compose

    for service, image in (("postgres", "postgres"), ("redis", "redis"), ("api", "bnlab")):
        name = compose["services"][service]["image"]
        full = drive_compose.IMAGES[image]
        assert full.endswith("/" + name) or full.endswith("/library/" + name), (name, full)
    for name in ("postgres", "redis"):
        assert (ROOT / "tests" / "deploy" / f"Containerfile.{name}").exists()


def test_a_restarted_worker_container_is_a_new_celery_node() -> None:
    # In a container the worker is PID 1 on every start and keeps its hostname across a restart; a node
    # refuses the runs its own name handed back at shutdown, so each start must name a new node.
    from service.cli import worker_command

    commands = [worker_command() for _ in range(3)]
    names = {command[command.index("--hostname") + 1] for command in commands}
    assert len(names) == 3
    assert all(name.startswith(f"bnlab-{os.getpid()}-") and name.endswith("@%h") for name in names)
