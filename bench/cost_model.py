"""Measure and fit the cost model's constants (service/experiments/cost.py).

Times, in this process on one thread (as `make run`'s training processes train a grid), the autograd
training step and the validation pass of networks that span the architectures: small and deep MLPs,
CNNs, residual nets (and recurrent ones where the build has them), each at a few batch sizes. Then
fits step = fixed + per call × module calls + per convolution + per flop × 3 × forward flops × batch
+ per parameter (non-negative least squares), and the same for validation, and prints the constants
with each network's measured and modelled times. Then the compiled fast path's step
(service/ml/fastpath.py) on the MLPs it trains: fixed + per hidden layer (and per normalised one) +
per flop, fitted the same way. Every step is timed with Adam and with SGD: the update adds a cost per
parameter. A benchmark: run it on a quiet machine and paste its constants into cost.py.

    .venv/bin/python bench/cost_model.py
"""

from __future__ import annotations

import math
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
from service.ml.config import ModelConfig, NormConfig, OptimizerName, TrainConfig  # noqa: E402
from service.ml.datasets import ImageDataset  # noqa: E402
from service.ml.fastpath import Batches  # noqa: E402

IMAGE = (1, 28, 28)
SAMPLES = 2048


def networks() -> list[tuple[str, ModelConfig, tuple[int, ...]]]:
    """(name, config, batch sizes) spanning what the cards train."""
    bn, ln = NormConfig(kind="batch", position="before_activation"), NormConfig(kind="layer")
    gn8 = NormConfig(kind="group", num_groups=8)
    found = [
        ("mlp 2x128 LN", ModelConfig(hidden=(128, 128), norm=ln), (2, 32, 256)),
        ("mlp 10x128 BN", ModelConfig(hidden=(128,) * 10, norm=bn), (2, 32, 128)),
        ("mlp 50x64 BN", ModelConfig(hidden=(64,) * 50, norm=bn), (64,)),
        ("mlp 3x1024 GN", ModelConfig(hidden=(1024,) * 3, norm=NormConfig(kind="group")), (64,)),
        ("cnn 16,32 BN", ModelConfig(arch="cnn", channels=(16, 32), norm=bn), (2, 8, 64)),
        ("cnn 16,32 GN", ModelConfig(arch="cnn", channels=(16, 32), norm=gn8), (2, 32)),
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


OPTIMIZERS: tuple[OptimizerName, ...] = ("adam", "sgd")  # SGD with momentum, as most cards train


def step_time(cfg: ModelConfig, batch: int, optimizer_name: OptimizerName) -> float:
    model = training.build_model(cfg, 0).train()
    optimizer = training.make_optimizer(model, TrainConfig(batch_size=batch, optimizer=optimizer_name))
    x, y = torch.rand(SAMPLES, *cfg.input_shape), torch.randint(0, 10, (SAMPLES,))
    batches = Batches.for_epoch(x, y, torch.randperm(SAMPLES), batch)
    position = 0

    def one() -> None:
        nonlocal position
        start = position * batch % (SAMPLES - batch)
        training.autograd_steps(model, optimizer, training.Shard(), batches, start, start + batch)
        position += 1

    return median_s(one)


def fast_networks() -> list[tuple[str, ModelConfig, tuple[int, ...]]]:
    """MLPs the fast path trains, shallow to deep, narrow to wide, ReLU and sigmoid."""
    bn, none = NormConfig(kind="batch", position="before_activation"), NormConfig(kind="none")
    return [
        ("mlp 2x100 BN", ModelConfig(hidden=(100, 100), norm=bn), (32, 128)),
        ("mlp 2x100 none", ModelConfig(hidden=(100, 100), norm=none), (32,)),
        ("mlp 3x100 sigmoid BN", ModelConfig(hidden=(100,) * 3, activation="sigmoid", norm=bn), (60,)),
        ("mlp 3x100 sigmoid none", ModelConfig(hidden=(100,) * 3, activation="sigmoid", norm=none), (60,)),
        ("mlp 8x256 none", ModelConfig(hidden=(256,) * 8, norm=none), (64,)),
        ("mlp 8x256 BN", ModelConfig(hidden=(256,) * 8, norm=bn), (64,)),
        ("mlp 20x100 BN", ModelConfig(hidden=(100,) * 20, norm=bn), (32,)),
        ("mlp 2x1024 BN", ModelConfig(hidden=(1024,) * 2, norm=bn), (128,)),
    ]


def fast_step_time(cfg: ModelConfig, batch: int, optimizer_name: OptimizerName) -> float:
    model = training.build_model(cfg, 0).train()
    optimizer = training.make_optimizer(model, TrainConfig(batch_size=batch, optimizer=optimizer_name))
    step = training.make_step(model, optimizer, batch)
    if not step.fast_path:
        raise SystemExit(f"the fast path does not train {cfg}")
    # The fast path reads flat rows, as the training loop hands them to it.
    x, y = torch.rand(SAMPLES, math.prod(cfg.input_shape)), torch.randint(0, 10, (SAMPLES,))
    batches = Batches.for_epoch(x, y, torch.randperm(SAMPLES), batch)
    k = step.steps_per_call  # the loop hands the fast path this many batches a call
    return median_s(lambda: step.run(batches, 0, k * batch)) / k  # run takes sample positions


def validation_time(cfg: ModelConfig, batch: int) -> float:
    """Seconds a sample of validation, `batch` samples at a time (as training validates `cfg`)."""
    model = training.build_model(cfg, 0)
    data = ImageDataset(torch.rand(SAMPLES, *cfg.input_shape), torch.randint(0, 10, (SAMPLES,)), 10)
    return median_s(lambda: training.evaluate(model, data, batch)) / SAMPLES


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
    step_rows, step_s, val_rows, val_s, names, val_names = [], [], [], [], [], []
    for name, cfg, batches in networks():
        p = nets.forward_profile(cfg)
        flops = [float(p.linear_flops), float(p.conv_flops), float(p.other_flops)]
        calls = p.calls
        params = nets.parameter_count(cfg)
        for batch in batches:
            for optimizer in OPTIMIZERS:
                seconds = step_time(cfg, batch, optimizer)
                per_step = [1.0, calls, p.conv_layers]
                step_rows.append([*per_step, *(3.0 * f * batch for f in flops), *updated(params, optimizer)])
                step_s.append(seconds)
                names.append(f"{name}, batch {batch}, {optimizer}")
                counted = f"{calls} calls, {p.flops:,} flops, {params:,} parameters"
                say(f"  step  {name:18} batch {batch:>4} {optimizer:4}: {seconds * 1e3:8.3f} ms  ({counted})")
        val_batch = training.evaluation_batch_size(cfg)
        per_sample = validation_time(cfg, val_batch)
        # Per sample: the fixed and per-call parts of a batch, shared by its samples, and the flops.
        val_rows.append([1 / val_batch, calls / val_batch, *flops])
        val_s.append(per_sample)
        val_names.append(f"{name}, batch {val_batch}")
        say(f"  val   {name:18}: {per_sample * 1e6:8.2f} µs a sample, {val_batch} a batch")
    step = fit(step_rows, step_s)
    val = fit(val_rows, val_s)
    say()
    for prefix, coef in (("STEP", step), ("VAL", val)):
        say(f"{prefix}_FIXED_S = {coef[0]:.6f}")
        say(f"{prefix}_PER_CALL_S = {coef[1]:.7f}")
        flop_rates = coef[3:6] if prefix == "STEP" else coef[2:5]
        for kind, value in zip(("LINEAR", "CONV", "OTHER"), flop_rates, strict=True):
            rate = f"1 / {1 / value:.3e}" if value > 0 else "0.0"
            say(f"{prefix}_PER_{kind}_FLOP_S = {rate}")
    say(f"STEP_PER_CONV_LAYER_S = {step[2]:.7f}")
    say(f"STEP_PER_PARAMETER_S = {per_parameter(step[6:])}")
    say()
    show_fit(names, step_rows, step_s, step)
    say()
    say("validation, a sample")
    show_fit(val_names, val_rows, val_s, val)
    fast_rows, fast_s, fast_names = [], [], []
    say()
    say("the fast path's step")
    for name, cfg, batches in fast_networks():
        p = nets.forward_profile(cfg)
        params = nets.parameter_count(cfg)
        flops = [3.0 * p.linear_flops, 3.0 * p.other_flops]
        for batch in batches:
            for optimizer in OPTIMIZERS:
                seconds = fast_step_time(cfg, batch, optimizer)
                layers = [len(cfg.hidden), len(cfg.hidden) if cfg.norm.kind != "none" else 0]
                fast_rows.append([1.0, *layers, *(f * batch for f in flops), *updated(params, optimizer)])
                fast_s.append(seconds)
                fast_names.append(f"{name}, batch {batch}, {optimizer}")
                say(f"  step  {name:22} batch {batch:>4} {optimizer:4}: {seconds * 1e3:8.3f} ms")
    fast = fit(fast_rows, fast_s)
    say()
    say(f"FAST_STEP_FIXED_S = {fast[0]:.6f}")
    say(f"FAST_STEP_PER_LAYER_S = {fast[1]:.7f}")
    say(f"FAST_STEP_PER_NORM_LAYER_S = {fast[2]:.7f}")
    for kind, value in zip(("LINEAR", "OTHER"), fast[3:5], strict=True):
        rate = f"1 / {1 / value:.3e}" if value > 0 else "0.0"
        say(f"FAST_STEP_PER_{kind}_FLOP_S = {rate}")
    say(f"FAST_STEP_PER_PARAMETER_S = {per_parameter(fast[5:])}")
    say()
    show_fit(fast_names, fast_rows, fast_s, fast)


def updated(params: int, optimizer: OptimizerName) -> list[float]:
    """The optimizer's columns: its update touches every parameter, Adam's at more cost than SGD's."""
    return [float(params) if optimizer == name else 0.0 for name in OPTIMIZERS]


def per_parameter(coef: np.ndarray) -> str:
    return (
        "{" + ", ".join(f'"{name}": {value:.3e}' for name, value in zip(OPTIMIZERS, coef, strict=True)) + "}"
    )


def show_fit(names: list[str], rows: list[list[float]], seconds: list[float], coef: np.ndarray) -> None:
    print(f"{'network':32} {'measured ms':>12} {'modelled ms':>12} {'ratio':>6}")  # noqa: T201
    for name, row, measured in zip(names, rows, seconds, strict=True):
        modelled = float(np.dot(row, coef))
        print(f"{name:32} {measured * 1e3:>12.3f} {modelled * 1e3:>12.3f} {modelled / measured:>6.2f}")  # noqa: T201


if __name__ == "__main__":
    main()
