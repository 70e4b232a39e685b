"""Each bad input raises the documented IncError subclass, says what to do, and leaves the model unchanged."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch_helpers import calib_data, same_state, split, state, trained_cnn

import inc_core as inc
import inc_torch
import inc_torch._backend
from inc_core.errors import (
    BackendNotFoundError,
    CalibrationError,
    ConfigError,
    DatasetError,
    EvaluationError,
    ModelLoadError,
    UnsupportedModelError,
)


class DataDependent(nn.Module):
    """Branches on tensor values: neither torch.export nor FX symbolic tracing can capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.mean() > 0:
            y = y * 2
        return self.fc(torch.flatten(y, 1))


@pytest.mark.parametrize(("fmt", "hint"), [("pt2e", "format='fx'"), ("fx", "format='pt2e'")])
def test_untraceable_model_names_another_path(fmt: str, hint: str) -> None:
    model = DataDependent().eval()
    before = state(model)
    with pytest.raises(UnsupportedModelError, match=hint) as info:
        inc.quantize(model, inc.QuantConfig(format=fmt), dataset=calib_data(8))
    assert "approach='dynamic'" in str(info.value)
    assert same_state(state(model), before)


def test_wrong_shape_inputs_are_a_dataset_error() -> None:
    model = trained_cnn().train()  # training mode: a forward would move batch-norm statistics
    before = state(model)
    data = inc.Dataset(np.zeros((8, 3, 8, 8), dtype=np.float32), batch_size=4)
    with pytest.raises(DatasetError, match=r"\(4, 3, 8, 8\) float32"):
        inc.quantize(model, inc.QuantConfig(), dataset=data)
    assert same_state(state(model), before) and model.training


def test_a_later_batch_of_another_shape_is_a_dataset_error() -> None:
    x, _, _, _ = split()
    batches = [x[:4], x[:4, :, :4, :4]]
    with pytest.raises(DatasetError, match="batch 1"):
        inc.quantize(trained_cnn(), inc.QuantConfig(format="fx"), dataset=inc.Dataset(batches))


@pytest.mark.parametrize("approach", ["static", "dynamic"])
def test_a_data_loader_of_inputs_and_labels_names_labels_true(approach: str) -> None:
    x, y, _, _ = split()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.tensor(x), torch.tensor(y)), batch_size=32)
    config = inc.QuantConfig(approach=approach)
    with pytest.raises(DatasetError, match=re.escape("pass inc.Dataset(loader, labels=True)")):
        inc.quantize(trained_cnn(), config, dataset=loader)
    quantized = inc.quantize(trained_cnn(), config, dataset=inc.Dataset(loader, labels=True))
    assert quantized(torch.tensor(x[:4])).shape == (4, 10)


def test_dict_batches_carrying_labels_name_the_way_out() -> None:
    x, y, _, _ = split()
    batches = [{"x": x[:16], "labels": y[:16]}]
    with pytest.raises(DatasetError, match="The batch's 'labels' is no argument of forward: leave the labels out"):
        inc.quantize(trained_cnn(), inc.QuantConfig(), dataset=inc.Dataset(batches))


def test_empty_calibration_data_is_a_dataset_error() -> None:
    model = trained_cnn()
    with pytest.raises(DatasetError, match="no samples"):
        inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset([]))


@pytest.mark.parametrize("fmt", ["pt2e", "fx"])
def test_nan_activations_are_a_calibration_error(fmt: str) -> None:
    model = trained_cnn()
    before = state(model)
    x, _, _, _ = split()
    bad = x[:16].copy()
    bad[3, 0, 2, 2] = np.nan
    with pytest.raises(CalibrationError, match=r"Calibration batch 0 .*NaN"):
        inc.quantize(model, inc.QuantConfig(format=fmt), dataset=inc.Dataset(bad, batch_size=16))
    assert same_state(state(model), before)


def test_eval_fn_that_raises_is_an_evaluation_error() -> None:
    from inc_core.tuning import autotune

    model = trained_cnn()
    before = state(model)

    def broken(candidate: nn.Module) -> float:
        raise ZeroDivisionError("accuracy needs labels")

    with pytest.raises(EvaluationError, match="accuracy needs labels"):
        autotune(model, inc.TuningConfig(max_trials=2), eval_fn=broken, dataset=calib_data(16))
    assert same_state(state(model), before)


@pytest.mark.parametrize(("approach", "name", "close"), [("static", "conv3", "conv1"), ("dynamic", "fc9", "fc1")])
def test_unknown_layer_names_are_a_config_error(approach: str, name: str, close: str) -> None:
    model = trained_cnn()
    config = inc.QuantConfig(approach=approach, exclude=inc.LayerFilter(names=(name,)))
    with pytest.raises(ConfigError, match=rf"{name}.*Close names.*{close}"):
        inc.quantize(model, config, dataset=calib_data(8))


def test_int8_activations_are_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="activation_dtype='uint8'"):
        inc.quantize(trained_cnn(), inc.QuantConfig(activation_dtype="int8"), dataset=calib_data(8))


def test_missing_ipex_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from inc_core._registry import _instance

    monkeypatch.setitem(sys.modules, "intel_extension_for_pytorch", None)  # import now fails
    _instance.cache_clear()
    try:
        model = trained_cnn()
        before = state(model)
        with pytest.raises(BackendNotFoundError, match=r"pip install inc-torch\[ipex\]"):
            inc.quantize(model, inc.QuantConfig(), dataset=calib_data(8), backend="ipex")
        assert same_state(state(model), before)
    finally:
        _instance.cache_clear()


@pytest.mark.parametrize(
    ("transformers_major", "advice"),
    [(5, r"transformers 5 no longer has: install transformers<5"), (None, r"IPEX 2\.8 needs torch 2\.8 exactly")],
)
def test_an_ipex_that_fails_to_import_says_why_not_reinstall(
    monkeypatch: pytest.MonkeyPatch, transformers_major: int | None, advice: str
) -> None:
    """IPEX 2.8 next to transformers 5 raises NameError('MoeModelOutputWithPast') from its own import: the
    message said "Reinstall it with pip install inc-torch[ipex]", which changes nothing."""
    from inc_core._registry import _instance
    from inc_torch.ptq import _ipex

    def failing_import(name: str) -> None:
        raise NameError("name 'MoeModelOutputWithPast' is not defined")

    monkeypatch.setattr(_ipex.importlib, "import_module", failing_import)
    monkeypatch.setattr(_ipex, "_transformers_major", lambda: transformers_major)
    _instance.cache_clear()
    try:
        with pytest.raises(BackendNotFoundError) as caught:
            inc.quantize(trained_cnn(), inc.QuantConfig(), dataset=calib_data(8), backend="ipex")
    finally:
        _instance.cache_clear()
    message = str(caught.value)
    assert "is installed but could not be imported (NameError: name 'MoeModelOutputWithPast'" in message
    assert re.search(advice, message) and "Reinstall" not in message


def test_already_quantized_model_is_refused() -> None:
    quantized = inc.quantize(trained_cnn(), inc.QuantConfig(format="fx"), dataset=calib_data(8))
    with pytest.raises(UnsupportedModelError, match="FP32"):
        inc.quantize(quantized, inc.QuantConfig(), dataset=calib_data(8))


def test_model_files_that_hold_no_nn_module_name_the_python_way(tmp_path: Path) -> None:
    """What a user hands the CLI or inc.load: before, an FP32 TorchScript file was called "already scripted or
    quantized", and a torch.save(model) file gave torch's page-long weights_only text. An FP32 .pt2 program is
    quantized (test_exported_program.py)."""
    model = trained_cnn()
    x = torch.from_numpy(split()[0][:2])
    program = tmp_path / "fp32.pt2"
    torch.export.save(torch.export.export(model, (x,)), program)
    scripted = tmp_path / "fp32_script.pt"
    torch.jit.save(torch.jit.trace(model, x), scripted)
    pickled = tmp_path / "pickled.pt"
    torch.save(model, pickled)
    with pytest.raises(UnsupportedModelError, match=r"The model is a TorchScript.*call inc\.quantize\(model, \.\.\.\)"):
        inc.describe(inc.load(scripted))
    assert [op.name for op in inc.describe(inc.load(program)).ops] == ["conv1", "conv2", "fc1", "fc2"]
    with pytest.raises(ModelLoadError, match=r"holds a pickled Python object \(torch.save\(model\)\); inc does not unpickle"):
        inc.load(pickled)
    int8 = inc.save(inc.quantize(model, inc.QuantConfig(format="fx"), dataset=calib_data(8)), tmp_path / "int8.pt")
    with pytest.raises(UnsupportedModelError, match="already quantized"):
        inc.describe(inc.load(int8))


class Circular(nn.Module):
    """A convolution with circular padding, which neither x86 INT8 path can quantize."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.wrap = nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.wrap(torch.relu(self.conv1(x)))), 1))


@pytest.mark.parametrize(("fmt", "way_out"), [("pt2e", "format='fx' with exclude"), ("fx", r"exclude=inc\.LayerFilter\(names=\('wrap',\)\)")])
def test_circular_padding_names_the_conv_and_the_way_out(fmt: str, way_out: str) -> None:
    torch.manual_seed(0)
    model = Circular().eval()
    before = state(model)
    with pytest.raises(UnsupportedModelError, match=rf"'wrap'.*padding_mode='circular'.*{way_out}"):
        inc.quantize(model, inc.QuantConfig(format=fmt), dataset=calib_data(8))
    assert same_state(state(model), before)


def test_the_way_out_works_for_circular_padding() -> None:
    torch.manual_seed(0)
    config = inc.QuantConfig(format="fx", exclude=inc.LayerFilter(names=("wrap",)))
    quantized = inc.quantize(Circular().eval(), config, dataset=calib_data(8))
    assert inc_torch.quantized_ops(quantized) == ["conv1", "fc"]


@pytest.mark.parametrize(("fmt", "call"), [("pt2e", "prepare_pt2e"), ("fx", "convert_fx")])
def test_a_framework_failure_is_an_inc_error_naming_the_op(monkeypatch: pytest.MonkeyPatch, fmt: str, call: str) -> None:
    # Without inc's up-front check, torchao/torch raise a builtin ValueError deep in their passes.
    monkeypatch.setattr(inc_torch._backend, "check_constructs", lambda *args: None)
    torch.manual_seed(0)
    with pytest.raises(UnsupportedModelError, match=rf"failed at op 'wrap' in {call}.*ValueError.*exclude=inc\.LayerFilter") as info:
        inc.quantize(Circular().eval(), inc.QuantConfig(format=fmt), dataset=calib_data(8))
    assert isinstance(info.value.__cause__, ValueError)


def test_qat_framework_failure_is_an_inc_error() -> None:
    torch.manual_seed(0)
    prepared = inc_torch.prepare_qat(Circular(), inc.QATConfig(format="fx"), split()[0][:4])
    with pytest.raises(UnsupportedModelError, match=r"QAT conversion.*'wrap'.*ValueError: 'padding_mode' circular"):
        inc_torch.convert(prepared)


class _Broken(nn.Module):
    """Stands in for an INT8 kernel that fails at run time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no kernel for this input")


def test_a_returned_model_that_does_not_run_is_an_error_naming_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    import inc_torch.ptq._fx

    real = inc_torch.ptq._fx.quantize_fx

    def broken_conv2(*args: object, **kwargs: object) -> nn.Module:
        converted = real(*args, **kwargs)  # type: ignore[arg-type]
        converted.conv2 = _Broken()
        return converted

    monkeypatch.setattr(inc_torch.ptq._fx, "quantize_fx", broken_conv2)
    with pytest.raises(UnsupportedModelError, match=r"does not run on the first calibration batch at op 'conv2'.*no kernel"):
        inc.quantize(trained_cnn(), inc.QuantConfig(format="fx"), dataset=calib_data(8))



@pytest.mark.parametrize(
    ("dtype", "fmt", "approach"),
    [(torch.float16, "pt2e", "static"), (torch.float16, "fx", "static"), (torch.float16, "pt2e", "dynamic"),
     (torch.bfloat16, "fx", "static"), (torch.bfloat16, "pt2e", "dynamic"),
     (torch.float64, "pt2e", "static"), (torch.float64, "fx", "static"), (torch.float64, "pt2e", "dynamic")],
)
def test_a_half_precision_model_is_refused_with_the_fp32_way(dtype: torch.dtype, fmt: str, approach: str) -> None:
    """These paths failed deep in inductor or torch.ao ("expects a Float Tensor, got Half"; a float64 model: "Expecting
    input to have dtype torch.float32", "expected scalar type Float but found Double") and pointed at an op."""
    model = trained_cnn().to(dtype)
    before = state(model)
    config = inc.QuantConfig(format=fmt, approach=approach)
    name = str(dtype).replace("torch.", "")
    with pytest.raises(UnsupportedModelError, match=rf"holds {name} parameters.*starts from the FP32 model\. Pass model\.float\(\)"):
        inc.quantize(model, config, dataset=calib_data(32, 16))
    assert same_state(state(model), before) and model.conv1.weight.dtype == dtype


def test_a_bfloat16_model_quantizes_on_pt2e() -> None:
    model = trained_cnn().to(torch.bfloat16)
    q = inc.quantize(model, inc.QuantConfig(), dataset=calib_data(32, 16))
    assert inc.resolve_backend(q).int8_op_counts(q).get("conv2d", 0) >= 1
