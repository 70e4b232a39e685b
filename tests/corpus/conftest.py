"""Corpus fixtures and the results table (printed after the run; written to benchmarks/results when complete)."""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
_ROWS: list[dict[str, Any]] = []


@pytest.fixture
def corpus_rows() -> list[dict[str, Any]]:
    """The shared list each corpus case appends its row to."""
    return _ROWS


def pytest_configure(config: pytest.Config) -> None:
    # Two threads, like the CI machines; set before any test imports torch's thread pool.
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    # torch's structured-trace logger emits DEBUG records pytest would print with every failure.
    logging.getLogger("torch.__trace").setLevel(logging.WARNING)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "packages"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() + (" (+ uncommitted changes under packages/)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _reference_cell(reference: dict[str, Any]) -> str:
    if "error" in reference:
        return "error: " + reference["error"][:60].replace("|", "/")
    return f"{_fmt(reference.get('cosine'))} ({_fmt(reference.get('int8_ops'))} ops)"


def markdown(rows: list[dict[str, Any]], header: dict[str, str]) -> str:
    lines = [
        "# Corpus: architectures users bring, through every inc path",
        "",
        *(f"- {key}: {value}" for key, value in header.items()),
        "",
        "Fidelity: mean (min) per-sample cosine of the INT8 model's outputs against FP32 on held-out inputs.",
        "Reference: the framework's own flow on the same model and data (torch.ao FX, torchao PT2E +",
        "X86InductorQuantizer, torch.ao dynamic, onnxruntime quantize_static/quantize_dynamic). Floor: reference - 0.02,",
        "never below 0.80 (0.90 where the reference produced nothing). int8 ops: int8 conv/linear kernels in what runs.",
        "",
        "| model | path | outcome | int8 ops | fidelity (min) | floor | reference | seconds | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        outcome = row.get("outcome", "?")
        if "error" in row:
            outcome = f"{outcome}: {row['error'][:90]}".replace("|", "/")
        fidelity = f"{_fmt(row.get('cosine'))} ({_fmt(row.get('min_cosine'))})" if "cosine" in row else "-"
        lines.append(
            f"| {row['model']} | {row['path']} | {outcome} | {_fmt(row.get('int8_ops'))} | {fidelity} | "
            f"{_fmt(row.get('floor'))} | {_reference_cell(row['reference'])} | {_fmt(row.get('seconds'), 1)} | "
            f"{row.get('verdict', 'FAIL: setup error')} |"
        )
    passed = sum(1 for r in rows if str(r.get("verdict", "")).startswith("ok"))
    lines += ["", f"{passed} of {len(rows)} cases pass."]
    return "\n".join(lines) + "\n"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not _ROWS:
        return
    import test_corpus

    header = {
        "CPU": _cpu_name(),
        "date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "git commit": _commit(),
        "python": platform.python_version(),
    }
    try:
        import onnxruntime
        import torch
        import torchao
        from _torchvision import torchvision_models

        torchvision_models()  # imports torchvision the way the corpus does
        import torchvision

        header["versions"] = (
            f"torch {torch.__version__}, torchao {torchao.__version__}, torchvision {torchvision.__version__}, "
            f"onnxruntime {onnxruntime.__version__}"
        )
    except ImportError:
        pass
    text = markdown(_ROWS, header)
    terminalreporter.write_sep("=", "corpus table")
    terminalreporter.write(text)
    # Only a run of every case replaces the committed results.
    if len(_ROWS) == len(test_corpus.CASES):
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "corpus.md").write_text(text)
        (RESULTS / "corpus.json").write_text(json.dumps({"header": header, "rows": _ROWS}, indent=1) + "\n")
        terminalreporter.write_line(f"written: {RESULTS / 'corpus.md'} and corpus.json")
