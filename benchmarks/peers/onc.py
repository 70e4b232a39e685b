"""The onnx-neural-compressor peer, seen from the benchmark process.

onnx-neural-compressor (Intel Neural Compressor for ONNX Runtime) pins numpy<2, so it cannot share the
benchmark's environment. :func:`quantize` hands it the FP32 model (an ``.onnx`` file) and the calibration
batches (an ``.npz``) in a work folder, runs ``onnx_neural_compressor_quantize.py`` with that
environment's interpreter, and loads the INT8 ``.onnx`` file it writes, so the benchmark times the
peer's model in its own process with the same sessions as every other model.

Any failure (no interpreter given, the library missing or raising, a model ONNX Runtime cannot load)
yields a :class:`PeerResult` without a model and with the reason, logged as a warning: the benchmark
then reports the peer as "n/a" and completes.
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError

import inc_onnx
from inc_core.errors import ModelLoadError

__all__ = ["LABEL", "PeerResult", "quantize"]

LABEL = "INC-ORT"  # column name: Intel Neural Compressor for ONNX Runtime
SCRIPT = Path(__file__).with_name("onnx_neural_compressor_quantize.py")
_log = logging.getLogger("inc.bench")


@dataclass(frozen=True, kw_only=True)
class PeerResult:
    """The peer's INT8 model, or why there is none.

    Attributes:
        model: the INT8 model, ``None`` when the peer could not produce one.
        settings: what the peer script reports it used (format, dtypes, calibration, timing, version).
        reason: why ``model`` is ``None``; ``None`` when it is not.
    """

    model: onnx.ModelProto | None
    settings: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None


def quantize(
    python: Path | None,
    approach: str,
    model: onnx.ModelProto,
    workdir: Path,
    *,
    name: str,
    calibration: list[dict[str, np.ndarray]] | None = None,
    timeout_s: float = 1800.0,
) -> PeerResult:
    """Quantize ``model`` with onnx-neural-compressor in the environment of ``python``.

    Args:
        python: interpreter of the environment holding onnx-neural-compressor; ``None``: peer skipped.
        approach: ``"static"`` (needs ``calibration``) or ``"dynamic"``.
        model: the FP32 model.
        workdir: a folder for the exchanged files (a subfolder ``onc-<name>`` is created).
        name: short name of the model, for the subfolder and the messages.
        calibration: calibration batches (all of one batch size), fed as they are to the peer's calibration.
        timeout_s: how long the peer may take before it counts as failed.

    Returns:
        The peer's result; on any failure, no model and the reason (also logged as a warning).
    """
    if approach not in ("static", "dynamic"):
        raise ValueError(f"approach must be 'static' or 'dynamic', got {approach!r}")
    if python is None:
        return _unavailable(name, "no --onc-python given (interpreter of an environment with onnx-neural-compressor)")
    if not Path(python).is_file():
        return _unavailable(name, f"--onc-python {python} is not a file")
    folder = workdir / f"onc-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    src, dst, report = folder / "fp32.onnx", folder / "int8.onnx", folder / "report.json"
    onnx.save_model(model, str(src))
    cmd = [str(python), str(SCRIPT), approach, "--model", str(src), "--output", str(dst), "--report", str(report)]
    if approach == "static":
        if not calibration:
            raise ValueError("static quantization by the peer needs calibration batches")
        arrays = {key: np.stack([batch[key] for batch in calibration]) for key in calibration[0]}
        np.savez(folder / "calib.npz", **arrays)
        cmd += ["--calib", str(folder / "calib.npz")]
    _log.info("quantizing %s with onnx-neural-compressor (%s): %s", name, approach, " ".join(cmd))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return _unavailable(name, f"onnx-neural-compressor took longer than {timeout_s:.0f} s")
    except OSError as exc:
        return _unavailable(name, f"cannot run {python}: {exc}")
    _log.debug("peer output for %s:\n%s\n%s", name, done.stdout, done.stderr)
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        return _unavailable(name, f"onnx-neural-compressor exited with status {done.returncode}: {tail}")
    try:
        settings = json.loads(report.read_text())
        int8 = onnx.load_model(str(dst))  # external data (the peer writes some) is read from the same folder
        inc_onnx.create_session(int8, threads=1, runtime="ort")  # a model ORT cannot load must not stop the whole benchmark
    except (OSError, ValueError, DecodeError) as exc:  # ModelLoadError and JSON errors are ValueErrors
        kind = "ONNX Runtime cannot load its model" if isinstance(exc, ModelLoadError) else "its output is unreadable"
        return _unavailable(name, f"onnx-neural-compressor ran, but {kind}: {exc}")
    return PeerResult(model=int8, settings=settings)


def _unavailable(name: str, reason: str) -> PeerResult:
    _log.warning("INT8 %s column for %s: n/a (%s)", LABEL, name, reason)
    return PeerResult(model=None, reason=reason)
