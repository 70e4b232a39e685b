"""One benchmark instance in its own process: ``python -m inc_core._benchmark_worker SPEC.json``.

Started by :mod:`inc_core._benchmark_instances`, which describes the protocol. The process pins
itself to its cores before importing the backend, so every thread the framework starts inherits
the pinning.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from inc_core.backend import Backend
from inc_core.errors import BackendNotFoundError, BenchmarkError

__all__ = ["main"]


def _send(channel: IO[str], message: dict[str, Any]) -> None:
    channel.write(json.dumps(message) + "\n")
    channel.flush()


def _pin(cpus: Sequence[int]) -> None:
    # Without sched_setaffinity (macOS, Windows) the instance runs unpinned; the parent warned already.
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cpus))


def _current_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _load_backend(key: str, class_path: str, options: dict[str, Any] | None = None) -> Backend:
    """Import the parent's backend class by path, register it under the parent's key, build it with its options."""
    from inc_core._registry import get_backend, register_backend

    module_name, _, qualname = class_path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise BackendNotFoundError(
            f"benchmark instance: cannot import the backend class {class_path!r} ({exc}); make its module "
            "importable in a fresh Python process (install it, or put it on PYTHONPATH)."
        ) from exc
    register_backend(key, obj)
    if options:
        instance: Backend = obj(**options)
        return instance
    return get_backend(key)


def _run(spec: dict[str, Any], channel: IO[str]) -> None:
    from inc_core._benchmark import run_warmup, time_calls
    from inc_core._benchmark_instances import load_inputs

    _pin(spec["cpus"])
    from inc_core._user_modules import import_user_modules

    import_user_modules()  # what the CLI's --import-module named: classes the model file refers to
    backend = _load_backend(spec["backend_key"], spec["backend_class"], spec.get("backend_options"))
    model = backend.load(Path(spec["model"]))
    inputs = load_inputs(Path(spec["inputs"]), spec["inputs_layout"])
    fn = backend.runner(model, inputs, threads=int(spec["threads"]))
    run_warmup(fn, int(spec["warmup"]))
    _send(channel, {"status": "ready", "pid": os.getpid()})
    # The barrier: the parent writes "go" once every instance is ready; anything else means it gave up.
    if sys.stdin.readline().strip() != "go":
        raise BenchmarkError("the benchmark parent closed the start channel without starting the run")
    latencies = time_calls(fn, int(spec["iterations"]))
    _send(channel, {"status": "result", "pid": os.getpid(), "cpus": _current_cpus(), "latencies_s": latencies.tolist()})


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # The protocol gets the real stdout; everything else printed to fd 1 (by Python code or by a
    # framework's C++ runtime) is sent to stderr, which the parent keeps as the instance's log.
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    try:
        if len(args) != 1:
            raise BenchmarkError(f"usage: python -m {__spec__.name if __spec__ else 'inc_core._benchmark_worker'} SPEC.json")
        spec = json.loads(Path(args[0]).read_text(encoding="utf-8"))
        _run(spec, channel)
    except Exception as exc:  # every failure is reported to the parent, which re-raises it there
        _send(
            channel,
            {"status": "error", "type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()},
        )
        traceback.print_exc()
        return 1
    finally:
        channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
