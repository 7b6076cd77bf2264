"""Measure and fit the cost model's constants (service/experiments/cost.py).

Times, in this process on one thread (as `make run`'s training processes train a grid), the autograd
training step and the validation pass of networks that span the architectures: small and deep MLPs,
CNNs, residual nets (and recurrent ones where the build has them), each at a few batch sizes. Then
fits step = fixed + per call × module calls + per flop × 3 × forward flops × batch (non-negative least
squares), and the same for validation, and prints the constants with each network's measured and
modelled times. A benchmark: run it on a quiet machine and paste its constants into cost.py.

    .venv/bin/python bench/cost_model.py
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import nnls

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.ml import nets, training  # noqa: E402
from service.ml.config import ModelConfig, NormConfig, TrainConfig  # noqa: E402
from service.ml.datasets import ImageDataset  # noqa: E402
from service.ml.fastpath import Batches  # noqa: E402

IMAGE = (1, 28, 28)
SAMPLES = 2048


def networks() -> list[tuple[str, ModelConfig, tuple[int, ...]]]:
    """(name, config, batch sizes) spanning what the cards train."""
    bn, ln = NormConfig(kind="batch", position="before_activation"), NormConfig(kind="layer")
    found = [
        ("mlp 2x128 LN", ModelConfig(hidden=(128, 128), norm=ln), (32, 256)),
        ("mlp 10x128 BN", ModelConfig(hidden=(128,) * 10, norm=bn), (32, 128)),
        ("mlp 50x64 BN", ModelConfig(hidden=(64,) * 50, norm=bn), (64,)),
        ("mlp 3x1024 GN", ModelConfig(hidden=(1024,) * 3, norm=NormConfig(kind="group")), (64,)),
        ("cnn 16,32 BN", ModelConfig(arch="cnn", channels=(16, 32), norm=bn), (8, 64)),
        ("cnn 32,64 GN", ModelConfig(arch="cnn", channels=(32, 64), norm=NormConfig(kind="group")), (32,)),
        ("resnet-8 BN", ModelConfig(arch="resnet", depth=8, norm=NormConfig(kind="batch")), (32,)),
        ("resnet-20 BN", ModelConfig(arch="resnet", depth=20, norm=NormConfig(kind="batch")), (64,)),
        (
            "resmlp-10 BN",
            ModelConfig(arch="resmlp", depth=10, width=128, norm=NormConfig(kind="batch")),
            (64,),
        ),
    ]
    rnn = {"arch": "rnn", "hidden_size": 64}
    found += [
        ("lstm 64 none", ModelConfig(**rnn, norm=NormConfig(kind="none")), (64,)),  # type: ignore[arg-type]
        ("lstm 64 BN", ModelConfig(**rnn, norm=NormConfig(kind="batch")), (64,)),  # type: ignore[arg-type]
        ("lstm 64 LN", ModelConfig(**rnn, norm=NormConfig(kind="layer")), (64,)),  # type: ignore[arg-type]
        ("gru 128 LN", ModelConfig(arch="rnn", cell="gru", norm=NormConfig(kind="layer")), (32,)),
    ]
    return found


def median_s(step: Callable[[], object], budget_s: float = 0.6) -> float:
    step()
    started, n = time.perf_counter(), 0
    while n < 2 or time.perf_counter() - started < budget_s / 3:
        step()
        n += 1
    per = (time.perf_counter() - started) / n
    inner = max(2, round(budget_s / 5 / per))
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(inner):
            step()
        samples.append((time.perf_counter() - started) / inner)
    return statistics.median(samples)


def step_time(cfg: ModelConfig, batch: int) -> float:
    model = training.build_model(cfg, 0).train()
    optimizer = training.make_optimizer(model, TrainConfig(batch_size=batch))
    x, y = torch.rand(SAMPLES, *cfg.input_shape), torch.randint(0, 10, (SAMPLES,))
    batches = Batches.for_epoch(x, y, torch.randperm(SAMPLES), batch)
    position = 0

    def one() -> None:
        nonlocal position
        start = position * batch % (SAMPLES - batch)
        training.autograd_steps(model, optimizer, training.Shard(), batches, start, start + batch)
        position += 1

    return median_s(one)


def validation_time(cfg: ModelConfig) -> float:
    model = training.build_model(cfg, 0)
    data = ImageDataset(torch.rand(SAMPLES, *cfg.input_shape), torch.randint(0, 10, (SAMPLES,)), 10)
    return median_s(lambda: training.evaluate(model, data)) / SAMPLES


def fit(rows: list[list[float]], seconds: list[float]) -> np.ndarray:
    # Relative errors matter (a card's runs span milliseconds to seconds): weigh each row by 1/time.
    a, b = np.array(rows), np.array(seconds)
    weights = 1 / b
    coef: np.ndarray = nnls(a * weights[:, None], b * weights)[0]
    return coef


def main() -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    say = print
    say(f"torch {torch.__version__}, 1 thread; autograd steps and validation, median of 5 windows")
    step_rows, step_s, val_rows, val_s, names = [], [], [], [], []
    for name, cfg, batches in networks():
        p = nets.forward_profile(cfg)
        flops = [float(p.linear_flops), float(p.conv_flops), float(p.other_flops)]
        calls = p.calls
        for batch in batches:
            seconds = step_time(cfg, batch)
            step_rows.append([1.0, calls, *(3.0 * f * batch for f in flops)])
            step_s.append(seconds)
            names.append(f"{name}, batch {batch}")
            counted = f"{calls} calls, {p.flops:,} flops"
            say(f"  step  {name:18} batch {batch:>4}: {seconds * 1e3:8.3f} ms  ({counted})")
        per_sample = validation_time(cfg)
        # Per sample: the fixed and per-call parts of a batch of 1024, and the flops.
        val_rows.append([1 / 1024, calls / 1024, *flops])
        val_s.append(per_sample)
        say(f"  val   {name:18}: {per_sample * 1e6:8.2f} µs a sample")
    step = fit(step_rows, step_s)
    val = fit(val_rows, val_s)
    say()
    for prefix, coef in (("STEP", step), ("VAL", val)):
        say(f"{prefix}_FIXED_S = {coef[0]:.6f}")
        say(f"{prefix}_PER_CALL_S = {coef[1]:.7f}")
        for kind, value in zip(("LINEAR", "CONV", "OTHER"), coef[2:], strict=True):
            rate = f"1 / {1 / value:.3e}" if value > 0 else "0.0"
            say(f"{prefix}_PER_{kind}_FLOP_S = {rate}")
    say()
    say(f"{'network':32} {'measured ms':>12} {'modelled ms':>12} {'ratio':>6}")
    for name, row, seconds in zip(names, step_rows, step_s, strict=True):
        modelled = float(np.dot(row, step))
        say(f"{name:32} {seconds * 1e3:>12.3f} {modelled * 1e3:>12.3f} {modelled / seconds:>6.2f}")


if __name__ == "__main__":
    main()
