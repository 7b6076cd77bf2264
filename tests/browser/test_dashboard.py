"""The dashboard in headless Chromium (Debian's `chromium` and `chromium-driver`, driven by Selenium;
nothing is downloaded), against a real API and worker that require API keys.

Screenshots are kept in test-artifacts/browser/ (printed at the end of each test). Without Chromium
the tests fail, never skip: `.ci/run` installs it.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, get_args

import pytest
from PIL import Image, ImageDraw
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from service.auth import create_key
from service.ml.config import NormKind
from service.models import EpochMetric, Run
from service.runs.schemas import RunCreate
from tests.conftest import sqlite_backend_at
from tests.integration.stack import Stack, start_stack

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
DOWNLOADS = ARTIFACTS / "downloads"
RUN = {"dataset": {"name": "synthetic", "limit": 1500}, "model": {"hidden": [32]}, "train": {"epochs": 4}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("browser")


@pytest.fixture(scope="module")
def keyed_stack(folder: Path) -> Iterator[tuple[Stack, str]]:
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
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(DOWNLOADS)}
    )
    return driver


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


def script_errors(driver: WebDriver) -> list[str]:
    """The page's uncaught errors since the last call (answers the server gave, such as the 401 before
    the key is typed, are not script errors)."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[attr-defined]
    return [
        e["message"]
        for e in entries
        if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]
    ]


def shot(driver: WebDriver, name: str) -> Path:
    assert script_errors(driver) == []
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")  # noqa: T201 - where the artifact is
    return path


def points_of(driver: WebDriver, chart_id: str) -> int:
    value = driver.execute_script(f"return document.getElementById({chart_id!r})?.dataset.points")
    return int(value or 0)


def ensure_key(driver: WebDriver, stack: Stack, key: str) -> None:
    fresh = not driver.current_url.startswith(stack.base_url)  # about:blank has no localStorage
    if fresh or not driver.execute_script("return localStorage.getItem('bnlab.apiKey')"):
        open_with_key(driver, stack, key)


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
    # Every probe is a chart of the same component: the activation statistics of epochs 0..4 of
    # the one normalisation slot, and the served model's BN running statistics.
    wait_until(lambda: points_of(browser, "activation-std-chart") == 5, 15, "the activation probe chart")
    assert points_of(browser, "activation-mean-chart") == 5
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#bn-table tbody tr"), 30, "the BN statistics")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#bn-table tbody tr")) == 1
    assert points_of(browser, "bn-running_var-chart") > 0
    # The deep-lab probes' charts (their route is not on every server: hidden where it answers 404)
    # read its answer's shape: a line per layer for one value, or per value of the whole network.
    body = {"epochs": [{"epoch": e, "layers": [{"layer": "fc1", "values": {"grad_norm": e + 1.0}},
                                               {"layer": "model", "values": {"loss": 2.0, "slope": 0.5}}]}
                       for e in (0, 1)]}  # fmt: skip
    shapes = browser.execute_script(
        "const [b] = arguments; return [probeLayerTraces(b, 'grad_norm'), probeModelTraces(b)]"
        ".map(ts => ts.map(t => [t.label, t.runs[0].points.length]))",
        body,
    )
    assert shapes == [[["fc1", 2]], [["loss", 2], ["slope", 2]]]
    shot(browser, "run-page")
    browser.execute_script("document.querySelector('h2').scrollIntoView()")  # the probes
    shot(browser, "run-probes")


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
    # Mean ± std per configuration: 2 configurations x (train, val) x 4 epochs, each its own colour.
    wait_until(lambda: points_of(browser, "exp-loss-chart") == 2 * 2 * 4, 15, "the mean curves")
    colours = browser.execute_script(
        "return [...document.querySelectorAll('#exp-loss-chart .legend .sample')]"
        ".map(s => [getComputedStyle(s).borderTopColor, getComputedStyle(s).borderTopStyle])"
    )
    assert len(colours) == 4
    assert len({c for c, _ in colours}) == 2  # a colour per configuration
    assert [style for _, style in colours] == ["solid", "dashed", "solid", "dashed"]  # validation dashed
    assert "browser-grid" in text_of(browser, "#exp-loss-chart .chart-title")
    # Hovering shows each configuration's mean ± std at that epoch in the legend.
    ActionChains(browser).move_to_element(
        browser.find_element(By.CSS_SELECTOR, "#exp-loss-chart .u-over")
    ).perform()
    wait_until(lambda: "±" in text_of(browser, "#exp-loss-chart .legend"), 10, "hover values")
    shot(browser, "experiment-page")
    Select(browser.find_element(By.CSS_SELECTOR, "#exp-loss-chart .x-mode")).select_by_value("time")
    wait_until(
        lambda: browser.find_element(By.ID, "exp-loss-chart").get_attribute("data-x") == "time",
        10,
        "x by time",
    )
    assert points_of(browser, "exp-loss-chart") == 2 * 2 * 4
    Select(browser.find_element(By.CSS_SELECTOR, "#exp-loss-chart .band-mode")).select_by_value("runs")
    wait_until(lambda: points_of(browser, "exp-loss-chart") == 4 * 4 * 2, 15, "one line per seed")


def finished_experiment(
    stack: Stack, name: str, grid: dict[str, list[Any]], seeds: list[int]
) -> dict[str, Any]:
    """The experiment called `name` (created now unless an earlier test did), once every run has ended."""
    found = stack.client.get("/api/v1/experiments", params={"q": name}).json()["items"]
    if found:
        experiment_id = found[0]["id"]
    else:
        created = stack.client.post(
            "/api/v1/experiments", json={"name": name, "base": RUN, "grid": grid, "seeds": seeds}
        )
        assert created.status_code == 202, created.text
        experiment_id = created.json()["id"]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        body: dict[str, Any] = stack.client.get(f"/api/v1/experiments/{experiment_id}").json()
        if body["finished"]:
            return body
        time.sleep(0.3)
    raise AssertionError(f"experiment {name} did not finish\n{stack.tail_logs()}")


def pick(driver: WebDriver, run_id: str) -> None:
    """Tick a run's checkbox (the live page may redraw its table at any moment: click from a script)."""
    script = (
        "const box = document.querySelector(`input.pick[data-run-id='${arguments[0]}']`);"
        "if (box && !box.checked) box.click();"
        "return JSON.parse(sessionStorage.getItem('bnlab.selection') || '[]').includes(arguments[0]);"
    )
    wait_until(lambda: driver.execute_script(script, run_id), 15, f"run {run_id} selected")


def downloaded(name: str, timeout: float = 15) -> str:
    path = DOWNLOADS / name
    wait_until(lambda: path.exists() and path.stat().st_size > 0, timeout, f"the download {name}")
    return path.read_text()


def test_runs_of_two_experiments_are_compared_side_by_side_and_downloaded(
    browser: WebDriver, keyed_stack: tuple[Stack, str]
) -> None:
    stack, key = keyed_stack
    norms = finished_experiment(stack, "browser-grid", {"model.norm.kind": ["none", "batch"]}, [0, 1])
    rates = finished_experiment(stack, "browser-lr", {"train.lr": [0.01, 0.003]}, [0])
    # A run submitted on its own, as the README's are: the same spec as the norm=batch runs but seed 1.
    alone = stack.submit(RUN | {"name": "browser-readme", "train": {"epochs": 4, "seed": 1}})
    stack.wait_for(alone, {"succeeded"})
    ensure_key(browser, stack, key)
    browser.execute_script("sessionStorage.clear()")
    # Runs are picked with the checkboxes of any list: the runs list, and two experiments' run tables.
    browser.get(f"{stack.base_url}/#/")
    wait_until(lambda: browser.find_elements(By.ID, "filter-alone"), 15, "the runs list")
    Select(browser.find_element(By.ID, "filter-alone")).select_by_value("false")
    browser.find_element(By.ID, "run-search").send_keys("readme")
    wait_until(
        lambda: len(browser.find_elements(By.CSS_SELECTOR, "#runs-table tbody tr")) == 1, 15, "the search"
    )
    pick(browser, alone)
    picked = [alone, norms["runs"][0]["id"], norms["runs"][2]["id"], rates["runs"][0]["id"]]
    for experiment, run_ids in ((norms, picked[1:3]), (rates, picked[3:])):
        browser.get(f"{stack.base_url}/#/experiments/{experiment['id']}")
        for run_id in run_ids:
            pick(browser, run_id)
    assert text_of(browser, "#selection-count") == "4 runs selected"
    browser.find_element(By.ID, "compare-selected").click()
    wait_until(
        lambda: len(browser.find_elements(By.CSS_SELECTOR, "#compare-table tbody tr")) == 4,
        30,
        "the comparison",
    )
    assert points_of(browser, "compare-loss-chart") == 4 * 4 * 2  # 4 runs x 4 epochs x (train, val)
    differing = {
        row.get_attribute("data-field")
        for row in browser.find_elements(By.CSS_SELECTOR, "#spec-table tr.differs")
    }
    assert {"model.norm.kind", "train.lr", "train.seed", "name"} <= differing
    assert "train.epochs" not in differing
    # Everything but the seed: the lone run joins the norm=batch seed-0 run; the others stay apart.
    Select(browser.find_element(By.ID, "group-by")).select_by_value("seed")
    wait_until(
        lambda: len(browser.find_elements(By.CSS_SELECTOR, "#group-table tbody tr")) == 3, 15, "the groups"
    )
    sizes = [
        row.find_elements(By.TAG_NAME, "td")[1].text
        for row in browser.find_elements(By.CSS_SELECTOR, "#group-table tbody tr")
    ]
    assert sorted(sizes) == ["1", "1", "2"]
    assert points_of(browser, "compare-loss-chart") == 3 * 4 * 2  # a mean curve per group
    assert "group=seed" in browser.current_url  # the comparison is saved in its URL

    log = browser.find_element(By.ID, "compare-loss-chart-log")
    log.click()
    wait_until(
        lambda: browser.find_element(By.ID, "compare-loss-chart").get_attribute("data-scale") == "log",
        10,
        "log scale",
    )
    assert "(log)" in text_of(browser, "#compare-loss-chart") or points_of(browser, "compare-loss-chart") > 0
    shot(browser, "comparison")

    (DOWNLOADS / "comparison.csv").unlink(missing_ok=True)
    browser.find_element(By.ID, "compare-csv").click()
    rows = list(csv.DictReader(io.StringIO(downloaded("comparison.csv"))))
    assert len(rows) == 4 * 4
    assert [r["run_id"] for r in rows[::4]] == picked
    first = stack.client.get(f"/api/v1/runs/{picked[0]}/metrics").json()["epochs"]
    assert [float(r["val_loss"]) for r in rows[:4]] == [e["val_loss"] for e in first]

    # A card page draws each of its experiments with the same component, read once.
    points = browser.execute_async_script(
        "const [id, done] = arguments; experimentCurves(id, new AbortController().signal)"
        ".then(box => done(box.querySelector('.chart-card').dataset.points))",
        norms["id"],
    )
    assert int(points) == 2 * 2 * 4  # 2 configurations x (train, val) x 4 epochs, as mean curves

    # A chart's pictures: vectors drawn from the plotted data, and the canvas as PNG.
    for picture in ("comparison-loss.svg", "comparison-loss.png"):
        (DOWNLOADS / picture).unlink(missing_ok=True)
    browser.find_element(By.CSS_SELECTOR, '#compare-loss-chart [data-download="svg"]').click()
    svg = downloaded("comparison-loss.svg")
    assert svg.count("<polyline") == 3 * 2  # a mean curve per group and split
    assert svg.count("<polygon") == 2  # the band of the one group of two runs, training and validation
    assert "(log)" in svg
    browser.find_element(By.CSS_SELECTOR, '#compare-loss-chart [data-download="png"]').click()
    wait_until(lambda: (DOWNLOADS / "comparison-loss.png").exists(), 15, "the PNG")
    assert (DOWNLOADS / "comparison-loss.png").read_bytes().startswith(b"\x89PNG")

    # A chart's own data, and a run's metrics.csv from the server (fetched with the key).
    (DOWNLOADS / "comparison-accuracy.csv").unlink(missing_ok=True)
    browser.find_element(By.CSS_SELECTOR, '#compare-accuracy-chart [data-download="csv"]').click()
    chart_rows = list(csv.DictReader(io.StringIO(downloaded("comparison-accuracy.csv"))))
    assert len(chart_rows) == 4 * 4 * 2  # every run's raw points, whatever the grouping
    browser.get(f"{stack.base_url}/#/runs/{picked[3]}")
    name = f"{picked[3]}-metrics.csv"
    (DOWNLOADS / name).unlink(missing_ok=True)
    wait_until(
        lambda: browser.find_elements(By.CSS_SELECTOR, f'[data-download="{name}"]'), 15, "the run page"
    )
    browser.find_element(By.CSS_SELECTOR, f'[data-download="{name}"]').click()
    assert downloaded(name) == stack.client.get(f"/api/v1/runs/{picked[3]}/metrics.csv").text


BULK_RUNS = 120


def insert_finished_runs(folder: Path, count: int) -> list[str]:
    """`count` finished runs with 3 epochs each, written straight into the stack's SQLite database
    (a second faster than training them: this test is about the list, not training). Named bulk-000
    (oldest, lowest val loss) to bulk-119; bulk-007's name is long."""
    spec = RunCreate.model_validate(RUN).model_dump(mode="json")
    engine = create_engine(f"sqlite:///{folder / 'data' / 'bnlab.db'}")
    start = datetime.now(UTC) - timedelta(days=1)
    ids = []
    with Session(engine) as session:
        for i in range(count):
            name = f"bulk-{i:03d}" + (
                " with a name far longer than any column should be" * 3 if i == 7 else ""
            )
            at = start + timedelta(seconds=i)
            run = Run(name=name, spec=spec | {"name": name}, status="succeeded", epochs_done=3,
                      created_at=at, finished_at=at)  # fmt: skip
            session.add(run)
            session.flush()
            ids.append(run.id)
            for epoch in (1, 2, 3):
                loss = 0.001 * (i + 1) / epoch
                session.add(EpochMetric(run_id=run.id, epoch=epoch, train_loss=loss, train_accuracy=0.9,
                                        val_loss=loss, val_accuracy=0.9, seconds=0.1))  # fmt: skip
        session.commit()
    engine.dispose()
    return ids


def test_the_runs_list_pages_sorts_and_searches_past_a_hundred_runs(
    browser: WebDriver, keyed_stack: tuple[Stack, str], folder: Path
) -> None:
    stack, key = keyed_stack
    ids = insert_finished_runs(folder, BULK_RUNS)
    total = stack.client.get("/api/v1/runs", params={"limit": 1}).json()["total"]
    assert total >= BULK_RUNS
    ensure_key(browser, stack, key)
    browser.get(f"{stack.base_url}/#/")
    wait_until(lambda: "of" in text_of(browser, "#runs-pager-range"), 15, "the pager")
    assert text_of(browser, "#runs-pager-range").startswith(f"1–50 of {total}")
    norms = browser.execute_script(
        "return [...document.querySelectorAll('#filter-norm option')].map(o => o.value)"
    )
    assert norms == ["", *get_args(NormKind)]  # the server's own list, from its OpenAPI document
    pages = -(-total // 50)
    for page in range(2, pages + 1):
        browser.find_element(By.ID, "runs-pager-next").click()
        shown = f"page {page} of"
        wait_until(lambda: shown in text_of(browser, "#runs-pager-range"), 15, shown)  # noqa: B023
    # The oldest run is on the last page, past the first 50 (and past 100).
    assert browser.find_elements(By.CSS_SELECTOR, f'tr[data-run-id="{ids[0]}"]')
    assert "page=" in browser.current_url
    assert not browser.find_element(By.ID, "runs-pager-next").is_enabled()

    browser.find_element(By.ID, "run-search").send_keys("bulk-007")
    wait_until(
        lambda: len(browser.find_elements(By.CSS_SELECTOR, "#runs-table tbody tr")) == 1, 15, "the search"
    )
    # A long name is cut with an ellipsis, whole in its tooltip, and the table still fits the page.
    cell = browser.find_element(By.CSS_SELECTOR, f'tr[data-run-id="{ids[7]}"] td.name a')
    assert (cell.get_attribute("title") or "").startswith("bulk-007 with a name far longer")
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")

    search = browser.find_element(By.ID, "run-search")
    search.clear()
    search.send_keys("bulk-")
    wait_until(lambda: f"of {BULK_RUNS}" in text_of(browser, "#runs-pager-range"), 15, "the bulk runs")
    browser.find_element(By.CSS_SELECTOR, 'button.sort[data-sort="val_loss"]').click()

    def first_row() -> str | None:
        run_id: str | None = browser.execute_script(
            "return document.querySelector('#runs-table tbody tr')?.dataset.runId"
        )
        return run_id

    wait_until(lambda: first_row() == ids[0], 15, "sorted by val loss, lowest first")
    browser.find_element(By.CSS_SELECTOR, 'button.sort[data-sort="val_loss"]').click()
    wait_until(lambda: first_row() == ids[-1], 15, "sorted by val loss, highest first")
    assert "sort=val_loss" in browser.current_url
    shot(browser, "runs-list")
    # The replication cards overview: one row per card the server has.
    browser.get(f"{stack.base_url}/#/cards")
    wait_until(
        lambda: len(browser.find_elements(By.CSS_SELECTOR, "#cards-table tbody tr")) >= 16,
        15,
        "the cards page",
    )
    assert browser.find_elements(By.CSS_SELECTOR, 'tr[data-card="wu-he-2018"]')
    # A card page, on a stand-in for the cards routes (the page itself stays as it is served).
    claim = {"sentence": "BN trains faster", "metric": "final.val_accuracy", "contrast": "batch - none",
             "direction": "positive", "smallest": 0.01}  # fmt: skip
    card = {"name": "demo", "title": "Demo card", "citation": "A paper", "claim": "BN helps",
            "paper_setup": "big", "paper_figures": [{"text": "fig 1", "verified": True}], "setup": "small",
            "differences": "size", "available": True, "unavailable_reason": None,
            "estimated_seconds": {"test": 5, "quick": 200}, "claims": [claim], "last_run": None}  # fmt: skip
    browser.execute_script(
        "const [card] = arguments; const real = window.fetch;"
        "window.fetch = (path, options) => String(path).startsWith('/api/v1/cards/')"
        " ? Promise.resolve(new Response(JSON.stringify(card), {headers: {'content-type': 'text/json'}}))"
        " : real(path, options);"
        "location.hash = '#/cards/demo';",
        card,
    )
    wait_until(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#contrasts-table tbody tr"), 15, "the card page"
    )
    assert "Demo card" in text_of(browser, "h1")


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
