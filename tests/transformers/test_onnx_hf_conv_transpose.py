"""Transformers models that up-sample with transposed convolutions, exported to ONNX: every convolution, the
transposed ones included (as sub-pixel Conv, see inc_onnx.ptq._conv_transpose), runs ONNX Runtime's INT8 kernel.

DPT's neck re-assembles ViT tokens into feature maps with ConvTranspose2d (kernel = stride = 4 and 2); SpeechT5's
HiFi-GAN vocoder up-samples mel frames with ConvTranspose1d (kernel 8, stride 4). Small configs, random weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import transformers

import inc_core as inc
import inc_onnx
from inc_onnx import OnnxBackend


def _dpt() -> tuple[torch.nn.Module, tuple[int, ...]]:
    config = transformers.DPTConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=64, patch_size=16,
        neck_hidden_sizes=[16, 32, 64, 64], fusion_hidden_size=32, backbone_out_indices=[0, 1, 2, 3],
        reassemble_factors=[4, 2, 1, 0.5],
    )
    return transformers.DPTForDepthEstimation(config).eval(), (3, 64, 64)


def _hifigan() -> tuple[torch.nn.Module, tuple[int, ...]]:
    config = transformers.SpeechT5HifiGanConfig(
        model_in_dim=16, upsample_initial_channel=32, upsample_rates=[4, 4], upsample_kernel_sizes=[8, 8],
        resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
    )
    return transformers.SpeechT5HifiGan(config).eval(), (20, 16)


@pytest.mark.parametrize("kind", ["dpt", "hifigan"])
def test_exported_model_runs_every_convolution_int8(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, shape = _dpt() if kind == "dpt" else _hifigan()
    path = tmp_path / f"{kind}.onnx"
    sample = torch.randn(1, *shape)
    torch.onnx.export(
        model, (sample,), str(path), input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}},
        dynamo=False, opset_version=17,
    )
    fp32 = onnx.load(str(path))
    convs = sum(n.op_type in ("Conv", "ConvTranspose") for n in fp32.graph.node)
    transposed = [n.name for n in fp32.graph.node if n.op_type == "ConvTranspose"]
    assert len(transposed) == 2
    listed = [op.name for op in inc.describe(fp32).ops if op.op_type == "ConvTranspose"]
    assert listed == transposed
    calibration = inc.Dataset([np.random.default_rng(seed).standard_normal((2, *shape)).astype(np.float32) for seed in range(4)])
    quantized = inc.quantize(str(path), inc.QuantConfig(), dataset=calibration)
    assert not any(n.op_type == "ConvTranspose" for n in quantized.graph.node)
    assert OnnxBackend().int8_op_counts(quantized)["QLinearConv"] == convs
    x = np.random.default_rng(9).standard_normal((2, *shape)).astype(np.float32)
    reference = inc_onnx.create_session(fp32, runtime="ort").run(None, {"x": x})[0].ravel()
    got = inc_onnx.create_session(quantized, runtime="ort").run(None, {"x": x})[0].ravel()
    assert float(reference @ got / np.linalg.norm(reference) / np.linalg.norm(got)) >= 0.98
