"""Serving benchmark: latency and throughput of POST /v2/models/{id}/infer over HTTP on loopback.

A benchmark, not a test: it prints a table, asserts nothing, and its figures depend on the machine.

    .venv/bin/python bench/serve.py    # about three minutes on a 2-core machine; `make bench`

What it does, all on 127.0.0.1 with a temporary data folder:
1. trains the article's model (Flatten → Dense(128, relu) → BN → Dense(10)) on Fashion-MNIST
   (synthetic data with --synthetic) for two epochs in-process and stores it as a succeeded run;
2. starts `bnlab api` twice, with micro-batching on and off (BNLAB_SERVE_MICRO_BATCHING), with the
   rate limit and the in-flight cap raised out of the way (BNLAB_RATE_LIMIT_*, BNLAB_MAX_CONCURRENT_*);
3. per server and per variant (fused / unfused): single-request latency (one client, one request at a
   time: p50, p99), then throughput with 1, 8 and 64 concurrent clients, each on its own keep-alive
   connection, sending one Fashion-MNIST test image (784 FP32 values) per request; three rounds,
   the variants alternating, and the table shows the medians;
4. times the bare forward pass in-process (fused vs unfused), the part fusion changes.

The load generator is a minimal asyncio HTTP/1.1 client in this file, so that the client spends as
little of the shared CPU as possible; it and the server still share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONCURRENCY = (1, 8, 64)


def say(text: str = "") -> None:
    """The benchmark's output: its table goes to stdout."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(data_dir: Path, port: int, micro_batching: bool) -> dict[str, str]:
    # BNLAB_SERVE_* set by the caller (say BNLAB_SERVE_MAX_WAIT_MS=2) reach the servers; other BNLAB_
    # variables do not, so a developer's own settings cannot point the benchmark at their database.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNLAB_") or k.startswith("BNLAB_SERVE_")}
    return env | {
        "BNLAB_DATA_DIR": str(data_dir),
        "BNLAB_PORT": str(port),
        "BNLAB_LOG_LEVEL": "warning",
        "BNLAB_SERVE_MICRO_BATCHING": str(micro_batching).lower(),
        "BNLAB_RATE_LIMIT_PER_MINUTE": "1000000",
        "BNLAB_RATE_LIMIT_BURST": "100000",
        "BNLAB_MAX_CONCURRENT_REQUESTS": "10000",
    }


def store_model(data_dir: Path, synthetic: bool) -> tuple[str, list[float]]:
    """Train the article's BN model briefly, store it as a succeeded run; return its id and one image."""
    os.environ["BNLAB_DATA_DIR"] = str(data_dir)
    from service.db import session_scope
    from service.migrate import upgrade_to_head
    from service.ml import checkpoints, datasets, training
    from service.models import RunStatus
    from service.runs import repository as run_repo
    from service.runs.schemas import RunCreate
    from service.runs.spec import model_config, train_config

    upgrade_to_head()
    name = "synthetic" if synthetic else "fashion-mnist"
    spec = RunCreate.model_validate({"name": "bench", "dataset": {"name": name}, "train": {"epochs": 2}})
    search = [datasets.SYSTEM_DATASET_DIR]
    full = datasets.load_dataset(name, search_dirs=search, split="train", limit=spec.dataset.limit)
    train_set, val_set = datasets.train_val_split(full, spec.dataset.val_split)
    config = model_config(spec)
    result = training.train(config, train_config(spec), train_set, val_set)
    weights = checkpoints.save_checkpoint(result.model, config)
    with session_scope() as session:
        run = run_repo.create_run(session=session, spec=spec)
        run.status = RunStatus.succeeded.value
        run_repo.save_artifact(
            session=session,
            run_id=run.id,
            weights=weights,
            model_config=config.to_dict(),
            sha256=checkpoints.sha256_hex(weights),
        )
        run_id = run.id
    test = datasets.load_dataset(name, search_dirs=search, split="test", limit=1)
    image = (test.x[0].reshape(-1).double() / 255).tolist()
    say(f"model: run {run_id}, val_accuracy {result.epochs[-1].val_accuracy:.3f} after 2 epochs on {name}")
    return run_id, image


# ---------------------------------------------------------------------------------------- client


class Connection:
    """One keep-alive HTTP/1.1 connection sending a prepared request again and again."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, raw: bytes) -> int:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


def infer_request(port: int, run_id: str, image: list[float], fused: bool) -> bytes:
    body = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": image}]}
    ).encode()
    head = (
        f"POST /v2/models/{run_id}/infer?fused={str(fused).lower()} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def latency(port: int, raw: bytes, n: int) -> tuple[float, float]:
    conn = await Connection.open(port)
    try:
        for _ in range(50):  # warm-up
            await conn.send(raw)
        times = []
        for _ in range(n):
            started = time.perf_counter()
            status = await conn.send(raw)
            times.append(time.perf_counter() - started)
            assert status == 200, status
    finally:
        conn.close()
    times.sort()
    return statistics.median(times) * 1e3, times[min(len(times) - 1, int(0.99 * len(times)))] * 1e3


async def throughput(port: int, raw: bytes, clients: int, seconds: float) -> float:
    conns = [await Connection.open(port) for _ in range(clients)]
    done = 0
    errors = 0
    deadline = 0.0

    async def loop(conn: Connection) -> None:
        nonlocal done, errors
        while time.perf_counter() < deadline:
            if await conn.send(raw) == 200:
                done += 1
            else:
                errors += 1

    try:
        deadline = time.perf_counter() + 0.5  # warm-up
        await asyncio.gather(*(loop(c) for c in conns))
        done = 0
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(loop(c) for c in conns))
        elapsed = time.perf_counter() - started
    finally:
        for conn in conns:
            conn.close()
    if errors:
        say(f"  warning: {errors} non-200 answers at {clients} clients")
    return done / elapsed


# ---------------------------------------------------------------------------------------- servers


def start_server(data_dir: Path, micro_batching: bool) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "api"],
        cwd=ROOT,
        env=server_env(data_dir, port, micro_batching),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the API did not start")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def measure_server(
    data_dir: Path, run_id: str, image: list[float], micro_batching: bool, args: argparse.Namespace
) -> dict[tuple[bool, str], float]:
    """Median of `args.rounds` rounds; fused and unfused alternate within each round, so a burst of
    load from elsewhere on the machine hits both variants alike."""
    process, port = start_server(data_dir, micro_batching)
    samples: dict[tuple[bool, str], list[float]] = {}
    try:
        for _ in range(args.rounds):
            for key_name, measure in [("latency", None), *((f"c{c}", c) for c in CONCURRENCY)]:
                for fused in (True, False):
                    raw = infer_request(port, run_id, image, fused)
                    if measure is None:
                        p50, p99 = asyncio.run(latency(port, raw, args.latency_requests))
                        samples.setdefault((fused, "p50"), []).append(p50)
                        samples.setdefault((fused, "p99"), []).append(p99)
                    else:
                        rate = asyncio.run(throughput(port, raw, measure, args.seconds))
                        samples.setdefault((fused, key_name), []).append(rate)
    finally:
        stop_server(process)
    return {key: statistics.median(values) for key, values in samples.items()}


def forward_times(run_id: str) -> dict[tuple[bool, int], float]:
    """Microseconds per forward pass in-process, fused vs unfused, batch 1 and 64."""
    from service.serving.server import forward_proba, open_model

    _, loaded = open_model(run_id, None)
    times = {}
    for fused in (True, False):
        module = loaded.module(fused)
        for batch in (1, 64):
            x = torch.rand(batch, 1, 28, 28)
            for _ in range(200):
                forward_proba(module, x)
            runs = []
            for _ in range(7):
                started = time.perf_counter()
                for _ in range(500):
                    forward_proba(module, x)
                runs.append((time.perf_counter() - started) / 500)
            times[(fused, batch)] = statistics.median(runs) * 1e6
    return times


def print_table(batched: dict[tuple[bool, str], float], plain: dict[tuple[bool, str], float]) -> None:
    rows = [("p50 latency, ms", "p50"), ("p99 latency, ms", "p99")] + [
        (f"req/s, {c} client{'s' if c > 1 else ''}", f"c{c}") for c in CONCURRENCY
    ]
    say()
    header = (
        f"{'':22} {'batched+fused':>14} {'batched+unfused':>16} {'unbatched+fused':>16} "
        f"{'unbatched+unfused':>18} {'batched/unbatched':>18} {'fused/unfused':>14}"
    )
    say(header)
    say("-" * len(header))
    for label, key in rows:
        bf, bu, uf, uu = batched[(True, key)], batched[(False, key)], plain[(True, key)], plain[(False, key)]
        digits = 2 if key.startswith("p") else 0
        say(
            f"{label:22} {bf:>14.{digits}f} {bu:>16.{digits}f} {uf:>16.{digits}f} {uu:>18.{digits}f}"
            f" {bf / uf:>17.2f}x {bf / bu:>13.2f}x"
        )
    say("(ratios: fused columns; for latency a ratio below 1 is better, for req/s above 1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--synthetic", action="store_true", help="train on generated data, not Fashion-MNIST")
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each throughput run")
    parser.add_argument("--latency-requests", type=int, default=500, help="requests per p50/p99 run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure; the table shows medians")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bnlab-bench-") as folder:
        data_dir = Path(folder)
        run_id, image = store_model(data_dir, args.synthetic)
        say(f"machine: {os.cpu_count()} cores; torch {torch.__version__}, {torch.get_num_threads()} threads")
        batched = measure_server(data_dir, run_id, image, True, args)
        plain = measure_server(data_dir, run_id, image, False, args)
        print_table(batched, plain)
        forwards = forward_times(run_id)
        say()
        say("forward pass in-process, µs:   fused   unfused   fused/unfused")
        for batch in (1, 64):
            fused, unfused = forwards[(True, batch)], forwards[(False, batch)]
            say(
                f"  batch {batch:>2}                  {fused:>7.1f} {unfused:>9.1f} {fused / unfused:>14.2f}x"
            )


if __name__ == "__main__":
    main()
