"""The dashboard's search pages in headless Chromium (tests/browser's driver), on a real API and
worker: a small search lists, and its page shows every trial, the best one and Optuna's plots."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.browser.test_dashboard import chromium, shot, text_of, wait_until
from tests.conftest import sqlite_backend_at
from tests.integration.stack import Stack, start_stack

pytestmark = pytest.mark.integration

SEARCH = {
    "name": "page",
    "base": {
        "dataset": {"name": "synthetic", "limit": 300},
        "model": {"hidden": [16]},
        "train": {"epochs": 2},
    },
    "space": {
        "train.lr": {"type": "float", "low": 1e-3, "high": 0.1, "log": True},
        "model.norm.kind": {"type": "categorical", "choices": ["none", "batch"]},
    },
    "trials": 3,
    "seeds": [0, 1],
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder: Path = tmp_path_factory.mktemp("search-page")
    with start_stack(sqlite_backend_at(folder), folder / "logs") as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    driver = chromium()
    try:
        yield driver
    finally:
        driver.quit()


def test_the_search_page_shows_trials_the_best_one_and_the_plots(stack: Stack, browser: WebDriver) -> None:
    submitted = stack.client.post("/api/v1/searches", json=SEARCH)
    assert submitted.status_code == 202, submitted.text
    search_id = submitted.json()["id"]

    browser.get(f"{stack.base_url}/#/searches")
    wait_until(
        lambda: browser.find_elements(By.CSS_SELECTOR, f"tr[data-search-id='{search_id}']"), 30, "the list"
    )
    browser.get(f"{stack.base_url}/#/searches/{search_id}")
    # The page follows the search while it runs: all three trials end up complete.
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and "finished" not in text_of(browser, "#search-summary"):
        time.sleep(0.5)
    assert "finished" in text_of(browser, "#search-summary"), stack.tail_logs()
    rows = browser.find_elements(By.CSS_SELECTOR, "#search-trials-table tbody tr")
    assert len(rows) == 3
    final = stack.client.get(f"/api/v1/searches/{search_id}").json()
    best = final["best"]
    assert f"best: trial {best['number']}" in text_of(browser, "#search-best")
    assert f"{best['value']:.4f}" in text_of(browser, "#search-best")
    loaded = wait_until(
        lambda: browser.execute_script(
            "const imgs = [...document.querySelectorAll('#search-plots img')];"
            "return imgs.length === 3 && imgs.every((i) => i.complete && i.naturalWidth === 1000);"
        ),
        30,
        "the three plots",
    )
    assert loaded
    shot(browser, "search-page")
