"""Models with transposed convolutions on the torch paths: INT8 ConvTranspose on PT2E (as sub-pixel conv2d) against
the other ways to run them.

Run from the repository root in the transformers venv (it has transformers and torchao)::

    flock /tmp/bench.lock .nox/transformers/bin/python benchmarks/torch_conv_transpose_bench.py

Models: ``benchmarks/_transposed_models.py`` (U-Net, the DCGAN tutorial's generator, SpeechT5's HiFi-GAN vocoder).

Paths: FP32 eager; FP32 compiled by inductor (freezing, as inc's PT2E models run); inc PT2E as it was before
transposed convolutions ran INT8 there (``exclude=LayerFilter(types=("ConvTranspose1d", "ConvTranspose2d"))``:
everything else the same; the DCGAN generator was refused then, as it is with that exclusion now: nothing else to
quantize); inc PT2E; inc FX (transposed convolutions FP32); torchao's documented x86 recipe (X86InductorQuantizer
defaults: no transposed convolution); torch.ao FX with its x86 defaults, the one peer that runs ConvTranspose2d in
INT8 (its quantized kernels: see the cosine). Calibration: 8 random batches; fidelity: output cosine to FP32 on 4
other inputs (mean and min). Speed: samples/s at batch 1 and 8, all paths timed side by side in interleaved rounds
(the median round). Writes ``benchmarks/results/torch_conv_transpose.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _machine import cpu_flags, cpu_name, git_commit, timing_lock  # noqa: E402
from _transposed_models import MODELS  # noqa: E402
from torch_bench import fp32_compiled, torchao_default  # noqa: E402

import inc_core as inc  # noqa: E402

BATCHES = (1, 8)
TRANSPOSED = ("ConvTranspose1d", "ConvTranspose2d")


def torch_ao_fx(model: nn.Module, calibration: list[np.ndarray]) -> nn.Module:
    """torch.ao FX with its x86 defaults (ConvTranspose with per-tensor weights, its quantized kernels)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (torch.from_numpy(calibration[0]),))
    with torch.no_grad():
        for batch in calibration:
            prepared(torch.from_numpy(batch))
    return convert_fx(prepared)


def _paths(model: nn.Module, calibration: list[np.ndarray]) -> dict[str, Callable[[], nn.Module]]:
    data = inc.Dataset(calibration)
    return {
        "FP32 eager": lambda: model,
        "FP32 compiled (inductor)": lambda: fp32_compiled(model),
        "inc PT2E, ConvTranspose FP32 (before)": lambda: inc.quantize(
            model, inc.QuantConfig(exclude=inc.LayerFilter(types=_transposed_types(model))), dataset=data
        ),
        "inc PT2E": lambda: inc.quantize(model, inc.QuantConfig(), dataset=data),
        "inc FX": lambda: inc.quantize(model, inc.QuantConfig(format="fx"), dataset=data),
        "torchao PT2E defaults": lambda: torchao_default(model, calibration),
        "torch.ao FX x86 defaults": lambda: torch_ao_fx(model, calibration),
    }


def _transposed_types(model: nn.Module) -> tuple[str, ...]:
    """The model's transposed convolution classes (a LayerFilter rejects a type that matches nothing)."""
    return tuple(sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in TRANSPOSED}))


def _cosines(model: nn.Module, candidate: nn.Module, inputs: list[np.ndarray]) -> list[float]:
    found = []
    with torch.no_grad():
        for x in inputs:
            ref, out = model(torch.from_numpy(x)), candidate(torch.from_numpy(x))
            ref, out = (getattr(ref, "last_hidden_state", ref), getattr(out, "last_hidden_state", out))
            found.append(float(nn.functional.cosine_similarity(ref.flatten().double(), out.flatten().double(), 0)))
    return found


def _int8_convs(path: str, candidate: nn.Module) -> int | None:
    if path.startswith("FP32"):
        return None
    if path.startswith("torch.ao"):
        return sum(type(m).__module__.startswith("torch.ao.nn.quantized") and "Conv" in type(m).__name__ for m in candidate.modules())
    counts = inc.get_backend("torch").int8_op_counts(candidate) or {}
    return sum(v for k, v in counts.items() if "conv" in k.lower())


def bench(name: str, build: Callable[[], tuple[nn.Module, Callable[[int, int], np.ndarray]]], args: argparse.Namespace) -> list[dict[str, Any]]:
    model, make = build()
    calibration = [make(4, seed) for seed in range(8)]
    held_out = [make(2, 50 + seed) for seed in range(4)]
    convs = sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    transposed = sum(isinstance(m, nn.modules.conv._ConvTransposeNd) for m in model.modules())
    built: dict[str, nn.Module] = {}
    rows: dict[str, dict[str, Any]] = {}
    for path, make_path in _paths(model, calibration).items():
        row: dict[str, Any] = {"model": name, "path": path, "conv_layers": convs, "transposed_layers": transposed}
        try:
            started = time.perf_counter()
            candidate = make_path()
            row["build_s"] = round(time.perf_counter() - started, 1)
            cosines = _cosines(model, candidate, held_out)  # also the first (compiling) calls
            row.update(cosine_mean=statistics.mean(cosines), cosine_min=min(cosines), int8_conv=_int8_convs(path, candidate))
            built[path] = candidate
        except Exception as exc:  # a peer's failure is a row of the table, not the end of the benchmark
            row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
            traceback.print_exc()
        rows[path] = row
    for batch in BATCHES:
        x = torch.from_numpy(make(batch, 99))
        per_round: dict[str, list[float]] = {path: [] for path in built}
        with torch.no_grad():
            for candidate in built.values():
                for _ in range(2):
                    candidate(x)
            for _ in range(args.rounds):
                for path, candidate in built.items():
                    started = time.perf_counter()
                    for _ in range(args.iterations):
                        candidate(x)
                    per_round[path].append(batch * args.iterations / (time.perf_counter() - started))
        for path, values in per_round.items():
            rows[path][f"samples_per_s_b{batch}"] = statistics.median(values)
    return list(rows.values())


def markdown(record: dict[str, Any]) -> str:
    lines = [
        "# Transposed convolutions: INT8 ConvTranspose on PT2E (as sub-pixel conv2d) vs the other torch paths",
        "",
        f"CPU: {record['cpu']} ({', '.join(record['cpu_flags'])}), {record['threads']} threads; torch {record['torch']}, "
        f"torchao {record['torchao']}; commit {record['commit']}; {record['date']}; `benchmarks/torch_conv_transpose_bench.py`.",
        f"All paths of a model timed side by side in {record['rounds']} interleaved rounds of {record['iterations']} calls "
        "(the median round); speed ratios are against FP32 eager in the same run. Fidelity: output cosine to FP32 on 4 "
        "held-out inputs (random weights and inputs). `INT8 conv`: convolutions the model runs in INT8 (of all its convolution "
        "layers, transposed ones included: `transposed` of them).",
        "",
        "| model | path | INT8 conv | cosine mean | cosine min | " + " | ".join(f"samples/s b{b} (vs FP32)" for b in BATCHES) + " |",
        "|---|---|---|---|---|" + "---|" * len(BATCHES),
    ]
    for row in record["rows"]:
        if "error" in row:
            before = row["path"].endswith("(before)") and "Every quantizable op" in row["error"]
            # a model of transposed convolutions only had nothing else to quantize: it ran FP32 (the rows above)
            what = "refused: nothing but transposed convolutions to quantize (FP32 before)" if before else f"failed: {row['error']}"
            lines.append(f"| {row['model']} | {row['path']} | {what} | | | " + " | " * len(BATCHES))
            continue
        base = next(r for r in record["rows"] if r["model"] == row["model"] and r["path"] == "FP32 eager")
        speeds = " | ".join(
            f"{row[f'samples_per_s_b{b}']:.1f} ({row[f'samples_per_s_b{b}'] / base[f'samples_per_s_b{b}']:.2f}x)" for b in BATCHES
        )
        int8 = "-" if row["int8_conv"] is None else f"{row['int8_conv']} of {row['conv_layers']} ({row['transposed_layers']} transposed)"
        lines.append(
            f"| {row['model']} | {row['path']} | {int8} | {row['cosine_mean']:.5f} | {row['cosine_min']:.5f} | {speeds} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(2)
    import torchao

    rows = [row for name, build in MODELS.items() for row in bench(name, build, args)]
    record = {
        "cpu": cpu_name(), "cpu_flags": cpu_flags(), "threads": 2, "torch": torch.__version__, "torchao": torchao.__version__,
        "commit": git_commit("packages", "benchmarks/torch_conv_transpose_bench.py"),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "rounds": args.rounds, "iterations": args.iterations, "rows": rows,
    }
    out = ROOT / "benchmarks" / "results"
    (out / "torch_conv_transpose.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "torch_conv_transpose.md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    with timing_lock():  # one benchmark times at a time (an outer flock on the same file counts)
        main()
