"""Training benchmark: the article's BN / no-BN pair, three ways, in one run (issue 6).

A benchmark, not a test: it prints a table, asserts nothing, and its figures depend on the machine
and on what else runs on it (the load average is printed next to each part).

    .venv/bin/python bench/train.py              # `make bench-train`; Fashion-MNIST from Debian
    .venv/bin/python bench/train.py --synthetic  # generated data, for a quick look
    .venv/bin/python bench/train.py --scale      # `make bench-scale`: the scale curve instead

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

`--scale` (issue 6, item 3) prints instead the training throughput of the article's MLP over batch
sizes 32-1024 and widths 128-2048, BN and no-BN, through the step train() uses, in one process with
make run's one thread; then the wall time of a 16-run grid experiment through the API and a worker,
per run, against one such run submitted alone.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
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
# How often (b) asks for the pair's status: 10 requests a second. Each answer costs the API process a
# few milliseconds of the same two cores the runs train on; at 20 polls a second per run the pair
# measured about a second slower.
POLL_S = 0.2


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


def time_idiomatic(
    data: tuple[TensorDataset, TensorDataset], epochs: int, *, flush_denormal: bool = False
) -> tuple[float, dict[str, float]]:
    """(a), or with `flush_denormal` the same loop with subnormal floats flushed to zero: what that
    one setting of bnlab's training processes is worth on its own."""
    torch.set_flush_denormal(flush_denormal)
    try:
        started = time.perf_counter()
        accuracies = {name: idiomatic_run(name == "bn", *data, epochs) for name in ("bn", "no-bn")}
        return time.perf_counter() - started, accuracies
    finally:
        torch.set_flush_denormal(False)


# ------------------------------------------------------------------------- (b) through bnlab's API


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stack_env(data_dir: Path, port: int) -> dict[str, str]:
    # Only the worker's own knobs (concurrency, threads, device, preloads) pass through from the caller;
    # other BNLAB_ variables do not, so a developer's settings cannot point the benchmark at their database.
    passed = (
        "BNLAB_WORKER_CONCURRENCY", "BNLAB_TORCH_THREADS", "BNLAB_DEVICE", "BNLAB_PRELOAD_DATASETS",
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNLAB_") or k in passed}
    # As `make run` starts it: one training process per core (one thread each), Fashion-MNIST decoded
    # as each starts, unless set.
    env.setdefault("BNLAB_WORKER_CONCURRENCY", str(os.cpu_count() or 1))
    env.setdefault("BNLAB_PRELOAD_DATASETS", "fashion-mnist")
    return env | {
        "BNLAB_DATA_DIR": str(data_dir),
        "BNLAB_PORT": str(port),
        "BNLAB_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "warning"),
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


def wait_succeeded(
    client: httpx.Client, run_ids: list[str], timeout_s: float = 600, poll_s: float = POLL_S
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = [_get(client, f"/api/v1/runs/{run_id}") for run_id in run_ids]
        failed = [run for run in runs if run["status"] in ("failed", "cancelled")]
        if failed:
            raise RuntimeError(f"a run did not succeed: {failed[0]['status']}: {failed[0]['error']}")
        if all(run["status"] == "succeeded" for run in runs):
            return runs
        time.sleep(poll_s)
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
    from service.serving.server import forward_proba, open_model

    _, loaded = open_model(run_id, None)
    module = loaded.module(True)
    rates = {}
    for batch in (1, 256):
        x = torch.rand(batch, 1, 28, 28)
        seconds = median_time(partial(forward_proba, module, x), inner=200 if batch > 1 else 2000)
        rates[batch] = batch / seconds
    return rates


# ------------------------------------------------------------- the scale curve (issue 6, item 3)

SCALE_BATCHES = (32, 64, 128, 256, 512, 1024)
SCALE_WIDTHS = (128, 512, 2048)
# Per cell: a warm-up that also sizes the windows, then the median of WINDOWS timed windows of about
# WINDOW_S each; 36 cells keep the table near two minutes on the 2-core machine.
WARM_UP_S, WINDOW_S, WINDOWS = 0.3, 0.5, 5
# make run's training processes: one per core, one thread each (Settings.effective_torch_threads).
SCALE_THREADS = 1
# The grid: the article's model on the first 10k training samples (8k train, 2k validation), 2 epochs,
# norm kind x lr x 5 seeds = 20 runs (issue 18's 4-configuration x 5-seed card), against the same
# spec submitted alone.
GRID_SAMPLES, GRID_EPOCHS, GRID_SEEDS = 10_000, 2, (0, 1, 2, 3, 4)
GRID: dict[str, list[Any]] = {"model.norm.kind": ["batch", "none"], "train.lr": [1e-3, 1e-2]}
ALONE_ROUNDS = 5  # the median: the first run may meet a pool process not yet warm


def resident_rows(synthetic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split (the last 20 % held out) as train() keeps it resident: flat float rows."""
    from service.ml import datasets

    name = "synthetic" if synthetic else "fashion-mnist"
    full = datasets.load_dataset(name, search_dirs=[datasets.SYSTEM_DATASET_DIR], split="train", limit=None)
    train_set, _ = datasets.train_val_split(full, 0.2)
    return datasets.to_inputs(train_set.x).flatten(1), train_set.y


def training_calls(
    width: int, batch_norm: bool, batch: int, rows: tuple[torch.Tensor, torch.Tensor]
) -> tuple[Callable[[], None], int, str]:
    """train()'s inner loop for the article's MLP at `width`, built by the same functions (seeded
    model, Adam 1e-3 fused, the step training picks: the compiled fast path or autograd): returns
    one of the loop's calls, the samples it trains on, and the path's name. Calls walk one epoch's
    permutation, each as many steps as train() runs between two checks for cancellation."""
    from service.ml import training
    from service.ml.config import ModelConfig, NormConfig, TrainConfig
    from service.ml.fastpath import Batches

    cfg = ModelConfig(hidden=(width,), norm=NormConfig(kind="batch" if batch_norm else "none"))
    tcfg = TrainConfig(batch_size=batch)
    model = training.build_model(cfg, tcfg.seed)
    model.train()
    optimizer = training.make_optimizer(model, tcfg)
    step = training.make_step(model, optimizer, batch)
    x_all, y_all = rows
    samples = batch * step.steps_per_call
    calls = len(y_all) // samples
    order = training.epoch_permutation(len(y_all), tcfg.seed, 1)[: calls * samples]
    batches = Batches.for_epoch(x_all, y_all, order, batch)
    path = "fast" if step.fast_path else "autograd"
    return cycling(partial(step.run, batches), samples, calls), samples, path


def cycling(run: Callable[[int, int], None], samples: int, calls: int) -> Callable[[], None]:
    """One call of a training loop a time: `run(start, stop)` over the next `samples` positions of
    the epoch's order, from the start again after `calls` calls."""
    position = 0

    def one_call() -> None:
        nonlocal position
        run(position * samples, (position + 1) * samples)
        position = (position + 1) % calls

    return one_call


def samples_per_s(step: Callable[[], None], batch: int) -> float:
    """Median throughput over WINDOWS windows of a fixed call count sized by the warm-up; `batch` is
    the samples one call of `step` trains on."""
    started, steps = time.perf_counter(), 0
    while steps < 3 or time.perf_counter() - started < WARM_UP_S:
        step()
        steps += 1
    per_window = max(3, round(WINDOW_S * steps / (time.perf_counter() - started)))
    rates = []
    for _ in range(WINDOWS):
        window_started = time.perf_counter()
        for _ in range(per_window):
            step()
        rates.append(per_window * batch / (time.perf_counter() - window_started))
    return statistics.median(rates)


def scale_curve(synthetic: bool) -> None:
    """The throughput table: widths x batch sizes, BN and no-BN, on SCALE_THREADS thread(s)."""
    rows = resident_rows(synthetic)
    say(f"{'width':>5} {'batch':>5} {'path':>8} {'BN samples/s':>13} {'no-BN samples/s':>16}"
        f" {'BN / no-BN':>11} {'load':>5}")  # fmt: skip
    say("-" * 70)
    for width in SCALE_WIDTHS:
        for batch in SCALE_BATCHES:
            rates, paths = {}, set()
            for batch_norm in (True, False):
                call, samples, path = training_calls(width, batch_norm, batch, rows)
                rates[batch_norm] = samples_per_s(call, samples)
                paths.add(path)
            say(f"{width:>5} {batch:>5} {'/'.join(sorted(paths)):>8} {rates[True]:>13,.0f}"
                f" {rates[False]:>16,.0f} {rates[True] / rates[False]:>10.2f}x {load():>5}")  # fmt: skip


def grid_base(dataset: str, samples: int = GRID_SAMPLES) -> dict[str, Any]:
    return {
        "dataset": {"name": dataset, "limit": samples},
        "train": {"epochs": GRID_EPOCHS, "batch_size": 32, "optimizer": "adam", "lr": 1e-3, "seed": 0},
    }


def time_alone(client: httpx.Client, dataset: str, samples: int = GRID_SAMPLES) -> float:
    """Seconds from the POST of one grid-sized run to its success, nothing else queued."""
    started = time.time()
    response = client.post("/api/v1/runs", json={"name": "scale-alone", **grid_base(dataset, samples)})
    response.raise_for_status()
    (run,) = wait_succeeded(client, [response.json()["id"]])
    return unix_time(run["finished_at"]) - started


@dataclass(frozen=True)
class GridTimes:
    wall_s: float  # from the POST until the last run's end, as the runs record it
    runs: int
    in_steps_s: float  # training steps alone, as each epoch row records them (train_seconds)
    in_epochs_s: float  # training steps and validation, as each epoch row records them (seconds)
    in_runs_s: float  # each run from its start to its end (set-up, probes, records, the final model)


def time_grid(client: httpx.Client, dataset: str, samples: int = GRID_SAMPLES) -> GridTimes:
    """The grid experiment's times."""
    base = grid_base(dataset, samples)
    spec = {"name": "scale-grid", "base": base, "grid": GRID, "seeds": list(GRID_SEEDS)}
    started = time.time()
    response = client.post("/api/v1/experiments", json=spec)
    response.raise_for_status()
    return experiments_times(client, [response.json()["id"]], started)


def time_card(client: httpx.Client, card: str, dataset: str) -> GridTimes:
    """A replication card at its quick scale, as `POST /api/v1/cards/{card}` starts it."""
    body = {"scale": "quick"} | ({"dataset": dataset} if dataset == "synthetic" else {})
    started = time.time()
    response = client.post(f"/api/v1/cards/{card}", json=body)
    response.raise_for_status()
    return experiments_times(client, response.json()["experiments"], started)


def experiments_times(client: httpx.Client, experiment_ids: list[str], started: float) -> GridTimes:
    """The times of these experiments' runs, submitted at `started` (time.time()): the wall time runs
    until the last run's end as the run records it, not until a poll sees it. Polls each experiment
    (one request) every POLL_S: an experiment's answer costs the API process about 10 ms of a core,
    which the training processes share, and twenty run polls would cost more."""
    experiments = []
    for experiment_id in experiment_ids:
        while not (experiment := _get(client, f"/api/v1/experiments/{experiment_id}"))["finished"]:
            time.sleep(POLL_S)
        experiments.append(experiment)
    for experiment in experiments:
        counts = experiment["status_counts"]
        if counts["succeeded"] != len(experiment["runs"]):
            raise RuntimeError(f"not every run of the grid succeeded: {counts}")
    ids = [run["id"] for experiment in experiments for run in experiment["runs"]]
    epochs = [row for run_id in ids for row in epoch_rows(client, run_id)]
    in_steps = sum(float(row["train_seconds"]) for row in epochs)
    in_epochs = sum(float(row["seconds"]) for row in epochs)
    runs = [_get(client, f"/api/v1/runs/{run_id}") for run_id in ids]
    seconds = max(unix_time(run["finished_at"]) for run in runs) - started
    in_runs = sum(run_seconds(run) for run in runs)
    return GridTimes(seconds, len(ids), in_steps, in_epochs, in_runs)


def epoch_rows(client: httpx.Client, run_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/api/v1/runs/{run_id}/metrics")
    response.raise_for_status()
    rows: list[dict[str, Any]] = response.json()["epochs"]
    return rows


def run_seconds(run: dict[str, Any]) -> float:
    return unix_time(run["finished_at"]) - unix_time(run["started_at"])


def unix_time(stamp: str) -> float:
    """A timestamp of the API (UTC, ISO 8601) as time.time() counts: the benchmark runs on the API's
    machine, so the two clocks are one."""
    moment = datetime.fromisoformat(stamp)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


# The grid again with runs about five times longer (48,000 training samples): what the cores' share
# in training steps becomes when a run's fixed costs weigh less.
LONGER_GRID_SAMPLES = 60_000


# A replication card of 4 configurations x 5 seeds of small runs (issue 18's grid goal, literally):
# higher-lr's quick scale, 2 x 128 MLPs, 4 epochs of 8,000 samples at batch 32.
GRID_CARD = "higher-lr"
CARD_ROUNDS = 2


def scale_grid(dataset: str, sizes: tuple[int, ...] = (GRID_SAMPLES,), card: str | None = None) -> None:
    """The grid on a fresh stack, and one run submitted alone, for the throughput ratio; for each
    size of run in `sizes` (samples before the validation split). Then, with `card`, that replication
    card at its quick scale, CARD_ROUNDS times."""
    with tempfile.TemporaryDirectory(prefix="bnlab-bench-scale-") as folder:
        stack = Stack(Path(folder))
        say(f"worker: BNLAB_WORKER_CONCURRENCY={stack.env['BNLAB_WORKER_CONCURRENCY']}")
        processes = int(stack.env["BNLAB_WORKER_CONCURRENCY"])
        with stack as client:
            warm_up(client)
            for samples in sizes:
                say(f"load {load()}: one run of {samples:,} samples alone, {ALONE_ROUNDS} times")
                alone = [time_alone(client, dataset, samples) for _ in range(ALONE_ROUNDS)]
                say(f"load {load()}: the grid")
                grid = time_grid(client, dataset, samples)
                report_alone(samples, alone, grid)
                report_utilisation(grid, processes)
            if card is not None:
                card_rounds(client, card, dataset, processes)


def card_rounds(client: httpx.Client, card: str, dataset: str, processes: int) -> None:
    for round_number in range(1, CARD_ROUNDS + 1):
        say(f"load {load()}: the card {card}, quick scale, round {round_number}")
        times = time_card(client, card, dataset)
        say(f"the replication card {card} at its quick scale, round {round_number}:")
        say(f"  {times.runs} runs: {times.wall_s:.2f} s wall, {times.wall_s / times.runs:.3f} s a run")
        report_utilisation(times, processes)


def report_alone(samples: int, alone: list[float], grid: GridTimes) -> None:
    alone_s = statistics.median(alone)
    say(f"runs of {samples:,} samples ({samples - samples // 5:,} trained on), {GRID_EPOCHS} epochs:")
    say(f"  one run alone (median of {', '.join(f'{s:.2f}' for s in alone)} s): {alone_s:>6.2f} s")
    say(f"  the {grid.runs}-run grid: {grid.wall_s:.2f} s wall, {grid.wall_s / grid.runs:.3f} s a run;"
        f" {alone_s / (grid.wall_s / grid.runs):.2f}x the throughput of runs submitted alone")  # fmt: skip


def report_utilisation(grid: GridTimes, processes: int) -> None:
    """Where the training processes' time went: wall time x processes, split by the runs' records."""
    cores_s = grid.wall_s * processes
    say(f"  utilisation: {grid.in_steps_s:.2f} s in training steps of {grid.wall_s:.2f} s x {processes}"
        f" training processes = {grid.in_steps_s / cores_s:.1%}; with validation (the epochs)"
        f" {grid.in_epochs_s / cores_s:.1%}")  # fmt: skip
    outside = grid.in_runs_s - grid.in_epochs_s
    between = cores_s - grid.in_runs_s
    say(f"  the rest: {outside / cores_s:.1%} inside runs, outside epochs (set-up, probes, epoch records"
        f" and training states, the final model); {between / cores_s:.1%} between runs (the hand-over"
        " to the next run, the experiment's start and end)")  # fmt: skip


def scale(synthetic: bool) -> None:
    dataset = "synthetic" if synthetic else "fashion-mnist"
    runs = len(GRID_SEEDS) * math.prod([len(values) for values in GRID.values()])
    say(f"machine: {os.cpu_count()} cores; torch {torch.__version__}; {dataset}; load {load()}")
    from service.ml import training

    # Part 1 measures in this process as a worker's training process trains: one thread,
    # subnormals flushed to zero (training.configure_training_process).
    training.configure_training_process(SCALE_THREADS)
    say(f"1. training throughput: one process, {SCALE_THREADS} thread (as make run's training processes,")
    say("   one per core, one thread each); the article's MLP, Flatten -> Linear(width) -> ReLU -> [BN] ->")
    say(f"   Linear(10), Adam 1e-3, through train()'s loop; median of {WINDOWS} windows of ~{WINDOW_S} s")
    scale_curve(synthetic)
    say()
    say(f"2. a {runs}-run grid through the API and a real worker vs one such run alone: first")
    say(f"   {GRID_SAMPLES:,} samples, {GRID_EPOCHS} epochs, batch 32; norm kind x lr x {len(GRID_SEEDS)}"
        " seeds")  # fmt: skip
    scale_grid(dataset)
    say(f"load at the end: {load()}")


# ----------------------------------------------------------------------------------------- report


def report(
    epochs: int,
    steps: int,
    idiomatic: tuple[float, dict[str, float]],
    flushed: tuple[float, dict[str, float]],
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
    rows += [("(a') the same, subnormals flushed to zero", *flushed)]
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
    parser.add_argument(
        "--scale",
        action="store_true",
        help="instead: the scale curve (`make bench-scale`): throughput over batch sizes and widths, "
        "then a 16-run grid through the API vs one run alone",
    )
    parser.add_argument(
        "--grid",
        action="store_true",
        help="instead: the 20-run grids through the API vs one run alone, and a replication card of 4"
        " configurations x 5 seeds, with their utilisation",
    )
    args = parser.parse_args()
    if args.scale:
        scale(args.synthetic)
        return
    if args.grid:
        dataset = "synthetic" if args.synthetic else "fashion-mnist"
        scale_grid(dataset, (GRID_SAMPLES, LONGER_GRID_SAMPLES), card=GRID_CARD)
        return
    dataset = "synthetic" if args.synthetic else "fashion-mnist"
    threads = torch.get_num_threads()
    say(f"machine: {os.cpu_count()} cores; torch {torch.__version__}, {threads} threads; {dataset}")
    data = load_pair_data(args.synthetic)
    steps = -(-len(data[0]) // 32)
    say(f"load {load()}: (c) the matmul floor")
    floor_step_s = matmul_floor_step_s()
    idiomatic: tuple[float, dict[str, float]] = (float("nan"), {"bn": float("nan"), "no-bn": float("nan")})
    flushed = idiomatic
    if not args.skip_idiomatic:
        say(f"load {load()}: (a) the idiomatic loop")
        idiomatic = time_idiomatic(data, args.epochs)
        say(f"load {load()}: (a') the idiomatic loop, subnormals flushed to zero")
        flushed = time_idiomatic(data, args.epochs, flush_denormal=True)
    with tempfile.TemporaryDirectory(prefix="bnlab-bench-train-") as folder:
        data_dir = Path(folder)
        rounds = []
        stack = Stack(data_dir)
        say(
            f"worker: BNLAB_WORKER_CONCURRENCY={stack.env['BNLAB_WORKER_CONCURRENCY']},"
            f" BNLAB_PRELOAD_DATASETS={stack.env['BNLAB_PRELOAD_DATASETS']}"
        )
        with stack as client:
            warm_up(client)
            for i in range(args.rounds):
                say(f"load {load()}: (b) round {i + 1} through the API")
                seconds, accuracies, bn_run = time_api(client, dataset, args.epochs)
                rounds.append((seconds, accuracies))
        report(args.epochs, steps, idiomatic, flushed, rounds, floor_step_s)
        rates = inference_throughput(data_dir, bn_run)
    say()
    say(f"inference of the BN model bnlab trained (eval, BN folded, in-process, {threads} threads):")
    for batch, rate in rates.items():
        say(f"  batch {batch:>3}: {rate:>12,.0f} samples/s")
    say(f"load at the end: {load()}")


if __name__ == "__main__":
    main()
