"""inc.save / inc.load in deployable torch formats, the benchmark runner."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch_helpers import calib_data, split, trained_cnn, trained_mlp

import inc_core as inc
import inc_torch
from inc_core.errors import ModelLoadError, SaveError


def _batch() -> torch.Tensor:
    x, _, _, _ = split()
    return torch.from_numpy(x[:5])


def test_pt2e_model_round_trips_as_exported_program(tmp_path: Path) -> None:
    quantized = inc.quantize(trained_cnn(), inc.QuantConfig(), dataset=calib_data(16))
    path = inc.save(quantized, tmp_path / "digits.pt2")
    program = torch.export.load(path)  # a plain torch.export artifact
    assert isinstance(program, torch.export.ExportedProgram)
    loaded = inc.load(path)
    assert isinstance(loaded, inc_torch.CompiledQuantizedModule)
    assert inc_torch.quantized_ops(loaded) == ["conv1", "conv2", "fc1", "fc2"]
    with torch.no_grad():
        np.testing.assert_allclose(loaded.graph_module(_batch()).numpy(), quantized.graph_module(_batch()).numpy(), atol=1e-5)


@pytest.mark.parametrize("approach", ["static", "dynamic"])
def test_fx_and_dynamic_models_round_trip_as_torchscript(tmp_path: Path, approach: str) -> None:
    model = trained_cnn() if approach == "static" else trained_mlp()
    quantized = inc.quantize(model, inc.QuantConfig(approach=approach, format="fx"), dataset=calib_data(16))
    path = inc.save(quantized, tmp_path / "digits.pt")
    loaded = inc.load(path)
    assert isinstance(loaded, torch.jit.ScriptModule)
    assert inc_torch.quantized_ops(loaded) == inc_torch.quantized_ops(quantized)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(_batch()).numpy(), quantized(_batch()).numpy(), atol=1e-6)


def test_suffix_must_match_the_format(tmp_path: Path) -> None:
    quantized = inc.quantize(trained_cnn(), inc.QuantConfig(), dataset=calib_data(8))
    with pytest.raises(SaveError, match=r"'\*\.pt2'"):
        inc.save(quantized, tmp_path / "digits.pt")
    assert list(tmp_path.iterdir()) == []


def test_unreadable_file_is_a_model_load_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.pt2"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(ModelLoadError, match="broken.pt2"):
        inc.load(path)


class Wide(nn.Module):
    """Digits through two 1024-wide layers: 4.5 MB of FP32 weights, so the file size is the weights'."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 8 * 8, 1024)
        self.fc2 = nn.Linear(1024, 1024)
        self.fc3 = nn.Linear(1024, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(torch.relu(self.conv(x)), 1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _state_dict_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def test_saved_pt2e_model_holds_int8_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Wide().eval()
    calib = calib_data(32, batch_size=16)
    quantized = inc.quantize(model, inc.QuantConfig(), dataset=calib)
    # convert_pt2e leaves the FP32 weights on the graph module; none may survive, in memory or on disk.
    tensors = dict(quantized.graph_module.state_dict())
    assert not [name for name, t in tensors.items() if t.is_floating_point() and t.dim() > 1], sorted(tensors)
    assert sum(t.dtype == torch.int8 for t in tensors.values()) == 4
    path = inc.save(quantized, tmp_path / "wide.pt2")
    fp32 = _state_dict_bytes(model)
    assert fp32 > 4_000_000
    # int8 weights are a quarter of the FP32 ones; FP32 + int8 (the defect) would be 1.25x.
    assert path.stat().st_size < 0.4 * fp32, (path.stat().st_size, fp32)
    loaded = inc.load(path)
    assert inc_torch.quantized_ops(loaded) == ["conv", "fc1", "fc2", "fc3"]
    x = torch.from_numpy(split()[0][:16])  # the calibration batch shape: quantize already compiled it
    with torch.no_grad():
        torch.testing.assert_close(loaded.graph_module(x), quantized.graph_module(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded(x), quantized(x), atol=1e-5, rtol=0)  # both through inductor


@pytest.mark.parametrize("approach", ["static", "dynamic"])
def test_save_leaves_the_callers_module_in_its_mode(tmp_path: Path, approach: str) -> None:
    model = trained_cnn() if approach == "static" else trained_mlp()
    quantized = inc.quantize(model, inc.QuantConfig(approach=approach, format="fx"), dataset=calib_data(16))
    quantized.train()
    quantized.get_submodule("fc1").eval()  # a mixed state must come back as it was
    modes = {name: m.training for name, m in quantized.named_modules()}
    loaded = inc.load(inc.save(quantized, tmp_path / "digits.pt"))
    assert {name: m.training for name, m in quantized.named_modules()} == modes
    assert not loaded.training  # the file is for inference
    quantized.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(_batch()), quantized(_batch()), atol=1e-6, rtol=0)


def test_torchscript_file_records_what_it_needs_from_the_cpu(tmp_path: Path) -> None:
    quantized = inc.quantize(trained_mlp(), inc.QuantConfig(approach="dynamic"))
    path = inc.save(quantized, tmp_path / "mlp.pt")
    extra = {"inc.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    record = json.loads(extra["inc.json"])
    from inc_torch.ptq._dynamic import activation_range

    assert record["dynamic_activations"] == activation_range(quantized)
    assert record["saved_by"].startswith("inc-torch ")


def test_runner_uses_its_threads_and_restores_the_callers() -> None:
    model = trained_cnn()
    seen: list[int] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    backend = inc.get_backend("torch")
    previous = torch.get_num_threads()
    other = 2 if previous != 2 else 3
    torch.set_num_threads(other)
    try:
        run = backend.runner(model, split()[0][:3], threads=1)
        assert torch.get_num_threads() == other
        assert run().shape == (3, 10)
        assert seen == [1]
        assert torch.get_num_threads() == other
    finally:
        torch.set_num_threads(previous)


def test_benchmark_a_quantized_model_leaves_the_thread_count() -> None:
    previous = torch.get_num_threads()
    quantized = inc.quantize(trained_cnn(), inc.QuantConfig(format="fx"), dataset=calib_data(8))
    result = inc.benchmark(quantized, split()[0][:8], warmup=2, iterations=5, cores_per_instance=1)
    assert result.throughput > 0
    assert torch.get_num_threads() == previous


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ('{"dynamic_activations": "full_range"}', r"full-range.*cannot be switched.*reduce_range"),
        ("{not json", r"inc\.json record is not valid JSON"),
        ("[1, 2]", r"inc\.json record is not a JSON object"),
    ],
)
def test_a_record_that_cannot_be_honoured_is_a_model_load_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, record: str, message: str
) -> None:
    from inc_torch.ptq import _dynamic

    monkeypatch.setattr(_dynamic, "cpu_flags", lambda: frozenset({"avx2"}))  # no VNNI here
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(nn.Linear(4, 2)), str(path), _extra_files={"inc.json": record})
    with pytest.raises(ModelLoadError, match=message):
        inc.load(path)


OUTPUT_TYPES = '''
from dataclasses import dataclass

import torch


@dataclass
class Scores:
    logits: torch.Tensor


torch.export.register_dataclass(Scores, serialized_type_name="inc_test_output_types.Scores")


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return Scores(self.fc(x))
'''


def test_a_program_output_type_is_imported_from_its_module_or_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A .pt2 whose output is a registered dataclass (as transformers' outputs are) loads once that class's module
    is importable, which inc.load imports; where it is not, the error names the type and the package."""
    import subprocess
    import sys

    (tmp_path / "types_src").mkdir()
    (tmp_path / "types_src" / "inc_test_output_types.py").write_text(OUTPUT_TYPES)
    path = tmp_path / "scores.pt2"
    script = (
        f"import sys, torch; sys.path.insert(0, {str(tmp_path / 'types_src')!r})\n"
        "from inc_test_output_types import Model\n"
        f"torch.export.save(torch.export.export(Model().eval(), (torch.randn(2, 4),)), {str(path)!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    monkeypatch.delitem(sys.modules, "inc_test_output_types", raising=False)
    with pytest.raises(ModelLoadError, match=r"include inc_test_output_types\.Scores, which this process cannot rebuild: install inc_test_output_types"):
        inc.load(path)
    monkeypatch.syspath_prepend(str(tmp_path / "types_src"))
    loaded = inc.load(path)
    with torch.no_grad():
        out = loaded(torch.randn(2, 4))
    assert type(out).__name__ == "Scores" and out.logits.shape == (2, 3)
