"""Parent side of a multi-instance benchmark: start pinned worker processes, release them together, collect.

Protocol with :mod:`inc_core._benchmark_worker` (one JSON object per line on the worker's stdout):

1. The parent saves the model with the backend's ``save`` and the inputs as ``.npz`` in a temporary
   directory, and writes one spec file per instance: backend key and class path (``module:qualname``,
   so a backend registered in-process with :func:`inc.register_backend` works too), core set, counts.
2. Each worker pins itself, loads backend, model and inputs, runs its warmup and reports ``ready``.
3. Once every worker is ready (the barrier), the parent writes ``go`` to each worker's stdin.
4. Each worker times its calls and reports ``result`` with its latencies, pid and CPU set, or ``error``.

Whatever the model or framework prints goes to a per-instance log file, which is quoted when a worker fails.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from inc_core import errors
from inc_core._benchmark_result import BenchmarkResult, instance_result
from inc_core.backend import Backend
from inc_core.errors import BenchmarkError, ConfigError

__all__ = ["run_instances", "save_inputs", "load_inputs", "WORKER_MODULE"]

log = logging.getLogger("inc")

WORKER_MODULE = "inc_core._benchmark_worker"
# Thread-pool sizes read by the common runtimes (OpenMP, MKL, OpenBLAS) when a process starts.
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_LOG_TAIL_CHARS = 4000
_EXIT_TIMEOUT_S = 30


def save_inputs(inputs: Any, path: Path) -> dict[str, Any]:
    """Write one batch of inputs to an ``.npz`` file; return what :func:`load_inputs` needs to rebuild it.

    Tuples, lists and mappings are kept as they are at any depth (a DLRM takes dense features, then a list of
    index tensors and a list of offset tensors): each array is stored on its own, the structure in the layout.

    Raises:
        ConfigError: an input cannot be represented as a numpy array.
    """
    arrays: dict[str, np.ndarray] = {}

    def store(value: Any, label: str | None) -> dict[str, Any]:
        if isinstance(value, Mapping):
            names = [str(k) for k in value]
            return {"kind": "mapping", "names": names, "items": [store(v, n) for n, v in zip(names, value.values())]}
        if isinstance(value, (tuple, list)) and not _plain_numbers(value):
            items = [store(v, f"#{i}" if label is None else f"{label}[{i}]") for i, v in enumerate(value)]
            return {"kind": "tuple" if isinstance(value, tuple) else "list", "items": items}
        try:
            array = np.asarray(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(
                f"benchmark: input {label} ({type(value).__name__}) cannot be converted to a numpy array ({exc}); "
                "with instances > 1 the inputs are sent to each instance as numpy arrays."
            ) from exc
        if array.dtype == object:
            raise ConfigError(
                f"benchmark: input {label} ({type(value).__name__}) is not a numeric array; with instances > 1 "
                "the inputs are sent to each instance as numpy arrays. Pass arrays (or tensors numpy can read)."
            )
        # Positional keys: input names may hold characters a zip member name cannot.
        key = f"input_{len(arrays)}"
        arrays[key] = array
        return {"kind": "array", "key": key}

    layout = store(inputs, None if isinstance(inputs, (tuple, list, Mapping)) else "#0")
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
    return layout


def _plain_numbers(value: Any) -> bool:
    """A (nested) list of Python numbers: one array, as numpy reads it (not a list of inputs)."""
    if isinstance(value, (tuple, list)):
        return isinstance(value, list) and bool(value) and all(_plain_numbers(v) for v in value)
    return isinstance(value, (bool, int, float, complex))


def load_inputs(path: Path, layout: Mapping[str, Any]) -> Any:
    """Inverse of :func:`save_inputs`."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}

    def build(node: Mapping[str, Any]) -> Any:
        if node["kind"] == "array":
            return arrays[node["key"]]
        items = [build(item) for item in node["items"]]
        if node["kind"] == "mapping":
            return dict(zip(node["names"], items))
        return tuple(items) if node["kind"] == "tuple" else items

    return build(layout)


def _class_path(impl: Backend) -> str:
    cls = type(impl)
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise ConfigError(
            f"benchmark: the backend class {cls.__qualname__} is defined in {cls.__module__!r}"
            f"{' inside a function' if '<locals>' in cls.__qualname__ else ''}, so instance processes cannot "
            "import it. Define it at the top level of an importable module (or install it under the "
            "inc_core.backends entry point), or run with instances=1."
        )
    return f"{cls.__module__}:{cls.__qualname__}"


def _suffix(impl: Backend, model: Any) -> str:
    """The backend's file suffix for ``model``, checked: it becomes part of a file name."""
    suffix = impl.file_suffix(model)
    if not isinstance(suffix, str) or not suffix.startswith(".") or "/" in suffix or "\\" in suffix or len(suffix) < 2:
        raise ConfigError(
            f"benchmark: the {impl.name} backend's file_suffix returned {suffix!r}; expected a suffix such as '.onnx'. "
            "This is a bug in the backend plugin; run with instances=1 meanwhile."
        )
    return suffix


def _options(impl: Backend) -> dict[str, Any]:
    """The backend's constructor options, checked to travel as JSON to the instance processes."""
    options = impl.options()
    try:
        json.dumps(options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"benchmark: the {impl.name} backend's options() returned {options!r}, which is not JSON ({exc}); "
            "instance processes rebuild the backend from them. Run with instances=1."
        ) from exc
    return dict(options)


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    # Workers must import what this process can: inc_core itself and the backend's module, even when
    # they were made importable by editing sys.path rather than by installing them.
    paths = [p or os.getcwd() for p in sys.path]
    extra = env.get("PYTHONPATH", "").split(os.pathsep) if env.get("PYTHONPATH") else []
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*(p for p in paths if os.path.isdir(p)), *extra]))
    for var in _THREAD_VARS:
        env[var] = str(threads)
    return env


def _log_tail(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    text = text.strip()
    return text[-_LOG_TAIL_CHARS:] if text else "(no output)"


class _Worker:
    def __init__(self, index: int, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.index = index
        self.proc = proc
        self.log_path = log_path

    def receive(self, expected: str) -> dict[str, Any]:
        """Block for the worker's next message; raise what the worker reported, or its exit."""
        stdout: IO[bytes] | None = self.proc.stdout
        line = stdout.readline() if stdout is not None else b""
        if not line:
            code = self.proc.wait()
            raise BenchmarkError(
                f"benchmark instance {self.index} (pid {self.proc.pid}) exited with code {code} before reporting "
                f"{expected!r}. Its output:\n{_log_tail(self.log_path)}"
            )
        try:
            message = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchmarkError(
                f"benchmark instance {self.index} sent an unreadable message {line[:200]!r} ({exc}); something in "
                f"the instance process wrote to its protocol channel. Its output:\n{_log_tail(self.log_path)}"
            ) from exc
        if message.get("status") == "error":
            self.proc.wait()
            _raise_worker_error(self.index, message)
        if message.get("status") != expected:
            raise BenchmarkError(f"benchmark instance {self.index} sent {message.get('status')!r}, expected {expected!r}.")
        return dict(message)

    def release(self) -> None:
        stdin = self.proc.stdin
        if stdin is None:
            return
        try:
            stdin.write(b"go\n")
            stdin.close()
        except BrokenPipeError:
            # The worker is gone; receive() reports how it ended, with its log.
            log.debug("benchmark instance %d closed its stdin before the start signal", self.index)

    def finish(self) -> None:
        """Wait for a worker that has reported its result to exit on its own."""
        try:
            self.proc.wait(timeout=_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning(
                "benchmark instance %d (pid %d) did not exit %d s after reporting; stopping it",
                self.index, self.proc.pid, _EXIT_TIMEOUT_S,
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                stream.close()


def _raise_worker_error(index: int, message: Mapping[str, Any]) -> None:
    kind = str(message.get("type", "Exception"))
    text = f"benchmark instance {index} failed: {message.get('message', '')}"
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, errors.IncError):
        raise cls(text)
    raise BenchmarkError(
        f"{text} ({kind}). Run the model with instances=1 to debug it in this process.\n"
        f"Traceback in the instance process:\n{message.get('traceback', '')}"
    )


def run_instances(
    impl: Backend,
    backend_key: str,
    model: Any,
    inputs: Any,
    *,
    core_sets: Sequence[tuple[int, ...]],
    warmup: int,
    iterations: int,
    batch_size: int,
) -> list[BenchmarkResult]:
    """Run one pinned worker process per core set, start their timed loops together, return their results."""
    class_path = _class_path(impl)
    threads = len(core_sets[0])
    if not hasattr(os, "sched_setaffinity"):
        log.warning("benchmark: this platform cannot pin processes to cores; the instances run unpinned")
    with tempfile.TemporaryDirectory(prefix="inc-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model_path = tmp / f"model{_suffix(impl, model)}"
        try:
            impl.save(model, model_path)
        except errors.IncError:
            raise
        except Exception as exc:  # a plugin's save that lets its framework's error through
            raise errors.SaveError(
                f"benchmark: the {impl.name} backend could not save the model for the instance processes "
                f"({type(exc).__name__}: {exc}). Check that inc.save(model, 'model{model_path.suffix}') works, "
                "or run with instances=1."
            ) from exc
        layout = save_inputs(inputs, tmp / "inputs.npz")
        base_spec = {
            "backend_key": backend_key,
            "backend_class": class_path,
            "backend_options": _options(impl),
            "model": str(model_path),
            "inputs": str(tmp / "inputs.npz"),
            "inputs_layout": layout,
            "warmup": warmup,
            "iterations": iterations,
            "threads": threads,
        }
        env = _child_env(threads)
        workers: list[_Worker] = []
        try:
            for index, cpus in enumerate(core_sets):
                spec_path = tmp / f"instance-{index}.json"
                spec_path.write_text(json.dumps({**base_spec, "index": index, "cpus": list(cpus)}), encoding="utf-8")
                log_path = tmp / f"instance-{index}.log"
                with open(log_path, "wb") as log_file:
                    try:
                        proc = subprocess.Popen(
                            [sys.executable, "-m", WORKER_MODULE, str(spec_path)],
                            stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE,
                            stderr=log_file,
                            env=env,
                        )
                    except OSError as exc:
                        raise BenchmarkError(
                            f"benchmark: cannot start instance process {index} ({sys.executable}: {exc}); "
                            "run with instances=1."
                        ) from exc
                workers.append(_Worker(index, proc, log_path))
                log.debug("benchmark instance %d: pid %d on CPUs %s", index, proc.pid, list(cpus))
            for worker in workers:
                worker.receive("ready")
                log.debug("benchmark instance %d ready", worker.index)
            for worker in workers:
                worker.release()
            reports = [worker.receive("result") for worker in workers]
            for worker in workers:
                worker.finish()
        finally:
            for worker in workers:
                worker.stop()
    return [
        instance_result(
            report["latencies_s"],
            batch_size=batch_size,
            warmup=warmup,
            cores_per_instance=threads,
            backend=impl.name,
            pid=int(report["pid"]),
            cpus=report["cpus"],
        )
        for report in reports
    ]
