"""Training benchmark of every workload family: an idiomatic PyTorch loop, bnlab through the API, and
the step's floor, side by side in one run (issue 18, goals 1 and 2).

A benchmark, not a test: it prints a table and asserts nothing; its figures depend on the machine and
on what else runs on it (the load average is printed next to each part).

    .venv/bin/python bench/families.py                 # part of `make bench`
    .venv/bin/python bench/families.py --only cnn      # one family
    .venv/bin/python bench/families.py --samples 2000  # a quick look at smaller sizes

Each family trains on the first `samples` of Fashion-MNIST's training split (the last 20 % held out,
as bnlab splits it), Adam 1e-3, batch 64:

(a) idiomatic: the same network (bnlab's `make_net`, so that only the loop differs; for the LSTM
    without norm, torch.nn.LSTM, as a user writes it), trained by the
    loop a PyTorch user writes: a DataLoader over float tensors (shuffle), zero_grad / backward /
    step, validation after each epoch, torch's default threads (every core);
(b) bnlab: the same spec POSTed alone to a real `bnlab api` + `bnlab worker` (SQLite, the embedded
    broker, the worker's defaults); wall time from the POST to the run's success, metrics stored;
(c) floor: the forward and backward passes of the same network on one resident batch (no data
    loading, no optimizer, no validation), timed alone in this process: the median step time × the
    run's steps. Once with the threads bnlab's training process uses (one per process under `make
    run`'s defaults), once with every core: the gap says what a lone run would gain from the idle
    core.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.train import Stack, load, say, wait_succeeded, warm_up  # noqa: E402

BATCH, LR = 64, 1e-3


class TorchLSTM(nn.Module):
    """What a PyTorch user writes for an LSTM over image rows: torch.nn.LSTM (its fused kernel) and a
    Linear on the last step's hidden state; the same function as bnlab's rnn with norm none."""

    def __init__(self, rows: int = 28, features: int = 28, hidden: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.rows, self.features = rows, features
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(x.reshape(x.shape[0], self.rows, self.features))
        out: torch.Tensor = self.out(hidden[:, -1])
        return out


@dataclass(frozen=True)
class Family:
    name: str
    model: dict[str, Any]
    samples: int
    epochs: int
    # The idiomatic loop's own network where a user would not write bnlab's (torch.nn.LSTM); None:
    # the same network as bnlab's (make_net), so that only the loop differs.
    idiomatic_model: Callable[[], nn.Module] | None = None


BN_BEFORE = {"kind": "batch", "position": "before_activation"}
FAMILIES = (
    Family("cnn (32, 64), BN", {"arch": "cnn", "channels": [32, 64], "norm": BN_BEFORE}, 20_000, 3),
    # BN momentum 0.1, PyTorch's default and the ResNet papers': at bnlab's default 0.01 (Keras') the running
    # statistics had not caught up after 126 steps, and both ways evaluated at chance.
    Family(
        "resnet-20, BN",
        {"arch": "resnet", "depth": 20, "norm": {"kind": "batch", "momentum": 0.1}},
        5_000,
        2,
    ),  # fmt: skip
    Family(
        "lstm 128, no norm",
        {"arch": "rnn", "cell": "lstm", "hidden_size": 128, "norm": {"kind": "none"}},
        20_000,
        3,
        TorchLSTM,
    ),  # fmt: skip
    Family(
        "lstm 128, recurrent BN",
        {"arch": "rnn", "cell": "lstm", "hidden_size": 128, "norm": {"kind": "batch"}},
        20_000,
        3,
    ),  # fmt: skip
    Family("mlp 50x128, BN", {"arch": "mlp", "depth": 50, "width": 128, "norm": BN_BEFORE}, 20_000, 3),
    Family("mlp 8x256, BN", {"arch": "mlp", "depth": 8, "width": 256, "norm": BN_BEFORE}, 20_000, 3),
)


def spec_for(family: Family, samples: int | None, epochs: int | None) -> dict[str, Any]:
    return {
        "name": f"bench {family.name}",
        "dataset": {"name": "fashion-mnist", "limit": samples or family.samples},
        "model": family.model,
        "train": {"epochs": epochs or family.epochs, "batch_size": BATCH, "optimizer": "adam", "lr": LR},
    }


@dataclass
class Prepared:
    """The family's network and data exactly as a bnlab run of `spec` builds them."""

    build: Callable[[], torch.nn.Module]
    train: TensorDataset
    val: TensorDataset
    epochs: int


def prepare(spec: dict[str, Any]) -> Prepared:
    from service.ml import datasets, training
    from service.runs.runner import model_config_for_data
    from service.runs.schemas import RunCreate
    from service.runs.spec import train_config

    run = RunCreate.model_validate(spec)
    from service.datasets.loading import load_training_data

    train_set, val_set = load_training_data(run)
    cfg, tcfg = model_config_for_data(run, train_set), train_config(run)

    def tensors(part: datasets.ImageDataset) -> TensorDataset:
        return TensorDataset(datasets.to_inputs(part.x), part.y)

    return Prepared(
        lambda: training.build_model(cfg, tcfg.seed), tensors(train_set), tensors(val_set), tcfg.epochs
    )


def idiomatic(family: Family, prepared: Prepared) -> tuple[float, float]:
    """(a): seconds and final validation accuracy."""
    torch.manual_seed(0)
    model = family.idiomatic_model() if family.idiomatic_model else prepared.build()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loader = DataLoader(prepared.train, batch_size=BATCH, shuffle=True)
    accuracy = float("nan")
    started = time.perf_counter()
    for _ in range(prepared.epochs):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        model.eval()
        with torch.no_grad():
            x_val, y_val = prepared.val.tensors
            accuracy = (model(x_val).argmax(1) == y_val).float().mean().item()
    return time.perf_counter() - started, accuracy


def floor_step_s(prepared: Prepared, threads: int, repeats: int = 5) -> float:
    """(c): the median seconds of one forward + backward pass on a resident batch, on `threads`."""
    model = prepared.build().train()
    x, y = (t[:BATCH] for t in prepared.train.tensors)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:

        def step() -> None:
            F.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]

        for _ in range(3):
            step()
        inner = max(3, round(0.4 / max(_once(step), 1e-4)))
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(inner):
                step()
            samples.append((time.perf_counter() - started) / inner)
        return statistics.median(samples)
    finally:
        torch.set_num_threads(saved)


def _once(step: Callable[[], None]) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def lone_run_threads(spec: dict[str, Any], share: int, cores: int) -> int:
    """The threads bnlab's training process trains this run on when it is alone on the worker: every
    core for a model whose steps are large enough (service/runs/cores.py), else its share."""
    from service.runs import cores as core_share
    from service.runs.schemas import RunCreate
    from service.runs.spec import model_config, train_config

    run = RunCreate.model_validate(spec)
    large = core_share.step_flops(model_config(run), train_config(run))
    return cores if large >= core_share.MIN_STEP_FLOPS_FOR_MORE_THREADS else share


def through_api(client: Any, spec: dict[str, Any]) -> tuple[float, float]:
    """(b): seconds from the POST to success, and the run's final validation accuracy."""
    started = time.perf_counter()
    response = client.post("/api/v1/runs", json=spec)
    if response.status_code != 202:
        raise RuntimeError(f"{spec['name']}: {response.status_code} {response.text}")
    run = wait_succeeded(client, [response.json()["id"]], timeout_s=1800)[0]
    return time.perf_counter() - started, float(run["summary"]["val_accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="families whose name contains this text")
    parser.add_argument(
        "--samples", type=int, help="training samples for every family (default: each its own)"
    )
    parser.add_argument("--epochs", type=int, help="epochs for every family (default: each its own)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    families = [f for f in FAMILIES if not args.only or args.only in f.name]
    say(f"machine: {cores} cores; torch {torch.__version__}; Fashion-MNIST; batch {BATCH}, Adam {LR}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bnlab-bench-families-") as folder:
        stack = Stack(Path(folder))
        bnlab_threads = int(stack.env.get("BNLAB_TORCH_THREADS") or 0) or max(
            1, cores // int(stack.env["BNLAB_WORKER_CONCURRENCY"])
        )
        with stack as client:
            warm_up(client)
            for family in families:
                spec = spec_for(family, args.samples, args.epochs)
                prepared = prepare(spec)
                steps = -(-len(prepared.train) // BATCH) * prepared.epochs
                size = f"{len(prepared.train):,} samples x {prepared.epochs} epochs"
                say(f"load {load()}: {family.name}: {size}")
                floors = {t: floor_step_s(prepared, t) * steps for t in sorted({1, bnlab_threads, cores})}
                idiomatic_s, idiomatic_acc = idiomatic(family, prepared)
                api_s, api_acc = through_api(client, spec)
                threads = lone_run_threads(spec, bnlab_threads, cores)
                rows.append((family.name, idiomatic_s, idiomatic_acc, api_s, api_acc, floors, threads))
    say()
    say(f"{'family':26} {'idiomatic s':>11} {'bnlab s':>8} {'speed-up':>9} {'threads':>7} {'floor s':>8}"
        f" {'vs floor':>9} {'floor, 1 thr':>12} {'acc idiom.':>10} {'acc bnlab':>10}")  # fmt: skip
    say("-" * 118)
    for name, idiomatic_s, idiomatic_acc, api_s, api_acc, floors, threads in rows:
        floor = floors[threads]
        accuracies = f"{idiomatic_acc:>10.4f} {api_acc:>10.4f}"
        speed = f"{idiomatic_s:>11.2f} {api_s:>8.2f} {idiomatic_s / api_s:>8.2f}x"
        say(f"{name:26} {speed} {threads:>7} {floor:>8.2f} {api_s / floor:>8.2f}x {floors[1]:>12.2f}"
            f" {accuracies}")  # fmt: skip
    say(f"threads: what (b)'s training process used alone (service/runs/cores.py); (a) used"
        f" {torch.get_num_threads()}; the floor is on (b)'s threads.")  # fmt: skip
    say(f"load at the end: {load()}")


if __name__ == "__main__":
    main()
