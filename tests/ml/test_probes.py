"""The covariate-shift probe measures what enters each normalisation slot, and disturbs nothing."""

from __future__ import annotations

import torch

from service.ml.config import ModelConfig, NormConfig
from service.ml.nets import make_net
from service.ml.probes import probe_slot_inputs


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
