"""A small HTTP client for the bnlab API: what the `bnlab` user commands call.

It talks only HTTP (httpx), so it works against any bnlab server: `BNLAB_URL` and `BNLAB_API_KEY`.
Live progress comes from the Server-Sent Events routes, resumed with Last-Event-ID when a connection
drops; when the stream cannot be had at all (an older server, a proxy that buffers), it falls back to
polling the run and its metrics and yields the same events.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
# Addresses a server binds to that a client cannot connect to: the client asks loopback instead.
ANY_ADDRESS = {"0.0.0.0", "::", ""}


def default_url(environ: Mapping[str, str] = os.environ) -> str:
    """BNLAB_URL; else the server's own BNLAB_HOST and BNLAB_PORT, so that `BNLAB_PORT=8611 bnlab runs`
    talks to the API that `BNLAB_PORT=8611 bnlab run` started; else the default address."""
    if environ.get("BNLAB_URL"):
        return environ["BNLAB_URL"]
    host = environ.get("BNLAB_HOST", "127.0.0.1")
    host = "127.0.0.1" if host in ANY_ADDRESS else host
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"http://{host}:{environ.get('BNLAB_PORT', '8000')}"


FINISHED = frozenset({"succeeded", "failed", "cancelled"})
POLL_INTERVAL_S = 1.0
RECONNECT_DELAYS_S = (0.5, 1.0, 2.0, 4.0)  # then it polls
MAX_RETRY_WAIT_S = 60.0  # the most a request waits in all for the API's Retry-After


class ApiError(Exception):
    """The API answered with an error status; `message` is its `detail`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


@dataclass(frozen=True)
class Event:
    """One progress event: `type` is `status` or `epoch`; `data` as the SSE route sends it."""

    type: str
    data: dict[str, Any]
    id: str | None = None


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait before sending again, where the API asked for it (429, 503 + Retry-After)."""
    if response.status_code not in (429, 503):
        return None
    try:
        return max(0.0, float(response.headers["Retry-After"]))
    except (KeyError, ValueError):  # no header, or an HTTP date: not ours
        return None


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    detail = body.get("detail", body.get("error", body)) if isinstance(body, dict) else body
    if isinstance(detail, list):  # FastAPI's validation errors: location and message of each
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" for d in detail)
    return detail if isinstance(detail, str) else json.dumps(detail)


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Events from the lines of a text/event-stream (comments and `retry:` skipped)."""
    kind, event_id, data = "message", None, list[str]()
    for line in lines:
        if line == "":
            if data:
                yield Event(kind, json.loads("\n".join(data)), event_id)
            kind, data = "message", []
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            kind = value
        elif field == "id":
            event_id = value
        elif field == "data":
            data.append(value)


class Client:
    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 30) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        return None if response.status_code == 204 else response.json()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The answer to a request; raises ApiError on an error status. A read (GET) refused with
        429 (the key's rate limit) or 503 (a full queue) and Retry-After is sent again after the wait
        it names, for up to MAX_RETRY_WAIT_S in all: a long export or listing slows down instead of
        failing halfway. Writes are not repeated: their refusal reaches the caller at once."""
        waited = 0.0
        while True:
            response = self.http.request(method, path, **kwargs)
            wait = _retry_after(response) if method.upper() == "GET" else None
            if wait is None or waited + wait > MAX_RETRY_WAIT_S:
                break
            time.sleep(wait)
            waited += wait
        if response.is_error:
            raise ApiError(response.status_code, _detail(response))
        return response

    # -- runs

    def submit_run(self, spec: dict[str, Any]) -> dict[str, Any]:
        run: dict[str, Any] = self.request("POST", "/api/v1/runs", json=spec)
        return run

    def list_runs(self, *, status: str | None = None, limit: int = 20, offset: int = 0) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, "offset": offset} | ({"status": status} if status else {})
        runs: dict[str, Any] = self.request("GET", "/api/v1/runs", params=params)
        return runs

    def get_run(self, run_id: str) -> dict[str, Any]:
        run: dict[str, Any] = self.request("GET", f"/api/v1/runs/{run_id}")
        return run

    def get_metrics(self, run_id: str) -> list[dict[str, Any]]:
        epochs: list[dict[str, Any]] = self.request("GET", f"/api/v1/runs/{run_id}/metrics")["epochs"]
        return epochs

    def get_layer_stats(self, run_id: str) -> list[dict[str, Any]]:
        """Per epoch (0 = at initialisation), each normalisation slot's input mean and std."""
        epochs: list[dict[str, Any]] = self.request("GET", f"/api/v1/runs/{run_id}/layer-stats")["epochs"]
        return epochs

    def cancel_run(self, run_id: str) -> dict[str, Any]:
        run: dict[str, Any] = self.request("POST", f"/api/v1/runs/{run_id}/cancel")
        return run

    def update_run(self, run_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Change a run's name, tags or notes (the keys given)."""
        run: dict[str, Any] = self.request("PATCH", f"/api/v1/runs/{run_id}", json=changes)
        return run

    def delete_run(self, run_id: str) -> None:
        self.request("DELETE", f"/api/v1/runs/{run_id}")

    def predict_image(self, run_id: str, image: Path) -> dict[str, Any]:
        kind = "image/png" if image.suffix.lower() == ".png" else "image/jpeg"
        with image.open("rb") as file:
            answer: dict[str, Any] = self.request(
                "POST", f"/api/v1/runs/{run_id}/predict", files={"file": (image.name, file, kind)}
            )
        return answer

    # -- experiments

    def create_experiment(self, spec: dict[str, Any]) -> dict[str, Any]:
        experiment: dict[str, Any] = self.request("POST", "/api/v1/experiments", json=spec)
        return experiment

    def start_preset(self, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
        experiment: dict[str, Any] = self.request("POST", f"/api/v1/presets/{name}", json=overrides or None)
        return experiment

    def list_experiments(self, *, limit: int = 20) -> dict[str, Any]:
        page: dict[str, Any] = self.request("GET", "/api/v1/experiments", params={"limit": limit})
        return page

    def get_experiment(self, experiment_id: str) -> dict[str, Any]:
        experiment: dict[str, Any] = self.request("GET", f"/api/v1/experiments/{experiment_id}")
        return experiment

    def update_experiment(self, experiment_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        experiment: dict[str, Any] = self.request(
            "PATCH", f"/api/v1/experiments/{experiment_id}", json=changes
        )
        return experiment

    def delete_experiment(self, experiment_id: str) -> None:
        self.request("DELETE", f"/api/v1/experiments/{experiment_id}")

    def get_report(self, experiment_id: str) -> dict[str, Any]:
        report: dict[str, Any] = self.request("GET", f"/api/v1/experiments/{experiment_id}/report")
        return report

    def get_plot(self, experiment_id: str, metric: str) -> bytes:
        return self.get_bytes(f"/api/v1/experiments/{experiment_id}/plot.png", params={"metric": metric})

    def get_report_file(self, experiment_id: str, fmt: str) -> bytes:
        """The report as the API serves it, "json" or "csv"."""
        return self.get_bytes(f"/api/v1/experiments/{experiment_id}/report", params={"format": fmt})

    # -- stored models

    def list_versions(self, run_id: str) -> list[dict[str, Any]]:
        versions: list[dict[str, Any]] = self.request("GET", f"/api/v1/runs/{run_id}/versions")["items"]
        return versions

    def get_weights(self, run_id: str, version: int) -> bytes:
        """A stored model version's weights, as safetensors."""
        return self.get_bytes(f"/api/v1/runs/{run_id}/versions/{version}/weights.safetensors")

    def get_model_config(self, run_id: str, version: int) -> bytes:
        """The JSON that rebuilds a stored version's network (its model config, version and sha256)."""
        return self.get_bytes(f"/api/v1/runs/{run_id}/versions/{version}/config.json")

    def get_bytes(self, path: str, **kwargs: Any) -> bytes:
        return self._send("GET", path, **kwargs).content

    # -- live progress

    def run_events(self, run_id: str) -> Iterator[Event]:
        """A run's events until it finishes: the SSE stream, reconnected with Last-Event-ID, or
        polling when the stream cannot be had."""
        path = f"/api/v1/runs/{run_id}/events"
        yield from self._follow(path, _run_ended, lambda last: self._poll_run(run_id, last))

    def experiment_events(self, experiment_id: str) -> Iterator[Event]:
        """Every run's events until the experiment's `end` (the same fallback to polling)."""
        path = f"/api/v1/experiments/{experiment_id}/events"
        yield from self._follow(
            path, lambda e: e.type == "end", lambda _: self._poll_experiment(experiment_id)
        )

    def _follow(
        self, path: str, is_end: Callable[[Event], bool], poll: Callable[[str | None], Iterator[Event]]
    ) -> Iterator[Event]:
        last_id: str | None = None
        failures = 0
        while failures < len(RECONNECT_DELAYS_S):
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with self.http.stream("GET", path, headers=headers, timeout=httpx.Timeout(30, read=60)) as r:
                    if r.is_error:
                        r.read()
                        if r.status_code < 500 and r.status_code != 429:
                            raise ApiError(r.status_code, _detail(r))
                        raise httpx.TransportError(f"HTTP {r.status_code}")
                    failures = 0
                    for event in parse_sse(r.iter_lines()):
                        last_id = event.id or last_id
                        yield event
                        if is_end(event):
                            return
            except httpx.TransportError:
                time.sleep(RECONNECT_DELAYS_S[failures])
                failures += 1
        yield from poll(last_id)

    def _poll_run(self, run_id: str, last_id: str | None) -> Iterator[Event]:
        """The events the stream would send, from GET /runs/{id} and its metrics."""
        seen_epoch, _, seen_status = (last_id or "0:").partition(":")
        epoch, status = int(seen_epoch), seen_status
        while True:
            run = self.get_run(run_id)
            total = run["summary"]["epochs_total"]
            if run["status"] != status and run["status"] not in FINISHED:
                status = run["status"]
                yield Event("status", _status_data(run, epoch))
            for row in self.get_metrics(run_id):
                if row["epoch"] > epoch:
                    epoch = row["epoch"]
                    yield Event("epoch", row | {"epochs_total": total})
            if run["status"] in FINISHED:
                yield Event("status", _status_data(run, epoch))
                return
            time.sleep(POLL_INTERVAL_S)

    def _poll_experiment(self, experiment_id: str) -> Iterator[Event]:
        """The experiment stream's events from GET /experiments/{id} and each run's metrics (a
        fallback: it restarts from the beginning, so a consumer sees events it may already have)."""
        seen: dict[str, tuple[int, str]] = {}
        while True:
            experiment = self.get_experiment(experiment_id)
            for run in experiment["runs"]:
                yield from self._poll_experiment_run(run, seen)
            if experiment["finished"]:
                yield Event("end", {"status_counts": experiment["status_counts"]})
                return
            time.sleep(POLL_INTERVAL_S)

    def _poll_experiment_run(self, run: dict[str, Any], seen: dict[str, tuple[int, str]]) -> Iterator[Event]:
        epoch, status = seen.get(run["id"], (0, ""))
        about = {"run_id": run["id"], "config": run["config"], "seed": run["seed"]}
        total = run["epochs_total"]
        if run["epochs_done"] > epoch:
            for row in self.get_metrics(run["id"]):
                if row["epoch"] > epoch:
                    epoch = row["epoch"]
                    yield Event("epoch", about | row | {"epochs_total": total})
        if run["status"] != status:
            status = run["status"]
            data = {"status": status, "error": None, "epochs_done": epoch, "epochs_total": total}
            yield Event("status", about | data)
        seen[run["id"]] = (epoch, status)


def _run_ended(event: Event) -> bool:
    return event.type == "status" and event.data.get("status") in FINISHED


def _status_data(run: dict[str, Any], epoch: int) -> dict[str, Any]:
    total = run["summary"]["epochs_total"]
    return {"status": run["status"], "error": run["error"], "epochs_done": epoch, "epochs_total": total}
