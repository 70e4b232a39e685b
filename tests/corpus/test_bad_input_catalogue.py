"""The bad-input catalogue: what a user gets wrong, across core, ONNX and torch, and what inc answers.

Every case asserts the specific IncError subclass, a key phrase of the message that tells the user what to
fix, that the user's model object or file is untouched (state_dict / sha256 compare) and that no partial
output is left behind. The kill -9 cases run a real backend in a child process (``_kill_child.py``).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bad_input_models as bm
import numpy as np
import onnx
import pytest
import torch
from torch import nn

import inc_core as inc
from inc_core.errors import (
    BackendNotFoundError,
    CalibrationError,
    ConfigError,
    DatasetError,
    EvaluationError,
    IncError,
    ModelLoadError,
    SaveError,
    TuningError,
    UnsupportedModelError,
)

CHILD = Path(__file__).resolve().parent / "_kill_child.py"
CASES: dict[str, Callable[[Path], None]] = {}


def case(fn: Callable[[Path], None]) -> Callable[[Path], None]:
    CASES[fn.__name__.removeprefix("case_").replace("_", "-")] = fn
    return fn


def expect(error: type[IncError], phrase: str, call: Callable[[], Any]) -> IncError:
    """``call()`` raises exactly ``error`` (an IncError) whose message matches ``phrase`` (regex, any case)."""
    with pytest.raises(IncError) as info:
        call()
    assert isinstance(info.value, error), f"expected {error.__name__}, got {type(info.value).__name__}: {info.value}"
    assert re.search(phrase, str(info.value), re.IGNORECASE | re.DOTALL), (
        f"the message does not say {phrase!r}: {info.value}"
    )
    return info.value


def listing(directory: Path) -> list[str]:
    """Visible entries of ``directory`` (a partial output would show here)."""
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def onnx_file(tmp: Path, name: str = "model.onnx") -> Path:
    path = tmp / name
    onnx.save_model(bm.onnx_mlp(), str(path))
    return path


def calib(n: int = 32, batch_size: int = 8) -> inc.Dataset:
    return inc.Dataset(bm.digits(n), batch_size=batch_size)


def image_calib(n: int = 32) -> inc.Dataset:
    return inc.Dataset(bm.images(n), batch_size=8)


def onnx_untouched(tmp: Path, error: type[IncError], phrase: str, call: Callable[[Path], Any]) -> None:
    """Run ``call(model_path)`` on a valid ONNX file; the file and the directory stay as they were."""
    path = onnx_file(tmp)
    digest, before = bm.sha256(path), listing(tmp)
    expect(error, phrase, lambda: call(path))
    assert bm.sha256(path) == digest and listing(tmp) == before


def torch_untouched(kind: str, error: type[IncError], phrase: str, call: Callable[[nn.Module], Any], *, train: bool = False) -> None:
    """Run ``call(model)`` on a tiny torch model; its parameters, buffers and train/eval mode stay as they were."""
    model = bm.tiny(kind).train(train)
    before = bm.state(model)
    expect(error, phrase, lambda: call(model))
    assert bm.same_state(bm.state(model), before) and model.training == train


# ============================================================================== core: configs and API


@case
def case_core_unknown_calibration(tmp: Path) -> None:
    expect(ConfigError, "calibration.*minmax", lambda: inc.QuantConfig(calibration="entropy"))


@case
def case_core_unknown_approach(tmp: Path) -> None:
    expect(ConfigError, "approach.*dynamic", lambda: inc.QuantConfig(approach="weight_only"))


@case
def case_core_unknown_granularity(tmp: Path) -> None:
    expect(ConfigError, "granularity.*per_channel", lambda: inc.QuantConfig(granularity="per_row"))


@case
def case_core_calib_samples_zero(tmp: Path) -> None:
    expect(ConfigError, "calib_samples", lambda: inc.QuantConfig(calib_samples=0))


@case
def case_core_percentile_out_of_range(tmp: Path) -> None:
    expect(ConfigError, r"percentile.*\(50, 100\]", lambda: inc.QuantConfig(percentile=150.0))


@case
def case_core_tolerable_loss_negative(tmp: Path) -> None:
    expect(ConfigError, "tolerable_loss", lambda: inc.TuningConfig(tolerable_loss=-0.1))


@case
def case_core_tolerable_loss_nan(tmp: Path) -> None:
    expect(ConfigError, "tolerable_loss", lambda: inc.TuningConfig(tolerable_loss=math.nan))


@case
def case_core_relative_tolerable_loss_above_one(tmp: Path) -> None:
    # A relative loss of 150% of the baseline accepts any model: a typo for 1.5% (0.015).
    expect(ConfigError, "tolerable_loss", lambda: inc.TuningConfig(tolerable_loss=1.5, loss_type="relative"))


@case
def case_core_unknown_strategy(tmp: Path) -> None:
    expect(ConfigError, "strategy.*basic", lambda: inc.TuningConfig(strategy="grid"))


@case
def case_core_unknown_loss_type(tmp: Path) -> None:
    expect(ConfigError, "loss_type.*relative", lambda: inc.TuningConfig(loss_type="percent"))


@case
def case_core_dataset_iterable_with_array_labels(tmp: Path) -> None:
    # Labels aligned by index need an indexable source; a generator's batches carry their own labels.
    batches = (bm.digits(8) for _ in range(2))
    expect(DatasetError, "labels", lambda: list(inc.Dataset(batches, labels=np.zeros(16, dtype=np.int64))))


@case
def case_core_benchmark_zero_instances(tmp: Path) -> None:
    expect(ConfigError, "instances", lambda: inc.benchmark(bm.onnx_mlp(), bm.digits(4), instances=0))


@case
def case_core_max_trials_zero(tmp: Path) -> None:
    expect(ConfigError, "max_trials", lambda: inc.TuningConfig(max_trials=0))


@case
def case_core_config_from_dict_unknown_key(tmp: Path) -> None:
    expect(ConfigError, "aproach", lambda: inc.QuantConfig.from_dict({"aproach": "dynamic"}))


@case
def case_core_config_passed_as_dict(tmp: Path) -> None:
    model = bm.onnx_mlp()
    before = model.SerializeToString()
    expect(ConfigError, "QuantConfig", lambda: inc.quantize(model, {"approach": "dynamic"}))  # type: ignore[arg-type]
    assert model.SerializeToString() == before


@case
def case_core_model_of_no_backend(tmp: Path) -> None:
    expect(BackendNotFoundError, "pip install|installed", lambda: inc.quantize([1, 2, 3], inc.QuantConfig(approach="dynamic")))


@case
def case_core_unknown_backend_name(tmp: Path) -> None:
    expect(BackendNotFoundError, "tensorrt.*(installed|pip install)", lambda: inc.quantize(bm.onnx_mlp(), backend="tensorrt"))


@case
def case_core_load_missing_file(tmp: Path) -> None:
    expect(ModelLoadError, "no file", lambda: inc.load(tmp / "missing.onnx"))
    assert listing(tmp) == []


@case
def case_core_dataset_labels_length_mismatch(tmp: Path) -> None:
    expect(DatasetError, "labels", lambda: inc.Dataset(bm.digits(10), labels=np.zeros(7, dtype=np.int64)))


@case
def case_core_corrupt_tuning_history(tmp: Path) -> None:
    history = tmp / "tuning.json"
    history.write_text("{ this is not json", encoding="utf-8")
    digest = bm.sha256(history)
    model, data = bm.tuning_case("onnx")
    expect(
        TuningError,
        "Cannot resume.*(Delete|move)",
        lambda: inc.autotune(model, bm.tuning_config("onnx", str(history)), eval_fn=bm.score, dataset=data),
    )
    assert bm.sha256(history) == digest and listing(tmp) == ["tuning.json"]


# ============================================================================== ONNX


def _write_bytes(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


@case
def case_onnx_corrupt_file(tmp: Path) -> None:
    path = _write_bytes(tmp, "corrupt.onnx", os.urandom(4096))
    digest = bm.sha256(path)
    expect(ModelLoadError, "corrupt.onnx.*(not an ONNX model|cannot)", lambda: inc.quantize(path, inc.QuantConfig(approach="dynamic")))
    assert bm.sha256(path) == digest and listing(tmp) == ["corrupt.onnx"]


@case
def case_onnx_truncated_file(tmp: Path) -> None:
    full = bm.onnx_mlp().SerializeToString()
    path = _write_bytes(tmp, "truncated.onnx", full[: len(full) // 2])
    digest = bm.sha256(path)
    expect(ModelLoadError, "truncated.onnx", lambda: inc.quantize(path, inc.QuantConfig(), dataset=calib()))
    assert bm.sha256(path) == digest and listing(tmp) == ["truncated.onnx"]


@case
def case_onnx_empty_file(tmp: Path) -> None:
    path = _write_bytes(tmp, "empty.onnx", b"")
    expect(ModelLoadError, "empty.onnx", lambda: inc.load(path))
    assert listing(tmp) == ["empty.onnx"]


@case
def case_onnx_load_truncated_file(tmp: Path) -> None:
    full = bm.onnx_mlp().SerializeToString()
    path = _write_bytes(tmp, "half.onnx", full[: len(full) // 3])
    expect(ModelLoadError, "half.onnx", lambda: inc.load(path))


@case
def case_onnx_wrong_input_shape(tmp: Path) -> None:
    data = inc.Dataset(np.zeros((8, 32), dtype=np.float32), batch_size=4)
    onnx_untouched(tmp, DatasetError, r"\(4, 32\).*64", lambda p: inc.quantize(p, inc.QuantConfig(), dataset=data))


@case
def case_onnx_wrong_input_dtype(tmp: Path) -> None:
    data = inc.Dataset(np.array([["a"] * 64] * 4), batch_size=4)
    onnx_untouched(tmp, DatasetError, "float", lambda p: inc.quantize(p, inc.QuantConfig(), dataset=data))


@case
def case_onnx_wrong_input_name(tmp: Path) -> None:
    data = inc.Dataset({"pixels": bm.digits(8)}, batch_size=4)
    onnx_untouched(tmp, DatasetError, "pixels.*'x'|'x'.*pixels", lambda p: inc.quantize(p, inc.QuantConfig(), dataset=data))


@case
def case_onnx_empty_calibration(tmp: Path) -> None:
    onnx_untouched(tmp, DatasetError, "no samples", lambda p: inc.quantize(p, inc.QuantConfig(), dataset=inc.Dataset([])))


@case
def case_onnx_nan_calibration(tmp: Path) -> None:
    x = bm.digits(16)
    x[5, 3] = np.nan
    data = inc.Dataset(x, batch_size=8)
    onnx_untouched(tmp, CalibrationError, "NaN", lambda p: inc.quantize(p, inc.QuantConfig(), dataset=data))


@case
def case_onnx_inf_calibration(tmp: Path) -> None:
    x = bm.digits(16)
    x[9, 0] = np.inf
    data = inc.Dataset(x, batch_size=8)
    onnx_untouched(tmp, CalibrationError, "Inf", lambda p: inc.quantize(p, inc.QuantConfig(), dataset=data))


@case
def case_onnx_static_without_dataset(tmp: Path) -> None:
    onnx_untouched(tmp, DatasetError, r"dataset.*(pass|inc\.Dataset)", lambda p: inc.quantize(p, inc.QuantConfig()))


@case
def case_onnx_unknown_exclude_name(tmp: Path) -> None:
    config = inc.QuantConfig(exclude=inc.LayerFilter(names=("fc3",)))
    onnx_untouched(tmp, ConfigError, "fc3.*fc1", lambda p: inc.quantize(p, config, dataset=calib()))


@case
def case_onnx_unknown_override_name(tmp: Path) -> None:
    config = inc.QuantConfig(overrides={"fc_2": {"granularity": "per_tensor"}})
    onnx_untouched(tmp, ConfigError, "fc_2.*fc2", lambda p: inc.quantize(p, config, dataset=calib()))


@case
def case_onnx_exclude_pattern_matching_nothing(tmp: Path) -> None:
    config = inc.QuantConfig(exclude=inc.LayerFilter(patterns=("conv.*",)))
    onnx_untouched(tmp, ConfigError, r"conv\.\*.*(fc1|describe)", lambda p: inc.quantize(p, config, dataset=calib()))


@case
def case_onnx_json_file_named_onnx(tmp: Path) -> None:
    path = tmp / "model.onnx"
    path.write_text(json.dumps({"graph": "not really"}))
    expect(ModelLoadError, "model.onnx", lambda: inc.quantize(path, inc.QuantConfig(approach="dynamic")))
    assert listing(tmp) == ["model.onnx"]


@case
def case_onnx_unknown_format(tmp: Path) -> None:
    onnx_untouched(tmp, ConfigError, "qlinear.*qdq", lambda p: inc.quantize(p, inc.QuantConfig(format="qlinear"), dataset=calib()))


@case
def case_onnx_save_into_missing_directory(tmp: Path) -> None:
    quantized = inc.quantize(bm.onnx_mlp(), inc.QuantConfig(approach="dynamic"))
    expect(SaveError, "does not exist", lambda: inc.save(quantized, tmp / "no_such_dir" / "out.onnx"))
    assert listing(tmp) == []


@case
def case_onnx_save_under_a_file(tmp: Path) -> None:
    quantized = inc.quantize(bm.onnx_mlp(), inc.QuantConfig(approach="dynamic"))
    (tmp / "notes.txt").write_text("a file, not a directory")
    expect(SaveError, "notes.txt", lambda: inc.save(quantized, tmp / "notes.txt" / "out.onnx"))
    assert listing(tmp) == ["notes.txt"]


@case
def case_onnx_eval_fn_raises(tmp: Path) -> None:
    def eval_fn(model: Any) -> float:
        raise FileNotFoundError("labels.csv not found")

    onnx_untouched(
        tmp, EvaluationError, "labels.csv",
        lambda p: inc.autotune(p, inc.TuningConfig(history=None), eval_fn=eval_fn, dataset=calib()),
    )


@case
def case_onnx_eval_fn_returns_nan(tmp: Path) -> None:
    onnx_untouched(
        tmp, EvaluationError, "nan",
        lambda p: inc.autotune(p, inc.TuningConfig(history=None), eval_fn=lambda m: float("nan"), dataset=calib()),
    )


@case
def case_onnx_eval_fn_returns_text(tmp: Path) -> None:
    onnx_untouched(
        tmp, EvaluationError, "float|number",
        lambda p: inc.autotune(p, inc.TuningConfig(history=None), eval_fn=lambda m: "0.97", dataset=calib()),
    )


@case
def case_onnx_cli_corrupt_model(tmp: Path) -> None:
    path = _write_bytes(tmp, "corrupt.onnx", os.urandom(2048))
    cli = Path(sys.executable).with_name("inc")
    run = subprocess.run(
        [str(cli), "quantize", str(path), "-o", str(tmp / "out.onnx"), "--approach", "dynamic"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode != 0
    assert "Traceback" not in run.stderr and "corrupt.onnx" in run.stderr, run.stderr
    assert listing(tmp) == ["corrupt.onnx"]


# ============================================================================== torch


@case
def case_torch_corrupt_pt2_file(tmp: Path) -> None:
    path = _write_bytes(tmp, "model.pt2", os.urandom(4096))
    expect(ModelLoadError, "model.pt2", lambda: inc.load(path))
    assert listing(tmp) == ["model.pt2"]


@case
def case_torch_truncated_pt2_file(tmp: Path) -> None:
    model = bm.tiny("mlp")
    full = tmp / "full.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(2, 64),)), str(full))
    data = full.read_bytes()
    full.unlink()
    path = _write_bytes(tmp, "model.pt2", data[: len(data) // 2])
    expect(ModelLoadError, "model.pt2", lambda: inc.load(path))
    assert listing(tmp) == ["model.pt2"]


@case
def case_torch_corrupt_pt_file(tmp: Path) -> None:
    path = _write_bytes(tmp, "model.pt", os.urandom(4096))
    expect(ModelLoadError, "model.pt", lambda: inc.load(path))


@case
def case_torch_truncated_pt_file(tmp: Path) -> None:
    quantized = inc.quantize(bm.tiny("mlp"), inc.QuantConfig(approach="dynamic"))
    saved = inc.save(quantized, tmp / "full.pt")
    data = Path(saved).read_bytes()
    Path(saved).unlink()
    path = _write_bytes(tmp, "model.pt", data[: len(data) // 2])
    expect(ModelLoadError, "model.pt", lambda: inc.load(path))


@case
def case_torch_quantize_a_file_path(tmp: Path) -> None:
    # A path is read as inc.load reads it (an FP32 .pt2 program is quantized, a TorchScript .pt refused naming the
    # nn.Module): one that holds neither is a load error naming the file, which stays as it was.
    path = _write_bytes(tmp, "user_model.pt", os.urandom(1024))
    digest = bm.sha256(path)
    expect(ModelLoadError, "user_model.pt' is not a readable TorchScript model", lambda: inc.quantize(path, inc.QuantConfig(approach="dynamic")))
    assert bm.sha256(path) == digest and listing(tmp) == ["user_model.pt"]


@case
def case_torch_wrong_input_shape(tmp: Path) -> None:
    data = inc.Dataset(np.zeros((8, 3, 8, 8), dtype=np.float32), batch_size=4)
    torch_untouched("cnn", DatasetError, r"\(4, 3, 8, 8\)", lambda m: inc.quantize(m, inc.QuantConfig(), dataset=data), train=True)


@case
def case_torch_wrong_input_dtype(tmp: Path) -> None:
    data = inc.Dataset(np.array([["a"] * 64] * 8), batch_size=4)
    torch_untouched("mlp", DatasetError, "float|dtype", lambda m: inc.quantize(m, inc.QuantConfig(format="fx"), dataset=data))


@case
def case_torch_empty_calibration(tmp: Path) -> None:
    torch_untouched("cnn", DatasetError, "no samples", lambda m: inc.quantize(m, inc.QuantConfig(), dataset=inc.Dataset([])))


def _bad_images(value: float) -> inc.Dataset:
    x = bm.images(16)
    x[3, 0, 2, 2] = value
    return inc.Dataset(x, batch_size=8)


@case
def case_torch_pt2e_nan_calibration(tmp: Path) -> None:
    torch_untouched("cnn", CalibrationError, "NaN", lambda m: inc.quantize(m, inc.QuantConfig(), dataset=_bad_images(np.nan)))


@case
def case_torch_fx_inf_calibration(tmp: Path) -> None:
    torch_untouched(
        "cnn", CalibrationError, "Inf", lambda m: inc.quantize(m, inc.QuantConfig(format="fx"), dataset=_bad_images(np.inf))
    )


@case
def case_torch_unknown_exclude_name(tmp: Path) -> None:
    config = inc.QuantConfig(exclude=inc.LayerFilter(names=("conv2",)))
    torch_untouched("cnn", ConfigError, "conv2.*conv", lambda m: inc.quantize(m, config, dataset=image_calib()))


@case
def case_torch_fx_unknown_override_name(tmp: Path) -> None:
    config = inc.QuantConfig(format="fx", overrides={"fc_2": {"granularity": "per_tensor"}})
    torch_untouched("cnn", ConfigError, "fc_2.*fc", lambda m: inc.quantize(m, config, dataset=image_calib()))


@case
def case_torch_dynamic_unknown_override_name(tmp: Path) -> None:
    config = inc.QuantConfig(approach="dynamic", overrides={"fc_2": {"granularity": "per_tensor"}})
    torch_untouched("mlp", ConfigError, "fc_2.*fc2", lambda m: inc.quantize(m, config))


@case
def case_torch_pt2e_unknown_override_name(tmp: Path) -> None:
    config = inc.QuantConfig(overrides={"fc_2": {"granularity": "per_tensor"}})
    torch_untouched("cnn", ConfigError, "fc_2.*fc", lambda m: inc.quantize(m, config, dataset=image_calib()))


@case
def case_torch_exclude_unknown_type(tmp: Path) -> None:
    config = inc.QuantConfig(exclude=inc.LayerFilter(types=("Conv3d",)))
    torch_untouched("cnn", ConfigError, "Conv3d.*Conv2d", lambda m: inc.quantize(m, config, dataset=image_calib()))


@case
def case_torch_unknown_format(tmp: Path) -> None:
    torch_untouched("cnn", ConfigError, "torchscript.*pt2e", lambda m: inc.quantize(m, inc.QuantConfig(format="torchscript"), dataset=image_calib()))


@case
def case_torch_dynamic_without_linear(tmp: Path) -> None:
    # Only a Conv2d: dynamic quantization has nothing to swap; a silent FP32 "success" would hide that.
    def call(model: nn.Module) -> Any:
        return inc.quantize(nn.Sequential(model.conv), inc.QuantConfig(approach="dynamic"))

    torch_untouched("cnn", UnsupportedModelError, "Linear.*static|static.*Linear", call)


@case
def case_torch_pt2e_circular_padding(tmp: Path) -> None:
    def call(model: nn.Module) -> Any:
        model.conv.padding_mode = "circular"
        return inc.quantize(model, inc.QuantConfig(), dataset=image_calib())

    torch_untouched("cnn", IncError, "circular", call)


@case
def case_torch_fx_circular_padding(tmp: Path) -> None:
    def call(model: nn.Module) -> Any:
        model.conv.padding_mode = "circular"
        return inc.quantize(model, inc.QuantConfig(format="fx"), dataset=image_calib())

    torch_untouched("cnn", IncError, "circular", call)


@case
def case_torch_save_wrong_suffix(tmp: Path) -> None:
    quantized = inc.quantize(bm.tiny("mlp"), inc.QuantConfig(approach="dynamic"))
    expect(SaveError, r"\*\.pt", lambda: inc.save(quantized, tmp / "model.onnx"))
    assert listing(tmp) == []


@case
def case_torch_save_into_missing_directory(tmp: Path) -> None:
    quantized = inc.quantize(bm.tiny("mlp"), inc.QuantConfig(approach="dynamic"))
    expect(SaveError, "does not exist", lambda: inc.save(quantized, tmp / "missing" / "model.pt"))
    assert listing(tmp) == []


@case
def case_torch_eval_fn_raises(tmp: Path) -> None:
    def eval_fn(model: Any) -> float:
        raise KeyError("accuracy")

    torch_untouched(
        "mlp", EvaluationError, "accuracy",
        lambda m: inc.autotune(m, inc.TuningConfig(base=inc.QuantConfig(approach="dynamic"), history=None), eval_fn=eval_fn),
    )


@case
def case_torch_eval_fn_returns_inf(tmp: Path) -> None:
    torch_untouched(
        "mlp", EvaluationError, "inf",
        lambda m: inc.autotune(
            m, inc.TuningConfig(base=inc.QuantConfig(approach="dynamic"), history=None), eval_fn=lambda _: float("inf")
        ),
    )


# ============================================================================== kill -9


def _kill_during_tuning(tmp: Path, backend: str) -> None:
    history = tmp / "tuning.json"
    # eval call 1 is the baseline, calls 2 and 3 are trials 1 and 2: the child dies evaluating trial 3.
    child = subprocess.run(
        [sys.executable, str(CHILD), "tune", backend, str(history), "4"], capture_output=True, text=True, timeout=600
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    saved = json.loads(history.read_text(encoding="utf-8"))
    assert len(saved["trials"]) == 2, saved
    assert listing(tmp) == ["tuning.json"]

    calls = 0

    def eval_fn(model: Any) -> float:
        nonlocal calls
        calls += 1
        return bm.score(model)

    model, data = bm.tuning_case(backend)
    resumed = inc.autotune(model, bm.tuning_config(backend, str(history)), eval_fn=eval_fn, dataset=data)
    statuses = [t.status for t in resumed.trials]
    assert statuses[:2] == ["resumed", "resumed"] and "resumed" not in statuses[2:], statuses
    # No baseline and no finished trial evaluated again: eval_fn ran for the new trials that built a model.
    assert calls == statuses.count("evaluated"), (calls, statuses)
    fresh = inc.autotune(*bm.tuning_case(backend)[:1], bm.tuning_config(backend, None), eval_fn=bm.score, dataset=data)
    assert [t.key for t in resumed.trials] == [t.key for t in fresh.trials]


@case
def case_onnx_kill_9_during_tuning(tmp: Path) -> None:
    _kill_during_tuning(tmp, "onnx")


@case
def case_torch_kill_9_during_tuning(tmp: Path) -> None:
    _kill_during_tuning(tmp, "torch")


def _kill_during_save(tmp: Path, backend: str, name: str) -> None:
    target = tmp / name
    child = subprocess.run([sys.executable, str(CHILD), "save", backend, str(target)], capture_output=True, text=True, timeout=600)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert not target.exists(), f"a partial {name} was left at the output path"
    assert listing(tmp) == []
    # The next save to the same path succeeds and clears what the killed writer staged (hidden entries too).
    model, data = bm.tuning_case(backend)
    inc.save(inc.quantize(model, bm.tuning_config(backend, None).base, dataset=data), target)
    assert sorted(p.name for p in tmp.iterdir()) == [name]
    assert bm.score(inc.load(target)) == 0.5  # the saved file is a complete INT8 model


@case
def case_onnx_kill_9_during_save(tmp: Path) -> None:
    _kill_during_save(tmp, "onnx", "model.int8.onnx")


@case
def case_torch_kill_9_during_save(tmp: Path) -> None:
    _kill_during_save(tmp, "torch", "model.int8.pt")


# ============================================================================== the catalogue


def test_catalogue_has_at_least_40_cases() -> None:
    assert len(CASES) >= 40, len(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    CASES[name](work)
