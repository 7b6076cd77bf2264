"""The covariate-shift probe measures what enters each normalisation slot, and disturbs nothing."""

from __future__ import annotations

import pytest
import torch

from service.ml.config import ModelConfig, NormConfig, TrainConfig
from service.ml.datasets import make_synthetic, to_inputs, train_val_split
from service.ml.nets import make_net, norm_slots
from service.ml.probes import PROBE_SAMPLES, probe_slot_inputs
from service.ml.resume import load_training_state
from service.ml.training import train
from tests.ml.test_training import Recorder


def bn_net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return make_net(ModelConfig(hidden=(16, 8), norm=NormConfig(kind="batch")))


def probe_batch() -> torch.Tensor:
    return torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_statistics_are_those_of_each_slot_input() -> None:
    net = bn_net()
    x = probe_batch()
    slots = [("bn1", net.bn1), ("bn2", net.bn2)]
    stats = probe_slot_inputs(net, slots, x, epoch=3)

    net.eval()
    with torch.no_grad():
        into_bn1 = net.act1(net.fc1(net.flatten(x))).double()
        into_bn2 = net.act2(net.fc2(net.bn1(into_bn1.float()))).double()
    assert [(s.epoch, s.layer) for s in stats] == [(3, "bn1"), (3, "bn2")]
    for stat, expected in zip(stats, (into_bn1, into_bn2), strict=True):
        assert abs(stat.input_mean - expected.mean().item()) < 1e-6
        assert abs(stat.input_std - expected.std(unbiased=False).item()) < 1e-6
    assert stats[0].input_std > 0


def test_probing_leaves_mode_buffers_rng_and_gradients_alone() -> None:
    net = bn_net()
    net.train()
    # Some training-mode traffic so the buffers are not at their initial values.
    net(probe_batch())
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()

    probe_slot_inputs(net, [("bn1", net.bn1), ("bn2", net.bn2)], probe_batch(), epoch=1)

    assert net.training, "the probe must restore train mode"
    assert all(torch.equal(buffers[k], v) for k, v in net.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in net.parameters())
    # The hooks are removed: a later forward records nothing and raises nothing.
    assert not net.bn1._forward_pre_hooks


def test_no_slots_means_no_statistics() -> None:
    net = bn_net()
    assert probe_slot_inputs(net, [], probe_batch(), epoch=0) == ()


@pytest.mark.parametrize("kind", ["batch", "none"])
def test_training_reports_epoch_zero_with_epoch_one_and_each_epoch_after(kind: str) -> None:
    cfg = ModelConfig(hidden=(16, 8), norm=NormConfig(kind=kind))  # type: ignore[arg-type]
    data = train_val_split(make_synthetic(400, seed=2), 0.25)
    recorder = Recorder()
    result = train(cfg, TrainConfig(epochs=3, seed=1), *data, callbacks=recorder)

    # Runs with and without BN are probed at the same slots.
    assert [[(s.epoch, s.layer) for s in m.layer_stats] for m in recorder.epochs] == [
        [(0, "bn1"), (0, "bn2"), (1, "bn1"), (1, "bn2")],
        [(2, "bn1"), (2, "bn2")],
        [(3, "bn1"), (3, "bn2")],
    ]
    # The last epoch's figures are those of the trained model on the first validation samples.
    probe = to_inputs(data[1].x[:PROBE_SAMPLES])
    again = probe_slot_inputs(result.model, norm_slots(result.model), probe, epoch=3)
    assert recorder.epochs[-1].layer_stats == again
    # Training moved the distributions: the input of the second slot is not what it was at epoch 0.
    first, last = recorder.epochs[0].layer_stats[1], recorder.epochs[-1].layer_stats[1]
    assert (first.input_mean, first.input_std) != (last.input_mean, last.input_std)


def test_a_resumed_run_does_not_report_epoch_zero_again() -> None:
    cfg = ModelConfig(hidden=(16,), norm=NormConfig(kind="batch"))
    data = train_val_split(make_synthetic(400, seed=2), 0.25)
    first = Recorder()
    train(cfg, TrainConfig(epochs=1, seed=1), *data, callbacks=first)
    rest = Recorder()
    train(
        cfg,
        TrainConfig(epochs=2, seed=1),
        *data,
        callbacks=rest,
        resume=load_training_state(first.snapshots[0]),
    )
    assert [(s.epoch, s.layer) for s in rest.epochs[0].layer_stats] == [(2, "bn1")]
