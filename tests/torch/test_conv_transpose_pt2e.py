"""Transposed convolutions on the PT2E path: INT8 as sub-pixel conv2d (inc_torch.ptq._conv_transpose), PTQ and QAT.

The model is torch_helpers.DigitsUNet, trained on digits: U-Net and DCGAN-style up-samplings in a classifier.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch_helpers import (
    accuracy,
    calib_data,
    relative_loss,
    same_state,
    split,
    stand_in_bf16_cpu,
    state,
    train,
    trained_unet,
)

import inc_core as inc
import inc_torch
from inc_torch.ptq._conv_transpose import conv_transpose_as_conv2d, restore_conv_transpose

UPS = ["up", "up2"]
ALL = ["e1", "down", "up", "dec", "up2", "head", "fc"]


def _targets(quantized: nn.Module) -> list[str]:
    return [str(n.target) for n in quantized.graph_module.graph.nodes if n.op == "call_function"]


CONFIGURATIONS = [
    (nn.ConvTranspose2d(4, 6, 2, 2), (4, 7, 5)),
    (nn.ConvTranspose2d(4, 6, 4, 2, 1, bias=False), (4, 5, 5)),
    (nn.ConvTranspose2d(4, 6, 3, 2, 1, output_padding=1), (4, 5, 6)),
    (nn.ConvTranspose2d(4, 6, 3, 1, 1), (4, 5, 6)),
    (nn.ConvTranspose2d(4, 6, (5, 3), (3, 2), (2, 1), output_padding=(1, 0)), (4, 9, 8)),
    (nn.ConvTranspose2d(4, 6, 4, 2, 1, groups=2), (4, 5, 5)),
    (nn.ConvTranspose2d(4, 8, 3, 2, 1, groups=4), (4, 5, 5)),
    (nn.ConvTranspose2d(4, 6, 4, 4, 0, output_padding=3), (4, 3, 3)),
    (nn.ConvTranspose2d(4, 6, 7, 2, 3, output_padding=1), (4, 5, 5)),
    (nn.ConvTranspose2d(4, 6, 1, 2, 0, output_padding=1), (4, 5, 5)),
    (nn.ConvTranspose1d(4, 6, 16, 8, 4), (4, 10)),
    (nn.ConvTranspose1d(4, 6, 3, 2, 1, output_padding=1, groups=2), (4, 10)),
    (nn.ConvTranspose1d(4, 6, 5, 1, 2), (4, 10)),
]


@pytest.mark.parametrize(("layer", "shape"), CONFIGURATIONS, ids=[repr(c[0]) for c in CONFIGURATIONS])
def test_the_rewrite_computes_what_the_transposed_convolution_computes(layer: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(copy.deepcopy(layer)).eval()
    graph = torch.export.export(model, (torch.randn(2, *shape),)).module()
    rewrite = conv_transpose_as_conv2d(graph)
    assert (rewrite.rewritten, rewrite.kept) == (("0",), {})
    assert not any("conv_transpose" in t for t in [str(n.target) for n in graph.graph.nodes]), graph.graph
    x = torch.randn(2, *shape)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x), rtol=1e-5, atol=1e-5)
    # a layer kept FP32 gets its transposed convolution back (faster in FP32), its weight bit for bit
    restore_conv_transpose(graph, frozenset({"0"}))
    assert [n.target for n in graph.graph.nodes if n.op == "call_function"] == [model[0].__class__.__name__ == "ConvTranspose1d"
                                                                                and torch.ops.aten.conv_transpose1d.default
                                                                                or torch.ops.aten.conv_transpose2d.input]
    assert torch.equal(graph.get_parameter("0.weight"), model[0].weight)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_dilated_transposed_convolution_stays_float_and_is_not_offered(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ConvTranspose2d(4, 6, 3, 2, dilation=2)).eval()
    assert inc.describe(model, inc.QuantConfig()).names == ("0",)
    graph = torch.export.export(copy.deepcopy(model), (torch.randn(2, 4, 5, 5),)).module()
    assert conv_transpose_as_conv2d(graph).kept == {"1": "it is dilated"}
    calibration = inc.Dataset([torch.randn(2, 4, 5, 5).numpy() for _ in range(2)])
    with caplog.at_level(logging.INFO, logger="inc"):
        quantized = inc.quantize(model, inc.QuantConfig(), dataset=calibration)
    assert "ConvTranspose '1' stays FP32 on format='pt2e': it is dilated" in caplog.text
    assert inc.get_backend("torch").int8_op_counts(quantized) == {"conv2d": 1}


def test_pt2e_runs_every_transposed_convolution_in_int8_within_one_percent_of_fp32(tmp_path) -> None:
    model = trained_unet()
    before = state(model)
    fp32 = accuracy(model)
    assert fp32 >= 0.9
    config = inc.QuantConfig()
    space = inc.describe(model, config)
    assert space.names == tuple(ALL)
    assert [op.op_type for op in space.ops if op.name in UPS] == ["ConvTranspose2d"] * 2
    quantized = inc.quantize(model, config, dataset=calib_data(256, 32))
    assert same_state(state(model), before)
    assert inc_torch.quantized_ops(quantized) == ALL
    assert inc.get_backend("torch").int8_op_counts(quantized)["conv2d"] == 6
    assert not any("conv_transpose" in t for t in _targets(quantized))
    assert relative_loss(fp32, accuracy(quantized)) <= 0.01, (fp32, accuracy(quantized))
    path = tmp_path / "unet.pt2"
    inc.save(quantized, path)
    sample = torch.from_numpy(split()[2][:8])
    with torch.no_grad():
        torch.testing.assert_close(inc.load(path)(sample), quantized(sample))


def test_an_excluded_transposed_convolution_stays_float() -> None:
    config = inc.QuantConfig(exclude=inc.LayerFilter(types=("ConvTranspose2d",)))
    quantized = inc.quantize(trained_unet(), config, dataset=calib_data(64, 32))
    assert inc_torch.quantized_ops(quantized) == [n for n in ALL if n not in UPS]
    assert inc.get_backend("torch").int8_op_counts(quantized)["conv2d"] == 4
    assert sum("conv_transpose2d" in t for t in _targets(quantized)) == 2  # as they were: faster in FP32


class Upsampler(nn.Module):
    """One up-sampling layer applied twice (its weight and bias read by both calls) and a grouped 1-D one."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1)
        self.wave = nn.ConvTranspose1d(8, 4, 16, stride=8, padding=4, groups=2)  # a vocoder's up-sampling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(torch.relu(self.up(x)))  # 2x2 -> 4x4 -> 8x8
        return self.wave(x.flatten(2))  # 64 frames -> 512 samples


def test_a_layer_called_twice_and_a_1d_one_run_int8() -> None:
    torch.manual_seed(0)
    model = Upsampler().eval()
    calibration = inc.Dataset([torch.randn(4, 8, 2, 2).numpy() for _ in range(4)])
    quantized = inc.quantize(model, inc.QuantConfig(), dataset=calibration)
    assert inc_torch.quantized_ops(quantized) == ["up", "wave"]
    assert inc.get_backend("torch").int8_op_counts(quantized) == {"conv2d": 3}
    x = torch.randn(3, 8, 2, 2)
    with torch.no_grad():
        expected, got = model(x), quantized(x)
    assert got.shape == expected.shape == (3, 4, 512)
    assert nn.functional.cosine_similarity(expected.flatten(), got.flatten(), 0) >= 0.99


def test_pt2e_qat_trains_transposed_convolutions_as_conv2d() -> None:
    model = copy.deepcopy(trained_unet())
    fp32 = accuracy(model)
    qat_model = inc_torch.prepare_qat(
        model, inc.QATConfig(freeze_bn_step=28, freeze_observer_step=42), torch.from_numpy(split()[0][:4])
    )
    train(qat_model, 2, lr=1e-4, seed=1)
    int8 = inc_torch.convert(qat_model)
    assert inc.get_backend("torch").int8_op_counts(int8)["conv2d"] == 6
    assert not any("conv_transpose" in t for t in _targets(int8))
    assert relative_loss(fp32, accuracy(int8)) <= 0.01, (fp32, accuracy(int8))


def test_fx_keeps_transposed_convolutions_float_and_names_pt2e(caplog: pytest.LogCaptureFixture) -> None:
    # torch.ao's quantized ConvTranspose2d computes wrong outputs on many shapes (see _conv_transpose)
    with caplog.at_level(logging.WARNING, logger="inc"):
        quantized = inc.quantize(trained_unet(), inc.QuantConfig(format="fx"), dataset=calib_data(64, 32))
    assert "format='fx' leaves 2 ConvTranspose2d layer(s) in FP32: up, up2. They become INT8 with format='pt2e'." in caplog.text
    assert not any(isinstance(m, torch.ao.nn.quantized.ConvTranspose2d) for m in quantized.modules())


def test_op_errors_measure_transposed_convolutions_as_pt2e_runs_them() -> None:
    # the mse strategy ranks ops by these: a transposed convolution is measured with its weight quantized per
    # output channel and phase (its sub-pixel conv2d's channels), as the INT8 model computes it
    model, backend, config = trained_unet(), inc.get_backend("torch"), inc.QuantConfig()
    data = calib_data(64, 32)
    errors = backend.op_errors(model, config, calibration=backend.calibrate(model, data, config), dataset=data)
    assert set(errors) == set(ALL)
    assert all(0 < errors[name] < 0.01 for name in UPS), errors
    per_tensor = inc.QuantConfig(granularity="per_tensor")
    coarse = backend.op_errors(model, per_tensor, calibration=backend.calibrate(model, data, per_tensor), dataset=data)
    assert all(coarse[name] > errors[name] for name in UPS), (coarse, errors)


def test_fx_does_not_promise_pt2e_for_a_dilated_transposed_convolution(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ConvTranspose2d(4, 6, 3, 2, dilation=2), nn.ConvTranspose2d(6, 6, 2, 2)).eval()
    calibration = inc.Dataset([torch.randn(2, 4, 5, 5).numpy() for _ in range(2)])
    with caplog.at_level(logging.WARNING, logger="inc"):
        inc.quantize(model, inc.QuantConfig(format="fx"), dataset=calibration)
    assert "format='fx' leaves 1 ConvTranspose2d layer(s) in FP32: 2. They become INT8 with format='pt2e'." in caplog.text


def test_a_transposed_convolution_runs_in_bf16_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    # kept out of INT8 by bf16=, it gets its transposed convolution back and runs it on BF16 weights
    stand_in_bf16_cpu(monkeypatch)
    model = trained_unet()
    quantized = inc.quantize(model, inc.QuantConfig(bf16=inc.LayerFilter(names=("up2",))), dataset=calib_data(64, 32))
    assert inc.get_backend("torch").int8_op_counts(quantized)["conv2d"] == 5
    transposed = [n for n in quantized.graph_module.graph.nodes if n.target == torch.ops.aten.conv_transpose2d.input]
    assert len(transposed) == 1
    assert transposed[0].args[1].meta["val"].dtype == torch.bfloat16
    assert relative_loss(accuracy(model), accuracy(quantized)) <= 0.01
