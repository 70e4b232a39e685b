"""Static INT8 through PT2E and FX: real INT8 kernels, accuracy on digits, ranges from inc-core's observers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch_helpers import accuracy, calib_data, relative_loss, split, trained_cnn

import inc_core as inc
import inc_torch
from inc_core.calibration import HistogramObserver, compute_qparams, weight_qparams
from inc_core.testing import cosine

QUANTIZED_DECOMPOSED = "quantized_decomposed"


@pytest.fixture(scope="module")
def cnn() -> torch.nn.Module:
    return trained_cnn()


@pytest.fixture(scope="module")
def pt2e_model(cnn: torch.nn.Module) -> inc_torch.CompiledQuantizedModule:
    return inc.quantize(cnn, inc.QuantConfig(format="pt2e"), dataset=calib_data())


@pytest.fixture(scope="module")
def fx_model(cnn: torch.nn.Module) -> torch.fx.GraphModule:
    return inc.quantize(cnn, inc.QuantConfig(format="fx"), dataset=calib_data())


def test_default_format_is_pt2e(cnn: torch.nn.Module) -> None:
    quantized = inc.quantize(cnn, inc.QuantConfig(calib_samples=16), dataset=calib_data(16))
    assert isinstance(quantized, inc_torch.CompiledQuantizedModule)


def test_pt2e_graph_has_qdq_pattern_with_int8_weights(pt2e_model: inc_torch.CompiledQuantizedModule) -> None:
    graph = pt2e_model.graph_module
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert any("quantize_per_tensor" in t and QUANTIZED_DECOMPOSED in t for t in targets)
    assert any("dequantize_per_channel" in t for t in targets)
    int8_weights = [v for v in graph.state_dict().values() if v.dtype == torch.int8]
    # conv1 (BN folded), conv2, fc1, fc2: one int8 weight each
    assert len(int8_weights) == 4
    assert inc_torch.quantized_ops(pt2e_model) == ["conv1", "conv2", "fc1", "fc2"]


def test_pt2e_lowers_to_onednn_int8_kernels(pt2e_model: inc_torch.CompiledQuantizedModule) -> None:
    from torch._dynamo.utils import counters

    counters.clear()
    x, _, _, _ = split()
    with torch.no_grad():
        compiled = pt2e_model(torch.from_numpy(x[:4]))
        reference = pt2e_model.graph_module(torch.from_numpy(x[:4]))
    matched = {k: v for k, v in counters["inductor"].items() if "qconv" in k or "qlinear" in k}
    assert any("qconv" in k for k in matched) and any("qlinear" in k for k in matched), dict(counters["inductor"])
    np.testing.assert_allclose(compiled.numpy(), reference.numpy(), atol=0.05)


@pytest.mark.parametrize("fmt", ["pt2e", "fx"])
def test_accuracy_within_one_percent_of_fp32(cnn: torch.nn.Module, fmt: str, request: pytest.FixtureRequest) -> None:
    quantized = request.getfixturevalue(f"{fmt}_model")
    fp32 = accuracy(cnn)
    int8 = accuracy(quantized)
    assert fp32 > 0.9
    assert relative_loss(fp32, int8) <= 0.01, (fp32, int8)


def test_fx_model_holds_x86_quantized_modules_with_int8_weights(fx_model: torch.fx.GraphModule) -> None:
    modules = dict(fx_model.named_modules())
    assert isinstance(modules["conv1"], torch.ao.nn.quantized.Conv2d)  # batch norm folded in
    assert isinstance(modules["fc1"], torch.ao.nn.quantized.Linear)
    assert isinstance(modules["fc2"], torch.ao.nn.quantized.Linear)
    assert "bn1" not in modules
    for name in ("conv1", "conv2", "fc1", "fc2"):
        assert modules[name].weight().dtype == torch.qint8
    assert inc_torch.quantized_ops(fx_model) == ["conv1", "conv2", "fc1", "fc2"]


def _input_histogram(n: int = 100) -> HistogramObserver:
    """The model input as calibration sees it: calib_samples=100 (the default) of calib_data()."""
    x, _, _, _ = split()
    histogram = HistogramObserver(2048, name="x")
    for start in range(0, n, 32):
        histogram.update(x[start : min(start + 32, n)])
    return histogram


@pytest.mark.parametrize("method", ["minmax", "percentile", "kl", "mse"])
@pytest.mark.parametrize("scheme", ["asym", "sym"])
def test_fx_input_qparams_are_inc_core_ranges(cnn: torch.nn.Module, method: str, scheme: str) -> None:
    config = inc.QuantConfig(format="fx", calibration=method, scheme=scheme)
    quantized = inc.quantize(cnn, config, dataset=calib_data())
    lo, hi = _input_histogram().range(method, percentile=config.percentile, dtype="uint8", scheme=scheme)
    expected = compute_qparams(lo, hi, dtype="uint8", scheme=scheme)
    assert float(quantized.conv1_input_scale_0) == pytest.approx(float(expected.scale), rel=1e-6)
    assert int(quantized.conv1_input_zero_point_0) == int(expected.zero_point)


def test_pt2e_input_qparams_are_inc_core_ranges(cnn: torch.nn.Module) -> None:
    config = inc.QuantConfig(calibration="percentile", percentile=99.0)
    quantized = inc.quantize(cnn, config, dataset=calib_data())
    graph = quantized.graph_module.graph
    first = next(n for n in graph.nodes if n.op == "call_function" and "quantize_per_tensor" in str(n.target))
    lo, hi = _input_histogram().range("percentile", percentile=99.0, dtype="uint8", scheme="asym")
    expected = compute_qparams(lo, hi, dtype="uint8", scheme="asym")
    assert first.args[1] == pytest.approx(float(expected.scale), rel=1e-6)
    assert first.args[2] == int(expected.zero_point)


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_weight_scales_are_inc_core_weight_qparams(cnn: torch.nn.Module, granularity: str) -> None:
    quantized = inc.quantize(cnn, inc.QuantConfig(format="fx", granularity=granularity), dataset=calib_data(32))
    weight = quantized.fc2.weight()
    expected = weight_qparams(cnn.fc2.weight.detach().numpy(), axis=0 if granularity == "per_channel" else None)
    if granularity == "per_channel":
        np.testing.assert_allclose(weight.q_per_channel_scales().numpy(), expected.scale, rtol=1e-6)
    else:
        assert weight.q_scale() == pytest.approx(float(expected.scale), rel=1e-6)


@pytest.mark.parametrize("fmt", ["pt2e", "fx"])
def test_excluded_layer_stays_fp32_and_others_stay_int8(cnn: torch.nn.Module, fmt: str) -> None:
    config = inc.QuantConfig(format=fmt, exclude=inc.LayerFilter(names=("conv2",), types=("Linear",)))
    quantized = inc.quantize(cnn, config, dataset=calib_data(32))
    assert inc_torch.quantized_ops(quantized) == ["conv1"]


def _quantize_args(quantized: inc_torch.CompiledQuantizedModule) -> list[tuple[str, float]]:
    graph = quantized.graph_module.graph
    return [(n.name, n.args[1]) for n in graph.nodes if n.op == "call_function" and str(n.target).startswith("quantized_decomposed.quantize_per_tensor")]


def test_override_changes_only_the_named_op(cnn: torch.nn.Module) -> None:
    backend = inc.get_backend("torch")
    calibration = backend.calibrate(cnn, calib_data(), inc.QuantConfig())
    base = _quantize_args(backend.quantize(cnn, inc.QuantConfig(), calibration=calibration))
    config = inc.QuantConfig(overrides={"fc2": {"calibration": "percentile"}}, percentile=90.0)
    tuned = _quantize_args(backend.quantize(cnn, config, calibration=calibration))
    changed = [(a, b) for a, b in zip(base, tuned) if a != b]
    # fc2's input (relu of fc1) alone is clipped at its 90th percentile
    assert len(base) == len(tuned) and len(changed) == 1
    assert changed[0][1][1] < changed[0][0][1]


def test_one_calibration_serves_configs_of_every_method(cnn: torch.nn.Module) -> None:
    backend = inc.get_backend("torch")
    calibration = backend.calibrate(cnn, calib_data(), inc.QuantConfig(format="fx"))
    histogram = _input_histogram()
    for method in ("minmax", "kl", "mse"):
        quantized = backend.quantize(cnn, inc.QuantConfig(format="fx", calibration=method), calibration=calibration)
        lo, hi = histogram.range(method, dtype="uint8", scheme="asym")
        assert float(quantized.conv1_input_scale_0) == pytest.approx(float(compute_qparams(lo, hi, dtype="uint8", scheme="asym").scale), rel=1e-6)


def test_calibration_for_one_format_is_refused_for_the_other(cnn: torch.nn.Module) -> None:
    backend = inc.get_backend("torch")
    calibration = backend.calibrate(cnn, calib_data(16), inc.QuantConfig(format="fx"))
    with pytest.raises(inc.errors.ConfigError, match="format='fx'"):
        backend.quantize(cnn, inc.QuantConfig(format="pt2e"), calibration=calibration)


def test_describe_lists_modules_with_their_types(cnn: torch.nn.Module) -> None:
    space = inc.describe(cnn)
    assert [(op.name, op.op_type) for op in space.ops] == [
        ("conv1", "Conv2d"), ("conv2", "Conv2d"), ("fc1", "Linear"), ("fc2", "Linear")
    ]
    assert set(space.options["Conv2d"]) == {"calibration", "granularity", "scheme", "activation_dtype"}


def test_inplace_fx_reuses_the_model(cnn: torch.nn.Module) -> None:
    import copy

    model = copy.deepcopy(cnn)
    quantized = inc.quantize(model, inc.QuantConfig(format="fx"), dataset=calib_data(16), inplace=True)
    assert inc_torch.quantized_ops(quantized) == ["conv1", "conv2", "fc1", "fc2"]


class SharedReLU(nn.Module):
    """torchvision's ResNet calls one nn.ReLU module several times; PT2E must still quantize every conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv1(x))
        return self.relu(self.conv2(y) + y)


def test_pt2e_handles_a_module_called_twice() -> None:
    torch.manual_seed(0)
    model = SharedReLU().eval()
    quantized = inc.quantize(model, inc.QuantConfig(calib_samples=16), dataset=calib_data(16))
    assert inc_torch.quantized_ops(quantized) == ["conv1", "conv2"]
    x = torch.from_numpy(split()[0][:8])
    with torch.no_grad():
        assert cosine(model(x).numpy(), quantized.graph_module(x).numpy()) > 0.99
