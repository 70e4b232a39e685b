"""Static INT8 of Hugging Face transformers through inc.autotune, side by side with dynamic INT8 and the peers.

Models (``_hf_workloads.py``): the real all-MiniLM-L6-v2 (sequence 128) and small configs with random weights
(hidden 128, 2 layers, sequence 64) of BERT, RoBERTa, GPT-2, the T5 encoder and ViT (32x32 images), each
timed at batch 1 and 8. Paths (``_hf_paths.py``):

- ONNX Runtime: FP32; inc static INT8 (QDQ) tuned by ``inc.autotune`` (strategy "mse") to a mean-pooled
  cosine >= 0.99 against FP32; inc dynamic; ``quantize_static`` and ``quantize_dynamic`` with default
  settings; onnx-neural-compressor static and dynamic (in its own venv, ``--onc-python``, as in onnx_bench.py);
- torch: FP32 eager; inc PT2E static tuned the same way; inc dynamic; torchao's PT2E with the
  X86InductorQuantizer defaults; neural-compressor-pt 3.x PT2E static and dynamic.

Fidelity: per-sample cosine of mean-pooled last hidden states against FP32's on the same backend, over the
scored samples (32 random-token/image samples for the small configs, 20 sentences for MiniLM), min and mean;
every calibrated path calibrates on other samples (32 others, or the 20 other sentences). Speed: the paths of
one model and backend are timed side by side (alternating blocks of calls, the order reversed every other
round), so load on a shared machine falls on each alike; throughput = batch / median latency, and each
path's ratio is against that backend's FP32. A path that fails, or misses the 0.99 goal, keeps its row with
the reason. Results: ``results/transformers.json`` and ``transformers.md`` naming the CPU and the commit.

    python benchmarks/transformers_bench.py [--models minilm bert ...] [--quick] [--merge] [--onc-python PATH]

``--merge`` keeps the models of an earlier results file that this run does not measure (each model records
its own date and commit). Run it under ``flock /tmp/bench.lock`` so two benchmarks never time at once.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _hf_paths as paths
import numpy as np
import torch
from _hf_workloads import MODELS, Workload, export_onnx, workload
from _machine import cpu_flags, cpu_name, git_commit, timing_lock

import inc_core as inc

RESULTS = Path(__file__).resolve().parent / "results"
FP32 = {"onnx": "FP32 (ORT)", "torch": "FP32 eager"}
FP32_COMPILED = "FP32 torch.compile (inductor, freezing)"
INC_STATIC = {"onnx": "inc static QDQ (autotune)", "torch": "inc PT2E static (autotune)"}
INC_DYNAMIC = {"onnx": "inc dynamic", "torch": "inc dynamic"}
DYNAMIC = ("inc dynamic", "ORT quantize_dynamic (defaults)", "onnx-neural-compressor dynamic", "neural-compressor-pt dynamic")
log = logging.getLogger("inc.bench")


def attempt(fn: Callable[[], Any], row: dict[str, Any], what: str) -> Any:
    """``fn()``, or None with the failure recorded in ``row["error"]`` (a path that fails keeps its row)."""
    try:
        return fn()
    except Exception as exc:  # a failing path is a result, not the end of the run
        first = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else ""
        row.setdefault("error", f"{what}: {type(exc).__name__}: {first}")
        log.warning("%s failed: %s", what, row["error"])
        if os.environ.get("INC_BENCH_DEBUG"):
            traceback.print_exc()
        return None


def interleaved(runners: dict[str, Callable[[], Any]], batch: int, iterations: int) -> dict[str, dict[str, float]]:
    """Throughput of each runner, timed side by side in alternating blocks of calls (as onnx_bench.side_by_side).

    Blocks rather than single alternating calls: ORT's (and OpenMP's) worker threads keep spinning for a while
    after a call and would steal the cores from the next runner; a short pause before each block lets them park
    (without it a runner timed after another lost up to 40% on 2 cores). The first call of each block is not timed.
    """
    for run in runners.values():
        for _ in range(max(3, iterations // 10)):
            run()
    block = max(1, min(10, iterations // 5))
    latencies: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for round_ in range(-(-iterations // block)):
        for name in order if round_ % 2 == 0 else reversed(order):
            time.sleep(0.05)
            runners[name]()
            for _ in range(block):
                start = time.perf_counter()
                runners[name]()
                latencies[name].append(time.perf_counter() - start)
    return {
        name: {"samples_per_s": batch / float(np.median(values)), "p50_ms": float(np.median(values)) * 1e3}
        for name, values in latencies.items()
    }


def _time_rows(rows: dict[str, dict[str, Any]], runners: dict[int, dict[str, Callable[[], Any]]], fp32: str,
               iterations: int) -> None:
    for batch, by_path in runners.items():
        its = iterations if batch == 1 else max(10, iterations // 4)
        for name, got in interleaved(by_path, batch, its).items():
            rows[name][f"bs{batch}"] = got
        base = rows[fp32].get(f"bs{batch}", {}).get("samples_per_s")
        for name in by_path:
            if base:
                rows[name][f"bs{batch}_vs_fp32"] = rows[name][f"bs{batch}"]["samples_per_s"] / base


def bench_onnx(work: Workload, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    path = export_onnx(work, workdir / f"{work.name}.onnx")
    reference = paths.onnx_embeddings(path, work.scored, args.threads)
    builders: dict[str, Callable[[], tuple[Any, dict[str, Any]]]] = {
        INC_STATIC["onnx"]: lambda: paths.inc_onnx_static(path, work, args.max_trials, args.threads),
        INC_DYNAMIC["onnx"]: lambda: paths.inc_onnx_dynamic(path),
        **paths.ort_paths(path, work, workdir),
        **paths.onc_paths(path, work, workdir, args.onc_python),
    }
    rows: dict[str, dict[str, Any]] = {FP32["onnx"]: {}}
    models: dict[str, Any] = {FP32["onnx"]: str(path)}
    for name, build in builders.items():
        if args.skip and any(s in name for s in args.skip):
            rows[name] = {"error": "not measured in this run (--skip)"}
            continue
        log.info("onnx %s: %s", work.name, name)
        row = rows.setdefault(name, {})
        built = attempt(lambda build=build: paths.timed_build(build), row, "quantize")
        if built is None:
            continue
        model, info = built
        row.update(info)
        got = attempt(lambda m=model: paths.onnx_embeddings(m, work.scored, args.threads), row, "run")
        if got is not None:
            row.update(paths.fidelity(got, reference))
            models[name] = model
    runners = {}
    for batch, feeds in work.timing.items():
        sessions = {name: paths.onnx_session(m, args.threads) for name, m in models.items()}
        runners[batch] = {name: (lambda s=s, f=feeds: s.run(None, f)) for name, s in sessions.items()}
    _time_rows(rows, runners, FP32["onnx"], args.iterations)
    return {"paths": rows, "onnxruntime": __import__("onnxruntime").__version__}


def bench_torch(work: Workload, args: argparse.Namespace) -> dict[str, Any]:
    reference = paths.torch_embeddings(work.model, work.scored, positional=False)
    # (builder, called with positional inputs): inc's paths take the HF model as it is, the peers the wrapper.
    builders: dict[str, tuple[Callable[[], tuple[Any, dict[str, Any]]], bool]] = {
        INC_STATIC["torch"]: (lambda: paths.inc_torch_static(work, args.max_trials), False),
        INC_DYNAMIC["torch"]: (lambda: paths.inc_torch_dynamic(work), False),
        "torchao PT2E (X86InductorQuantizer defaults)": (lambda: paths.torchao_pt2e(work), True),
        "neural-compressor-pt static": (lambda: paths.neural_compressor_pt2e(work, dynamic=False), True),
        "neural-compressor-pt dynamic": (lambda: paths.neural_compressor_pt2e(work, dynamic=True), True),
    }
    rows: dict[str, dict[str, Any]] = {FP32["torch"]: {}, FP32_COMPILED: {}}
    models: dict[str, tuple[Any, bool]] = {FP32["torch"]: (work.model, False)}
    # FP32 compiled too: eager runs many small ops, each a parallel region that a loaded machine slows most.
    models[FP32_COMPILED] = (paths.fp32_compiled(work), True)
    for name, (build, positional) in builders.items():
        if args.skip and any(s in name for s in args.skip):
            rows[name] = {"error": "not measured in this run (--skip)"}
            continue
        log.info("torch %s: %s", work.name, name)
        row = rows.setdefault(name, {})
        built = attempt(lambda build=build: paths.timed_build(build), row, "quantize")
        if built is None:
            continue
        model, info = built
        row.update(info)
        got = attempt(lambda m=model, p=positional: paths.torch_embeddings(m, work.scored, p), row, "run")
        if got is not None:
            row.update(paths.fidelity(got, reference))
            models[name] = (model, positional)
    runners: dict[int, dict[str, Callable[[], Any]]] = {}
    for batch, feeds in work.timing.items():
        tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
        runners[batch] = {}
        for name, (model, positional) in models.items():
            def run(m: Any = model, p: bool = positional, t: dict[str, torch.Tensor] = tensors) -> Any:
                with torch.no_grad():
                    return m(*t.values()) if p else m(**t)

            started = time.perf_counter()  # the first call on this shape compiles the compiled paths
            if attempt(run, rows[name], f"batch {batch}") is not None:
                rows[name].setdefault("first_call_s", {})[f"bs{batch}"] = time.perf_counter() - started
                runners[batch][name] = run
    _time_rows(rows, runners, FP32["torch"], args.iterations)
    return {"paths": rows, "torch": torch.__version__}


# --- report --------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _notes(row: dict[str, Any]) -> str:
    notes = []
    if "trials" in row:
        notes.append(f"{row['trials']} trial(s), {row['kept_fp32']} op(s) kept FP32, goal {'met' if row['met'] else 'MISSED'}")
    if "int8_matmuls" in row:
        notes.append(f"{row['int8_matmuls']} INT8 MatMul kernels")
    if "int8_weights" in row:
        notes.append(f"{row['int8_weights']} INT8 weights")
    if "int8_layers" in row:
        notes.append(f"INT8 layers {row['int8_layers']}")
    if "quantize_s" in row:
        notes.append(f"quantize {row['quantize_s']:.0f} s")
    if "first_call_s" in row:
        notes.append("first call " + "/".join(f"{v:.1f}" for v in row["first_call_s"].values()) + " s")
    if "error" in row:
        notes.append(f"**did not run**: {row['error']}")
    return "; ".join(notes)


def _measured(backend: str, entry: dict[str, Any]) -> str:
    got = entry[backend]
    load = f", load average {got['load_average_1m']:.1f} on start" if "load_average_1m" in got else ""
    return f"{backend} {got.get('date', entry.get('date'))}, git commit {got.get('commit', entry.get('commit'))}{load}"


def verdicts(name: str, entry: dict[str, Any]) -> list[str]:
    """The issue's goals for one model: static at cosine >= 0.99 and faster than every dynamic path; MiniLM >= 3x."""
    lines = []
    best_bs1 = 0.0
    for backend in ("onnx", "torch"):
        rows = entry.get(backend, {}).get("paths", {})
        static = rows.get(INC_STATIC[backend], {})
        if not static or "cosine_mean" not in static:
            lines.append(f"- {backend}: inc static: no result ({static.get('error', 'not measured')})")
            continue
        ok = static["cosine_mean"] >= paths.GOAL
        parts = [f"cosine mean {static['cosine_mean']:.4f} / min {static['cosine_min']:.4f} ({'>=' if ok else '<'} 0.99)"]
        for batch in ("bs1", "bs8"):
            mine = static.get(batch, {}).get("samples_per_s")
            dyn = {k: r[batch]["samples_per_s"] for k, r in rows.items() if k in DYNAMIC and batch in r}
            if mine is None or not dyn:
                continue
            slower = [f"{k} ({mine / v:.2f}x)" for k, v in dyn.items() if v >= mine]
            compiled = rows.get(FP32_COMPILED, {}).get(batch, {}).get("samples_per_s")
            versus = f" ({mine / compiled:.2f}x FP32 torch.compile)" if compiled else ""
            parts.append(f"{batch}: {static.get(f'{batch}_vs_fp32', 0):.2f}x FP32{versus}, "
                         + ("faster than every dynamic path" if not slower else "not faster than " + ", ".join(slower)))
        best_bs1 = max(best_bs1, static.get("bs1_vs_fp32", 0.0))
        lines.append(f"- {backend}: " + "; ".join(parts))
    if name == "minilm":
        lines.append(f"- MiniLM >= 3x FP32 at batch 1 on at least one backend: {'yes' if best_bs1 >= 3 else 'no'} "
                     f"(best inc static {best_bs1:.2f}x)")
    return lines


def markdown(out: dict[str, Any]) -> str:
    meta = out["meta"]
    lines = [
        "# Transformers INT8 benchmark: static INT8 through inc.autotune vs dynamic INT8 and the peers",
        "",
        f"CPU: {meta['cpu']} ({meta['threads']} threads; INT8 flags: {', '.join(meta['cpu_flags']) or 'n/a'}). "
        "Each model below names the date, the git commit measured and the library versions. Throughput in samples/s "
        "(batch / median latency); the paths of one model and backend are timed side by side in one process "
        "(alternating blocks of calls), so the ratio to that backend's FP32 holds on a loaded machine, while absolute "
        "numbers vary with the load. Cosine: per-sample cosine of mean-pooled last hidden states vs FP32 on the same "
        "backend, over samples no path calibrated on (min / mean). inc static is tuned by `inc.autotune` (strategy "
        f"\"mse\", at most {meta['max_trials']} trials) to mean cosine >= 0.99; its row reports the cosine recomputed "
        "here. A path that failed keeps its row, with the reason.",
        "",
    ]
    if meta.get("note"):
        lines += [meta["note"], ""]
    if meta.get("quick"):
        lines += ["**Quick run (few iterations): a check that every path runs, not a measurement.**", ""]
    for name in MODELS:
        entry = out["models"].get(name)
        if entry is None:
            continue
        lines += [f"## {entry['label']}, {entry['shape']}", "",
                  "Measured: " + "; ".join(_measured(b, entry) for b in ("onnx", "torch") if b in entry)
                  + f"; {entry['versions']}.", "",
                  "| backend | path | bs1 samples/s | bs1 vs FP32 | bs8 samples/s | bs8 vs FP32 | cosine min | cosine mean "
                  "| notes |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for backend in ("onnx", "torch"):
            for path, row in entry.get(backend, {}).get("paths", {}).items():
                cells = []
                for batch in ("bs1", "bs8"):
                    cells += [_fmt(row.get(batch, {}).get("samples_per_s"), ".1f"), _fmt(row.get(f"{batch}_vs_fp32"), ".2f", "x")]
                cells += [_fmt(row.get("cosine_min"), ".4f"), _fmt(row.get("cosine_mean"), ".4f")]
                lines.append(f"| {backend} | {path} | " + " | ".join(cells) + f" | {_notes(row)} |")
            if backend in entry.get("errors", {}):
                lines.append(f"| {backend} | (all paths) | - | - | - | - | - | - | **did not run**: {entry['errors'][backend]} |")
        lines += ["", "Goals:", "", *verdicts(name, entry), ""]
    missing = [m for m in MODELS if m not in out["models"]]
    if missing:
        lines += [f"Not measured: {', '.join(missing)}.", ""]
    return "\n".join(lines)


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for dist in ("torch", "torchao", "transformers", "onnxruntime", "neural-compressor-pt"):
        try:
            found.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            found.append(f"{dist} not installed")
    return ", ".join(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--backends", nargs="+", choices=("onnx", "torch"), default=["onnx", "torch"])
    parser.add_argument("--skip", nargs="*", default=[], help="leave out the paths whose name holds one of these words")
    parser.add_argument("--quick", action="store_true", help="few iterations and trials: check that every path runs")
    parser.add_argument("--iterations", type=int, default=100, help="timed calls per path at batch 1 (a quarter at batch 8)")
    parser.add_argument("--max-trials", type=int, default=12, help="inc.autotune's trial budget per model and backend")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--onc-python", type=Path, default=None, help="python of a venv with onnx-neural-compressor")
    parser.add_argument("--merge", action="store_true", help="keep the other models of an existing results file")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render-only", action="store_true", help="only rewrite transformers.md from transformers.json")
    parser.add_argument("--note", default=None, help="a remark on the run for the markdown (with --render-only)")
    args = parser.parse_args()
    if args.render_only:
        out = json.loads((args.out / "transformers.json").read_text())
        if args.note is not None:
            out["meta"]["note"] = args.note
            (args.out / "transformers.json").write_text(json.dumps(out, indent=2) + "\n")
        (args.out / "transformers.md").write_text(markdown(out) + "\n")
        return
    if args.quick:
        args.iterations, args.max_trials = min(args.iterations, 10), min(args.max_trials, 3)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    out_json = args.out / "transformers.json"
    out: dict[str, Any] = {"models": {}}
    if args.merge and out_json.exists():
        out = json.loads(out_json.read_text())
    out["meta"] = {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "threads": args.threads, "max_trials": args.max_trials,
                   "iterations": args.iterations, "quick": args.quick, "inc_core": inc.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="inc-hf-bench-") as tmp:
        for name in args.models:
            work = workload(name)
            # --merge: the backends this run does not measure keep their earlier results (each names its commit)
            entry: dict[str, Any] = out["models"].get(name, {}) if args.merge else {}
            entry.update({"label": work.label, "shape": work.shape, "versions": _versions(),
                          "scored_samples": sum(len(next(iter(b.values()))) for b in work.scored)})
            entry.setdefault("errors", {})
            for backend in args.backends:
                measured = {"commit": git_commit("packages", "benchmarks"), "load_average_1m": os.getloadavg()[0],
                            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
                log.info("%s on %s", name, backend)
                started = time.perf_counter()
                run = (lambda w=work: bench_onnx(w, args, Path(tmp))) if backend == "onnx" else (lambda w=work: bench_torch(w, args))
                failure: dict[str, Any] = {}
                got = attempt(run, failure, backend)
                if got is None:
                    entry["errors"][backend] = failure["error"]
                    entry.pop(backend, None)
                else:
                    entry["errors"].pop(backend, None)
                    entry[backend] = {**got, **measured, "seconds": time.perf_counter() - started}
            out["models"][name] = entry
            # written after every model, so an interrupted run keeps what it finished
            out_json.write_text(json.dumps(out, indent=2) + "\n")
            (args.out / "transformers.md").write_text(markdown(out) + "\n")
    print(markdown(out))


if __name__ == "__main__":
    with timing_lock():  # one benchmark times at a time (an outer flock on the same file counts)
        main()
