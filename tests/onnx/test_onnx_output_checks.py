"""What inc checks before it returns an INT8 model, and what it reports about it.

- Exporters share one zero bias initializer between several ops (torch.onnx on ConvNeXt-style
  blocks; ORT's own constant sharing does the same). ORT's QOperator quantizer then fed the int32
  bias it made for the first Gemm into a QLinearAdd, a model ORT refuses to load.
- Whatever the cause, a model ORT refuses or cannot run is never returned: it is an IncError naming
  the node.
- An exception from inside ORT's quantizer is an IncError naming the op it was working on.
- Dynamic ``describe`` lists exactly the ops that end up in integer kernels, and the result's count of
  INT8 ops is read from the output graph.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnx_testmodels as models
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import inc_core as inc
import inc_onnx._preprocess as preprocess
from inc_core.cli import main
from inc_core.errors import ConfigError, IncError, UnsupportedModelError
from inc_core.testing import cosine

N = 16


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], batch: int | str = "batch") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, N])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, N])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="inc-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _weights(seed: int) -> list[onnx.TensorProto]:
    rng = np.random.default_rng(seed)
    return [
        numpy_helper.from_array((rng.normal(0, 1, (N, N)) / np.sqrt(N)).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.normal(0, 1, (N, N)) / np.sqrt(N)).astype(np.float32), "w2"),
    ]


def shared_zero_bias(seed: int = 0) -> onnx.ModelProto:
    """Two Linear layers and a residual-style Add, all reading one zero bias tensor, as exporters write it."""
    inits = [*_weights(seed), numpy_helper.from_array(np.zeros(N, np.float32), "zero_bias")]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "zero_bias"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "zero_bias"], ["h2"], name="fc2"),
        helper.make_node("Add", ["h2", "zero_bias"], ["y"], name="add"),
    ]
    return _model(nodes, inits)


def _data(seed: int = 1, batches: int = 8) -> inc.Dataset:
    rng = np.random.default_rng(seed)
    return inc.Dataset([rng.normal(0, 1, (8, N)).astype(np.float32) for _ in range(batches)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _quantized_with_fidelity(model: onnx.ModelProto, fmt: str) -> tuple[onnx.ModelProto, float]:
    """The static INT8 model of ``model`` and its output cosine against FP32 on held-out rows (ORT loads both)."""
    quantized = inc.quantize(model, inc.QuantConfig(format=fmt), dataset=_data())
    x = np.random.default_rng(5).normal(0, 1, (64, N)).astype(np.float32)
    return quantized, _cosine(_run(model, x), _run(quantized, x))


@pytest.mark.parametrize("fmt", ["qoperator", "qdq"])
def test_shared_zero_bias_gives_a_model_ort_loads_with_fidelity(fmt: str) -> None:
    model = shared_zero_bias()
    # Loads (the check that failed with INVALID_GRAPH ... tensor(int32) ... QLinearAdd) and tracks FP32.
    quantized, fidelity = _quantized_with_fidelity(model, fmt)
    assert fidelity > 0.99
    counts = inc.get_backend("onnx").int8_op_counts(quantized)
    assert counts.get("QGemm") == 2, counts
    # The user's model still shares its bias: only the prepared copy was changed.
    assert [n.input[2] for n in model.graph.node if n.op_type == "Gemm"] == ["zero_bias", "zero_bias"]


def shared_pad_value(seed: int = 0, value: float = 0.0) -> onnx.ModelProto:
    """Two Linear layers, each output padded by a Pad reading one shared constant value (timm's EfficientViT)."""
    inits = [
        *_weights(seed),
        numpy_helper.from_array(np.array([0, 2, 0, 2], np.int64), "pads"),
        numpy_helper.from_array(np.array(value, np.float32), "pad_value"),
        numpy_helper.from_array(np.array([1], np.int64), "starts"),  # one padded column kept: the value matters
        numpy_helper.from_array(np.array([N + 1], np.int64), "ends"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Pad", ["h", "pads", "pad_value"], ["hp"], name="pad1"),
        helper.make_node("Slice", ["hp", "starts", "ends", "axes"], ["hs"], name="crop1"),
        helper.make_node("Gemm", ["hs", "w2"], ["h2"], name="fc2"),
        helper.make_node("Pad", ["h2", "pads", "pad_value"], ["h2p"], name="pad2"),
        helper.make_node("Slice", ["h2p", "starts", "ends", "axes"], ["y"], name="crop2"),
    ]
    return _model(nodes, inits)


@pytest.mark.parametrize("fmt", ["qoperator", "qdq"])
def test_a_pad_value_shared_by_several_pads_quantizes(fmt: str) -> None:
    # ORT's QOperator quantizer replaced the shared value by the first Pad's quantized copy, then failed on the
    # second: "Invalid model with unknown initializers/tensors.{'pad_value'}" (an IncError, no model)
    model = shared_pad_value()
    quantized, fidelity = _quantized_with_fidelity(model, fmt)
    assert fidelity > 0.99
    assert inc.get_backend("onnx").int8_op_counts(quantized).get("QGemm") == 2
    # the user's model still shares its pad value: only the prepared copy was changed
    assert [n.input[2] for n in model.graph.node if n.op_type == "Pad"] == ["pad_value", "pad_value"]


@pytest.mark.parametrize("fmt", ["qoperator", "qdq"])
def test_a_pad_value_outside_the_calibrated_range_is_kept(fmt: str) -> None:
    # an INT8 Pad writes its constant in its input's scale: 40.0, beyond a range that ends near 3, was clamped
    # to it (QOperator cosine 0.848)
    assert _quantized_with_fidelity(shared_pad_value(seed=3, value=40.0), fmt)[1] > 0.99


def test_a_model_ort_refuses_is_an_error_naming_the_node(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the repair, ORT's QOperator quantizer writes the broken model; the output check must catch it.
    monkeypatch.setattr(preprocess, "unshare_biases", lambda model: 0)
    model = shared_zero_bias(seed=11)  # weights of its own: not in the preparation cache
    with pytest.raises(UnsupportedModelError) as info:
        inc.quantize(model, inc.QuantConfig(format="qoperator"), dataset=_data())
    message = str(info.value)
    assert "does not load" in message
    assert "'add_quant' (QLinearAdd)" in message
    assert "exclude=inc.LayerFilter(names=('add',))" in message


def test_excluding_the_named_op_is_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preprocess, "unshare_biases", lambda model: 0)
    model = shared_zero_bias(seed=12)
    config = inc.QuantConfig(format="qoperator", exclude=inc.LayerFilter(names=("add",)))
    quantized = inc.quantize(model, config, dataset=_data())
    x = np.random.default_rng(5).normal(0, 1, (32, N)).astype(np.float32)
    assert _cosine(_run(model, x), _run(quantized, x)) > 0.99


def test_an_exception_inside_orts_quantizer_names_the_op() -> None:
    # A full [batch, N] Gemm bias: ORT's QOperator int32-bias check indexes it per output channel and
    # raises numpy's "truth value of an array is ambiguous" ValueError.
    rng = np.random.default_rng(3)
    inits = [*_weights(3), numpy_helper.from_array(rng.normal(0, 0.1, (4, N)).astype(np.float32), "full_bias")]
    model = _model([helper.make_node("Gemm", ["x", "w1", "full_bias"], ["y"], name="fc")], inits, batch=4)
    data = inc.Dataset([rng.normal(0, 1, (4, N)).astype(np.float32) for _ in range(4)])
    with pytest.raises(UnsupportedModelError) as info:
        inc.quantize(model, inc.QuantConfig(format="qoperator"), dataset=data)
    message = str(info.value)
    assert "failed on op 'fc' (Gemm)" in message
    assert "ValueError" in message
    assert "exclude=inc.LayerFilter(names=('fc',))" in message and "format='qdq'" in message
    assert isinstance(info.value.__cause__, ValueError)
    # QDQ has an ORT option for this check; with it the same model quantizes.
    quantized = inc.quantize(model, inc.QuantConfig(format="qdq"), dataset=data)
    assert inc.get_backend("onnx").int8_op_counts(quantized) == {"QGemm": 1}


def test_excluding_every_op_is_a_config_error() -> None:
    model = shared_zero_bias()
    ops = inc.describe(model).ops
    with pytest.raises(ConfigError, match="keeps every one"):
        inc.quantize(model, inc.QuantConfig(exclude=inc.LayerFilter(names=tuple(op.name for op in ops))), dataset=_data())


def test_dynamic_describe_lists_exactly_the_ops_that_become_integer_kernels() -> None:
    model = models.attention_block()
    config = inc.QuantConfig(approach="dynamic")
    described = {op.name for op in inc.describe(model, config).ops}
    # Activation x activation products (scores, context) stay in float, so they are not listed.
    assert described == {"embed", "query", "key", "value", "output"}
    quantized = inc.quantize(model, config)
    counts = inc.get_backend("onnx").int8_op_counts(quantized)
    assert sum(counts.values()) == len(described), counts
    integer_nodes = {n.name for n in quantized.graph.node if n.op_type == "MatMulInteger"}
    assert integer_nodes == {f"{name}_quant" for name in ("query", "key", "value", "output")}
    ids = np.random.default_rng(2).integers(0, 50, (2, 7))
    session_fp32 = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    session_int8 = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    out_fp32, out_int8 = session_fp32.run(None, {"ids": ids})[0], session_int8.run(None, {"ids": ids})[0]
    assert _cosine(out_fp32, out_int8) > 0.98


def test_no_builtin_error_escapes_for_a_model_ort_cannot_run_after_quantization() -> None:
    # Every failure on these paths is an IncError (and still the builtin a caller may catch).
    model = shared_zero_bias()
    with pytest.raises(IncError):
        inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset([np.zeros((2, N + 1), np.float32)]))


def test_cli_reports_the_int8_ops_of_the_written_model_for_dynamic_attention(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = tmp_path / "attention.onnx", tmp_path / "attention.int8.onnx"
    onnx.save_model(models.attention_block(), str(source))
    assert main(["quantize", str(source), "-o", str(out), "--approach", "dynamic"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "ops:" in line)
    # Before, every MatMul and the Transpose counted as quantized, though scores and context stay in float.
    match = re.search(r"(\d+) INT8 ops in the output model \((.*)\); (\d+) of (\d+) quantizable ops selected", line)
    assert match, line
    assert int(match.group(1)) == int(match.group(3)) == int(match.group(4)) == 5, line
    counts = inc.get_backend("onnx").int8_op_counts(onnx.load_model(str(out)))
    assert sum(counts.values()) == 5 and counts.get("Gather") == 1, counts


def test_benchmark_inputs_ort_cannot_run_are_a_dataset_error() -> None:
    from inc_core.errors import DatasetError

    # The right rank and dtype, so the feed checks pass; the Gemm cannot take 3 columns against 16 rows.
    model = _model([helper.make_node("Gemm", ["x", "w1"], ["y"], name="fc")], _weights(4))
    model.graph.input[0].type.tensor_type.shape.dim[1].ClearField("dim_value")
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "features"
    with pytest.raises(DatasetError, match="could not run the model"):
        inc.benchmark(model, np.zeros((2, 3), np.float32), warmup=1, iterations=1)


def test_static_model_left_without_int8_ops_gets_static_advice() -> None:
    # Embedding lookup, bias Add and LayerNorm: ORT's static quantizer leaves them in float when no INT8 kernel
    # reads them; the message must speak of the static path, not send a static user to approach='static'.
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 1, (50, N)).astype(np.float32), "table"),
        numpy_helper.from_array(rng.normal(0, 1, (N,)).astype(np.float32), "bias"),
        numpy_helper.from_array(np.ones(N, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(N, np.float32), "beta"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        helper.make_node("Add", ["e", "bias"], ["h"], name="add_bias"),
        helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["y"], name="norm", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "embeddings", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", N])], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="inc-tests")
    model.ir_version = 8
    batches = [{"ids": rng.integers(0, 50, (2, 8))} for _ in range(4)]
    with pytest.raises(UnsupportedModelError, match=r"static qdq: .*\(embed, add_bias, norm\).*inc\.describe") as caught:
        inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset(batches))
    assert "try approach='static'" not in str(caught.value)


def _fc1_fc2(middle: list[onnx.NodeProto], outputs: tuple[str, ...], opsets: dict[str, int]) -> onnx.ModelProto:
    """pixels -> fc1 (MatMul, writes "h") -> ``middle`` (reads "h", writes "g") -> fc2 (MatMul, writes "y")."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.normal(0, 1, (16, 32)) / 4).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.normal(0, 1, (32, 8)) / 6).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["pixels", "w1"], ["h"], name="fc1"),
        *middle,
        helper.make_node("MatMul", ["g" if middle else "h", "w2"], ["y"], name="fc2"),
    ]
    widths = {"h": 32, "y": 8}
    graph = helper.make_graph(
        nodes, "fc1_fc2",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", widths[name]]) for name in outputs],
        initializer=inits,
    )
    opset_imports = [helper.make_opsetid(domain, version) for domain, version in opsets.items()]
    model = helper.make_model(graph, opset_imports=opset_imports, producer_name="inc-tests")
    model.ir_version = 8
    return model


def test_ops_after_a_node_of_another_domain_are_quantized_statically() -> None:
    # What a com.microsoft (or ai.onnx.ml) node computes from signal is signal: fc2 once counted as mask arithmetic
    # the com.microsoft Gelu as ORT's transformer optimizer writes it
    gelu = helper.make_node("Gelu", ["h"], ["g"], name="gelu", domain="com.microsoft")
    model = _fc1_fc2([gelu], ("y",), {"": 17, "com.microsoft": 1})
    assert [op.name for op in inc.describe(model, inc.QuantConfig()).ops] == ["fc1", "fc2"]
    x = np.random.default_rng(1).normal(0, 1, (64, 16)).astype(np.float32)
    quantized = inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset({"pixels": x}, batch_size=16))
    consumers = {i for n in quantized.graph.node if n.op_type == "MatMul" for i in n.input}
    weights = {n.output[0]: n.input[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    quantized_weights = {weights[name] for name in consumers if name in weights}
    assert {"w1", "w2"} <= {name.removesuffix("_quantized") for name in quantized_weights}, quantized_weights
    assert cosine(models.run(model, x), models.run(quantized, x)) >= 0.99


def test_an_output_that_an_int8_op_also_reads_stays_float() -> None:
    # ORT's QDQ quantizer made the graph output the DequantizeLinear of the pair fc2 reads: the user got
    # h rounded to 8 bits (all-MiniLM-L6-v2 exported with its pooler: token cosine 0.83 instead of 0.99).
    # h = fc1(pixels) is an output and fc2's input (a BERT export's last hidden states and its pooler)
    model = _fc1_fc2([], ("h", "y"), {"": 17})
    x = np.random.default_rng(3).normal(0, 1, (64, 16)).astype(np.float32)
    quantized = inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset({"pixels": x}, batch_size=16))
    producers = {out: node for node in quantized.graph.node for out in node.output}
    assert producers["h"].op_type == "MatMul" and producers["y"].op_type == "MatMul"
    # fc2 runs in INT8; fc1 in float: ORT has no INT8 kernel that writes both the float output and the 8-bit
    # copy fc2 reads, so fc1 reads the float input and a float weight, not a DequantizeLinear run per call
    assert inc.get_backend("onnx").int8_op_counts(quantized) == {"MatMulIntegerToFloat": 1}
    assert producers["h"].input[0] == "pixels"
    assert producers["h"].input[1] in {init.name for init in quantized.graph.initializer}
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    fp32 = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"pixels": x})
    int8 = session.run(None, {"pixels": x})
    for want, got in zip(fp32, int8, strict=True):
        assert cosine(want, got) >= 0.999


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_a_static_shape_encoder_quantizes_to_a_model_ort_loads(fmt: str) -> None:
    # Preparation runs ORT's optimizer: it fuses the feed-forward MatMul + Add into a Gemm between two Reshapes
    # and names the Reshape's shape initializer "gemm_input_shape" (ORT makes that name unique among node names
    # only). Loading the quantized model, ORT fuses the output projection with its float bias Add (its attention
    # rule kept it apart before quantization) and generated the same name again: "Attempt to replace the
    # existing tensor". DistilBERT and DeBERTa-v2 exported by torch.onnx's dynamo exporter with fixed shapes hit it.
    model = models.static_encoder_block()
    x = np.random.default_rng(4).normal(0, 1, (16, 2, 8, 16)).astype(np.float32)
    data = inc.Dataset([{"x": batch} for batch in x])
    # the output projection's bias Add in float (as ORT's QDQ quantizer leaves it on DistilBERT) is the pair
    # the load-time fusion takes
    quantized = inc.quantize(model, inc.QuantConfig(format=fmt, exclude=inc.LayerFilter(names=("o_bias",))), dataset=data)
    shapes = [init.name for init in quantized.graph.initializer if init.name.startswith(("gemm_input_shape", "gemm_output_shape"))]
    assert shapes == ["gemm_input_shape/prepared", "gemm_output_shape/prepared"], shapes
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    fp32 = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert cosine(fp32.run(None, {"x": x[0]})[0], session.run(None, {"x": x[0]})[0]) >= 0.99
    assert sum(inc.get_backend("onnx").int8_op_counts(quantized).values()) >= 4
