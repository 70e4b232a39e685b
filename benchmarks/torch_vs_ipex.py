"""inc PT2E on upstream torch vs IPEX on the ResNet-18-shaped convnet (or `--model`), interleaved across the two venvs.

IPEX needs its own torch (2.8), so the two sides cannot share a process. ``torch_bench.py`` runs them
as two processes one after the other, and on a shared machine the load changes in between. Here one
worker process per venv builds its models once, then waits on a pipe; the driver asks each in turn for
a short timed block, so only one side computes at a time and both see the same load, round after
round. The ratio of medians is the comparison; the minimum per-call latency (the least disturbed call)
is shown as well.

    # from the torch venv, naming the IPEX venv's interpreter
    python benchmarks/torch_vs_ipex.py --ipex-python .nox/bench_ipex/bin/python
    python benchmarks/torch_vs_ipex.py --ipex-python ... --quick   # check that it runs

Writes benchmarks/results/torch_vs_ipex.{json,md}. A measurement, never a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# Marks the worker's answers on stdout, where libraries may print lines of their own.
MARK = "@@torch_vs_ipex@@ "


# --- worker: one per venv, builds its paths once, then answers "measure" requests -------------------
def _worker() -> None:
    import numpy as np
    import torch
    from torch_bench import (
        CALIBRATION_SENTENCES,
        INC_PT2E,
        SENTENCES,
        have,
        minilm,
        minilm_inputs,
        mobilenet_v2,
        paths,
        resnet18,
        resnet50,
        with_aoti_row,
    )

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    which = os.environ.get("INC_TORCH_VS_IPEX_MODEL", "convnet")
    if which == "minilm":
        model, tokenizer = minilm()
        calib: list[Any] = [
            minilm_inputs(tokenizer, CALIBRATION_SENTENCES[i : i + 4]) for i in range(0, len(CALIBRATION_SENTENCES), 4)
        ]
    else:
        model = {"convnet": resnet18, "resnet50": resnet50, "mobilenetv2": mobilenet_v2}[which]()
        calib = [rng.standard_normal((4, 3, 224, 224)).astype(np.float32) for _ in range(4)]
    built: dict[str, Any] = {"fp32 eager": model}
    for name, build in paths(include_fx=False).items():
        if name in (INC_PT2E, "inc ipex", "ipex defaults"):
            built[name] = build(model, calib)
    built = with_aoti_row(built)
    side = "ipex" if have("intel_extension_for_pytorch") else "torch"
    print(MARK + json.dumps({"side": side, "torch": torch.__version__, "rows": list(built)}), flush=True)

    def make_input(batch: int) -> Any:
        if which == "minilm":
            return {k: torch.from_numpy(v) for k, v in minilm_inputs(tokenizer, (SENTENCES * batch)[:batch]).items()}
        return torch.from_numpy(rng.standard_normal((batch, 3, 224, 224)).astype(np.float32))

    inputs = {}
    for line in sys.stdin:
        name, batch, calls = line.split("\t")
        batch, calls = int(batch), int(calls)
        x = inputs.setdefault(batch, make_input(batch))
        model_ = built[name]
        call = _caller(model_, x)
        latencies = []
        with torch.no_grad():
            started = time.perf_counter()
            if calls == 0:  # first call: compilation for this shape
                call()
            for _ in range(calls):
                t = time.perf_counter()
                call()
                latencies.append(time.perf_counter() - t)
            elapsed = time.perf_counter() - started
        print(MARK + json.dumps({"elapsed": elapsed, "latencies": latencies}), flush=True)


def _caller(model: Any, x: Any) -> Any:
    """One call of ``model`` on ``x``: keyword tensors (a tokenized batch) or one positional tensor."""
    return (lambda: model(**x)) if isinstance(x, dict) else (lambda: model(x))


class Worker:
    def __init__(self, python: str) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent / "tests" / "torch")]))
        self.process = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.process.args} exited with {self.process.wait()}")
            if line.startswith(MARK):
                return dict(json.loads(line[len(MARK) :]))

    def measure(self, name: str, batch: int, calls: int) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{name}\t{batch}\t{calls}\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ipex-python", help="the IPEX venv's python (torch 2.8 + IPEX)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20, help="calls per timed block at batch 1 (a quarter at batch 16)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--model", choices=("convnet", "resnet50", "mobilenetv2", "minilm"), default="convnet",
        help="the ResNet-18-shaped convnet at 224 (results torch_vs_ipex.*), the ResNet-50- or MobileNetV2-shaped one "
        "(torch_vs_ipex_<model>.*), or all-MiniLM-L6-v2 at sequence 128 (torch_vs_ipex_minilm.*)",
    )
    parser.add_argument("--output", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.worker:
        _worker()
        return
    if not args.ipex_python:
        parser.error("--ipex-python is required")
    if args.quick:
        args.rounds, args.calls = 2, 3
    from _machine import timing_lock

    with timing_lock():  # one benchmark times at a time (an outer flock on the same file counts)
        _drive(args)


def _drive(args: argparse.Namespace) -> None:
    from _machine import cpu_flags, cpu_name, git_commit

    # A fresh AOTInductor cache: the first call below is a real compilation, not a cached package.
    os.environ["INC_AOTI_CACHE_DIR"] = tempfile.mkdtemp(prefix="inc_aoti_bench_")
    os.environ["INC_TORCH_VS_IPEX_MODEL"] = args.model
    workers = [Worker(sys.executable), Worker(args.ipex_python)]
    rows = [(w, name) for w in workers for name in w.info["rows"]]
    first_call_s: dict[str, dict[str, float]] = {}
    samples: dict[str, dict[str, list[float]]] = {}
    latencies: dict[str, dict[str, list[float]]] = {}
    for batch in args.batches:
        calls = args.calls if batch == 1 else max(args.calls // 4, 3)
        for worker, name in rows:
            key = f"{worker.info['side']}: {name}"
            first_call_s.setdefault(key, {})[f"bs{batch}"] = worker.measure(name, batch, 0)["elapsed"]
            worker.measure(name, batch, 3)  # warm-up
        for _ in range(args.rounds):
            previous = None
            for worker, name in rows:
                key = f"{worker.info['side']}: {name}"
                if worker is not previous:
                    # The other process's OpenMP threads spin after its last call (Intel OpenMP, which IPEX
                    # uses, for 200 ms by default) and would take the cores from this block.
                    time.sleep(0.3)
                    previous = worker
                result = worker.measure(name, batch, calls)
                samples.setdefault(key, {}).setdefault(f"bs{batch}", []).append(batch * calls / result["elapsed"])
                latencies.setdefault(key, {}).setdefault(f"bs{batch}", []).extend(result["latencies"])
    for worker in workers:
        worker.close()
    out = {
        "meta": {
            "cpu": cpu_name(),
            "cpu_flags": cpu_flags(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "torch": {w.info["side"]: w.info["torch"] for w in workers},
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": git_commit("packages", "benchmarks"),
            "rounds": args.rounds,
            "calls": args.calls,
            "quick": args.quick,
            "model": args.model,
        },
        "median_samples_per_s": {k: {c: statistics.median(v) for c, v in cols.items()} for k, cols in samples.items()},
        "min_latency_ms": {k: {c: min(v) * 1e3 for c, v in cols.items()} for k, cols in latencies.items()},
        "first_call_s": first_call_s,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    stem = "torch_vs_ipex" if args.model == "convnet" else f"torch_vs_ipex_{args.model}"
    (args.output / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.output / f"{stem}.md").write_text(markdown(out) + "\n")
    print(markdown(out))


_TITLES = {
    "convnet": "ResNet-18-shaped convnet, 224x224",
    "resnet50": "ResNet-50-shaped convnet, 224x224",
    "mobilenetv2": "MobileNetV2-shaped convnet, 224x224",
    "minilm": "all-MiniLM-L6-v2, sequence 128",
}


def markdown(out: dict[str, Any]) -> str:
    meta = out["meta"]
    med, low, first = out["median_samples_per_s"], out["min_latency_ms"], out["first_call_s"]
    reference = "ipex: inc ipex"
    lines = [
        "# inc PT2E (upstream torch) vs IPEX, interleaved: "
        + _TITLES.get(meta.get("model", "convnet"), "ResNet-18-shaped convnet, 224x224"),
        "",
        f"CPU: {meta['cpu']} ({meta['cpus']} logical CPUs; INT8 flags: {', '.join(meta['cpu_flags']) or 'n/a'}); torch "
        f"{meta['torch'].get('torch')} and torch {meta['torch'].get('ipex')} + IPEX, one worker process each; {meta['date']}; "
        f"git commit {meta['commit']}; load average at the end {', '.join(f'{v:.1f}' for v in meta['load_average'])}. "
        f"{meta['rounds']} rounds; in each, every path runs {meta['calls']} calls at batch 1 (a quarter at batch 16) in turn "
        "while the other process waits. Samples/s: median over rounds; ratio: that median over inc's IPEX backend's. "
        "Min latency: the fastest single call (the least disturbed by other processes). First call: compilation for "
        "that shape included (AOTInductor cache empty at the start).",
        "",
    ]
    columns = sorted({c for cols in med.values() for c in cols}, key=lambda c: int(c[2:]))
    header = "| path | " + " | ".join(f"{c} samples/s | {c} vs inc ipex | {c} min latency ms | {c} first call s" for c in columns) + " |"
    lines += [header, "| --- " * (1 + 4 * len(columns)) + "|"]
    for key, cols in med.items():
        cells = []
        for c in columns:
            tp, ref = cols.get(c), med.get(reference, {}).get(c)
            cells += ["-" if tp is None else f"{tp:.1f}", f"{tp / ref:.2f}x" if tp and ref else "-"]
            cells += [f"{low[key][c]:.2f}" if c in low.get(key, {}) else "-", f"{first[key][c]:.1f}" if c in first.get(key, {}) else "-"]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
