"""Conv1d on the PT2E path: INT8 through the conv2d kernels (inc_torch.ptq._conv1d), in PTQ and QAT.

The model reads each digits image as a sequence of 8 columns with 8 channels (its rows), as an audio or
sensor model reads frames: Conv1d + BatchNorm1d + ReLU, a grouped 'same' Conv1d with an even kernel, a strided
one without bias, a mean over time and a Linear classifier, trained here.
"""

from __future__ import annotations

import copy
import functools
import logging

import numpy as np
import pytest
import torch
from torch import nn
from torch_helpers import accuracy, calib_data, relative_loss, same_state, split, state, train

import inc_core as inc
import inc_torch
from inc_torch.ptq._conv1d import conv1d_as_conv2d

CONVS = ["c1", "c2", "c3"]


class Digits1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(8, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(32)
        self.c2 = nn.Conv1d(32, 32, 4, padding="same", groups=4)  # 'same' with an even kernel: one side more
        self.c3 = nn.Conv1d(32, 64, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1, 2)  # a (N, 1, 8, 8) image as 8 rows (channels) over 8 columns (time)
        x = torch.relu(self.bn1(self.c1(x)))
        x = torch.relu(self.c2(x)) + x
        x = nn.functional.gelu(self.c3(x))
        return self.fc(x.mean(-1))


def _rows(images: np.ndarray) -> torch.Tensor:
    """Digits images as (N, 8, 8) sequences, for the small Conv1d models that take them directly."""
    return torch.from_numpy(images[:, 0])


@functools.cache
def _trained() -> nn.Module:
    torch.manual_seed(0)
    return train(Digits1d(), 12, lr=3e-3, seed=1)


def _targets(quantized: nn.Module) -> list[str]:
    return [str(n.target) for n in quantized.graph_module.graph.nodes if n.op == "call_function"]


class Varied(nn.Module):
    """Every way a Conv1d is configured: string paddings, dilation, reflect padding, groups, no bias, tanh."""

    def __init__(self) -> None:
        super().__init__()
        self.same_even = nn.Conv1d(8, 16, 4, padding="same", dilation=3)
        self.valid = nn.Conv1d(16, 16, 3, padding="valid", stride=2)
        self.reflect = nn.Conv1d(16, 16, 5, padding=2, padding_mode="reflect", groups=4, bias=False)
        self.last = nn.Conv1d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.valid(torch.relu(self.same_even(x)))
        y = torch.tanh(self.reflect(x))
        return self.last(y * x)


def _rewritten(model: nn.Module, x: torch.Tensor) -> tuple[torch.fx.GraphModule, list[str]]:
    graph = torch.export.export(copy.deepcopy(model), (x,)).module()
    rewrite = conv1d_as_conv2d(graph)
    assert rewrite.kept == {}
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert not any("conv1d" in t for t in targets), targets
    return graph, list(rewrite.rewritten)


def test_the_rewrite_computes_what_conv1d_computes() -> None:
    torch.manual_seed(0)
    varied = Varied().eval()
    x = torch.randn(3, 8, 40)
    graph, names = _rewritten(varied, x)
    assert names == ["same_even", "valid", "reflect", "last"]
    with torch.no_grad():
        torch.testing.assert_close(graph(x), varied(x), rtol=1e-5, atol=1e-5)
    model = _trained()
    x = torch.from_numpy(split()[2][:16])
    graph, names = _rewritten(model, x)
    assert names == CONVS
    # the batch norm and the ReLU act on the conv2d's output, where conv-bn folding and fusion find them
    conv = next(n for n in graph.graph.nodes if n.target == torch.ops.aten.conv2d.default)
    norm = next(iter(conv.users))
    assert norm.target == torch.ops.aten.batch_norm.default
    assert [u.target for u in norm.users] == [torch.ops.aten.relu.default]
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x), rtol=1e-5, atol=1e-5)


def test_depthwise_conv1d_stays_conv1d_grouped_ones_do_not() -> None:
    # oneDNN's INT8 depthwise kernel can stall on 1-D shapes (tests/torch/test_depthwise_conv1d.py): one input
    # channel per group, with or without a channel multiplier, stays conv1d; other groupings are rewritten
    model = nn.Sequential(nn.Conv1d(8, 16, 3, groups=8), nn.Conv1d(16, 16, 3, groups=4), nn.Conv1d(16, 16, 3, groups=16))
    graph = torch.export.export(model.eval(), (torch.randn(2, 8, 20),)).module()
    rewrite = conv1d_as_conv2d(graph)
    assert rewrite.rewritten == ("1",)
    assert set(rewrite.kept) == {"0", "2"}
    assert all(reason.startswith("oneDNN's INT8 depthwise convolution can stall") for reason in rewrite.kept.values())


def test_every_conv1d_configuration_runs_int8_reflect_padding_included() -> None:
    # a non-zero padding_mode is refused for Conv2d on PT2E (torchao's partitions fail on it); a Conv1d's padding
    # is its own op once the convolution is a conv2d, so it runs INT8 after its FP32 reflect padding
    torch.manual_seed(0)
    model = Varied().eval()
    calibration = inc.Dataset([torch.randn(4, 8, 40).numpy() for _ in range(4)])
    quantized = inc.quantize(model, inc.QuantConfig(), dataset=calibration)
    assert inc.get_backend("torch").int8_op_counts(quantized) == {"conv2d": 4}
    x = torch.randn(5, 8, 40)
    with torch.no_grad():
        assert nn.functional.cosine_similarity(model(x).flatten(), quantized(x).flatten(), 0) >= 0.999


def test_pt2e_runs_every_conv1d_in_int8_within_one_percent_of_fp32(tmp_path) -> None:
    model = _trained()
    before = state(model)
    fp32 = accuracy(model)
    assert fp32 >= 0.9
    config = inc.QuantConfig()
    assert inc.describe(model, config).names == (*CONVS, "fc")
    quantized = inc.quantize(model, config, dataset=calib_data(256, 32))
    assert same_state(state(model), before)
    assert inc_torch.quantized_ops(quantized) == [*CONVS, "fc"]
    assert inc.get_backend("torch").int8_op_counts(quantized) == {"conv2d": 3, "linear": 1}
    targets = _targets(quantized)
    assert not any("conv1d" in t or "batch_norm" in t for t in targets), targets  # bn1 folded into c1
    assert relative_loss(fp32, accuracy(quantized)) <= 0.01, (fp32, accuracy(quantized))
    path = tmp_path / "digits1d.pt2"
    inc.save(quantized, path)
    sample = torch.from_numpy(split()[2][:8])
    with torch.no_grad():
        torch.testing.assert_close(inc.load(path)(sample), quantized(sample))


def test_an_excluded_conv1d_stays_float() -> None:
    model = _trained()
    config = inc.QuantConfig(exclude=inc.LayerFilter(names=("c2",)))
    quantized = inc.quantize(model, config, dataset=calib_data(64, 32))
    assert inc_torch.quantized_ops(quantized) == ["c1", "c3", "fc"]
    assert inc.get_backend("torch").int8_op_counts(quantized) == {"conv2d": 2, "linear": 1}


class SharedKernel(nn.Module):
    """One kernel applied twice (a module called again, and its weight in a functional conv): one weight, both INT8."""

    def __init__(self) -> None:
        super().__init__()
        self.filters = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.filters(torch.relu(self.filters(x))))
        x = nn.functional.conv1d(x, self.filters.weight, padding=1)
        return self.fc(x.mean(-1))


class TiedKernel(nn.Module):
    """A kernel whose weight another op reads too (its centre taps as a projection): it must stay [out, in, k]."""

    def __init__(self) -> None:
        super().__init__()
        self.filters = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.filters(x)).mean(-1)
        return self.fc(x @ self.filters.weight[:, :, 1])


def test_a_shared_conv1d_weight_runs_int8_in_every_call() -> None:
    torch.manual_seed(0)
    model = SharedKernel().eval()
    quantized = inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset(_rows(split()[0][:32]).numpy(), batch_size=16))
    assert inc.get_backend("torch").int8_op_counts(quantized) == {"conv2d": 3, "linear": 1}
    x = _rows(split()[2][:16])
    with torch.no_grad():
        assert nn.functional.cosine_similarity(model(x).flatten(), quantized(x).flatten(), 0) >= 0.99


def test_a_conv1d_whose_weight_another_op_reads_stays_float_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = TiedKernel().eval()
    with caplog.at_level(logging.INFO, logger="inc"):
        quantized = inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset(_rows(split()[0][:32]).numpy(), batch_size=16))
    assert (
        "Conv1d 'filters' stays FP32 on format='pt2e': its weight is computed in the graph or read by an op other "
        "than a Conv1d (format='fx' quantizes it)"
    ) in caplog.text
    assert inc.get_backend("torch").int8_op_counts(quantized) == {"linear": 1}
    x = _rows(split()[2][:16])
    with torch.no_grad():
        assert nn.functional.cosine_similarity(model(x).flatten(), quantized(x).flatten(), 0) >= 0.99


def test_pt2e_qat_trains_conv1d_as_conv2d_and_folds_its_batch_norm() -> None:
    model = copy.deepcopy(_trained())
    fp32 = accuracy(model)
    qat_model = inc_torch.prepare_qat(
        model, inc.QATConfig(freeze_bn_step=28, freeze_observer_step=42), torch.from_numpy(split()[0][:4])
    )
    train(qat_model, 2, lr=1e-4, seed=1)
    int8 = inc_torch.convert(qat_model)
    assert inc.get_backend("torch").int8_op_counts(int8) == {"conv2d": 3, "linear": 1}
    targets = _targets(int8)
    assert not any("conv1d" in t or "batch_norm" in t for t in targets), targets
    assert relative_loss(fp32, accuracy(int8)) <= 0.01, (fp32, accuracy(int8))
