"""backend="ipex": intel-extension-for-pytorch static INT8 (traced, frozen, oneDNN Graph fusions) and dynamic INT8."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_helpers import (
    accuracy,
    calib_data,
    relative_loss,
    same_state,
    split,
    state,
    trained_cnn,
    trained_mlp,
    trained_unet,
)

import inc_core as inc
import inc_torch
from inc_core.calibration import HistogramObserver, compute_qparams


def _batch() -> torch.Tensor:
    return torch.from_numpy(split()[0][:4])


def _int8_kernels(model: torch.jit.ScriptModule) -> list[str]:
    """The weighted ops IPEX runs in INT8: convolutions/linears inside oneDNN Graph fusion groups fed by dequantize."""
    with torch.no_grad():
        graph = model.graph_for(_batch())
    found = []
    for node in graph.nodes():
        if node.kind() == "ipex::LlgaFusionGroup":
            body = str(node.g("Subgraph"))
            if "aten::dequantize" in body:
                found += re.findall(r"aten::(_convolution|linear)\(", body)
    return found


def _fp32_kernels(model: torch.jit.ScriptModule) -> list[str]:
    with torch.no_grad():
        graph = model.graph_for(_batch())
    return [n.kind() for n in graph.nodes() if n.kind() in ("aten::conv2d", "aten::linear") or n.kind().startswith("ipex_prepack::")]


@pytest.fixture(scope="module")
def cnn() -> torch.nn.Module:
    return trained_cnn()


def test_static_int8_on_digits(cnn: torch.nn.Module) -> None:
    before = state(cnn)
    quantized = inc.quantize(cnn, inc.QuantConfig(), dataset=calib_data(), backend="ipex")
    assert isinstance(quantized, torch.jit.ScriptModule)
    assert sorted(_int8_kernels(quantized)) == ["_convolution", "_convolution", "linear", "linear"]
    # what the CLI and the tuning report count: IPEX's traced graph puts an alias after each dequantize
    assert inc.get_backend("ipex").int8_op_counts(quantized) == {"convolution": 2, "linear": 2}
    # and by name: the frozen graph inlines every module, the names were put on the INT8 weights before freezing
    assert inc_torch.quantized_ops(quantized) == ["conv1", "conv2", "fc1", "fc2"]
    assert same_state(state(cnn), before)
    fp32, int8 = accuracy(cnn), accuracy(quantized)
    assert relative_loss(fp32, int8) <= 0.01, (fp32, int8)


def test_transposed_convolutions_run_int8_with_a_scale_per_output_channel(caplog: pytest.LogCaptureFixture) -> None:
    # IPEX rebuilds a transposed convolution's weight observer with ch_axis=1 (weight [in, out, kh, kw]) only when
    # it is a PerChannelMinMaxObserver; inc's own weight observer was not one, and every model with a
    # ConvTranspose2d failed per channel ("length of scales must equal to channel, expected 8 got, 16")
    model = trained_unet()
    names = ["e1", "down", "up", "dec", "up2", "head", "fc"]
    assert inc.describe(model, inc.QuantConfig(), backend="ipex").names == tuple(names)
    with caplog.at_level(logging.WARNING, logger="inc"):
        quantized = inc.quantize(model, inc.QuantConfig(), dataset=calib_data(256, 32), backend="ipex")
    assert "FP32" not in caplog.text  # no layer is said to be left in FP32: IPEX runs ConvTranspose2d in INT8
    assert inc.get_backend("ipex").int8_op_counts(quantized) == {"convolution": 6, "linear": 1}
    assert inc_torch.quantized_ops(quantized) == names
    fp32, int8 = accuracy(model), accuracy(quantized)
    assert relative_loss(fp32, int8) <= 0.01, (fp32, int8)


def test_excluded_conv_runs_fp32(cnn: torch.nn.Module) -> None:
    config = inc.QuantConfig(exclude=inc.LayerFilter(names=("conv2",)))
    quantized = inc.quantize(cnn, config, dataset=calib_data(), backend="ipex")
    assert sorted(_int8_kernels(quantized)) == ["_convolution", "linear", "linear"]
    assert _fp32_kernels(quantized) == ["ipex_prepack::convolution_relu_run"]
    assert inc_torch.quantized_ops(quantized) == ["conv1", "fc1", "fc2"]


@pytest.mark.parametrize("method", ["minmax", "kl", "percentile", "mse"])
def test_trial_scales_come_from_inc_core(cnn: torch.nn.Module, method: str) -> None:
    backend = inc.get_backend("ipex")
    calibration = backend.calibrate(cnn, calib_data(), inc.QuantConfig())
    config = inc.QuantConfig(calibration=method, scheme="sym")
    summary = backend._trial_summary(config, calibration, inc.describe(cnn, backend="ipex").ops)
    first = summary[" "]["q_op_infos"]["0"]
    assert first["fqn"] == "conv1"
    x = split()[0]
    histogram = HistogramObserver(2048)
    for start in range(0, 100, 32):
        histogram.update(x[start : min(start + 32, 100)])
    lo, hi = histogram.range(method, dtype="uint8", scheme="sym")
    expected = compute_qparams(lo, hi, dtype="uint8", scheme="sym")
    assert first["input_tensor_infos"][0]["scale"] == [pytest.approx(float(expected.scale), rel=1e-6)]
    assert first["input_tensor_infos"][0]["zero_point"] == [128]


def test_autotune_calibrates_once(cnn: torch.nn.Module) -> None:
    from inc_core.tuning import autotune

    backend = inc.get_backend("ipex")
    calls = {"n": 0}
    original = backend.calibrate

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return original(*args, **kwargs)

    backend.calibrate = counting  # type: ignore[method-assign]
    try:
        tuning = inc.TuningConfig(base=inc.QuantConfig(calib_samples=64), max_trials=3, keep_searching=True)
        result = autotune(cnn, tuning, eval_fn=accuracy, dataset=calib_data(64), backend="ipex")
    finally:
        del backend.calibrate
    assert calls["n"] == 1 and len(result.trials) >= 2
    assert result.met


def test_dynamic_int8() -> None:
    model = trained_mlp()
    quantized = inc.quantize(model, inc.QuantConfig(approach="dynamic"), backend="ipex")
    assert inc_torch.quantized_ops(quantized) == ["fc1", "fc2", "fc3"]
    assert relative_loss(accuracy(model), accuracy(quantized)) <= 0.01


def test_save_load_round_trip(cnn: torch.nn.Module, tmp_path: Path) -> None:
    quantized = inc.quantize(cnn, inc.QuantConfig(calib_samples=32), dataset=calib_data(32), backend="ipex")
    path = inc.save(quantized, tmp_path / "digits.pt", backend="ipex")
    loaded = inc.load(path)
    with torch.no_grad():
        for _ in range(2):  # fusion passes run on the first calls
            loaded(_batch())
        np.testing.assert_allclose(loaded(_batch()).numpy(), quantized(_batch()).numpy(), atol=1e-5)
    assert sorted(_int8_kernels(loaded)) == ["_convolution", "_convolution", "linear", "linear"]


def test_ipex_rejects_the_pt2e_format(cnn: torch.nn.Module) -> None:
    with pytest.raises(inc.errors.ConfigError, match="torchscript"):
        inc.quantize(cnn, inc.QuantConfig(format="pt2e"), dataset=calib_data(8), backend="ipex")


def test_dynamic_activation_range_is_a_backend_setting(tmp_path: Path) -> None:
    from inc_torch.ptq._dynamic import activation_range

    backend = inc_torch.IpexBackend(dynamic_activations="reduce_range")
    quantized = inc.quantize(trained_mlp(), inc.QuantConfig(approach="dynamic"), backend=backend)
    assert activation_range(quantized) == "reduce_range"
    loaded = inc.load(inc.save(quantized, tmp_path / "mlp.pt", backend=backend))
    assert activation_range(loaded) == "reduce_range"
    with pytest.raises(inc.errors.ConfigError, match="dynamic_activations"):
        inc_torch.IpexBackend(dynamic_activations="8bit")


def test_an_ipex_failure_is_an_inc_error(cnn: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    import intel_extension_for_pytorch as ipex

    def failing_convert(model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
        raise RuntimeError("oneDNN has no INT8 kernel for this pattern")

    monkeypatch.setattr(ipex.quantization, "convert", failing_convert)
    before = state(cnn)
    with pytest.raises(inc.errors.UnsupportedModelError, match=r"IPEX quantization.*RuntimeError: oneDNN has no INT8 kernel") as info:
        inc.quantize(cnn, inc.QuantConfig(calib_samples=16), dataset=calib_data(16), backend="ipex")
    assert isinstance(info.value.__cause__, RuntimeError)
    assert same_state(state(cnn), before)


def _signal(shape: tuple[int, ...]) -> inc.Dataset:
    return inc.Dataset(np.random.default_rng(0).normal(size=shape).astype(np.float32), batch_size=2)


def test_conv1d_layers_ipex_leaves_in_float_are_named(caplog: pytest.LogCaptureFixture) -> None:
    # IPEX 2.8 runs Conv1d in FP32 whatever its qconfig; inc lists what IPEX quantizes, and says what it leaves.
    torch.manual_seed(0)
    audio = torch.nn.Sequential(torch.nn.Conv1d(8, 16, 7, padding=3), torch.nn.ReLU(), torch.nn.Conv1d(16, 4, 3, padding=1))
    with pytest.raises(inc.errors.UnsupportedModelError, match=r"no op that IPEX static quantization can quantize.*also quantizes Conv1d"):
        inc.quantize(audio.eval(), inc.QuantConfig(), dataset=_signal((4, 8, 16)), backend="ipex")
    head = torch.nn.Sequential(audio, torch.nn.Flatten(), torch.nn.Linear(64, 3)).eval()
    assert inc.describe(head, backend="ipex").names == ("2",)
    with caplog.at_level("WARNING", logger="inc"):
        quantized = inc.quantize(head, inc.QuantConfig(), dataset=_signal((4, 8, 16)), backend="ipex")
    assert inc_torch.quantized_ops(quantized) == ["2"]
    assert (
        "backend='ipex' leaves 2 Conv1d layer(s) in FP32: 0.0, 0.2. They become INT8 with the torch backend "
        "(backend=None, format='pt2e')."
    ) in caplog.text


def test_a_model_ipex_quantizes_nothing_of_is_an_error(cnn: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    # Whatever IPEX's graph holds, a returned model without INT8 ops is an error (here IPEX is made to skip them all).
    from inc_torch.ptq import _ipex

    monkeypatch.setattr(_ipex, "name_int8_ops", lambda traced: None)  # no INT8 op found by name
    with pytest.raises(inc.errors.UnsupportedModelError, match=r"IPEX quantized none of the layers inc listed \(conv1, conv2, fc1, fc2\)"):
        inc.quantize(cnn, inc.QuantConfig(calib_samples=16), dataset=calib_data(16), backend="ipex")


class EncoderClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(16, 32)
        self.enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)
        self.out = torch.nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.enc(self.inp(x)).mean(1))


def test_listed_layers_ipex_runs_in_float_are_named(caplog: pytest.LogCaptureFixture) -> None:
    # IPEX's trace turns each nn.TransformerEncoderLayer into torch's fused encoder op: its Linears stay float.
    torch.manual_seed(0)
    model = EncoderClassifier().eval()
    with caplog.at_level("WARNING", logger="inc"):
        quantized = inc.quantize(model, inc.QuantConfig(), dataset=_signal((8, 10, 16)), backend="ipex")
    assert inc_torch.quantized_ops(quantized) == ["inp", "out"]
    assert (
        "IPEX left 4 of the 6 layers inc listed in FP32 (its traced graph runs them in float): enc.layers.0.linear1, "
        "enc.layers.0.linear2, enc.layers.1.linear1, enc.layers.1.linear2." in caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="inc"):
        inc.quantize(model, inc.QuantConfig(exclude=inc.LayerFilter(patterns=(r"enc\..*",))), dataset=_signal((8, 10, 16)), backend="ipex")
    assert "IPEX left" not in caplog.text  # what the user excluded is not reported


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_model_not_in_float32_is_refused_before_ipex_calibrates_it(dtype: torch.dtype) -> None:
    """IPEX static calibration ran before the backend's precision check and failed in IPEX's TorchScript trace
    ("The following operation failed in the TorchScript interpreter") with advice that cannot help (another backend,
    excluding an op); the refusal now comes first, with model.float() as the way, and the user's model is untouched."""
    model = trained_cnn().to(dtype)
    before = state(model)
    name = str(dtype).replace("torch.", "")
    with pytest.raises(inc.errors.UnsupportedModelError, match=rf"holds {name} parameters.*Pass model\.float\(\)"):
        inc.quantize(model, inc.QuantConfig(), dataset=calib_data(32, 16), backend="ipex")
    assert same_state(state(model), before)


class _PooledHead(torch.nn.Module):
    """conv -> ReLU -> global average pool -> flatten -> linear: the end of every ResNet, on the digits images."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 16, 3)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def test_a_pooled_output_keeps_its_inputs_quantization_as_ipex_computes_it() -> None:
    """IPEX's int8 pool and flatten pass their input's quantization through. Giving the pooled output a range of
    its own (far narrower than the ReLU's) had the linear read data of one scale as another: cosine to FP32 0.889
    on this head (a ResNet-shaped net 0.984), where IPEX's own recipe gives 0.9999."""
    model = _PooledHead().eval()
    calib = calib_data()
    backend = inc.get_backend("ipex")
    calibration = backend.calibrate(model, calib, inc.QuantConfig())
    summary = backend._trial_summary(inc.QuantConfig(), calibration, inc.describe(model, backend="ipex").ops)
    infos = summary[" "]["q_op_infos"]
    by_type = {str(info["op_type"]).rsplit(".", 1)[-1].strip("'>"): info for info in infos.values()}
    pool_in = by_type["AdaptiveAvgPool2d"]["input_tensor_infos"][0]
    linear_in = by_type["Linear"]["input_tensor_infos"][0]
    assert linear_in["scale"] == pool_in["scale"] and linear_in["zero_point"] == pool_in["zero_point"]
    quantized = inc.quantize(model, inc.QuantConfig(), dataset=calib, backend="ipex")
    x = torch.from_numpy(split()[2][:200])
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(quantized(x), model(x)).mean()
    assert float(cosine) > 0.995


def test_a_torch_export_program_is_refused_naming_the_pt2e_path_and_quantized_there() -> None:
    """IPEX prepares an nn.Module; the program the user exported quantizes on the torch backend's PT2E path."""
    _, _, x, _ = split()
    program = torch.export.export(trained_cnn(), (torch.from_numpy(x[:4]),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    with pytest.raises(inc.errors.UnsupportedModelError, match=r"program; backend='ipex' prepares .*static PT2E path"):
        inc.quantize(program, inc.QuantConfig(), dataset=calib_data(), backend="ipex")
    assert inc_torch.quantized_ops(inc.quantize(program, inc.QuantConfig(), dataset=calib_data())) == ["conv1", "conv2", "fc1", "fc2"]
