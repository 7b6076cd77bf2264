"""What the article's BN / no-BN pair leaves in the database, per BNLAB_KEEP_CHECKPOINTS
(docs/lifecycle.md). A measurement, not a test.

For each setting it starts `bnlab migrate`, `bnlab worker` (two training processes) and `bnlab api`
as real processes on a fresh SQLite database with the embedded broker (what `make run` uses),
submits the README's two runs (fashion-bn, fashion-no-bn: Fashion-MNIST, 10 epochs), samples the
checkpoint table while they train, and once both have succeeded prints, per table, its rows and
the bytes of its blobs, then the database file: pages in use and free pages (SQLite keeps freed
pages in the file for reuse; the file does not shrink without VACUUM). Then it deletes one run
and prints the same again.

    .venv/bin/python bench/db_size.py
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PAIR = [
    {"name": "fashion-bn", "dataset": {"name": "fashion-mnist"}, "model": {"norm": {"kind": "batch"}}},
    {"name": "fashion-no-bn", "model": {"norm": {"kind": "none"}}},
]
# Each table, and its blob column if it has one.
TABLES = {
    "run_checkpoints": "state",
    "model_artifacts": "weights",
    "epoch_metrics": None,
    "layer_stats": None,
    "runs": None,
}
MB = 1e6


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scalar(db: Path, sql: str) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute(sql).fetchone()[0])


def report(title: str, db: Path) -> None:
    say(title)
    for table, blob in TABLES.items():
        rows = scalar(db, f"SELECT count(*) FROM {table}")  # noqa: S608  # names from TABLES
        size = scalar(db, f"SELECT coalesce(sum(length({blob})), 0) FROM {table}") if blob else 0  # noqa: S608
        say(f"  {table:16} {rows:3} rows  {size / MB:6.3f} MB of blobs")
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page, pages, free = (
            conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_size", "page_count", "freelist_count")
        )
    used, unused = (pages - free) * page / MB, free * page / MB
    say(f"  file {db.stat().st_size / MB:.3f} MB: {used:.3f} MB in use, {unused:.3f} MB free pages")


def wait_ready(client: httpx.Client) -> None:
    for _ in range(600):
        try:
            if client.get("/health/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the API did not become ready")


def measure(keep: str) -> None:
    data = Path(tempfile.mkdtemp(prefix=f"bnlab-dbsize-{keep}-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNLAB_")} | {"PYTHONPATH": str(ROOT)}
    env |= {"BNLAB_DATA_DIR": str(data), "BNLAB_PORT": str(port), "BNLAB_WORKER_CONCURRENCY": "2"}
    env |= {"BNLAB_KEEP_CHECKPOINTS": keep}
    bnlab = [sys.executable, "-m", "service.cli"]
    subprocess.run([*bnlab, "migrate"], env=env, check=True, capture_output=True)
    db = data / "bnlab.db"
    with (data / "processes.log").open("wb") as logs:
        procs = [
            subprocess.Popen([*bnlab, role], env=env, stdout=logs, stderr=subprocess.STDOUT)
            for role in ("worker", "api")
        ]
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                wait_ready(client)
                ids = [client.post("/api/v1/runs", json=spec).json()["id"] for spec in PAIR]
                largest = 0  # bytes of checkpoints stored at once
                while {client.get(f"/api/v1/runs/{i}").json()["status"] for i in ids} != {"succeeded"}:
                    stored = scalar(db, "SELECT coalesce(sum(length(state)), 0) FROM run_checkpoints")
                    largest = max(largest, stored)
                    time.sleep(0.1)
                say(f"\nBNLAB_KEEP_CHECKPOINTS={keep}: checkpoints in training, up to {largest / MB:.3f} MB")
                report("both runs succeeded:", db)
                client.delete(f"/api/v1/runs/{ids[0]}")
                report("after DELETE /api/v1/runs/<fashion-bn>:", db)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)


if __name__ == "__main__":
    for keep in ("epoch", "final"):
        measure(keep)
