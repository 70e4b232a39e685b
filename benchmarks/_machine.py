"""What the benchmark ran on: the CPU's name and the instruction-set flags that matter for INT8."""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import time
from collections.abc import Iterator
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


#: the lock file every benchmark times under (the one ``flock /tmp/bench.lock ...`` takes), so two never time at once
BENCH_LOCK = Path("/tmp/bench.lock")


@contextlib.contextmanager
def timing_lock(path: Path | None = BENCH_LOCK) -> Iterator[None]:
    """Hold the benchmarks' lock file while timing (``None``: no lock).

    A script started under ``flock /tmp/bench.lock ...`` already runs inside that lock, held by its parent
    process; taking it again would wait for itself forever, so then it times under the parent's hold.
    """
    if path is None:
        yield
        return
    with open(path, "a") as handle:
        if _held_by_an_ancestor(path):
            print(f"{path} is held by a parent process (flock): timing under its hold", flush=True)
            yield
            return
        started = time.perf_counter()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another benchmark is timing: say so rather than sit silent
            print(f"waiting for {path}: another benchmark holds it", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        waited = time.perf_counter() - started
        if waited > 1:
            print(f"waited {waited:.0f} s for {path}", flush=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _held_by_an_ancestor(path: Path) -> bool:
    """Whether a process above this one holds a flock on ``path`` (read from /proc/locks; False where unreadable)."""
    try:
        st = os.stat(path)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return False
    # /proc/locks: "1: FLOCK  ADVISORY  WRITE 4242 fd:01:131 0 EOF"; waiters carry "->" and hold nothing
    file_id = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = {int(parts[4]) for parts in (line.split() for line in lines)
               if len(parts) > 5 and parts[1] == "FLOCK" and parts[5] == file_id}
    pid = os.getppid()
    while pid > 1:
        if pid in holders:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state: the parent's pid
    return False
