"""The dashboard in headless Chromium (Debian's `chromium` and `chromium-driver`, driven by Selenium;
nothing is downloaded), against a real API and worker that require API keys.

Screenshots are kept in test-artifacts/browser/ (printed at the end of each test). Without Chromium
the tests fail, never skip: `.ci/run` installs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from service.auth import create_key
from tests.conftest import sqlite_backend_at
from tests.integration.stack import Stack, start_stack

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
RUN = {"dataset": {"name": "synthetic", "limit": 1500}, "model": {"hidden": [32]}, "train": {"epochs": 4}}


@pytest.fixture(scope="module")
def keyed_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str]]:
    folder = tmp_path_factory.mktemp("browser")
    keys_file = folder / "keys.txt"
    key = create_key(keys_file, scopes="read,train", name="dashboard")
    with start_stack(
        sqlite_backend_at(folder), folder / "logs", {"BNLAB_API_KEYS_FILE": str(keys_file)}
    ) as stack:
        stack.client.headers["Authorization"] = f"Bearer {key}"
        yield stack, key


# Every host name but loopback fails to resolve: a page that needs the internet shows it.
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"


def chromium(*extra: str) -> WebDriver:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: apt-get install chromium chromium-driver (.ci/run does)")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-dev-shm-usage", "--window-size=1280,1000", *extra):  # fmt: skip
        options.add_argument(arg)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    driver = chromium()
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(condition: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def text_of(driver: WebDriver, css: str) -> str:
    text: str = driver.execute_script(f"return document.querySelector({css!r})?.innerText || ''")
    return text.strip()


def shot(driver: WebDriver, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")  # noqa: T201 - where the artifact is
    return path


def open_with_key(driver: WebDriver, stack: Stack, key: str) -> None:
    driver.get(f"{stack.base_url}/")
    notice = wait_until(lambda: text_of(driver, "#notice"), 15, "the API-key notice")
    assert "API key" in notice  # the data is behind the keys; the page is not
    field = driver.find_element(By.ID, "api-key")
    field.send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait_until(lambda: driver.find_elements(By.ID, "runs-table") or "No runs yet" in text_of(driver, "#runs"))


def test_a_run_submitted_through_the_api_appears_and_its_curves_grow_live(
    browser: WebDriver, keyed_stack: tuple[Stack, str]
) -> None:
    stack, key = keyed_stack
    open_with_key(browser, stack, key)
    # The stack's one worker is kept busy until the page watches, so the page sees the run from
    # before its first epoch however fast training is or however slowly the page loads.
    blocker = stack.submit(RUN | {"name": "browser-blocker", "train": {"epochs": 500}})
    stack.wait_for(blocker, {"running"})
    run_id = stack.submit(RUN | {"name": "browser-bn", "model": {"hidden": [32], "norm": {"kind": "batch"}}})
    wait_until(
        lambda: browser.find_elements(By.CSS_SELECTOR, f'tr[data-run-id="{run_id}"]'), 15, "the run's row"
    )
    browser.get(f"{stack.base_url}/#/runs/{run_id}")
    wait_until(
        lambda: browser.find_elements(By.CSS_SELECTOR, '#run-status [data-status="queued"]'),
        15,
        "the run page showing the queued run",
    )
    assert stack.client.post(f"/api/v1/runs/{blocker}/cancel").status_code == 200
    samples: list[tuple[str, int]] = []

    def finished() -> bool:
        # One script reads both, so nothing the page replaces meanwhile goes stale between them.
        status, points = browser.execute_script(
            "return [document.querySelector('#run-status [data-status]')?.dataset.status,"
            " document.getElementById('loss-chart')?.dataset.points]"
        )
        if status and points is not None:
            samples.append((status, int(points)))
        return bool(samples) and samples[-1] == ("succeeded", 8)  # 4 epochs x (train, val)

    wait_until(finished, 120, "the run to finish on the page")
    # The page saw the run before it ended, and the curve grew while it watched.
    assert samples[0][0] in ("queued", "running"), samples[:3]
    assert len({points for _, points in samples}) >= 2
    assert [points for _, points in samples] == sorted(points for _, points in samples)
    metrics = stack.client.get(f"/api/v1/runs/{run_id}/metrics").json()["epochs"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#epochs tbody tr")) == len(metrics) == 4
    shot(browser, "run-page")


def test_an_uploaded_image_and_a_drawing_get_predictions(
    browser: WebDriver, keyed_stack: tuple[Stack, str], tmp_path: Path
) -> None:
    stack, key = keyed_stack
    run_id = stack.submit(RUN | {"name": "browser-model"})
    stack.wait_for(run_id, {"succeeded"})
    if not browser.find_elements(By.ID, "api-key") or not browser.execute_script(
        "return localStorage.getItem('bnlab.apiKey')"
    ):
        open_with_key(browser, stack, key)
    image = tmp_path / "seven.png"
    canvas = Image.new("L", (140, 140), 255)
    ImageDraw.Draw(canvas).line([(30, 30), (110, 30), (60, 120)], fill=0, width=14)
    canvas.save(image)
    with image.open("rb") as file:
        expected = stack.client.post(
            f"/api/v1/runs/{run_id}/predict", files={"file": ("s.png", file, "image/png")}
        )
    browser.get(f"{stack.base_url}/#/models/{run_id}")
    wait_until(lambda: browser.find_elements(By.ID, "image-file"), 15, "the model page")
    browser.find_element(By.ID, "image-file").send_keys(str(image))
    shown = wait_until(lambda: text_of(browser, "#prediction"), 30, "the upload's prediction")
    assert shown == str(expected.json()["predictions"][0])

    pad = browser.find_element(By.ID, "pad")
    ActionChains(browser).move_to_element_with_offset(pad, -60, -60).click_and_hold().move_by_offset(
        120, 0
    ).move_by_offset(-60, 110).release().perform()
    browser.execute_script("document.getElementById('prediction-box').textContent = ''")
    browser.find_element(By.ID, "predict-drawing").click()
    drawn = wait_until(lambda: text_of(browser, "#prediction"), 30, "the drawing's prediction")
    assert drawn in {str(d) for d in range(10)}
    assert "28×28" not in text_of(
        browser, "#prediction-box"
    )  # the 280×280 drawing, letterboxed by the server
    shot(browser, "model-page")


def test_an_experiment_page_overlays_bn_and_no_bn_and_shows_the_report(
    browser: WebDriver, keyed_stack: tuple[Stack, str]
) -> None:
    stack, key = keyed_stack
    spec = {
        "name": "browser-grid",
        "base": RUN,
        "grid": {"model.norm.kind": ["none", "batch"]},
        "seeds": [0, 1],
    }
    created = stack.client.post("/api/v1/experiments", json=spec)
    assert created.status_code == 202, created.text
    experiment_id = created.json()["id"]
    if not browser.execute_script("return localStorage.getItem('bnlab.apiKey')"):
        open_with_key(browser, stack, key)
    browser.get(f"{stack.base_url}/#/experiments/{experiment_id}")
    wait_until(lambda: text_of(browser, "#experiment-status") == "finished", 180, "the experiment to finish")
    wait_until(
        lambda: len(browser.find_elements(By.CSS_SELECTOR, "#report-table tbody tr")) == 2, 15, "the report"
    )
    rows = [row.text for row in browser.find_elements(By.CSS_SELECTOR, "#report-table tbody tr")]
    assert rows[0].startswith("norm=none 2/2")
    assert rows[1].startswith("norm=batch 2/2")
    points = int(browser.find_element(By.ID, "exp-loss-chart").get_attribute("data-points") or 0)
    assert points == 4 * 4 * 2  # 4 runs x 4 epochs x (train, val)
    shot(browser, "experiment-page")


def test_the_api_reference_renders_with_the_network_blocked(keyed_stack: tuple[Stack, str]) -> None:
    stack, _ = keyed_stack
    driver = chromium(OFFLINE)
    try:
        driver.get(f"{stack.base_url}/docs")
        operations = wait_until(
            lambda: len(driver.find_elements(By.CSS_SELECTOR, ".opblock")), 30, "Swagger UI's operations"
        )
        assert operations >= 30  # every documented route, drawn from /openapi.json
        assert "Submit a training run" in driver.find_element(By.TAG_NAME, "body").text
        loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded, "the page loaded no resources"
        assert all(url.startswith(stack.base_url) for url in loaded), loaded
        shot(driver, "api-docs-offline")
    finally:
        driver.quit()
