"""The INT8 paths of the transformers benchmark: inc (static through inc.autotune, dynamic) and the peers.

ONNX: ``onnxruntime.quantization.quantize_static``/``quantize_dynamic`` with default settings, and
onnx-neural-compressor in its own venv (``peers/onc.py``). torch: torchao's PT2E flow with the
X86InductorQuantizer defaults and neural-compressor-pt 3.x's PT2E flow (static and dynamic), both on the
:class:`~_hf_workloads.HiddenStates` wrapper (positional inputs, one output, ``use_cache=False``): the least a user
must write to get an HF model through ``torch.export``; inc's paths take the HF model as it is.

Every builder returns ``(model, info)``; ``info`` holds what the table reports beside speed and fidelity.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _hf_workloads import Batch, HiddenStates, Workload, cosines, hidden_of, mean_pooled

import inc_core as inc

GOAL = 0.99
# Kernels ORT runs in INT8 for a quantized MatMul/Gemm, in either format (after its QDQ fusions).
ONNX_INT8_MATMULS = ("QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "QGemm", "DynamicQuantizeMatMul")


# --- fidelity ------------------------------------------------------------------------------------
def onnx_session(model: Any, threads: int) -> Any:
    import inc_onnx

    return inc_onnx.create_session(model, inc_onnx.session_options(threads=threads), runtime="ort")


def onnx_embeddings(model: Any, batches: list[Batch], threads: int) -> np.ndarray:
    session = onnx_session(model, threads)
    return np.concatenate([mean_pooled(session.run(None, b)[0], b) for b in batches])


def torch_embeddings(model: Any, batches: list[Batch], positional: bool) -> np.ndarray:
    rows = []
    with torch.no_grad():
        for batch in batches:
            tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
            out = model(*tensors.values()) if positional else model(**tensors)
            rows.append(mean_pooled(hidden_of(out), batch))
    return np.concatenate(rows)


def fidelity(embeddings: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    got = cosines(embeddings, reference)
    return {"cosine_min": float(got.min()), "cosine_mean": float(got.mean())}


def _tuning(base: inc.QuantConfig, max_trials: int, search_space: dict[str, tuple[str, ...]] | None) -> inc.TuningConfig:
    """Tune to mean cosine >= GOAL; the ops kept in FP32 are ranked by their measured error (mse strategy)."""
    return inc.TuningConfig(
        base=base, strategy="mse", tolerable_loss=1.0 - GOAL, loss_type="absolute", max_trials=max_trials, history=None,
        **({"search_space": search_space} if search_space is not None else {}),
    )


def _tuned_info(result: Any) -> dict[str, Any]:
    return {
        "tuned_score": float(result.score), "met": bool(result.met), "trials": len(result.trials),
        "kept_fp32": len(result.config.exclude.names),
    }


# --- ONNX ----------------------------------------------------------------------------------------
def onnx_int8_matmuls(model: Any) -> int:
    counts = inc.get_backend("onnx").int8_op_counts(model)
    return sum(counts.get(kind, 0) for kind in ONNX_INT8_MATMULS)


def inc_onnx_static(path: Path, work: Workload, max_trials: int, threads: int) -> tuple[Any, dict[str, Any]]:
    reference = onnx_embeddings(path, work.scored, threads)

    def mean_cosine(model: Any) -> float:
        return float(cosines(onnx_embeddings(model, work.scored, threads), reference).mean())

    base = inc.QuantConfig(format="qdq")
    # Only which ops stay FP32 is searched; the settings stay at the base config's.
    fixed = {k: (str(getattr(base, k)),) for k in ("calibration", "granularity", "scheme", "activation_dtype")}
    result = inc.autotune(str(path), _tuning(base, max_trials, fixed), eval_fn=mean_cosine,
                          dataset=inc.Dataset(work.calibration))
    return result.model, {**_tuned_info(result), "int8_matmuls": onnx_int8_matmuls(result.model)}


def inc_onnx_dynamic(path: Path) -> tuple[Any, dict[str, Any]]:
    model = inc.quantize(str(path), inc.QuantConfig(approach="dynamic"))
    return model, {"int8_matmuls": onnx_int8_matmuls(model)}


def ort_paths(path: Path, work: Workload, workdir: Path) -> dict[str, Callable[[], tuple[Any, dict[str, Any]]]]:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(work.calibration)

        def get_next(self) -> Batch | None:
            return next(self._batches, None)

    def static() -> tuple[Any, dict[str, Any]]:
        quantize_static(str(path), str(workdir / "ort_static.onnx"), Reader())  # default settings, as a user calls it
        model = onnx.load_model(str(workdir / "ort_static.onnx"))
        return model, {"int8_matmuls": onnx_int8_matmuls(model)}

    def dynamic() -> tuple[Any, dict[str, Any]]:
        quantize_dynamic(str(path), str(workdir / "ort_dynamic.onnx"))
        model = onnx.load_model(str(workdir / "ort_dynamic.onnx"))
        return model, {"int8_matmuls": onnx_int8_matmuls(model)}

    return {"ORT quantize_static (defaults)": static, "ORT quantize_dynamic (defaults)": dynamic}


def onc_paths(path: Path, work: Workload, workdir: Path, python: Path | None) -> dict[str, Callable[[], tuple[Any, dict[str, Any]]]]:
    import onnx
    from peers import onc

    fp32 = onnx.load_model(str(path))

    def run(approach: str) -> tuple[Any, dict[str, Any]]:
        got = onc.quantize(python, approach, fp32, workdir, name=f"{work.name}-{approach}",
                           calibration=work.calibration if approach == "static" else None)
        if got.model is None:
            raise RuntimeError(got.reason)
        return got.model, {"int8_matmuls": onnx_int8_matmuls(got.model), "settings": got.settings}

    return {"onnx-neural-compressor static (QOperator)": lambda: run("static"),
            "onnx-neural-compressor dynamic": lambda: run("dynamic")}


# --- torch ---------------------------------------------------------------------------------------
def _torch_dataset(work: Workload) -> inc.Dataset:
    return inc.Dataset(work.calibration)


def inc_torch_static(work: Workload, max_trials: int) -> tuple[Any, dict[str, Any]]:
    import inc_torch

    reference = torch_embeddings(work.model, work.scored, positional=False)

    def mean_cosine(model: Any) -> float:
        return float(cosines(torch_embeddings(model, work.scored, positional=False), reference).mean())

    result = inc.autotune(work.model, _tuning(inc.QuantConfig(), max_trials, None), eval_fn=mean_cosine,
                          dataset=_torch_dataset(work))
    listed = len(inc.describe(work.model, result.config).ops)
    return result.model, {**_tuned_info(result), "int8_layers": f"{len(inc_torch.quantized_ops(result.model))}/{listed}"}


def inc_torch_dynamic(work: Workload) -> tuple[Any, dict[str, Any]]:
    return inc.quantize(work.model, inc.QuantConfig(approach="dynamic")), {}


def _positional(batch: Batch) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(v) for v in batch.values())


def _exported(work: Workload) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], Any]:
    """The wrapped model, its example inputs and a dynamic batch dimension (one export runs batch 1 and 8)."""
    wrapped = HiddenStates(copy.deepcopy(work.model), work.input_names).eval()
    args = _positional(work.calibration[0])
    shapes = torch.export.ShapesCollection()
    for value in args:
        shapes[value] = {0: torch.export.Dim.AUTO}
    return wrapped, args, shapes.dynamic_shapes(wrapped, args, {})


def _calibrate(prepared: Any, work: Workload) -> None:
    with torch.no_grad():
        for batch in work.calibration:
            prepared(*_positional(batch))


def _int8_weights(graph_module: Any) -> dict[str, int]:
    """How many weights the converted graph holds in INT8 (one per-channel dequantize each): 0 = nothing quantized."""
    return {"int8_weights": sum("dequantize_per_channel" in str(n.target) for n in graph_module.graph.nodes)}


def _without_dead_code(graph_module: Any) -> Any:
    """Drop ops whose results nothing reads (MiniLM's pooler: a Linear + tanh the wrapper does not return).

    Left in, they stop X86InductorQuantizer (torchao 0.18, and neural-compressor-pt 3.10 through it) with
    ``IndexError: list index out of range`` in ``_get_output_nodes_of_partitions``: a Linear-unary partition
    with no output node.
    """
    graph_module.graph.eliminate_dead_code()
    graph_module.recompile()
    return graph_module


def torchao_pt2e(work: Workload) -> tuple[Any, dict[str, Any]]:
    """torchao's documented x86 recipe: export, X86InductorQuantizer defaults, calibrate, convert, compile."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    import inc_torch

    wrapped, args, dynamic = _exported(work)
    exported = _without_dead_code(torch.export.export(wrapped, args, dynamic_shapes=dynamic).module())
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    _calibrate(prepared, work)
    converted = convert_pt2e(prepared)
    # compiled as inc's own PT2E models are (inductor, freezing), so the runtime is the same
    return inc_torch.CompiledQuantizedModule(converted, (args, {}), runtime="compile"), _int8_weights(converted)


def neural_compressor_pt2e(work: Workload, dynamic: bool) -> tuple[Any, dict[str, Any]]:
    """neural-compressor-pt 3.x's PT2E flow (export, prepare, calibrate, convert), compiled the same way."""
    from neural_compressor.torch.export import export
    from neural_compressor.torch.quantization import DynamicQuantConfig, StaticQuantConfig, convert, prepare

    import inc_torch

    wrapped, args, shapes = _exported(work)
    exported = _without_dead_code(export(wrapped, example_inputs=args, dynamic_shapes=shapes))
    prepared = prepare(exported, quant_config=DynamicQuantConfig() if dynamic else StaticQuantConfig())
    _calibrate(prepared, work)
    converted = convert(prepared)
    return inc_torch.CompiledQuantizedModule(converted, (args, {}), runtime="compile"), _int8_weights(converted)


def fp32_compiled(work: Workload) -> torch.nn.Module:
    """The FP32 model compiled by inductor with freezing, as the INT8 PT2E models are run (positional inputs)."""
    compiled = torch.compile(HiddenStates(copy.deepcopy(work.model), work.input_names).eval())

    class Frozen(torch.nn.Module):
        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), torch._inductor.config.patch(freezing=True):
                return compiled(*inputs)

    return Frozen()


def timed_build(build: Callable[[], tuple[Any, dict[str, Any]]]) -> tuple[Any, dict[str, Any]]:
    started = time.perf_counter()
    model, info = build()
    return model, {**info, "quantize_s": time.perf_counter() - started}
