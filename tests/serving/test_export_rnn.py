"""ONNX export of the rnn arch (docs/deep-lab.md, Recurrent networks): the eval-mode network, its time
loop unrolled (a fixed sequence length, any batch size), runs in onnxruntime like PyTorch, with each
time step's running statistics of recurrent BN and the last one's beyond the limit."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch

from service.ml.config import ModelConfig, NormConfig
from service.ml.nets import make_net
from service.serving.export import export_onnx

SHAPE = (1, 6, 4)  # 6 steps of 4 values


@pytest.mark.parametrize(
    ("cell", "kind"),
    [("lstm", "batch"), ("gru", "layer"), ("lstm", "none"), ("gru", "none")],
    ids=["lstm-recurrent-bn", "gru-layer-norm", "lstm-plain", "gru-plain"],
)
def test_an_rnn_exports_to_onnx_and_runs_like_pytorch(cell: str, kind: str) -> None:
    norm = NormConfig(kind=kind, position="before_activation", momentum=0.5, max_steps=4)  # type: ignore[arg-type]
    cfg = ModelConfig(arch="rnn", input_shape=SHAPE, cell=cell, hidden_size=8, norm=norm)  # type: ignore[arg-type]
    torch.manual_seed(0)
    net = make_net(cfg).train()
    net(torch.rand(16, *SHAPE))  # running statistics, one slot per step and the last shared
    net.eval()
    session = onnxruntime.InferenceSession(export_onnx(net, SHAPE))
    for batch in (1, 5):
        x = torch.rand(batch, *SHAPE)
        (onnx_logits,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(onnx_logits, net(x).numpy(), rtol=1e-4, atol=1e-5)
