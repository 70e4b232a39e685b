"""Files, benchmarks and the command line: MXNet's own export format, read back without inc."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import mxnet_testmodels as models
import numpy as np
from conftest import graph_nodes, param_snapshot
from mxnet import gluon

import inc_core as inc


def test_saved_model_is_mxnet_export_that_symbolblock_imports_reads(cnn: gluon.HybridBlock, calib: inc.Dataset, tmp_path: Path) -> None:
    quantized = inc.quantize(cnn, inc.QuantConfig(calib_samples=64), dataset=calib)
    target = inc.save(quantized, tmp_path / "digits.mxnet")
    assert sorted(p.name for p in target.iterdir()) == ["digits-0000.params", "digits-symbol.json", "inputs.json"]
    # Plain MXNet, no inc involved: the files are what HybridBlock.export writes.
    block = gluon.SymbolBlock.imports(str(target / "digits-symbol.json"), ["data"], str(target / "digits-0000.params"))
    x = models.digits()[1][:32]
    np.testing.assert_array_equal(block(mx.nd.array(x)).asnumpy(), quantized(mx.nd.array(x)).asnumpy())
    # oneDNN's fused INT8 ops keep FP32 weights in the file (batch norm is folded into them first) and
    # quantize them once, at their first run; what marks them INT8 is the op's attributes.
    nodes = [n for n in json.loads((target / "digits-symbol.json").read_text())["nodes"] if n["op"] == "_sg_mkldnn_conv"]
    assert nodes and all(n["attrs"]["quantized"] == "true" for n in nodes)


def test_fp32_block_saves_and_a_model_exported_by_mxnet_quantizes(cnn: gluon.HybridBlock, calib: inc.Dataset, tmp_path: Path) -> None:
    # A model directory written by MXNet itself (HybridBlock.export), as a user would have it.
    exported = tmp_path / "exported.mxnet"
    exported.mkdir()
    twin = models.cnn()
    twin.hybridize()
    x = models.digits()[1][:16]
    twin(mx.nd.array(x))
    twin.export(str(exported / "exported"))
    loaded = inc.load(exported)
    np.testing.assert_allclose(loaded(mx.nd.array(x)).asnumpy(), cnn(mx.nd.array(x)).asnumpy(), rtol=1e-5, atol=1e-5)
    quantized = inc.quantize(exported, inc.QuantConfig(calib_samples=32), dataset=calib)
    assert [n for n in graph_nodes(quantized) if n["op"] == "_sg_mkldnn_conv"]
    # And the FP32 HybridBlock itself saves in the same format, untouched.
    before = param_snapshot(cnn)
    inc.save(cnn, tmp_path / "fp32.mxnet")
    assert param_snapshot(cnn) == before and not cnn._active
    np.testing.assert_allclose(inc.load(tmp_path / "fp32.mxnet")(mx.nd.array(x)).asnumpy(), cnn(mx.nd.array(x)).asnumpy(), rtol=1e-5, atol=1e-5)


def test_benchmark_runs_fp32_and_int8_without_touching_the_block(cnn: gluon.HybridBlock, calib: inc.Dataset) -> None:
    quantized = inc.quantize(cnn, inc.QuantConfig(calib_samples=32), dataset=calib)
    batch = models.digits()[1][:8]
    for model in (cnn, quantized):
        result = inc.benchmark(model, batch, warmup=2, iterations=5)
        assert result.throughput > 0 and result.batch_size == 8
    assert not cnn._active


def test_cli_quantizes_a_saved_model(cnn: gluon.HybridBlock, tmp_path: Path) -> None:
    inc.save(cnn, tmp_path / "fp32.mxnet")
    np.savez(tmp_path / "calib.npz", data=models.digits()[0][:64])
    out = tmp_path / "int8.mxnet"
    inc_cli = Path(sys.executable).with_name("inc")
    done = subprocess.run(
        [str(inc_cli), "quantize", str(tmp_path / "fp32.mxnet"), "-o", str(out), "--calib", str(tmp_path / "calib.npz"),
         "--calib-batch-size", "16", "--exclude", "cnn_dense1_fwd"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    (symbol_file,) = out.glob("*-symbol.json")
    nodes = [n for n in json.loads(symbol_file.read_text())["nodes"] if n["op"] == "_sg_mkldnn_fully_connected"]
    assert sorted(n.get("attrs", {}).get("quantized", "false").lower() for n in nodes) == ["false", "true"]
    x_test, y_test = models.digits()[1], models.digits()[3]
    assert models.accuracy(inc.load(out), x_test, y_test) >= models.accuracy(cnn, x_test, y_test) - 0.01


def test_cli_benchmarks_a_saved_int8_model(cnn: gluon.HybridBlock, calib: inc.Dataset, tmp_path: Path) -> None:
    inc.save(inc.quantize(cnn, inc.QuantConfig(calib_samples=32), dataset=calib), tmp_path / "int8.mxnet")
    np.savez(tmp_path / "x.npz", data=models.digits()[1][:4])
    inc_cli = Path(sys.executable).with_name("inc")
    done = subprocess.run(
        [str(inc_cli), "bench", str(tmp_path / "int8.mxnet"), "--inputs", str(tmp_path / "x.npz"), "--warmup", "1",
         "--iterations", "3", "--json", str(tmp_path / "bench.json")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["backend"] == "mxnet" and result["throughput"] > 0 and result["batch_size"] == 4
