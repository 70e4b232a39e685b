"""Honest accounting on the torch paths: describe() lists every op inc quantizes, exclude and overrides reach
each of them, names that match nothing are refused, and a run that would quantize nothing is an error."""

from __future__ import annotations

import pytest
import torch
from test_fidelity import TinyMobileNet
from torch import nn
from torch_helpers import calib_data, split, trained_cnn, trained_mlp

import inc_core as inc
import inc_torch
from inc_core.errors import ConfigError, UnsupportedModelError
from inc_core.testing import cosine


@pytest.fixture(scope="module")
def mobilenet() -> nn.Module:
    torch.manual_seed(0)
    return TinyMobileNet().eval()


def _quantized_kinds(model: torch.fx.GraphModule) -> set[str]:
    """Types of the torch.ao quantized modules and names of the quantized functions in an FX model."""
    kinds = {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("torch.ao.nn.quantized")}
    for node in model.graph.nodes:
        if node.op == "call_function" and "quantized" in str(node.target) and "quantize_per" not in str(node.target):
            kinds.add(str(node.target))
    return kinds


def test_describe_lists_every_op_fx_quantizes(mobilenet: nn.Module) -> None:
    space = inc.describe(mobilenet, inc.QuantConfig(format="fx"))
    ops = {op.name: op.op_type for op in space.ops}
    assert ops["stem.0"] == "Conv2d" and ops["fc"] == "Linear"
    assert ops["stem.2"] == "Hardswish" and ops["depthwise.2"] == "Hardswish"
    assert ops["se.gate"] == "Hardsigmoid" and ops["se.avgpool"] == "AdaptiveAvgPool2d"
    assert ops["se.mul"] == "mul" and ops["add"] == "add" and ops["pool"] == "AdaptiveAvgPool2d"
    assert "flatten" not in ops, "a flatten moves quantized data unchanged: nothing to quantize or exclude"
    assert "stem.1" not in ops, "batch norm is folded into the conv, not an op of its own"
    # settings exist only where they change something
    assert set(space.options["Conv2d"]) == {"calibration", "granularity", "scheme", "activation_dtype"}
    assert set(space.options["add"]) == {"calibration", "scheme", "activation_dtype"}
    assert space.options["Hardsigmoid"] == {} and space.options["AdaptiveAvgPool2d"] == {}


def test_excluding_what_describe_lists_leaves_only_conv_and_linear_int8(mobilenet: nn.Module) -> None:
    space = inc.describe(mobilenet, inc.QuantConfig(format="fx"))
    others = tuple(t for t in space.op_types if t not in ("Conv2d", "Linear"))
    config = inc.QuantConfig(format="fx", exclude=inc.LayerFilter(types=others))
    quantized = inc.quantize(mobilenet, config, dataset=calib_data(32))
    kinds = _quantized_kinds(quantized)
    assert "Hardswish" not in kinds and not any("add" in k or "mul" in k for k in kinds), kinds
    assert kinds <= {"Conv2d", "ConvReLU2d", "Linear", "LinearPackedParams"}, kinds
    assert inc_torch.quantized_ops(quantized) == [op.name for op in space.ops if op.op_type in ("Conv2d", "Linear")]


def test_exclude_reaches_each_listed_op(mobilenet: nn.Module) -> None:
    backend = inc.get_backend("torch")
    base = inc.QuantConfig(format="fx")
    calibration = backend.calibrate(mobilenet, calib_data(32), base)
    everything = backend.quantize(mobilenet, base, calibration=calibration).code
    for op in inc.describe(mobilenet, base).ops:
        config = inc.QuantConfig(format="fx", exclude=inc.LayerFilter(names=(op.name,)))
        assert backend.quantize(mobilenet, config, calibration=calibration).code != everything, op


def test_hardswish_is_int8_unless_excluded(mobilenet: nn.Module) -> None:
    quantized = inc.quantize(mobilenet, inc.QuantConfig(format="fx"), dataset=calib_data(32))
    assert "Hardswish" in _quantized_kinds(quantized)
    config = inc.QuantConfig(format="fx", exclude=inc.LayerFilter(types=("Hardswish",)))
    assert "Hardswish" not in _quantized_kinds(inc.quantize(mobilenet, config, dataset=calib_data(32)))


class TwoMeans(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(3).mean(2))


def test_method_calls_are_set_together() -> None:
    torch.manual_seed(0)
    model = TwoMeans().eval()
    ops = [op.name for op in inc.describe(model, inc.QuantConfig(format="fx")).ops]
    assert ops == ["conv", "mean", "mean_1", "fc"]
    with pytest.raises(ConfigError, match=r"mean.*for the whole model"):
        inc.quantize(model, inc.QuantConfig(format="fx", exclude=inc.LayerFilter(names=("mean",))), dataset=calib_data(16))
    everything = inc.quantize(model, inc.QuantConfig(format="fx"), dataset=calib_data(16))
    config = inc.QuantConfig(format="fx", exclude=inc.LayerFilter(types=("mean",)))
    without = inc.quantize(model, config, dataset=calib_data(16))
    assert inc_torch.quantized_ops(without) == ["conv", "fc"] and without.code != everything.code


@pytest.mark.parametrize(
    ("approach", "fmt"), [("static", "fx"), ("static", "pt2e"), ("dynamic", "default")]
)
def test_override_naming_no_op_is_a_config_error(approach: str, fmt: str) -> None:
    model = trained_mlp() if approach == "dynamic" else trained_cnn()
    config = inc.QuantConfig(approach=approach, format=fmt, overrides={"fc_2": {"granularity": "per_tensor"}})
    with pytest.raises(ConfigError, match=r"'fc_2'.*close: \['fc2'"):
        inc.quantize(model, config, dataset=calib_data(16))


def test_override_of_a_setting_the_op_lacks_is_a_config_error() -> None:
    config = inc.QuantConfig(format="fx", overrides={"MaxPool2d": {"calibration": "kl"}})
    with pytest.raises(ConfigError, match=r"MaxPool2d ops do not have"):
        inc.quantize(trained_cnn(), config, dataset=calib_data(16))


def test_override_by_type_reaches_an_activation_op(mobilenet: nn.Module) -> None:
    backend = inc.get_backend("torch")
    calibration = backend.calibrate(mobilenet, calib_data(32), inc.QuantConfig(format="fx"))
    plain = backend.quantize(mobilenet, inc.QuantConfig(format="fx"), calibration=calibration)
    config = inc.QuantConfig(format="fx", percentile=90.0, overrides={"add": {"calibration": "percentile"}})
    clipped = backend.quantize(mobilenet, config, calibration=calibration)
    scales = {n: float(getattr(plain, n)) for n in dict(plain.named_buffers()) if n.endswith("scale_0")}
    changed = [n for n, v in scales.items() if float(getattr(clipped, n)) != v]
    assert changed and all(float(getattr(clipped, n)) < scales[n] for n in changed), changed


class ConvOnly(nn.Module):
    """SqueezeNet's shape: convolutions and a global pool, no Linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(torch.relu(self.conv(x))), 1)


def test_dynamic_on_a_model_without_linear_layers_is_an_error() -> None:
    with pytest.raises(UnsupportedModelError, match=r"looked for Linear, LSTM.*approach='static'"):
        inc.quantize(ConvOnly().eval(), inc.QuantConfig(approach="dynamic"))


@pytest.mark.parametrize("fmt", ["fx", "pt2e"])
def test_static_with_every_op_excluded_is_an_error(fmt: str) -> None:
    config = inc.QuantConfig(format=fmt, exclude=inc.LayerFilter(patterns=(".*",)))
    with pytest.raises(UnsupportedModelError, match="nothing would be quantized"):
        inc.quantize(trained_cnn(), config, dataset=calib_data(16))


class PositionalEmbedding(nn.Module):
    """ViT's ``x + self.pos_embedding``: a parameter is an observed input of the add."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.pos_embedding = nn.Parameter(torch.randn(1, 32) * 0.1)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1)) + self.pos_embedding))


def test_a_parameter_added_to_activations_is_calibrated() -> None:
    torch.manual_seed(0)
    model = PositionalEmbedding().eval()
    quantized = inc.quantize(model, inc.QuantConfig(format="fx"), dataset=calib_data(32))
    assert inc_torch.quantized_ops(quantized) == ["fc1", "fc2"]
    assert any("add" in k for k in _quantized_kinds(quantized)), "the add runs int8"
    x = torch.from_numpy(split()[2])
    with torch.no_grad():
        assert cosine(model(x).numpy(), quantized(x).numpy()) > 0.99
