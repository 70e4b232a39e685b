"""Which runtime executes an ONNX model: ONNX Runtime's CPU provider or OpenVINO, named or measured.

``runtime="auto"`` times both runtimes on the model at hand, on this CPU, with the caller's thread
count, and picks the faster: which one wins depends on the CPU (AMX, AVX512-VNNI, AVX2) and on the model
(convolutions, transformer MatMuls, batch size), so the choice is measured rather than guessed from a
vendor name. The decision is cached in memory per model, CPU, threads, input shapes and precision, so
it is measured once per process. When OpenVINO is not installed, or cannot compile the model, "auto"
is ONNX Runtime without a measurement.
"""

from __future__ import annotations

import functools
import logging
import platform
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inc_core.errors import BackendNotFoundError, ConfigError, IncError
from inc_onnx._feeds import to_feeds
from inc_onnx._model_io import as_model_proto, digest
from inc_onnx._preprocess import InputSpec, _input_specs

__all__ = ["RUNTIMES", "RuntimeChoice", "check_runtime", "choose_runtime", "cached_choices"]

log = logging.getLogger("inc")

RUNTIMES = ("auto", "ort", "openvino")
# Measuring: a few untimed calls, then alternating blocks of timed calls for about this long per runtime.
_WARMUP_CALLS = 3
_BLOCK_CALLS = 5
_MIN_CALLS = 10
_MAX_CALLS = 200
_BUDGET_S = 0.5

_lock = threading.Lock()
_choices: dict[tuple[str, ...], RuntimeChoice] = {}


@dataclass(frozen=True)
class RuntimeChoice:
    """What ``runtime="auto"`` decided for one model on this CPU.

    Attributes:
        runtime: ``"ort"`` or ``"openvino"``.
        latency_ms: median latency per call of each runtime measured (empty when nothing was measured).
        threads: threads both runtimes ran with.
        cpu: the CPU measured on.
        reason: why this runtime (the measurement, or why only one runtime was available).
    """

    runtime: str
    latency_ms: Mapping[str, float] = field(default_factory=dict)
    threads: int = 1
    cpu: str = ""
    reason: str = ""


def check_runtime(owner: str, runtime: Any) -> str:
    """``runtime`` if it is one of :data:`RUNTIMES`, else a ConfigError listing them."""
    if not isinstance(runtime, str) or runtime not in RUNTIMES:
        raise ConfigError(
            f"{owner}: runtime={runtime!r} is not one of {list(RUNTIMES)} ('ort': ONNX Runtime's CPU provider, "
            "'openvino': OpenVINO's CPU plugin, 'auto': the faster of the two, measured on this CPU)."
        )
    return runtime


@functools.cache
def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo`` on Linux), part of the cache key of a choice."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cached_choices() -> dict[tuple[str, ...], RuntimeChoice]:
    """The choices ``runtime="auto"`` made in this process, by (model digest, CPU, threads, shapes, precision)."""
    with _lock:
        return dict(_choices)


def choose_runtime(
    model: Any, inputs: Any = None, *, threads: int | None = None, openvino_precision: str = "f32"
) -> RuntimeChoice:
    """Time ONNX Runtime and OpenVINO on ``model`` and return the faster (cached per model and CPU).

    Args:
        model: an ``onnx.ModelProto`` or the path of an ``.onnx`` file.
        inputs: one batch to time on (array, tuple or mapping, as for ``inc.benchmark``); by default a
            batch of one with zeros for integer inputs and random values for float inputs, dynamic
            dimensions set to 1.
        threads: threads for both runtimes (``None``: every CPU this process may use).
        openvino_precision: OpenVINO's inference precision for float ops (see ``create_session``).

    Raises:
        ModelLoadError: ONNX Runtime cannot load the model.
        DatasetError: ``inputs`` do not fit the model.
    """
    choice, _ = measure(model, inputs, threads=threads, openvino_precision=openvino_precision)
    return choice


def measure(
    model: Any, inputs: Any = None, *, threads: int | None = None, openvino_precision: str = "f32"
) -> tuple[RuntimeChoice, Any | None]:
    """:func:`choose_runtime`, plus the winner's session when this call built one (None when cached or not measured)."""
    from inc_onnx.runtime._openvino import check_precision, compile_openvino, import_openvino
    from inc_onnx.runtime._session import available_cpus, ort_session

    check_precision("choose_runtime", openvino_precision)
    proto = as_model_proto(model)
    specs = _input_specs(proto)
    feeds = to_feeds(inputs, specs, where="runtime choice inputs") if inputs is not None else _synthetic_feeds(specs)
    n_threads = threads if threads is not None else available_cpus()
    shapes = ";".join(f"{k}:{v.dtype}{list(v.shape)}" for k, v in sorted(feeds.items()))
    key = (digest(proto), cpu_name(), str(n_threads), shapes, openvino_precision)
    with _lock:
        cached = _choices.get(key)
    if cached is not None:
        return cached, None
    try:
        import_openvino()
    except BackendNotFoundError:
        choice = RuntimeChoice("ort", {}, n_threads, cpu_name(), "OpenVINO is not installed (pip install 'inc-onnx[openvino]')")
        return _remember(key, choice), None
    ort_sess = ort_session(proto, threads=n_threads)
    try:
        ov_sess = compile_openvino(model, proto, threads=n_threads, precision=openvino_precision)
        ov_sess.run(None, feeds)
    except IncError as exc:
        choice = RuntimeChoice("ort", {}, n_threads, cpu_name(), f"OpenVINO could not run the model: {exc}")
        log.info("runtime auto: ort, %s", choice.reason)
        return _remember(key, choice), ort_sess
    sessions = {"ort": ort_sess, "openvino": ov_sess}
    latency = _time_side_by_side(sessions, feeds)
    winner = min(latency, key=lambda name: latency[name])
    other = "ort" if winner == "openvino" else "openvino"
    reason = f"{winner} {latency[other] / latency[winner]:.2f}x faster than {other} (median latency, {n_threads} threads)"
    choice = RuntimeChoice(winner, latency, n_threads, cpu_name(), reason)
    log.info("runtime auto: %s on %s", reason, cpu_name())
    return _remember(key, choice), sessions[winner]


def _remember(key: tuple[str, ...], choice: RuntimeChoice) -> RuntimeChoice:
    with _lock:
        _choices[key] = choice
    return choice


def _synthetic_feeds(specs: tuple[InputSpec, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in specs:
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in (spec.shape or ()))
        # Zeros for integer inputs: a valid index for every embedding table and token-type lookup.
        kind = spec.dtype.kind
        feeds[spec.name] = rng.normal(0, 1, shape).astype(spec.dtype) if kind == "f" else np.zeros(shape, spec.dtype)
    return feeds


def _time_side_by_side(sessions: Mapping[str, Any], feeds: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Median latency (ms) of each session, timed in alternating blocks so other load falls on both alike."""
    from inc_core.errors import DatasetError

    calls = {}
    for name, session in sessions.items():
        names = [o.name for o in session.get_outputs()]
        call = functools.partial(session.run, names, dict(feeds))
        try:
            for _ in range(_WARMUP_CALLS):
                call()
        except IncError:
            raise
        except Exception as exc:  # ORT's pybind errors carry the reason in their text
            text = (str(exc).strip() or type(exc).__name__).splitlines()[0][:400]
            raise DatasetError(f"runtime choice: {name} could not run the model on the timing inputs: {text}") from exc
        calls[name] = call
    times: dict[str, list[float]] = {name: [] for name in calls}
    start = time.perf_counter()
    round_ = 0
    while True:
        order = list(calls) if round_ % 2 == 0 else list(reversed(list(calls)))
        for name in order:
            calls[name]()  # untimed: lets the previous runtime's spinning threads settle
            for _ in range(_BLOCK_CALLS):
                t0 = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - t0)
        round_ += 1
        done = min(len(v) for v in times.values())
        if done >= _MAX_CALLS or (done >= _MIN_CALLS and time.perf_counter() - start >= _BUDGET_S * len(calls)):
            break
    return {name: float(np.median(values)) * 1e3 for name, values in times.items()}
