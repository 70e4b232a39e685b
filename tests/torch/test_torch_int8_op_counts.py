"""TorchBackend.int8_op_counts reports the INT8 ops the output model holds, not what was selected.

Each count is checked against what the model really contains (its quantized modules, the int8 weights
of its graph), on every torch path: FX, PT2E, dynamic, FX QAT, and saved files loaded back; and the
CLI's summary line reports these counts.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch_helpers import calib_data, trained_mlp

import inc_core as inc
import inc_torch
from inc_core._cli_quantize import _op_summary

TORCH = inc.get_backend("torch")


def _excluding_fc3(fmt: str) -> inc.QuantConfig:
    return inc.QuantConfig(format=fmt, exclude=inc.LayerFilter(names=("fc3",)))


def test_fx_counts_the_quantized_linears_and_not_the_excluded_one() -> None:
    quantized = inc.quantize(trained_mlp(), _excluding_fc3("fx"), dataset=calib_data())
    counts = TORCH.int8_op_counts(quantized)
    linears = [m for m in quantized.modules() if isinstance(m, torch.ao.nn.quantized.Linear)]
    assert len(linears) == 2  # fc1 and fc2; fc3 stays nn.Linear
    assert type(quantized.get_submodule("fc3")) is nn.Linear
    assert counts == {"QuantizedLinear": 2}, counts


def test_pt2e_counts_linears_with_int8_weights() -> None:
    quantized = inc.quantize(trained_mlp(), _excluding_fc3("pt2e"), dataset=calib_data())
    counts = TORCH.int8_op_counts(quantized)
    assert counts == {"linear": 2}, counts
    assert sorted(inc_torch.quantized_ops(quantized)) == ["fc1", "fc2"]


class _ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle: the group size is computed from the quantized tensor's size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat((self.conv(x), x), dim=1)  # as ShuffleNet's units: the shuffle reads a quantized cat
        batch, channels, height, width = x.size()
        x = x.view(batch, 2, channels // 2, height, width).transpose(1, 2).reshape(batch, channels, height, width)
        return self.fc(x.mean(dim=(2, 3)))


def test_fx_counts_no_arithmetic_on_a_quantized_tensors_size() -> None:
    # torchvision shufflenet_v2 counted 16 "floordiv" INT8 ops: integer division of a size read from a
    # quantized tensor, which runs in Python
    torch.manual_seed(0)
    data = inc.Dataset(torch.randn(16, 3, 8, 8).numpy(), batch_size=8)
    quantized = inc.quantize(_ChannelShuffle().eval(), inc.QuantConfig(format="fx"), dataset=data)
    counts = TORCH.int8_op_counts(quantized)
    assert "floordiv" not in counts and "getitem" not in counts, counts
    assert counts["QuantizedConv2d"] == 1 and counts["cat"] == 1 and counts["QuantizedLinear"] == 1, counts


class _AttentionAndLinears(nn.Module):
    """Two Linear layers and a MultiheadAttention, whose out_proj dynamic quantization leaves in float."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.attention(x, x, x)
        return self.fc2(torch.relu(self.fc1(y)))


def test_dynamic_counts_exclude_layers_it_does_not_swap() -> None:
    torch.manual_seed(0)
    model = _AttentionAndLinears().eval()
    quantized = inc.quantize(model, inc.QuantConfig(approach="dynamic"))
    dynamic = [m for m in quantized.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(dynamic) == 2
    assert type(quantized.attention.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert TORCH.int8_op_counts(quantized) == {"DynamicQuantizedLinear": 2}


def test_fx_counts_activations_and_adds_that_run_int8_and_drops_excluded_ones() -> None:
    from test_fidelity import TinyMobileNet

    torch.manual_seed(0)
    model = TinyMobileNet().eval()
    data = calib_data()
    quantized = inc.quantize(model, inc.QuantConfig(format="fx"), dataset=data)
    counts = TORCH.int8_op_counts(quantized)
    hardswish = sum(isinstance(m, torch.ao.nn.quantized.Hardswish) for m in quantized.modules())
    adds = sum(1 for n in quantized.graph.nodes if n.op == "call_function" and str(n.target) == "quantized.add")
    assert hardswish > 0 and adds > 0
    assert counts.get("QuantizedHardswish") == hardswish and counts.get("add") == adds, counts
    convs = sum(isinstance(m, torch.ao.nn.quantized.Conv2d) for m in quantized.modules())
    assert sum(n for kind, n in counts.items() if "Conv" in kind) == convs

    no_hardswish = inc.QuantConfig(format="fx", exclude=inc.LayerFilter(types=("Hardswish",)))
    without = TORCH.int8_op_counts(inc.quantize(model, no_hardswish, dataset=data))
    assert "QuantizedHardswish" not in without, without


@pytest.mark.parametrize("approach", ["static", "dynamic"])
def test_a_saved_model_loads_back_with_the_same_module_counts(approach: str, tmp_path) -> None:
    config = _excluding_fc3("fx") if approach == "static" else inc.QuantConfig(approach="dynamic")
    quantized = inc.quantize(trained_mlp(), config, dataset=calib_data() if approach == "static" else None)
    path = tmp_path / "model.pt"
    inc.save(quantized, path)
    assert TORCH.int8_op_counts(inc.load(path)) == TORCH.int8_op_counts(quantized)


def test_fx_qat_converted_model_is_counted() -> None:
    example = next(calib_data().inputs())
    qat = inc_torch.prepare_qat(trained_mlp(), inc.QATConfig(format="fx"), example)
    qat(torch.as_tensor(example))  # one step in training mode: observers see data
    converted = inc_torch.convert(qat)
    linears = [m for m in converted.modules() if isinstance(m, torch.ao.nn.quantized.Linear)]
    assert len(linears) == 3
    assert TORCH.int8_op_counts(converted) == {"QuantizedLinear": 3}


def test_cli_summary_reports_the_counted_ops() -> None:
    model = trained_mlp()
    config = _excluding_fc3("fx")
    quantized = inc.quantize(model, config, dataset=calib_data())
    line = _op_summary(model, quantized, config, None)
    assert line.startswith("2 INT8 ops in the output model (2 QuantizedLinear); 2 of 3 quantizable ops selected"), line
    assert "kept in FP32: fc3" in line, line


class Conv3dSimple(nn.Conv3d):
    """A Conv3d subclass defined outside torch.nn (torchvision's video ResNets): FX traces into it, so torch.ao
    quantizes its convolution as a function call, not as a quantized module."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, kernel_size=3, padding=1)


class VideoNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv3d(3, 8, 3, padding=1)
        self.block = nn.Sequential(Conv3dSimple(8, 8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.block(torch.relu(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3, 4)))


def _clips() -> inc.Dataset:
    return inc.Dataset(torch.randn(4, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0)).numpy(), batch_size=2)


def test_fx_names_convolutions_it_quantizes_as_calls() -> None:
    torch.manual_seed(0)
    quantized = inc.quantize(VideoNet().eval(), inc.QuantConfig(format="fx"), dataset=_clips())
    calls = [n for n in quantized.graph.nodes if n.op == "call_function" and str(n.target) == "quantized.conv3d"]
    assert len(calls) == 1  # block.0, traced into
    assert sorted(inc_torch.quantized_ops(quantized)) == ["block.0", "fc", "stem"]


def test_pt2e_says_which_conv3d_layers_it_leaves_in_float(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    with caplog.at_level("WARNING", logger="inc"):
        quantized = inc.quantize(VideoNet().eval(), inc.QuantConfig(), dataset=_clips())
    assert inc_torch.quantized_ops(quantized) == ["fc"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "FP32" in r.getMessage()]
    assert warnings == [
        "format='pt2e' leaves 2 Conv3d/Conv3dSimple layer(s) in FP32: "
        "stem, block.0. They become INT8 with format='fx'."
    ], caplog.text


def test_a_program_says_which_conv3d_layers_pt2e_leaves_in_float(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = VideoNet().eval()
    program = torch.export.export(model, (torch.randn(2, 3, 4, 8, 8),))
    with caplog.at_level("WARNING", logger="inc"):
        quantized = inc.quantize(program, inc.QuantConfig(), dataset=_clips())
    assert inc_torch.quantized_ops(quantized) == ["fc"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "FP32" in r.getMessage()]
    assert warnings == [
        "format='pt2e' leaves 2 Conv3d layer(s) of the program in FP32: stem, block.0. They become INT8 with "
        "format='fx' on the nn.Module the program was exported from (FX cannot trace a program)."
    ], caplog.text
