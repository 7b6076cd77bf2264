"""The training switches (docs/training-switches.md) in the epoch loop: each against a hand-written
loop or its definition, and each off leaving training as it was."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from service.ml import training
from service.ml.config import ModelConfig, NormConfig, TrainConfig
from service.ml.datasets import ImageDataset, make_synthetic, to_inputs, train_val_split
from service.ml.training import build_model, epoch_permutation, make_optimizer, train, used_samples

BN = ModelConfig(hidden=(16, 16))
NO_BN = replace(BN, norm=NormConfig(kind="none"))


@pytest.fixture(scope="module")
def small() -> tuple[ImageDataset, ImageDataset]:
    return train_val_split(make_synthetic(200, seed=5), 0.25)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- train.agc -------------------------------------------------------------------------------------


def clip_by_definition(model: torch.nn.Module, lam: float) -> None:
    """Brock et al. 2021b, §4: for each unit i (a row of a weight, a whole bias) of every parameter but
    the head, G_i ← λ·max(‖W_i‖, 1e-3)/‖G_i‖·G_i where ‖G_i‖/max(‖W_i‖, 1e-3) > λ."""
    for name, p in model.named_parameters():
        if name.startswith("out.") or p.grad is None:
            continue
        units_w = p.detach().reshape(p.shape[0], -1) if p.dim() > 1 else p.detach().reshape(1, -1)
        units_g = p.grad.reshape(units_w.shape)
        for i in range(units_w.shape[0]):  # in float32, as training computes
            w_norm = units_w[i].norm().clamp(min=1e-3)
            g_norm = units_g[i].norm()
            if g_norm / w_norm > lam:
                units_g[i] *= (lam * w_norm) / g_norm


@pytest.mark.parametrize("cfg", [BN, NO_BN])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_agc_run_equals_a_hand_loop_that_clips_by_the_definition(
    small: tuple[ImageDataset, ImageDataset], cfg: ModelConfig, optimizer: str
) -> None:
    train_set, val_set = small
    tcfg = TrainConfig(epochs=2, batch_size=32, seed=3, agc=1e-3, optimizer=optimizer, lr=0.05)  # type: ignore[arg-type]
    trained = train(cfg, tcfg, train_set, val_set).model

    model = build_model(cfg, tcfg.seed)
    opt = make_optimizer(model, tcfg)
    x, y = to_inputs(train_set.x).flatten(1), train_set.y
    n_used = used_samples(len(train_set), tcfg.batch_size)
    for epoch in (1, 2):
        model.train()
        order = epoch_permutation(len(train_set), tcfg.seed, epoch)[:n_used]
        for s in range(0, n_used, tcfg.batch_size):
            idx = order[s : s + tcfg.batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()  # type: ignore[no-untyped-call]
            clip_by_definition(model, tcfg.agc or 0)
            opt.step()
        model.eval()
    hand, got = model.state_dict(), trained.state_dict()
    for k in hand:
        torch.testing.assert_close(got[k], hand[k], rtol=1e-6, atol=1e-7, msg=k)  # bit-identical on CPU
    # λ = 1e-3 does clip: without it the run ends elsewhere.
    unclipped = train(cfg, replace(tcfg, agc=None), train_set, val_set).model.state_dict()
    assert not torch.allclose(unclipped["fc1.weight"], got["fc1.weight"], atol=1e-4)


def test_agc_trains_through_autograd_and_null_keeps_the_fast_path(
    small: tuple[ImageDataset, ImageDataset],
) -> None:
    model = build_model(BN, 0)
    opt = make_optimizer(model, TrainConfig())
    assert training.make_step(model, opt, 32, tcfg=TrainConfig()).fast_path
    assert not training.make_step(model, opt, 32, tcfg=TrainConfig(agc=0.01)).fast_path
    # agc null is today's training, bit for bit.
    today = train(BN, TrainConfig(epochs=2, seed=1), *small)
    off = train(BN, TrainConfig(epochs=2, seed=1, agc=None), *small)
    assert same_state(today.model, off.model)
    assert [m.val_loss for m in today.epochs] == [m.val_loss for m in off.epochs]
