"""Adaptive gradient clipping held to its definition (Brock et al. 2021b §4): unit by unit,
G_i ← λ·max(‖W_i‖, ε)/‖G_i‖ · G_i where ‖G_i‖/max(‖W_i‖, ε) > λ, else G_i."""

from __future__ import annotations

import pytest
import torch

from service.ml.agc import AGC_EPS, adaptive_clip, agc_parameters, clip_gradients_, unitwise_norm
from service.ml.config import ModelConfig, NormConfig
from service.ml.nets import make_net

F64 = torch.float64


def by_definition(grad: torch.Tensor, param: torch.Tensor, clipping: float, eps: float) -> torch.Tensor:
    """Unit by unit with Python loops: each output unit (row / output channel), or the whole tensor
    for a vector or scalar."""
    units = [(...,)] if param.dim() <= 1 else [(i,) for i in range(param.shape[0])]
    out = grad.clone()
    for unit in units:
        g, w = grad[unit], param[unit]
        w_norm = max(float(torch.sqrt((w**2).sum())), eps)
        g_norm = float(torch.sqrt((g**2).sum()))
        if g_norm / w_norm > clipping:
            out[unit] = g * (clipping * w_norm / g_norm)
    return out


@pytest.mark.parametrize("shape", [(7, 5), (4, 3, 3, 3), (9,), ()], ids=["linear", "conv", "bias", "scalar"])
def test_agc_matches_its_definition_unit_by_unit(shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(0)
    param = torch.randn(shape, dtype=F64, generator=generator)
    # Gradients from small to large per unit, so some units clip and others do not.
    spread = torch.logspace(-3, 1, shape[0], dtype=F64).reshape(-1, *[1] * (len(shape) - 1)) if shape else 5.0
    grad = torch.randn(shape, dtype=F64, generator=generator) * spread
    clipping = 0.1
    clipped = adaptive_clip(grad, param, clipping)
    torch.testing.assert_close(clipped, by_definition(grad, param, clipping, AGC_EPS), atol=1e-14, rtol=0)
    ratio = unitwise_norm(clipped) / unitwise_norm(param).clamp(min=AGC_EPS)
    assert (ratio <= clipping + 1e-12).all()
    if len(shape) >= 2:
        changed = (clipped != grad).flatten(1).any(1)
        assert changed.any()
        assert not changed.all()
        torch.testing.assert_close(
            ratio.flatten()[changed], torch.full_like(ratio.flatten()[changed], clipping)
        )


def test_agc_lets_zero_initialised_parameters_move_by_eps() -> None:
    param, grad = torch.zeros(3, 4, dtype=F64), torch.ones(3, 4, dtype=F64)
    clipped = adaptive_clip(grad, param, 0.5)
    # ‖W_i‖* = ε: each row is clipped to norm λ·ε.
    torch.testing.assert_close(unitwise_norm(clipped).flatten(), torch.full((3,), 0.5 * AGC_EPS, dtype=F64))
    assert torch.equal(adaptive_clip(torch.zeros_like(grad), param, 0.5), torch.zeros_like(grad))
    with pytest.raises(ValueError, match="> 0"):
        adaptive_clip(grad, param, 0.0)


def test_clip_gradients_in_place_leaves_the_head_unclipped() -> None:
    torch.manual_seed(0)
    net = make_net(ModelConfig(hidden=(16,), norm=NormConfig(kind="ws")))
    net(torch.rand(8, 1, 28, 28)).pow(2).sum().mul(1e4).backward()
    chosen = agc_parameters(net)
    names = {id(p): n for n, p in net.named_parameters()}
    assert all(not names[id(p)].startswith("out.") for p in chosen)
    assert {"fc1.parametrizations.weight.original", "fc1.bias"} <= {names[id(p)] for p in chosen}
    expected = {id(p): by_definition(p.grad, p.detach(), 0.01, AGC_EPS) for p in chosen if p.grad is not None}
    head = net.get_parameter("out.weight")
    assert head.grad is not None
    head_grad = head.grad.clone()
    clip_gradients_(chosen, 0.01)
    for p in chosen:
        assert p.grad is not None
        torch.testing.assert_close(p.grad, expected[id(p)], atol=1e-6, rtol=1e-5)
    assert torch.equal(head.grad, head_grad)
