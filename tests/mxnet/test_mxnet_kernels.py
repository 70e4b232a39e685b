"""The INT8 graph MXNet builds: oneDNN-fused quantized kernels, thresholds from inc's observers, fallbacks."""

from __future__ import annotations

import json
from pathlib import Path

import mxnet as mx
import mxnet_testmodels as models
import numpy as np
import pytest
from conftest import graph_nodes
from mxnet import gluon
from mxnet.gluon import nn

import inc_core as inc
from inc_core.calibration import HistogramObserver
from inc_mxnet import MxnetBackend, mxnet_dtype


def _exported_nodes(path: Path) -> list[dict]:
    (symbol_file,) = path.glob("*-symbol.json")
    return [n for n in json.loads(symbol_file.read_text())["nodes"] if n["op"] != "null"]


def _by_op(nodes: list[dict], op: str) -> list[dict]:
    return [n for n in nodes if n["op"] == op]


def test_exported_symbol_has_fused_int8_conv_fc_and_quantize(cnn: gluon.HybridBlock, calib: inc.Dataset, tmp_path: Path) -> None:
    quantized = inc.quantize(cnn, inc.QuantConfig(calib_samples=64), dataset=calib)
    target = inc.save(quantized, tmp_path / "cnn.mxnet")
    nodes = _exported_nodes(target)
    convs = _by_op(nodes, "_sg_mkldnn_conv")
    assert len(convs) == 2 and all(n["attrs"]["quantized"] == "true" for n in convs)
    # conv + batch norm + relu run as one fused INT8 kernel with its output range baked in
    inner = {m["op"] for m in json.loads(json.dumps(convs[0]["subgraphs"]))[0]["nodes"]}
    assert {"Convolution", "BatchNorm", "Activation"} <= inner
    assert all(float(n["attrs"]["max_calib_range"]) > 0 for n in convs)
    fcs = _by_op(nodes, "_sg_mkldnn_fully_connected")
    assert len(fcs) == 2 and all(n["attrs"]["quantized"].lower() == "true" for n in fcs)
    (quantize,) = _by_op(nodes, "_contrib_quantize_v2")
    assert float(quantize["attrs"]["max_calib_range"]) == pytest.approx(1.0, abs=1e-4)  # digits pixels in [0, 1]
    assert _by_op(nodes, "_contrib_quantized_pooling") and _by_op(nodes, "_contrib_quantized_flatten")
    assert not _by_op(nodes, "Convolution") and not _by_op(nodes, "FullyConnected")


def test_residual_sum_is_fused_into_the_int8_conv(digits: tuple[np.ndarray, ...]) -> None:
    quantized = inc.quantize(models.resnet_block_net(), inc.QuantConfig(calib_samples=64), dataset=inc.Dataset(digits[0][:64], batch_size=32))
    sums = [n for n in graph_nodes(quantized) if n["op"] == "_sg_mkldnn_conv" and "add" in n["name"]]
    assert len(sums) == 1 and sums[0]["attrs"]["quantized"] == "true"
    assert not [n for n in graph_nodes(quantized) if n["op"] in ("elemwise_add", "_Plus", "broadcast_add")]


def test_thresholds_are_the_core_observers_ranges(cnn: gluon.HybridBlock, calib: inc.Dataset) -> None:
    backend = MxnetBackend()
    config = inc.QuantConfig(calibration="percentile", percentile=99.9, calib_samples=128)
    calibration = backend.calibrate(cnn, calib, config)
    quantized = backend.quantize(cnn, config, calibration=calibration)
    # The first conv's output is calibrated from a core HistogramObserver fed with the same activations.
    (conv0,) = [n for n in graph_nodes(quantized) if n["op"] == "_sg_mkldnn_conv" and n["name"].endswith("_0")]
    tensor = conv0["name"][len("quantized_"):] + "_output"
    expected = calibration.observers[tensor].range("percentile", percentile=99.9, dtype="uint8", scheme="asym")
    assert float(conv0["attrs"]["max_calib_range"]) == pytest.approx(expected[1], rel=1e-4)
    reference = HistogramObserver(name=tensor)
    reference.merge(calibration.observers[tensor])
    minmax = reference.range("minmax")
    assert expected[1] < minmax[1]  # percentile clips the tail that min/max keeps


def test_calibration_runs_the_model_once_for_every_method(cnn: gluon.HybridBlock, calib: inc.Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    import inc_mxnet._collect as collect

    runs = {"n": 0}
    original = collect._run

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        runs["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(collect, "_run", counting)
    backend = MxnetBackend()
    calibration = backend.calibrate(cnn, calib, inc.QuantConfig(calib_samples=128))
    assert runs["n"] == 4  # 128 samples in batches of 32
    x_test, y_test = models.digits()[1], models.digits()[3]
    for method in ("minmax", "kl", "percentile", "mse"):
        quantized = backend.quantize(cnn, inc.QuantConfig(calibration=method), calibration=calibration)
        assert models.accuracy(quantized, x_test, y_test) >= 0.95
    assert runs["n"] == 4


@pytest.mark.parametrize(("activation_dtype", "scheme", "expected"), [("uint8", "asym", "auto"), ("uint8", "sym", "uint8"), ("int8", "sym", "int8")])
def test_activation_types(cnn: gluon.HybridBlock, calib: inc.Dataset, activation_dtype: str, scheme: str, expected: str) -> None:
    config = inc.QuantConfig(activation_dtype=activation_dtype, scheme=scheme, calib_samples=64)
    assert mxnet_dtype(config) == expected
    quantized = inc.quantize(cnn, config, dataset=calib)
    (quantize,) = [n for n in graph_nodes(quantized) if n["op"] == "_contrib_quantize_v2"]
    assert quantize["attrs"]["out_type"] == expected
    # 'auto' picks uint8 for a tensor calibrated non-negative: the input pixels' range starts at 0.
    assert float(quantize["attrs"]["min_calib_range"]) >= 0.0
    x_test, y_test = models.digits()[1], models.digits()[3]
    assert models.accuracy(quantized, x_test, y_test) >= models.accuracy(cnn, x_test, y_test) - 0.02


def test_per_channel_weights_are_marked_channel_wise(cnn: gluon.HybridBlock, calib: inc.Dataset) -> None:
    per_channel = inc.quantize(cnn, inc.QuantConfig(granularity="per_channel", calib_samples=32), dataset=calib)
    per_tensor = inc.quantize(cnn, inc.QuantConfig(granularity="per_tensor", calib_samples=32), dataset=calib)
    fc = [n for n in graph_nodes(per_channel) if n["op"] == "_sg_mkldnn_fully_connected"]
    assert fc and all(n["attrs"].get("channel_wise_quantize", "").lower() == "true" for n in fc)
    assert not [n for n in graph_nodes(per_tensor) if n.get("attrs", {}).get("channel_wise_quantize", "").lower() == "true"]


def test_excluded_layers_fall_back_to_fp32(cnn: gluon.HybridBlock, calib: inc.Dataset) -> None:
    names = [op.name for op in inc.describe(cnn).ops]
    assert names[0] == "cnn_conv0_fwd" and "cnn_dense1_fwd" in names
    config = inc.QuantConfig(exclude=inc.LayerFilter(names=("cnn_conv0_fwd",), types=("FullyConnected",)), calib_samples=32)
    nodes = graph_nodes(inc.quantize(cnn, config, dataset=calib))
    convs = [n for n in nodes if n["op"] == "_sg_mkldnn_conv"]
    assert sorted(n.get("attrs", {}).get("quantized", "false") for n in convs) == ["false", "true"]
    assert all(n.get("attrs", {}).get("quantized", "false") == "false" for n in nodes if n["op"] == "_sg_mkldnn_fully_connected")
    assert any(n["op"] == "_contrib_dequantize" for n in nodes)


def test_per_layer_calibration_override(cnn: gluon.HybridBlock, calib: inc.Dataset) -> None:
    base = inc.QuantConfig(calib_samples=128)
    override = inc.QuantConfig(calib_samples=128, overrides={"cnn_conv1_fwd": {"calibration": "percentile"}}, percentile=99.0)
    backend = MxnetBackend()
    calibration = backend.calibrate(cnn, calib, base)

    def ranges(config: inc.QuantConfig) -> dict[str, float]:
        nodes = graph_nodes(backend.quantize(cnn, config, calibration=calibration))
        return {n["name"]: float(n["attrs"]["max_calib_range"]) for n in nodes if "max_calib_range" in n.get("attrs", {})}

    a, b = ranges(base), ranges(override)
    changed = [k for k in a if a[k] != b[k]]
    assert changed == ["quantized_sg_mkldnn_conv_act_1"] and b[changed[0]] < a[changed[0]]


def test_dynamic_quantization_computes_ranges_at_run_time(cnn: gluon.HybridBlock) -> None:
    quantized = inc.quantize(cnn, inc.QuantConfig(approach="dynamic"))
    nodes = graph_nodes(quantized)
    convs = [n for n in nodes if n["op"] == "_sg_mkldnn_conv"]
    assert convs and all(n["attrs"]["quantized"] == "true" and "max_calib_range" not in n["attrs"] for n in convs)
    x_test, y_test = models.digits()[1], models.digits()[3]
    assert models.accuracy(quantized, x_test, y_test) >= models.accuracy(cnn, x_test, y_test) - 0.02


def test_quantized_block_is_a_symbol_block_that_runs_any_batch_size(cnn: gluon.HybridBlock, calib: inc.Dataset) -> None:
    quantized = inc.quantize(cnn, inc.QuantConfig(calib_samples=32), dataset=calib)
    assert isinstance(quantized, gluon.SymbolBlock)
    x = models.digits()[1]
    for n in (1, 7, 64):
        assert quantized(mx.nd.array(x[:n])).shape == (n, 10)


class TwoInputs(gluon.HybridBlock):
    """Two inputs joined by a concat: inputs are named data0, data1 in hybrid_forward's order."""

    def __init__(self) -> None:
        super().__init__(prefix="two_")
        with self.name_scope():
            self.left = nn.Dense(16, activation="relu")
            self.right = nn.Dense(16, activation="relu")
            self.head = nn.Dense(4)

    def hybrid_forward(self, F, a, b):  # noqa: ANN001, ANN201, N803
        return self.head(F.concat(self.left(a), self.right(b), dim=1))


def test_block_with_two_inputs_takes_tuples_and_named_mappings() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(64, 8)).astype(np.float32), rng.normal(size=(64, 6)).astype(np.float32)
    net = TwoInputs()
    net.initialize(mx.init.Xavier())
    reference = net(mx.nd.array(a), mx.nd.array(b)).asnumpy()
    as_tuples = inc.Dataset([(a[i : i + 16], b[i : i + 16]) for i in range(0, 64, 16)])
    as_mapping = inc.Dataset({"data0": a, "data1": b}, batch_size=16)
    for data in (as_tuples, as_mapping):
        quantized = inc.quantize(net, inc.QuantConfig(calib_samples=64), dataset=data)
        fcs = [n for n in graph_nodes(quantized) if n["op"] == "_sg_mkldnn_fully_connected"]
        assert len(fcs) == 3 and all(n["attrs"]["quantized"].lower() == "true" for n in fcs)
        got = quantized(mx.nd.array(a), mx.nd.array(b)).asnumpy()
        cosine = float(np.sum(got * reference) / (np.linalg.norm(got) * np.linalg.norm(reference)))
        assert cosine > 0.99


def test_int8_op_counts_are_read_from_the_quantized_graph(cnn: gluon.HybridBlock, calib: inc.Dataset, tmp_path: Path) -> None:
    backend = inc.get_backend("mxnet")
    quantized = inc.quantize(cnn, inc.QuantConfig(calib_samples=64), dataset=calib)
    counts = backend.int8_op_counts(quantized)
    nodes = graph_nodes(quantized)
    assert counts["conv"] == len(_by_op(nodes, "_sg_mkldnn_conv")) == 2
    assert counts["fully_connected"] == 2 and counts["pooling"] >= 1 and counts["flatten"] == 1
    assert "quantize_v2" not in counts and "dequantize" not in counts  # conversions compute nothing
    assert backend.int8_op_counts(inc.load(inc.save(quantized, tmp_path / "cnn.mxnet"))) == counts
    excluded = inc.quantize(cnn, inc.QuantConfig(calib_samples=64, exclude=inc.LayerFilter(types=("FullyConnected",))), dataset=calib)
    assert "fully_connected" not in backend.int8_op_counts(excluded)
    assert backend.int8_op_counts(cnn) == {}  # the FP32 block


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_a_block_cast_from_float32_is_quantized_from_its_float32_values(dtype: str, digits: tuple[np.ndarray, ...]) -> None:
    """A block trained on a GPU and cast with ``net.cast('float16')`` cannot run on MXNet's CPU backend ("FP16 gemm on
    cpu not implemented"); calibration of it (or of a float64 block) failed with "This layer requires uniform type
    ... given 'float16'" read as a batch-shape error. Its parameters are copied as float32 (exactly from float16),
    and the INT8 block is the float32 one's."""
    x_train, x_test, _, _ = digits
    reference = models.cnn()
    half = models.cnn()
    half.cast(dtype)
    calib = inc.Dataset(x_train[:128], batch_size=32)
    before = {name: str(param.dtype) for name, param in half.collect_params().items()}

    from_half = inc.quantize(half, inc.QuantConfig(calib_samples=128), dataset=calib)
    from_float = inc.quantize(reference, inc.QuantConfig(calib_samples=128), dataset=calib)

    assert inc.resolve_backend(from_half).int8_op_counts(from_half).get("conv") == 2
    agreement = np.mean(models.predict(from_half, x_test).argmax(1) == models.predict(from_float, x_test).argmax(1))
    assert agreement >= 0.98, agreement
    assert {name: str(param.dtype) for name, param in half.collect_params().items()} == before  # the user's block
