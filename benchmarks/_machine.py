"""What the benchmark ran on: the CPU's name and the instruction-set flags that matter for INT8."""

from __future__ import annotations

import platform
from pathlib import Path

_INT8_FLAGS = ("avx2", "avx512f", "amx_int8")


def _cpuinfo_field(key: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The VNNI / AVX2 / AVX-512 / AMX flags of the CPU (the INT8 kernels ORT and oneDNN pick depend on them)."""
    flags = (_cpuinfo_field("flags") or "").split()
    return sorted({f for f in flags if "vnni" in f or f in _INT8_FLAGS})


def git_commit(*paths: str) -> str:
    """The commit measured (short hash), with "+dirty" when ``paths`` hold uncommitted changes.

    benchmarks/results/ never counts: a benchmark that merges its rows into a results file it has already
    written would otherwise mark its own later rows dirty.
    """
    import subprocess

    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths, ":(exclude)benchmarks/results"], cwd=root, capture_output=True, text=True, check=False)
    return (head.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")
