"""ONNX export of the residual networks (docs/deep-lab.md, Serving): fused v1 and unfused v2 run in
onnxruntime like PyTorch, at any batch size."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch

from service.ml.config import ModelConfig, NormConfig
from service.ml.fusion import fuse_bn
from service.ml.nets import make_net
from service.serving.export import export_onnx

SHAPE = (1, 12, 12)


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(arch="resnet", depth=8, width=4, input_shape=SHAPE),
        ModelConfig(arch="resnet", depth=8, width=4, input_shape=SHAPE, block="pre_activation"),
        ModelConfig(
            arch="resnet",
            depth=8,
            width=4,
            input_shape=SHAPE,
            norm=NormConfig(kind="none"),
            residual_init="fixup",
        ),
        ModelConfig(
            arch="resmlp",
            depth=4,
            width=16,
            input_shape=SHAPE,
            norm=NormConfig(kind="none"),
            residual_init="skipinit",
        ),
    ],
    ids=["v1-fused", "v2-unfused", "fixup", "resmlp-skipinit"],
)
def test_residual_networks_export_to_onnx_and_run_like_pytorch(cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    net = make_net(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))  # leave the zero init: every layer matters
        net(torch.rand(16, *SHAPE))  # running statistics
    model, report = fuse_bn(net.eval())
    assert report.fused == (cfg.block == "post_activation")
    session = onnxruntime.InferenceSession(export_onnx(model, SHAPE), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.rand(batch, *SHAPE)
        (logits,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(logits, net(x).numpy(), atol=1e-4)
