"""Training benchmark: the article's BN / no-BN pair, three ways, in one run (issue 6).

A benchmark, not a test: it prints a table, asserts nothing, and its figures depend on the machine
and on what else runs on it (the load average is printed next to each part).

    .venv/bin/python bench/train.py              # `make bench-train`; Fashion-MNIST from Debian
    .venv/bin/python bench/train.py --synthetic  # generated data, for a quick look

The pair: Flatten → Dense(128, relu) → [BatchNorm(eps 1e-3, momentum 0.01)] → Dense(10), Adam 1e-3,
batch 32, 10 epochs, the last 20 % of the training split held out for validation.

(a) an idiomatic PyTorch loop written plainly here (DataLoader, nn.Sequential, default threads,
    the two runs one after the other, validation after each epoch);
(b) the same pair through bnlab end to end: `bnlab migrate`, `bnlab worker` and `bnlab api` as real
    processes on a temporary SQLite database and the embedded broker, with the worker's default
    settings; the wall time runs from the first POST to both runs `succeeded` (metrics stored);
(c) the floor: the five matrix products of a batch-32 training step (two forward, three backward)
    on one core, times the steps of one run;
then the inference throughput of the model bnlab trained (eval mode, in-process, batch 1 and 256).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HIDDEN, CLASSES, FEATURES = 128, 10, 784
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # the article's Keras constants (momentum 0.99 in Keras' convention)
POLL_S = 0.05


def say(text: str = "") -> None:
    """The benchmark's output: its table goes to stdout."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def load() -> str:
    return open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else "?"


def load_pair_data(synthetic: bool) -> tuple[TensorDataset, TensorDataset]:
    """The same training/validation split as bnlab's (the last 20 % held out), as float tensors."""
    from service.ml import datasets

    name = "synthetic" if synthetic else "fashion-mnist"
    full = datasets.load_dataset(name, search_dirs=[datasets.SYSTEM_DATASET_DIR], split="train", limit=None)
    train_set, val_set = datasets.train_val_split(full, 0.2)
    return tuple(  # type: ignore[return-value]
        TensorDataset(part.x.reshape(len(part), -1).float() / 255, part.y) for part in (train_set, val_set)
    )


# ------------------------------------------------------------------------ (a) the idiomatic loop


def idiomatic_model(batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(FEATURES, HIDDEN), nn.ReLU()]
    if batch_norm:
        layers.append(nn.BatchNorm1d(HIDDEN, eps=BN_EPS, momentum=BN_MOMENTUM))
    return nn.Sequential(*layers, nn.Linear(HIDDEN, CLASSES))


def idiomatic_run(batch_norm: bool, train_ds: TensorDataset, val_ds: TensorDataset, epochs: int) -> float:
    """What a hand-written script does; returns the final validation accuracy."""
    torch.manual_seed(0)
    model = idiomatic_model(batch_norm)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(train_ds, batch_size=32, shuffle=True)
    accuracy = 0.0
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()  # type: ignore[no-untyped-call]  # unannotated in torch
            optimizer.step()
        model.eval()
        with torch.no_grad():
            x_val, y_val = val_ds.tensors
            accuracy = (model(x_val).argmax(1) == y_val).float().mean().item()
    return accuracy


def time_idiomatic(data: tuple[TensorDataset, TensorDataset], epochs: int) -> tuple[float, dict[str, float]]:
    started = time.perf_counter()
    accuracies = {name: idiomatic_run(name == "bn", *data, epochs) for name in ("bn", "no-bn")}
    return time.perf_counter() - started, accuracies


# ------------------------------------------------------------------------- (b) through bnlab's API


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stack_env(data_dir: Path, port: int) -> dict[str, str]:
    # Only the worker's own knobs (concurrency, threads, device) pass through from the caller; other
    # BNLAB_ variables do not, so a developer's settings cannot point the benchmark at their database.
    passed = ("BNLAB_WORKER_CONCURRENCY", "BNLAB_TORCH_THREADS", "BNLAB_DEVICE")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNLAB_") or k in passed}
    # As `make run` starts it: one training process per core (one thread each) unless set.
    env.setdefault("BNLAB_WORKER_CONCURRENCY", str(os.cpu_count() or 1))
    return env | {
        "BNLAB_DATA_DIR": str(data_dir),
        "BNLAB_PORT": str(port),
        "BNLAB_LOG_LEVEL": "warning",
        # The benchmark polls the two runs every 50 ms: more than the default per-key rate allows.
        "BNLAB_RATE_LIMIT_PER_MINUTE": "1000000",
        "BNLAB_RATE_LIMIT_BURST": "100000",
    }


class Stack:
    """`bnlab migrate`, then a worker and the API as real processes, stopped by their own PIDs."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.env = stack_env(data_dir, self.port)
        self.logs = data_dir / "logs"
        self.processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> httpx.Client:
        bnlab = [sys.executable, "-m", "service.cli"]
        subprocess.run([*bnlab, "migrate"], cwd=ROOT, env=self.env, check=True, capture_output=True)
        self.logs.mkdir(exist_ok=True)
        for role in ("worker", "api"):
            with (self.logs / f"{role}.log").open("wb") as out:
                process = subprocess.Popen([*bnlab, role], cwd=ROOT, env=self.env, stdout=out, stderr=out)
            self.processes.append(process)
        client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if client.get("/health/ready").status_code == 200:
                    return client
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError(f"the API did not become ready; logs in {self.logs}")

    def __exit__(self, *_: object) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_succeeded(client: httpx.Client, run_ids: list[str], timeout_s: float = 600) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = [_get(client, f"/api/v1/runs/{run_id}") for run_id in run_ids]
        failed = [run for run in runs if run["status"] in ("failed", "cancelled")]
        if failed:
            raise RuntimeError(f"a run did not succeed: {failed[0]['status']}: {failed[0]['error']}")
        if all(run["status"] == "succeeded" for run in runs):
            return runs
        time.sleep(POLL_S)
    raise RuntimeError(f"runs not finished after {timeout_s} s")


def _get(client: httpx.Client, path: str) -> dict[str, Any]:
    response = client.get(path)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def submit_pair(client: httpx.Client, dataset: str, epochs: int) -> list[str]:
    ids = []
    for name, kind in (("bench-bn", "batch"), ("bench-no-bn", "none")):
        spec = {
            "name": name,
            "dataset": {"name": dataset},
            "model": {"norm": {"kind": kind}},
            "train": {"epochs": epochs, "batch_size": 32, "optimizer": "adam", "lr": 1e-3, "seed": 0},
        }
        response = client.post("/api/v1/runs", json=spec)
        response.raise_for_status()
        ids.append(response.json()["id"])
    return ids


def time_api(client: httpx.Client, dataset: str, epochs: int) -> tuple[float, dict[str, float], str]:
    started = time.perf_counter()
    ids = submit_pair(client, dataset, epochs)
    runs = wait_succeeded(client, ids)
    seconds = time.perf_counter() - started
    accuracies = {"bn": runs[0]["summary"]["val_accuracy"], "no-bn": runs[1]["summary"]["val_accuracy"]}
    return seconds, accuracies, ids[0]


def warm_up(client: httpx.Client) -> None:
    """One tiny run, so the timed pairs start with a worker that is up and consuming."""
    spec = {"name": "warm-up", "dataset": {"name": "synthetic", "limit": 200}, "train": {"epochs": 1}}
    response = client.post("/api/v1/runs", json=spec)
    response.raise_for_status()
    wait_succeeded(client, [response.json()["id"]])


# ---------------------------------------------------------------------- (c) the matrix-product floor


def median_time(step: Callable[[], object], repeats: int = 5, inner: int = 300) -> float:
    for _ in range(inner // 3):
        step()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(inner):
            step()
        samples.append((time.perf_counter() - started) / inner)
    return statistics.median(samples)


def matmul_floor_step_s(batch: int = 32) -> float:
    """Seconds of a step's five matrix products on one core: x·W1ᵀ, h·W2ᵀ; dW2 = dᵀ·h, dh = d·W2,
    dW1 = dhᵀ·x (no gradient for the input)."""
    x, w1, w2 = torch.rand(batch, FEATURES), torch.rand(HIDDEN, FEATURES), torch.rand(CLASSES, HIDDEN)

    def step() -> None:
        h = x @ w1.t()
        d = h @ w2.t()
        _ = d.t() @ h
        dh = d @ w2
        _ = dh.t() @ x

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return median_time(step)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- inference throughput


def inference_throughput(data_dir: Path, run_id: str) -> dict[int, float]:
    """Samples/s of the stored model (as the server loads it: eval mode, BN folded) in this process."""
    os.environ["BNLAB_DATA_DIR"] = str(data_dir)
    from service.serving import forward_proba, open_model

    _, loaded = open_model(run_id, None)
    module = loaded.module(True)
    rates = {}
    for batch in (1, 256):
        x = torch.rand(batch, 1, 28, 28)
        seconds = median_time(partial(forward_proba, module, x), inner=200 if batch > 1 else 2000)
        rates[batch] = batch / seconds
    return rates


# ----------------------------------------------------------------------------------------- report


def report(
    epochs: int,
    steps: int,
    idiomatic: tuple[float, dict[str, float]],
    api_rounds: list[tuple[float, dict[str, float]]],
    floor_step_s: float,
) -> None:
    api_s = statistics.median(seconds for seconds, _ in api_rounds)
    idiomatic_s, idiomatic_acc = idiomatic
    floor_run_s = floor_step_s * steps * epochs
    cores = os.cpu_count() or 1
    say()
    say(f"{'the pair (BN, no-BN), ' + str(epochs) + ' epochs':44} {'wall s':>8} {'vs idiomatic':>13}"
        f" {'val acc BN':>11} {'val acc no-BN':>14}")  # fmt: skip
    say("-" * 94)
    rows = [("(a) idiomatic PyTorch loop", idiomatic_s, idiomatic_acc)]
    rows += [(f"(b) bnlab via the API, round {i}", s, acc) for i, (s, acc) in enumerate(api_rounds, 1)]
    for label, seconds, acc in rows:
        ratio = idiomatic_s / seconds
        say(f"{label:44} {seconds:>8.2f} {ratio:>12.2f}x {acc['bn']:>11.4f} {acc['no-bn']:>14.4f}")
    say(f"{'(b) bnlab via the API, median of rounds':44} {api_s:>8.2f} {idiomatic_s / api_s:>12.2f}x")
    one_core = 2 * floor_run_s
    say(
        f"{'(c) matmul floor, the two runs on one core':44} {one_core:>8.2f} {idiomatic_s / one_core:>12.2f}x"
    )
    pair_floor = floor_run_s * max(1, 2 // min(cores, 2))
    say(f"{'(c) matmul floor, the two runs on ' + str(min(cores, 2)) + ' cores':44} {pair_floor:>8.2f}"
        f" {idiomatic_s / pair_floor:>12.2f}x")  # fmt: skip
    step_ms = floor_step_s * 1e3
    say(f"floor: {step_ms:.3f} ms a step x {steps} steps x {epochs} epochs = {floor_run_s:.2f} s a run;"
        f" bnlab's pair takes {api_s / pair_floor:.2f}x its floor")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--synthetic", action="store_true", help="generated data instead of Fashion-MNIST")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per run (the article: 10)")
    parser.add_argument("--rounds", type=int, default=3, help="pairs through the API; the table shows each")
    parser.add_argument("--skip-idiomatic", action="store_true", help="leave (a) out (quick checks)")
    args = parser.parse_args()
    dataset = "synthetic" if args.synthetic else "fashion-mnist"
    threads = torch.get_num_threads()
    say(f"machine: {os.cpu_count()} cores; torch {torch.__version__}, {threads} threads; {dataset}")
    data = load_pair_data(args.synthetic)
    steps = -(-len(data[0]) // 32)
    say(f"load {load()}: (c) the matmul floor")
    floor_step_s = matmul_floor_step_s()
    idiomatic: tuple[float, dict[str, float]] = (float("nan"), {"bn": float("nan"), "no-bn": float("nan")})
    if not args.skip_idiomatic:
        say(f"load {load()}: (a) the idiomatic loop")
        idiomatic = time_idiomatic(data, args.epochs)
    with tempfile.TemporaryDirectory(prefix="bnlab-bench-train-") as folder:
        data_dir = Path(folder)
        rounds = []
        stack = Stack(data_dir)
        say(f"worker: BNLAB_WORKER_CONCURRENCY={stack.env['BNLAB_WORKER_CONCURRENCY']}")
        with stack as client:
            warm_up(client)
            for i in range(args.rounds):
                say(f"load {load()}: (b) round {i + 1} through the API")
                seconds, accuracies, bn_run = time_api(client, dataset, args.epochs)
                rounds.append((seconds, accuracies))
        report(args.epochs, steps, idiomatic, rounds, floor_step_s)
        rates = inference_throughput(data_dir, bn_run)
    say()
    say(f"inference of the BN model bnlab trained (eval, BN folded, in-process, {threads} threads):")
    for batch, rate in rates.items():
        say(f"  batch {batch:>3}: {rate:>12,.0f} samples/s")
    say(f"load at the end: {load()}")


if __name__ == "__main__":
    main()
