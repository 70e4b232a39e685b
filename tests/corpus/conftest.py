"""Corpus fixtures and the results table (printed after the run; written to benchmarks/results when complete).

Under pytest-xdist (the nox session runs two workers) each worker keeps the rows of the cases it ran and hands
them to the controller when it finishes (``workeroutput``); the controller prints and writes the merged table,
in the order of ``test_corpus.CASES``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
_ROWS: list[dict[str, Any]] = []
_STARTED = datetime.datetime.now(datetime.timezone.utc)
_COMMIT_AT_START: list[str] = []  # the code a run measures is the code it imported when it started
_FULL_RUN = False  # every corpus case collected: only such a run replaces the committed results
_WORKER_RUNS: list[bool] = []  # controller under xdist: whether each finished worker had collected every case


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


@pytest.fixture
def corpus_rows() -> Iterator[list[dict[str, Any]]]:
    """The shared list each corpus case appends its row to; the row is also printed as soon as the case ends."""
    count = len(_ROWS)
    yield _ROWS
    for row in _ROWS[count:]:
        print("corpus row:", json.dumps(row))  # shown with -s, and in the report of a failed case
    if _FULL_RUN and "PYTEST_XDIST_WORKER" not in os.environ:  # written after every case, so that an interrupted
        _write_results()  # full run still leaves its table (a worker holds only its own cases: the controller writes)


def pytest_collection_finish(session: pytest.Session) -> None:
    global _FULL_RUN
    import test_corpus

    _FULL_RUN = sum(1 for item in session.items if item.name.startswith("test_corpus_case[")) == len(test_corpus.CASES)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _is_worker(session.config):
        session.config.workeroutput["corpus_rows"] = json.dumps(_ROWS)  # type: ignore[attr-defined]
        session.config.workeroutput["corpus_full_run"] = _FULL_RUN  # type: ignore[attr-defined]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist controller: take the rows of a worker that finished."""
    output = getattr(node, "workeroutput", {})
    if "corpus_rows" in output:
        _ROWS.extend(json.loads(output["corpus_rows"]))
        _WORKER_RUNS.append(bool(output["corpus_full_run"]))


def pytest_configure(config: pytest.Config) -> None:
    # Two threads, like the CI machines; set before any test imports torch's thread pool.
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    _COMMIT_AT_START.append(_commit())
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
        "never below 0.80 unless the reference is below 0.80 too (then on par with it, and the verdict says so; 0.90 where the reference produced nothing). int8 ops: int8 conv/linear kernels in what runs.",
        "torch_qat_pt2e/fx (inc_torch.prepare_qat, 8 steps of a distillation loop, convert): fidelity is the INT8 model's",
        "against the QAT model in eval mode, the reference torchao's prepare_qat_pt2e / torch.ao's prepare_qat_fx flow",
        "trained the same way; the case also",
        "requires the QAT graph with fake quantization off to compute FP32 (min cosine >= 0.9999) and the QAT and INT8",
        "models to repeat their outputs in eval mode. corpus.json has each figure (and the INT8 model against FP32).",
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


def _header() -> dict[str, str]:
    import test_corpus

    header = {
        "CPU": _cpu_name(),
        "started (UTC)": _STARTED.strftime("%Y-%m-%d %H:%M"),
        "git commit (at start)": _COMMIT_AT_START[0] if _COMMIT_AT_START else _commit(),
        "python": platform.python_version(),
        "cases finished": f"{len(_ROWS)} of {len(test_corpus.CASES)}",
        "processes": (
            f"{len(_WORKER_RUNS)} pytest-xdist workers running cases side by side: seconds include the others' load"
            if _WORKER_RUNS
            else "one"
        ),
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
    return header


def _write_results() -> None:
    header = _header()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "corpus.md").write_text(markdown(_ROWS, header))
    (RESULTS / "corpus.json").write_text(json.dumps({"header": header, "rows": _ROWS}, indent=1) + "\n")


def _in_case_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    import test_corpus

    order = {case: i for i, case in enumerate(test_corpus.CASES)}
    return sorted(rows, key=lambda row: order.get((row["model"], row["path"]), len(order)))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    global _FULL_RUN
    if not _ROWS:
        return
    if _WORKER_RUNS:  # the controller of an xdist run: every worker collected every case, and none was lost
        import test_corpus

        _FULL_RUN = all(_WORKER_RUNS) and {(r["model"], r["path"]) for r in _ROWS} == set(test_corpus.CASES)
        _ROWS[:] = _in_case_order(_ROWS)
    terminalreporter.write_sep("=", "corpus table")
    terminalreporter.write(markdown(_ROWS, _header()))
    if _FULL_RUN:
        _write_results()
        terminalreporter.write_line(f"written: {RESULTS / 'corpus.md'} and corpus.json")
