"""Every card this build can run, at the test scale (synthetic data, one epoch, two seeds), through a
real API and worker, driven by the one command that writes the record: `bnlab cards run --all`. It
checks the wiring (experiments, report, statistics, verdicts, figure, record), not the claims."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.integration.stack import Stack, stack_on

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("cards")
    with stack_on(
        "sqlite", folder, {"BNLAB_PRELOAD_DATASETS": "", "BNLAB_WORKER_CONCURRENCY": "2"}
    ) as running:
        yield running


def test_every_available_card_runs_reports_and_draws_at_the_test_scale(stack: Stack, tmp_path: Path) -> None:
    record = tmp_path / "replications.md"
    env = os.environ | {"BNLAB_URL": stack.base_url}
    command = [sys.executable, "-m", "service.cli", "cards", "run", "--all", "--scale", "test"]
    done = subprocess.run(
        [*command, "--write", str(record)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr + stack.tail_logs()

    cards = stack.client.get("/api/v1/cards").json()["items"]
    available = [c for c in cards if c["available"]]
    assert len(available) >= 7
    text = record.read_text()
    for card in cards:
        assert f"## {card['name']}" in text
        if not card["available"]:
            assert (
                stack.client.post(f"/api/v1/cards/{card['name']}", json={"scale": "test"}).status_code == 409
            )
            continue
        report = stack.client.get(f"/api/v1/cards/{card['name']}/report").json()
        assert report["finished"], report
        assert report["runs"]["queued"] == report["runs"]["running"] == 0
        assert report["runs"]["succeeded"] > 0, stack.tail_logs()
        assert report["measured_seconds"] > 0
        for claim in report["claims"]:
            assert claim["verdict"] in ("supported", "contradicted", "inconclusive")
            if claim["n"] < 2:  # a failed run drops its seed; fewer than two left: runs failed
                assert claim["reason"] == "runs failed"
                assert claim["dropped_seeds"]
                continue
            assert claim["n"] == 2
            assert claim["adjusted_p"] >= claim["p_value"]
        png = stack.client.get(report["figure_png"])
        assert png.status_code == 200
        assert Image.open(io.BytesIO(png.content)).size == (1200, 500)
        assert (tmp_path / "replications" / f"{card['name']}.png").stat().st_size > 0
    overview = stack.client.get("/api/v1/replications").json()["items"]
    assert all(r["last_run"] is not None for r in overview if r["available"])
