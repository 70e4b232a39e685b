"""inc.save / inc.load in deployable torch formats, the benchmark runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
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


def test_runner_sets_threads_and_runs_numpy_inputs() -> None:
    model = trained_cnn()
    backend = inc.get_backend("torch")
    previous = torch.get_num_threads()
    try:
        run = backend.runner(model, split()[0][:3], threads=1)
        assert torch.get_num_threads() == 1
        assert run().shape == (3, 10)
    finally:
        torch.set_num_threads(previous)


def test_benchmark_a_quantized_model() -> None:
    quantized = inc.quantize(trained_cnn(), inc.QuantConfig(format="fx"), dataset=calib_data(8))
    result = inc.benchmark(quantized, split()[0][:8], warmup=2, iterations=5)
    assert result.throughput > 0
