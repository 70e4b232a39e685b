"""FP32 torch.export programs (an ExportedProgram, its .module(), a .pt2 file) quantized on the PT2E path, with
the same op names, results and per-op errors as the nn.Module they were exported from."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_helpers import accuracy, calib_data, split, stand_in_bf16_cpu, trained_cnn

import inc_core as inc
import inc_torch
from inc_core.cli import main
from inc_core.errors import DatasetError, UnsupportedModelError
from inc_core.testing import cosine

_BATCH = torch.export.Dim("batch", min=1, max=1024)


def _program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    # torch.export.export's default (non-strict) capture, with a batch dimension that may vary, as users write it
    return torch.export.export(model, (example,), dynamic_shapes=({0: _BATCH},))


def _digits_program() -> tuple[nn.Module, torch.export.ExportedProgram]:
    model = trained_cnn()
    _, _, x, _ = split()
    return model, _program(model, torch.from_numpy(x[:4]))


@pytest.mark.parametrize("form", ["program", "module"])
def test_program_is_quantized_like_the_module_it_came_from(form: str) -> None:
    model, program = _digits_program()
    given = program if form == "program" else program.module()
    assert inc.describe(given).ops == inc.describe(model).ops  # named after the modules that made each op

    q = inc.quantize(given, inc.QuantConfig(), dataset=calib_data())
    reference = inc.quantize(model, inc.QuantConfig(), dataset=calib_data())
    assert inc_torch.quantized_ops(q) == ["conv1", "conv2", "fc1", "fc2"]
    assert inc.get_backend("torch").int8_op_counts(q) == inc.get_backend("torch").int8_op_counts(reference)
    _, _, x, _ = split()
    assert cosine(q(torch.from_numpy(x)).numpy(), reference(torch.from_numpy(x)).numpy()) > 0.9999
    assert accuracy(q) >= accuracy(model) - 0.01


def test_exclude_and_overrides_reach_the_program_s_ops_by_module_name() -> None:
    _, program = _digits_program()
    config = inc.QuantConfig(exclude=inc.LayerFilter(names=("conv2",)), overrides={"fc2": {"granularity": "per_tensor"}})
    q = inc.quantize(program, config, dataset=calib_data())
    assert inc_torch.quantized_ops(q) == ["conv1", "fc1", "fc2"]
    with pytest.raises(inc.errors.ConfigError, match="'fc3'"):
        inc.quantize(program, inc.QuantConfig(exclude=inc.LayerFilter(names=("fc3",))), dataset=calib_data())


class _SharedReluBlock(nn.Module):
    """torchvision's BasicBlock: one nn.ReLU module called twice."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.conv1(x))
        return self.relu(self.conv2(out) + x)


def test_a_module_called_twice_in_a_non_strict_program_is_quantized() -> None:
    # Without a partition per call, torchao's quantizer sees one ReLU with two outputs and raises
    # "Input partition has more than one output node".
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _SharedReluBlock(8), nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).eval()
    x = torch.randn(8, 3, 8, 8)
    q = inc.quantize(_program(model, x[:2]), inc.QuantConfig(), dataset=inc.Dataset(x.numpy(), batch_size=4))
    assert inc_torch.quantized_ops(q) == ["0", "1.conv1", "1.conv2", "3"]
    assert cosine(q(x).numpy(), model(x).detach().numpy()) > 0.99


class _Mixed(nn.Module):
    """An embedding table, a Conv1d and a ConvTranspose1d (inc's graph rewrites) and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.up = nn.ConvTranspose1d(16, 8, 4, stride=2, padding=1)
        self.fc = nn.Linear(8 * 16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids).transpose(1, 2)
        return self.fc(self.up(torch.relu(self.conv(x))).flatten(1))


def test_per_op_errors_of_a_program_are_those_of_its_module() -> None:
    # The mse strategy ranks ops by these; measured with module hooks, a program (no such modules) read all zeros.
    torch.manual_seed(0)
    model = _Mixed().eval()
    program = _program(model, torch.randint(0, 50, (4, 8)))
    data = inc.Dataset(np.random.default_rng(0).integers(0, 50, (32, 8)), batch_size=4)
    backend = inc_torch.TorchBackend()
    config = inc.QuantConfig(granularity="per_tensor")
    errors = {}
    for key, given in (("program", program), ("module", model)):
        calibration = backend.calibrate(given, data, config)
        errors[key] = backend.op_errors(given, config, calibration=calibration, dataset=data)
    assert list(errors["program"]) == ["emb", "conv", "up", "fc"]
    assert all(value > 0 for value in errors["program"].values())
    assert errors["program"] == pytest.approx(errors["module"], rel=1e-6)

    q = inc.quantize(program, config, dataset=data)
    assert inc_torch.quantized_ops(q) == ["emb", "conv", "up", "fc"]


def test_fp32_pt2_file_is_quantized_by_path_and_by_the_cli_and_left_as_it_was(tmp_path) -> None:
    model, program = _digits_program()
    source = tmp_path / "digits.pt2"
    torch.export.save(program, source)
    before = source.read_bytes()

    q = inc.quantize(source, inc.QuantConfig(), dataset=calib_data())
    assert inc_torch.quantized_ops(q) == ["conv1", "conv2", "fc1", "fc2"]
    x, _, _, _ = split()
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=x[:128])
    out = tmp_path / "digits.int8.pt2"
    assert main(["quantize", str(source), "-o", str(out), "--calib", str(calib), "--calib-batch-size", "32"]) == 0
    loaded = inc.load(out)
    assert inc_torch.quantized_ops(loaded) == ["conv1", "conv2", "fc1", "fc2"]
    assert accuracy(loaded) >= accuracy(model) - 0.01
    assert source.read_bytes() == before


def test_bf16_ops_of_a_program(monkeypatch) -> None:
    stand_in_bf16_cpu(monkeypatch)
    _, program = _digits_program()
    q = inc.quantize(program, inc.QuantConfig(bf16=inc.LayerFilter(names=("fc1",))), dataset=calib_data())
    assert inc_torch.bf16_ops(q) == ["fc1"] and inc_torch.quantized_ops(q) == ["conv1", "conv2", "fc2"]


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (inc.QuantConfig(approach="dynamic"), r"program; dynamic quantization swaps .*approach='static', format='pt2e'"),
        (inc.QuantConfig(format="fx"), r"program; format='fx' traces .*pass the nn.Module you exported"),
        (inc.QuantConfig(smooth_quant=inc.SmoothQuant()), r"program; SmoothQuant rescales .*Leave smooth_quant unset"),
    ],
)
def test_paths_that_need_the_module_refuse_a_program_naming_the_way_out(config: inc.QuantConfig, match: str) -> None:
    _, program = _digits_program()
    with pytest.raises(UnsupportedModelError, match=match):
        inc.quantize(program, config, dataset=calib_data())


def test_qat_refuses_an_inference_program() -> None:
    _, program = _digits_program()
    x, _, _, _ = split()
    with pytest.raises(UnsupportedModelError, match="not a torch.export program"):
        inc_torch.prepare_qat(program.module(), inc.QATConfig(), torch.from_numpy(x[:4]))


def test_a_program_exported_for_one_batch_size_says_how_to_calibrate_it() -> None:
    model = trained_cnn()
    x, _, _, _ = split()
    program = torch.export.export(model, (torch.from_numpy(x[:4]),))  # static shapes: batch 4 only
    with pytest.raises(DatasetError, match=r"Guard failed.*torch.export.Dim"):
        inc.quantize(program, inc.QuantConfig(), dataset=calib_data(batch_size=32))
    q = inc.quantize(program, inc.QuantConfig(), dataset=calib_data(batch_size=4))
    assert inc_torch.quantized_ops(q) == ["conv1", "conv2", "fc1", "fc2"]


class _TopLevelLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.head = nn.Parameter(torch.randn(4, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.relu(self.fc(x)), self.head)  # called in no submodule


def test_ops_called_outside_any_submodule_are_named_in_a_warning(caplog) -> None:
    torch.manual_seed(0)
    model = _TopLevelLinear().eval()
    program = _program(model, torch.randn(4, 16))
    assert [op.name for op in inc.describe(program).ops] == ["fc"]
    with caplog.at_level(logging.WARNING, logger="inc"):
        inc.quantize(program, inc.QuantConfig(), dataset=inc.Dataset(np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32), batch_size=4))
    assert "1 op(s) of the program are called outside any submodule (linear_1)" in caplog.text


class _HandedOnAttention(nn.Module):
    """torchvision's Swin attention: the layers' weights handed to functions, the layers never called."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 16)
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.relu(F.linear(x, self.qkv.weight, self.qkv.bias)), self.proj.weight, self.proj.bias)


class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _HandedOnAttention()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)  # projections inside one function: FP32 on PT2E
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(x)
        return self.fc(self.mha(x, x, x, need_weights=False)[0])


def test_ops_are_listed_by_the_module_whose_call_computes_them_for_a_module_and_its_program() -> None:
    # Before: the module listed attn.qkv and attn.proj, whose ops the graph names attn, so excluding them was silently
    # ignored; the program listed the MultiheadAttention's projections, which stay FP32.
    torch.manual_seed(0)
    model = _Blocks().eval()
    x = torch.randn(8, 5, 16)
    data = inc.Dataset(x.numpy(), batch_size=4)
    program = _program(model, x[:2])
    for given in (model, program):
        assert [(op.name, op.op_type) for op in inc.describe(given).ops] == [("attn", "Linear"), ("fc", "Linear")]
        assert inc_torch.quantized_ops(inc.quantize(given, inc.QuantConfig(), dataset=data)) == ["attn", "fc"]
        excluded = inc.quantize(given, inc.QuantConfig(exclude=inc.LayerFilter(names=("attn",))), dataset=data)
        assert inc_torch.quantized_ops(excluded) == ["fc"]
