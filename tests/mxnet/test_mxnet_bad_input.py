"""Bad input gives the documented IncError with the fix, and leaves nothing half-done behind."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import mxnet as mx
import mxnet_testmodels as models
import numpy as np
import pytest
from conftest import param_snapshot
from mxnet import gluon
from mxnet.gluon import nn

import inc_core as inc
from inc_core.errors import (
    CalibrationError,
    ConfigError,
    DatasetError,
    EvaluationError,
    ModelLoadError,
    SaveError,
    UnsupportedModelError,
)
from inc_core.tuning import autotune
from inc_mxnet import MxnetBackend


class ImperativeNet(gluon.Block):
    """A plain Block: forward() runs op by op and has no graph to quantize."""

    def __init__(self) -> None:
        super().__init__()
        with self.name_scope():
            self.fc = nn.Dense(10)

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.fc(x)


class NumpyInTheMiddle(gluon.HybridBlock):
    """A HybridBlock whose hybrid_forward needs concrete values, so it cannot be traced."""

    def __init__(self) -> None:
        super().__init__()
        with self.name_scope():
            self.fc = nn.Dense(10)

    def hybrid_forward(self, F, x):  # noqa: ANN001, ANN201, N803
        scale = float(x.asnumpy().max())
        return self.fc(x / scale)


def _trained_fc() -> nn.HybridSequential:
    net = nn.HybridSequential()
    net.add(nn.Dense(10))
    net.initialize()
    net(mx.nd.zeros((1, 64)))
    return net


def test_plain_block_is_unsupported_with_the_fix() -> None:
    net = ImperativeNet()
    net.initialize()
    with pytest.raises(UnsupportedModelError, match="HybridBlock"):
        inc.quantize(net, inc.QuantConfig(), dataset=inc.Dataset(np.zeros((4, 64), np.float32)))
    with pytest.raises(UnsupportedModelError, match="HybridBlock"):
        inc.describe(net)


def test_untraceable_hybrid_block_is_unsupported() -> None:
    net = NumpyInTheMiddle()
    net.initialize()
    with pytest.raises(UnsupportedModelError, match="could not trace") as info:
        inc.describe(net)
    assert "F.*" in str(info.value)


def test_uninitialized_parameters_say_how_to_fix() -> None:
    net = nn.HybridSequential()
    net.add(nn.Dense(10))
    net.initialize()  # shapes deferred until a first batch
    with pytest.raises(UnsupportedModelError, match="run it once on a batch"):
        inc.quantize(net, inc.QuantConfig(), dataset=inc.Dataset(np.zeros((4, 64), np.float32)))


def test_wrong_input_shape_names_the_shapes(cnn: gluon.HybridBlock) -> None:
    before = param_snapshot(cnn)
    with pytest.raises(DatasetError, match=r"\(4, 1, 5\)") as info:
        inc.quantize(cnn, inc.QuantConfig(), dataset=inc.Dataset(np.zeros((8, 1, 5), np.float32), batch_size=4))
    assert "calibration batch 0" in str(info.value)
    assert param_snapshot(cnn) == before


def test_wrong_number_of_inputs(cnn: gluon.HybridBlock) -> None:
    batch = (np.zeros((4, 1, 8, 8), np.float32), np.zeros((4, 1, 8, 8), np.float32))
    with pytest.raises(DatasetError, match="2 input array"):
        inc.quantize(cnn, inc.QuantConfig(), dataset=inc.Dataset([batch]))


def test_a_gluon_data_loader_of_inputs_and_labels_names_labels_true(cnn: gluon.HybridBlock, digits) -> None:
    x, y = digits[0][:64], digits[1][:64].astype(np.float32)
    loader = gluon.data.DataLoader(gluon.data.ArrayDataset(x, y), batch_size=16)
    with pytest.raises(DatasetError, match=re.escape("inc.Dataset(loader, labels=True)")):
        inc.quantize(cnn, inc.QuantConfig(), dataset=loader)
    quantized = inc.quantize(cnn, inc.QuantConfig(), dataset=inc.Dataset(loader, labels=True))
    assert quantized(mx.nd.array(x[:4])).shape == (4, 10)


def test_non_numeric_input_is_rejected(cnn: gluon.HybridBlock) -> None:
    with pytest.raises(DatasetError, match="numeric array"):
        inc.quantize(cnn, inc.QuantConfig(), dataset=inc.Dataset([np.array(["a", "b"])]))


def test_empty_data_is_rejected(cnn: gluon.HybridBlock) -> None:
    with pytest.raises(DatasetError, match="no samples"):
        inc.quantize(cnn, inc.QuantConfig(), dataset=inc.Dataset(np.zeros((0, 1, 8, 8), np.float32)))
    with pytest.raises(DatasetError):
        inc.quantize(cnn, inc.QuantConfig(), dataset=inc.Dataset(lambda: iter(())))


@pytest.mark.parametrize(("value", "kind"), [(np.nan, "NaN"), (np.inf, "Inf")])
def test_non_finite_activations_are_rejected(cnn: gluon.HybridBlock, value: float, kind: str) -> None:
    x = models.digits()[0][:8].copy()
    x[3, 0, 2, 2] = value
    with pytest.raises(CalibrationError, match=kind):
        inc.quantize(cnn, inc.QuantConfig(), dataset=inc.Dataset(x, batch_size=8))


def test_activation_that_overflows_to_inf_is_rejected() -> None:
    net = _trained_fc()
    huge = np.full((4, 64), 3e38, np.float32)  # finite input; the dense layer's sum overflows float32
    net[0].weight.set_data(mx.nd.ones((10, 64)))
    with pytest.raises(CalibrationError, match="Inf"):
        inc.quantize(net, inc.QuantConfig(), dataset=inc.Dataset(huge))


def test_unknown_layer_name_in_exclusions_suggests_close_names(cnn: gluon.HybridBlock, calib: inc.Dataset) -> None:
    with pytest.raises(ConfigError, match="cnn_conv0_fwd"):
        inc.quantize(cnn, inc.QuantConfig(exclude=inc.LayerFilter(names=("cnn_conv0_fw",))), dataset=calib)
    with pytest.raises(ConfigError, match="Convolution"):
        inc.quantize(cnn, inc.QuantConfig(exclude=inc.LayerFilter(types=("Conv2D",))), dataset=calib)


def test_per_layer_override_mxnet_cannot_apply(cnn: gluon.HybridBlock, calib: inc.Dataset) -> None:
    config = inc.QuantConfig(overrides={"cnn_conv0_fwd": {"activation_dtype": "int8"}})
    with pytest.raises(ConfigError, match="whole graph"):
        inc.quantize(cnn, config, dataset=calib)
    with pytest.raises(ConfigError, match="no layer"):
        inc.quantize(cnn, inc.QuantConfig(overrides={"conv9": {"calibration": "kl"}}), dataset=calib)


def test_calibration_of_another_model_is_rejected(cnn: gluon.HybridBlock, calib: inc.Dataset) -> None:
    backend = MxnetBackend()
    other = models.resnet_block_net()
    calibration = backend.calibrate(other, calib, inc.QuantConfig())
    with pytest.raises(CalibrationError, match="different block"):
        backend.quantize(cnn, inc.QuantConfig(), calibration=calibration)


def test_eval_fn_that_raises_stops_autotune(cnn: gluon.HybridBlock, calib: inc.Dataset) -> None:
    def eval_fn(model: gluon.Block) -> float:
        if isinstance(model, gluon.SymbolBlock):
            raise ValueError("labels misaligned")
        return 1.0

    with pytest.raises(EvaluationError, match="labels misaligned"):
        autotune(cnn, inc.TuningConfig(max_trials=2), eval_fn=eval_fn, dataset=calib)


def test_unwritable_output_path_writes_nothing(cnn: gluon.HybridBlock, calib: inc.Dataset, tmp_path: Path) -> None:
    quantized = inc.quantize(cnn, inc.QuantConfig(calib_samples=32), dataset=calib)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(SaveError, match="does not exist"):
        inc.save(quantized, blocker / "model.mxnet")
    with pytest.raises(SaveError, match=r"\*\.mxnet"):
        inc.save(quantized, tmp_path / "model.json", backend="mxnet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_write_failing_halfway_leaves_nothing(cnn: gluon.HybridBlock, calib: inc.Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    quantized = inc.quantize(cnn, inc.QuantConfig(calib_samples=32), dataset=calib)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mx.nd, "save", disk_full)  # the symbol JSON is written, then the params fail
    with pytest.raises(SaveError, match="No space left"):
        inc.save(quantized, tmp_path / "model.mxnet")
    assert list(tmp_path.iterdir()) == []  # neither the model nor a temporary is left


def test_loading_what_is_not_a_saved_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no file or directory"):
        inc.load(tmp_path / "missing.mxnet")
    empty = tmp_path / "empty.mxnet"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="symbol.json"):
        inc.load(empty)
    broken = tmp_path / "broken.mxnet"
    broken.mkdir()
    (broken / "broken-symbol.json").write_text("{not json")
    (broken / "broken-0000.params").write_bytes(b"\x00" * 16)
    with pytest.raises(ModelLoadError, match="could not read"):
        inc.load(broken)


def test_mxnet_quantizer_failure_is_wrapped_and_a_failed_trial(cnn: gluon.HybridBlock, calib: inc.Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    from mxnet.contrib import quantization

    original = quantization.quantize_graph

    def fails_unless_conv1_is_fp32(*args: object, **kwargs: object) -> object:
        if "cnn_conv1_fwd" not in kwargs["excluded_sym_names"]:  # as MXNet does on an op it cannot quantize
            raise mx.base.MXNetError("Check failed: unsupported op in quantization pass")
        return original(*args, **kwargs)

    monkeypatch.setattr(quantization, "quantize_graph", fails_unless_conv1_is_fp32)
    with pytest.raises(UnsupportedModelError, match="unsupported op in quantization pass") as info:
        inc.quantize(cnn, inc.QuantConfig(), dataset=calib)
    assert "exclude=" in str(info.value)
    # In tuning the same failure is a failed trial; the search goes on and falls back the layer.
    x_test, y_test = models.digits()[1], models.digits()[3]
    result = autotune(
        cnn, inc.TuningConfig(strategy="basic", tolerable_loss=0.01, max_trials=30),
        eval_fn=lambda m: models.accuracy(m, x_test, y_test), dataset=calib,
    )
    assert result.trials[0].status != "evaluated" and "unsupported op" in (result.trials[0].error or "")
    assert result.met and "cnn_conv1_fwd" in result.config.exclude.names
