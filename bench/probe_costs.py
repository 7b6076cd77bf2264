"""Measure what each epoch-end probe costs (docs/probes.md's table): seconds per probing, median of
repeats, on one thread, for the article's MLP, a deep BN MLP and a ResNet-20, next to an epoch's
training time.

    PYTHONPATH=. python bench/probe_costs.py [--depth 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial

import torch

from service.datasets.loading import load_training_data
from service.ml.config import PROBE_NAMES, ModelConfig, NormConfig, TrainConfig
from service.ml.datasets import DataShape, to_inputs
from service.ml.nets import make_net, norm_slots
from service.ml.probes import (
    PROBE_SAMPLES,
    STATISTICS_SAMPLES,
    EpochProbes,
    capture_slot_inputs,
    probe_percentiles,
    probe_slot_inputs,
)
from service.ml.training import configure_training_process, evaluation_batch_size, train
from service.runs.schemas import RunCreate
from service.runs.spec import model_config


def say(line: str) -> None:
    sys.stdout.write(line + "\n")


def seconds(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def resnet_20() -> ModelConfig:
    """The deep lab's ResNet-20 for Fashion-MNIST's 1 × 28 × 28 images, as a run's spec builds it."""
    spec = RunCreate.model_validate({"model": {"arch": "resnet", "depth": 20}})
    return model_config(spec, DataShape((1, 28, 28), 10, "pixels", 60_000))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--epoch-samples", type=int, default=4800, help="deep MLP and ResNet: samples timed, scaled"
    )
    args = parser.parse_args()
    configure_training_process(1)
    train_set, val_set = load_training_data(RunCreate.model_validate({}))
    x, y = to_inputs(val_set.x[:PROBE_SAMPLES]), val_set.y[:PROBE_SAMPLES]
    train_x = to_inputs(train_set.x[:STATISTICS_SAMPLES]).flatten(1)
    nets = {
        "article MLP (1×128, BN)": ModelConfig(),
        f"deep MLP ({args.depth}×128, BN before act)": ModelConfig(
            hidden=(128,) * args.depth, norm=NormConfig(position="before_activation")
        ),
        "ResNet-20 (BN)": resnet_20(),
    }
    say(f"{len(train_set)} training samples; probe batch {PROBE_SAMPLES}; statistics over {len(train_x)}")
    for label, cfg in nets.items():
        torch.manual_seed(0)
        model = make_net(cfg)
        slots = norm_slots(model)
        always = partial(probe_slot_inputs, model, slots, x, 1)
        row = {"slot mean/std (always)": seconds(always, args.repeats)}
        for name in PROBE_NAMES:
            # statistics_gap's chunks as training sizes them: validation's batch for this network.
            probes = EpochProbes(frozenset({name}), x, y, slots, train_x, evaluation_batch_size(cfg))
            row[name] = seconds(partial(probes, model, 1, 1e-3), args.repeats)
        # As training runs it: on the slot inputs that the slot mean/std's forward pass captured.
        shared = partial(probe_percentiles, model, slots, x, 1, capture_slot_inputs(model, slots, x))
        row["percentiles, in training"] = seconds(shared, args.repeats)
        n = len(train_set) if cfg == ModelConfig() else args.epoch_samples
        subset = type(train_set)(train_set.x[:n], train_set.y[:n], train_set.num_classes)
        # The training steps scaled to the full split; validation (of the whole validation split) as is.
        timed = train(cfg, TrainConfig(epochs=1, probes=()), subset, val_set).epochs[0]
        steps = timed.train_seconds or timed.seconds  # always recorded by train(); None only in old rows
        epoch = steps * len(train_set) / n + (timed.seconds - steps)
        say(f"\n{label}: one epoch over {len(train_set)} samples ≈ {epoch:.2f} s (measured on {n})")
        for probe_name, s in row.items():
            say(f"  {probe_name:24s} {s * 1000:9.1f} ms  {100 * s / epoch:6.2f} % of an epoch")


if __name__ == "__main__":
    main()
