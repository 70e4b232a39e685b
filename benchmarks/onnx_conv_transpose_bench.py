"""Models with transposed convolutions exported to ONNX: inc's INT8 ConvTranspose (as sub-pixel Conv) against the
other ways to run them, on ONNX Runtime's CPU provider and on OpenVINO.

Run from the repository root (the session installs torch, transformers and OpenVINO)::

    nox -s bench_onnx_conv_transpose

Models: ``benchmarks/_transposed_models.py`` (U-Net, the DCGAN tutorial's generator, SpeechT5's HiFi-GAN vocoder),
exported by ``torch.onnx.export`` (opset 17, dynamic batch). Random weights: speed and fidelity to FP32 do not depend
on training.

INT8 files: ORT's quantizer (``quantize_static``, QDQ, uint8 activations, int8 per-channel weights: ORT's fast x86
recipe; it quantizes ConvTranspose as QDQ, which ORT's CPU provider runs in float); inc with every ConvTranspose
excluded (what inc gave before they ran INT8 on ORT: float ConvTranspose, everything else the same; the DCGAN
generator was refused then, as it is with that exclusion now); inc (``inc.quantize``, defaults: each ConvTranspose
as its sub-pixel Conv); inc for OpenVINO (``OnnxBackend(runtime="openvino")``: QDQ ConvTranspose, which OpenVINO
runs in INT8 itself). Calibration: 8 random batches of 4; fidelity: output cosine to FP32 on 4 other inputs (mean
and min), on the runtime of the row. Speed: samples/s at batch 1 and 8, 2 threads, inc_onnx's session options
(OpenVINO: its LATENCY hint); every (runtime, file) of a model timed side by side in alternating blocks of calls
(``onnx_bench.side_by_side``; the median call). Writes ``benchmarks/results/onnx_conv_transpose.json``
and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _machine import cpu_flags, cpu_name, git_commit, timing_lock  # noqa: E402
from _transposed_models import MODELS  # noqa: E402
from onnx_bench import OnRuntime, side_by_side  # noqa: E402

import inc_core as inc  # noqa: E402
import inc_onnx  # noqa: E402
from inc_onnx import OnnxBackend  # noqa: E402

BATCHES = (1, 8)
THREADS = 2
FILES = ("FP32", "ORT quantize_static (QDQ u8s8)", "inc, ConvTranspose FP32 (before)", "inc", "inc for OpenVINO")
# the files each runtime runs; inc's OpenVINO file is inc's ORT file but for its QDQ ConvTranspose
RUNS = {
    "ORT": ("FP32", "ORT quantize_static (QDQ u8s8)", "inc, ConvTranspose FP32 (before)", "inc"),
    "OpenVINO": ("FP32", "ORT quantize_static (QDQ u8s8)", "inc", "inc for OpenVINO"),
}


def export(model: torch.nn.Module, x: np.ndarray, path: Path) -> onnx.ModelProto:
    torch.onnx.export(
        model, (torch.from_numpy(x),), str(path), input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False, opset_version=17,
    )
    return onnx.load(str(path))


def ort_static(path: Path, calibration: list[np.ndarray], out: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": x} for x in calibration])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(
        str(path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )
    return onnx.load(str(out))


def _files(fp32: onnx.ModelProto, path: Path, calibration: list[np.ndarray], work: Path) -> dict[str, Callable[[], onnx.ModelProto]]:
    data = inc.Dataset(calibration)
    transposed = inc.LayerFilter(types=("ConvTranspose",))
    return {
        "FP32": lambda: fp32,
        "ORT quantize_static (QDQ u8s8)": lambda: ort_static(path, calibration, work / "ort.onnx"),
        "inc, ConvTranspose FP32 (before)": lambda: inc.quantize(fp32, inc.QuantConfig(exclude=transposed), dataset=data),
        "inc": lambda: inc.quantize(fp32, inc.QuantConfig(), dataset=data),
        "inc for OpenVINO": lambda: inc.quantize(fp32, inc.QuantConfig(), dataset=data, backend=OnnxBackend(runtime="openvino")),
    }


def _session(runtime: str, model: onnx.ModelProto) -> Callable[[np.ndarray], np.ndarray]:
    """The model on ``runtime`` as the timing runs it (inc_onnx's session options; OpenVINO's LATENCY hint)."""
    session = inc_onnx.create_session(model, runtime="ort" if runtime == "ORT" else "openvino", threads=THREADS)
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _cosines(reference: Callable[[np.ndarray], np.ndarray], run: Callable[[np.ndarray], np.ndarray], inputs: list[np.ndarray]) -> list[float]:
    found = []
    for x in inputs:
        a, b = reference(x).ravel().astype(np.float64), np.asarray(run(x)).ravel().astype(np.float64)
        found.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return found


def bench(name: str, build: Callable[[], tuple[torch.nn.Module, Callable[[int, int], np.ndarray]]], args: argparse.Namespace) -> list[dict[str, Any]]:
    model, make = build()
    calibration = [make(4, seed) for seed in range(8)]
    held_out = [make(2, 50 + seed) for seed in range(4)]
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    timed: dict[tuple[str, str], onnx.ModelProto | OnRuntime] = {}
    with tempfile.TemporaryDirectory(prefix="onnx-ct-bench-") as tmp:
        work = Path(tmp)
        fp32 = export(model, calibration[0], work / "fp32.onnx")
        transposed = sum(n.op_type == "ConvTranspose" for n in fp32.graph.node)
        convs = sum(n.op_type in ("Conv", "ConvTranspose") for n in fp32.graph.node)
        built: dict[str, onnx.ModelProto] = {}
        errors: dict[str, str] = {}
        for label, make_file in _files(fp32, work / "fp32.onnx", calibration, work).items():
            try:
                built[label] = make_file()
            except Exception as exc:  # a path's failure is a row of the table, not the end of the benchmark
                errors[label] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
                traceback.print_exc()
        counts = OnnxBackend().int8_op_counts
        for runtime, labels in RUNS.items():
            reference = _session(runtime, fp32)
            for label in labels:
                row: dict[str, Any] = {"model": name, "runtime": runtime, "file": label, "conv_layers": convs, "transposed_layers": transposed}
                rows[(runtime, label)] = row
                if label in errors:
                    row["error"] = errors[label]
                    continue
                try:
                    run = _session(runtime, built[label])
                    cosines = _cosines(reference, run, held_out)
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
                    traceback.print_exc()
                    continue
                row.update(cosine_mean=statistics.mean(cosines), cosine_min=min(cosines))
                if runtime == "ORT" and label != "FP32":
                    row["ort_int8_conv"] = counts(built[label]).get("QLinearConv", 0) + counts(built[label]).get("ConvInteger", 0)
                    row["conv_transpose_left"] = sum(n.op_type == "ConvTranspose" for n in built[label].graph.node)
                timed[(runtime, label)] = built[label] if runtime == "ORT" else OnRuntime(built[label])
    for batch in BATCHES:
        # blocks of calls per model, in alternating order, with a pause for the last one's threads to park
        speeds = side_by_side({f"{r}: {f}": m for (r, f), m in timed.items()}, make(batch, 99), args.iterations, THREADS)
        for (runtime, label) in timed:
            rows[(runtime, label)][f"samples_per_s_b{batch}"] = speeds[f"{runtime}: {label}"]["samples_per_s"]
    return list(rows.values())


def markdown(record: dict[str, Any]) -> str:
    lines = [
        "# Transposed convolutions on ONNX: INT8 ConvTranspose as sub-pixel Conv vs the other ways to run them",
        "",
        f"CPU: {record['cpu']} ({', '.join(record['cpu_flags'])}), {record['threads']} threads; onnxruntime "
        f"{record['onnxruntime']}, openvino {record['openvino']}, torch {record['torch']} (export); commit {record['commit']}; "
        f"{record['date']}; `benchmarks/onnx_conv_transpose_bench.py`.",
        f"Every (runtime, file) of a model timed side by side ({record['iterations']} calls each, in alternating blocks: "
        "`onnx_bench.side_by_side`; samples/s from the median call); speed ratios are against the FP32 file on ONNX Runtime in the "
        "same run. Fidelity: output cosine to the FP32 file on the same runtime, 4 held-out inputs (random weights and "
        "inputs). `ORT INT8 conv`: convolutions ONNX Runtime runs in INT8 (QLinearConv after its fusions), of all the "
        "model's convolution layers, transposed ones included; `ConvTranspose left`: those still in the file.",
        "",
        "| model | runtime | file | ORT INT8 conv | ConvTranspose left | cosine mean | cosine min | "
        + " | ".join(f"samples/s b{b} (vs ORT FP32)" for b in BATCHES) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(BATCHES),
    ]
    for row in record["rows"]:
        head = f"| {row['model']} | {row['runtime']} | {row['file']} |"
        if "error" in row:
            before = row["file"].endswith("(before)") and "keeps every one" in row["error"]
            what = "refused: nothing but ConvTranspose to quantize" if before else f"failed: {row['error']}"
            lines.append(f"{head} {what} | | | | " + " | " * len(BATCHES))
            continue
        base = next(r for r in record["rows"] if r["model"] == row["model"] and r["runtime"] == "ORT" and r["file"] == "FP32")
        speeds = " | ".join(
            f"{row[f'samples_per_s_b{b}']:.1f} ({row[f'samples_per_s_b{b}'] / base[f'samples_per_s_b{b}']:.2f}x)" for b in BATCHES
        )
        int8 = f"{row['ort_int8_conv']} of {row['conv_layers']} ({row['transposed_layers']} transposed)" if "ort_int8_conv" in row else "-"
        left = str(row.get("conv_transpose_left", "-"))
        lines.append(f"{head} {int8} | {left} | {row['cosine_mean']:.5f} | {row['cosine_min']:.5f} | {speeds} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=40, help="timed calls per model and batch size")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    import openvino

    rows = [row for name, build in MODELS.items() for row in bench(name, build, args)]
    record = {
        "cpu": cpu_name(), "cpu_flags": cpu_flags(), "threads": THREADS, "onnxruntime": ort.__version__,
        "openvino": openvino.__version__, "torch": torch.__version__,
        "commit": git_commit("packages", "benchmarks/onnx_conv_transpose_bench.py"),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "iterations": args.iterations, "rows": rows,
    }
    out = ROOT / "benchmarks" / "results"
    (out / "onnx_conv_transpose.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "onnx_conv_transpose.md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    with timing_lock():  # one benchmark times at a time (an outer flock on the same file counts)
        main()
