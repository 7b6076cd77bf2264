"""`make loadtest`: hey, a compiled load generator, against a real `bnlab run` stack (what `make run`
starts: API + worker, one training process per core), first on SQLite with the embedded broker,
then on Postgres + Redis.

Per backend, four phases:
  a. submits     SUBMITS concurrent POST /api/v1/runs; then every run finishes, each exactly once,
                 with one model;
  b. serving     POST /api/v1/runs/{id}/predict, then V2 infer, 128 clients for SERVE_S seconds each;
  c. streams     200 clients following runs' Server-Sent Events while those runs train;
  d. experiments EXPERIMENTS concurrent POST /api/v1/experiments of 10 runs each; every run
                 finishes exactly once, with one model.
It asserts: no connection error or timeout, no 5xx other than 503 with Retry-After (hey's counts,
and every line of the server's access log), no lost or duplicated run (one row per 202, one
attempt, every epoch once, one model each); it prints throughput and p50/p99 per phase.

Bounded: every hey has a request count or a duration and a per-request timeout; every wait has a
deadline. Loopback only; the stack (a process group this script starts) is stopped by its PID.
LOAD_SHORT=1 is the short form CI runs (fewer runs and seconds, same checks); LOAD_BACKENDS=sqlite
(or postgres) runs one backend only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.orm import InstrumentedAttribute

from service.db import make_engine
from service.models import EpochMetric, ModelArtifact, Run
from tests.conftest import bnlab_free_environ, postgres_backend_at

ROOT = Path(__file__).resolve().parents[2]
SHORT = os.environ.get("LOAD_SHORT") == "1"
BACKENDS = os.environ.get("LOAD_BACKENDS", "sqlite,postgres").split(",")
SUBMITS = 100
SERVE_CLIENTS = 128
SERVE_S = 3 if SHORT else 10
STREAM_CLIENTS = 200
STREAM_RUNS = 4
EXPERIMENTS = 20 if SHORT else 50
RUNS_PER_EXPERIMENT = 10
REQUEST_TIMEOUT_S = 60  # hey's per-request limit; a stream's is its run's training time plus this
FINISH_TIMEOUT_S = 600  # for every run of a phase to finish
# A tiny run: 80 training samples, one epoch; the stream phase's runs train a few seconds.
TINY = {"dataset": {"name": "synthetic", "limit": 100}, "train": {"epochs": 1}}
STREAM_EPOCHS = 4
STREAMED = {"dataset": {"name": "synthetic", "limit": 2000}, "train": {"epochs": STREAM_EPOCHS}}
IMAGE = [round((i % 28) / 27, 3) for i in range(784)]


def say(text: str = "") -> None:
    print(text, flush=True)  # noqa: T201 - the driver's report


# ---------------------------------------------------------------------------------------- hey


@dataclass
class Load:
    """hey's summary: status counts, transport errors, throughput and latency percentiles (s)."""

    label: str
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    per_s: float = 0.0
    percentiles: dict[int, float] = field(default_factory=dict)
    slowest: float = float("nan")

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    def line(self) -> str:
        codes = " ".join(f"{n}×{code}" for code, n in sorted(self.statuses.items()))
        # hey gives no p99 for fewer than 100 answers: the slowest then stands in, named so.
        tail = f"p99 {self.percentiles[99] * 1000:7.0f} ms" if 99 in self.percentiles else ""
        tail = tail or f"max {self.slowest * 1000:7.0f} ms"
        p50 = f"p50 {self.percentiles.get(50, self.slowest) * 1000:7.0f} ms"
        return f"{self.label:<34} {codes:<18} {self.per_s:8.1f}/s  {p50}  {tail}"


def parse_hey(label: str, text: str) -> Load:
    load = Load(label)
    if found := re.search(r"Requests/sec:\s+([\d.]+)", text):
        load.per_s = float(found[1])
    if found := re.search(r"Slowest:\s+([\d.]+)", text):
        load.slowest = float(found[1])
    for pct, secs in re.findall(r"^\s+(\d+)%+ in ([\d.]+) secs", text, re.MULTILINE):
        if int(pct):
            load.percentiles[int(pct)] = float(secs)
    section = text.split("Status code distribution:", 1)[-1] if "Status code" in text else ""
    for code, n in re.findall(r"^\s+\[(\d{3})\]\s+(\d+) responses", section, re.MULTILINE):
        load.statuses[int(code)] = int(n)
    errors = text.split("Error distribution:", 1)[1] if "Error distribution:" in text else ""
    for n, message in re.findall(r"^\s+\[(\d+)\]\s+(.+)$", errors, re.MULTILINE):
        load.errors[message] = int(n)
    return load


def hey_command(
    url: str, *args: str, body: Path | None = None, timeout_s: int = REQUEST_TIMEOUT_S
) -> list[str]:
    command = ["hey", "-t", str(timeout_s), *args]
    if body is not None:
        command += ["-m", "POST", "-T", "application/json", "-D", str(body)]
    return [*command, url]


def hey(label: str, url: str, *args: str, body: Path | None = None) -> Load:
    done = subprocess.run(
        hey_command(url, *args, body=body), capture_output=True, text=True, check=True, timeout=900
    )
    return report(parse_hey(label, done.stdout))


def report(load: Load) -> Load:
    say(load.line())
    assert not load.errors, f"{load.label}: transport errors or timeouts: {load.errors}"
    unexpected = {code: n for code, n in load.statuses.items() if code >= 500 and code != 503}
    assert not unexpected, f"{load.label}: server errors {unexpected}"
    return load


# ---------------------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    url: str
    database_url: str
    log: Path
    engine: Engine
    log_offset: int = 0

    def get(self, path: str) -> dict[str, object]:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:
            body: dict[str, object] = json.loads(response.read())
            return body

    def access_lines(self) -> list[dict[str, object]]:
        """The server's access-log lines written since the last call."""
        with self.log.open("rb") as f:
            f.seek(self.log_offset)
            text = f.read()
            self.log_offset = f.tell()
        lines = [json.loads(line) for line in text.splitlines() if line.startswith(b"{")]
        return [line for line in lines if line.get("logger") == "bnlab.access"]


def stack_env(folder: Path, port: int, backend_env: dict[str, str]) -> dict[str, str]:
    return (
        bnlab_free_environ()
        | {
            # As `make run`: one training process per core; Fashion-MNIST decoded at start if present.
            "BNLAB_WORKER_CONCURRENCY": "0",
            "BNLAB_PRELOAD_DATASETS": "fashion-mnist",
            "BNLAB_DATA_DIR": str(folder / "data"),
            "BNLAB_PORT": str(port),
            "BNLAB_LOG_LEVEL": "info",  # the access log is what the 503 check reads
            "BNLAB_LOG_FORMAT": "json",
            # One client key sends everything: lift the per-key limits, as the test did.
            "BNLAB_RATE_LIMIT_PER_MINUTE": "1000000",
            "BNLAB_RATE_LIMIT_BURST": "100000",
            "BNLAB_MAX_ACTIVE_RUNS_PER_KEY": "100000",
        }
        | backend_env
    )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def wait_ready(url: str, server: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"loadtest: bnlab run exited with {server.returncode}: {log_tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"loadtest: the API at {url} did not become ready")


@contextmanager
def bnlab_run(folder: Path, backend_env: dict[str, str]) -> Iterator[Stack]:
    port = free_port()
    env = stack_env(folder, port, backend_env)
    log = folder / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "run"], env=env, cwd=ROOT, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    database_url = env.get("BNLAB_DATABASE_URL") or f"sqlite:///{folder / 'data' / 'bnlab.db'}"
    try:
        wait_ready(url, server, log)
        engine = make_engine(database_url)
        yield Stack(url, database_url, log, engine)
        engine.dispose()
    finally:
        stop(server)


def stop(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the group this script started (bnlab run, its API and worker), then SIGKILL."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


# ---------------------------------------------------------------------------------------- checks


def check_access_log(stack: Stack, label: str) -> None:
    """Every 5xx the server answered during the phase was a 503 with Retry-After. Prints the
    server's own p50/p99 of its 2xx answers (hey's percentiles count the 503s, answered at once)."""
    lines = stack.access_lines()
    bad = [line for line in lines if int(str(line["status"])) >= 500 and not _documented_503(line)]
    assert not bad, f"{label}: {len(bad)} server errors, e.g. {bad[:3]}"
    busy = sum(1 for line in lines if line["status"] == 503)
    ok = sorted(float(str(line["duration_ms"])) for line in lines if int(str(line["status"])) < 300)
    served = f"2xx in p50 {_pct(ok, 50):.0f} ms, p99 {_pct(ok, 99):.0f} ms" if ok else "no 2xx"
    say(f"{'':<34} server: {len(lines)} answers, {busy} × 503 all with Retry-After, 0 other 5xx; {served}")


def _pct(sorted_ms: list[float], pct: int) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, len(sorted_ms) * pct // 100)]


def _documented_503(line: dict[str, object]) -> bool:
    return line["status"] == 503 and bool(line.get("retry_after"))


def wait_finished(stack: Stack, prefix: str, label: str) -> float:
    """Seconds until every run named `prefix`… has ended; fails past FINISH_TIMEOUT_S."""
    started = time.monotonic()
    pending = (
        select(func.count())
        .select_from(Run)
        .where(Run.name.startswith(prefix), Run.status.in_(("queued", "running")))
    )
    while time.monotonic() - started < FINISH_TIMEOUT_S:
        with stack.engine.connect() as db:
            if not db.scalar(pending):
                return time.monotonic() - started
        time.sleep(0.5)
    raise AssertionError(f"{label}: runs still unfinished after {FINISH_TIMEOUT_S} s")


def check_runs(stack: Stack, prefix: str, expected: int, epochs: int, label: str) -> None:
    """No lost or duplicated run: `expected` rows, each succeeded on its first attempt, every epoch
    recorded once, one model."""
    with stack.engine.connect() as db:
        runs = db.execute(select(Run.id, Run.status, Run.attempts).where(Run.name.startswith(prefix))).all()
        ids = [run.id for run in runs]
        models = _per_run(db, ModelArtifact.run_id, ids)
        metrics = _per_run(db, EpochMetric.run_id, ids)
    assert len(runs) == expected, f"{label}: {len(runs)} runs stored for {expected} accepted"
    failed = [run for run in runs if run.status != "succeeded" or run.attempts != 1]
    assert not failed, f"{label}: {len(failed)} runs not succeeded on their one attempt, e.g. {failed[:3]}"
    assert all(models.get(i) == 1 for i in ids), f"{label}: a run without exactly one model"
    assert all(metrics.get(i) == epochs for i in ids), f"{label}: a run with missing or repeated epochs"


def _per_run(db: Connection, column: InstrumentedAttribute[str], ids: list[str]) -> dict[str, int]:
    rows = db.execute(select(column, func.count()).where(column.in_(ids)).group_by(column)).all()
    return {run_id: n for run_id, n in rows}


# ---------------------------------------------------------------------------------------- phases


def write(folder: Path, name: str, body: object) -> Path:
    path = folder / name
    path.write_text(json.dumps(body))
    return path


def phase_submits(stack: Stack, folder: Path) -> str:
    """SUBMITS clients at once; those turned away with 503 (the in-flight cap) send again, as a
    client honouring Retry-After would, until every one is accepted (a few rounds at most)."""
    body = write(folder, "submit.json", {"name": "load-a", **TINY})
    accepted = 0
    for attempt in range(1, 6):
        clients = str(SUBMITS - accepted)
        label = f"a. {clients} concurrent submits" + (f" (round {attempt})" if attempt > 1 else "")
        load = hey(label, f"{stack.url}/api/v1/runs", "-n", clients, "-c", clients, body=body)
        accepted += load.statuses.get(202, 0)
        if accepted == SUBMITS:
            break
        time.sleep(1)  # the Retry-After
    check_access_log(stack, "submits")
    assert accepted == SUBMITS, f"submits: {accepted} of {SUBMITS} accepted after 5 rounds"
    seconds = wait_finished(stack, "load-a", "submits")
    check_runs(stack, "load-a", SUBMITS, epochs=1, label="submits")
    say(f"{'':<34} {SUBMITS} runs trained in {seconds:.1f} s, each once, one model each")
    with stack.engine.connect() as db:
        return str(db.scalar(select(Run.id).where(Run.name == "load-a").limit(1)))


def phase_serving(stack: Stack, folder: Path, run_id: str) -> None:
    predict = write(folder, "predict.json", {"inputs": [IMAGE]})
    v2 = write(
        folder,
        "v2.json",
        {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": IMAGE}]},
    )
    clients = ["-c", str(SERVE_CLIENTS), "-z", f"{SERVE_S}s"]
    label = f"{SERVE_CLIENTS} clients {SERVE_S} s"
    hey(f"b. predict, {label}", f"{stack.url}/api/v1/runs/{run_id}/predict", *clients, body=predict)
    hey(f"b. V2 infer, {label}", f"{stack.url}/v2/models/{run_id}/infer", *clients, body=v2)
    check_access_log(stack, "serving")


def phase_streams(stack: Stack, folder: Path) -> None:
    body = write(folder, "streamed.json", {"name": "load-c", **STREAMED})
    submitted = hey(
        "c. submits to stream", f"{stack.url}/api/v1/runs", "-n", str(STREAM_RUNS), "-c", "1", body=body
    )
    assert submitted.statuses == {202: STREAM_RUNS}
    with stack.engine.connect() as db:
        ids = db.scalars(select(Run.id).where(Run.name == "load-c")).all()
    per_run = STREAM_CLIENTS // len(ids)
    at_once = ["-n", str(per_run), "-c", str(per_run)]
    events = [f"{stack.url}/api/v1/runs/{run_id}/events" for run_id in ids]
    commands = [hey_command(url, *at_once, timeout_s=FINISH_TIMEOUT_S) for url in events]
    with ExitStack() as running:
        processes = [
            running.enter_context(subprocess.Popen(c, stdout=subprocess.PIPE, text=True)) for c in commands
        ]
        outputs = [p.communicate(timeout=FINISH_TIMEOUT_S + 60)[0] for p in processes]
    merged = report(merge(f"c. {per_run * len(ids)} SSE clients on {len(ids)} runs", outputs))
    assert merged.statuses == {200: per_run * len(ids)}, f"streams: {merged.statuses}"
    time.sleep(1)  # a stream's access line is written as its handler returns, just after hey has read it
    check_access_log(stack, "streams")
    wait_finished(stack, "load-c", "streams")
    check_runs(stack, "load-c", STREAM_RUNS, epochs=STREAM_EPOCHS, label="streams")


def merge(label: str, outputs: list[str]) -> Load:
    """hey runs side by side as one: counts and rates add up; the percentiles of the slowest."""
    loads = [parse_hey(label, out) for out in outputs]
    merged = Load(label, per_s=sum(load.per_s for load in loads))
    for load in loads:
        for code, n in load.statuses.items():
            merged.statuses[code] = merged.statuses.get(code, 0) + n
        merged.errors |= load.errors
    slowest = max(loads, key=lambda load: load.slowest)
    merged.percentiles, merged.slowest = slowest.percentiles, slowest.slowest
    return merged


def phase_experiments(stack: Stack, folder: Path) -> None:
    spec = {"name": "load-d", "base": TINY, "grid": {"train.lr": [0.01, 0.02]}, "seeds": [0, 1, 2, 3, 4]}
    body = write(folder, "experiment.json", spec)
    label = f"d. {EXPERIMENTS} concurrent experiments of {RUNS_PER_EXPERIMENT}"
    at_once = ["-n", str(EXPERIMENTS), "-c", str(EXPERIMENTS)]
    load = hey(label, f"{stack.url}/api/v1/experiments", *at_once, body=body)
    check_access_log(stack, "experiments")
    runs = load.statuses.get(202, 0) * RUNS_PER_EXPERIMENT
    seconds = wait_finished(stack, "load-d", "experiments")
    check_runs(stack, "load-d", runs, epochs=1, label="experiments")
    rate = f"{runs / seconds:.1f} runs/s"
    say(f"{'':<34} {runs} runs trained in {seconds:.1f} s ({rate}), each once, one model each")


def warm_up(stack: Stack, folder: Path) -> None:
    """Ten runs at once through the whole stack before measuring: the worker's training processes
    have started (and decoded their preloaded dataset, a second of both cores), and the API's pools
    hold their connections (ten to the database, as many to the broker)."""
    body = write(folder, "warmup.json", {"name": "warmup", **TINY})
    command = hey_command(f"{stack.url}/api/v1/runs", "-n", "10", "-c", "10", body=body)
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    wait_finished(stack, "warmup", "warm-up")
    stack.access_lines()  # not part of any phase


def load_test(name: str, folder: Path, backend_env: dict[str, str]) -> None:
    say(f"\n== {name}")
    folder.mkdir(parents=True)
    with bnlab_run(folder, backend_env) as stack:
        warm_up(stack, folder)
        run_id = phase_submits(stack, folder)
        phase_serving(stack, folder, run_id)
        phase_streams(stack, folder)
        phase_experiments(stack, folder)
    say(f"{'':<34} {waits_logged(stack.log)}")


def waits_logged(log: Path) -> str:
    """Log lines (API and worker) that report a lock or pool timeout, by logger and message: a
    worker's failed heartbeat or reaper pass is retried, so these are reported, not failed on."""
    seen: dict[str, int] = {}
    for raw in log.read_text(errors="replace").splitlines():
        if "database is locked" in raw or "QueuePool limit" in raw:
            try:
                line = json.loads(raw)
                where = f"{line.get('logger')}: {str(line.get('message'))[:60]}"
            except ValueError:
                where = raw[:80]
            seen[where] = seen.get(where, 0) + 1
    listed = "; ".join(f"{n} × {where}" for where, n in seen.items())
    return f"lock or pool timeouts logged: {listed or 'none'}"


def main() -> int:
    if shutil.which("hey") is None:
        raise SystemExit("loadtest: hey is not installed (Debian: apt-get install hey)")
    started = time.monotonic()
    form = " (short form)" if SHORT else ""
    say(f"loadtest{form}: hey against bnlab run on 127.0.0.1, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="bnlab-load-") as tmp:
        if "sqlite" in BACKENDS:
            load_test("SQLite + embedded broker", Path(tmp) / "sqlite", {})
        if "postgres" in BACKENDS:
            with postgres_backend_at(Path(tmp) / "postgres") as backend:
                load_test("Postgres + Redis", Path(tmp) / "postgres", backend.env)
    say(f"\nloadtest: passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
