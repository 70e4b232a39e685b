"""Reading, validating and writing ONNX models; the user's model and file are never modified."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError

from inc_core.errors import ModelLoadError, SaveError, UnsupportedModelError

__all__ = ["as_model_proto", "check_runtime_loads", "digest", "is_onnx_model", "save_model"]

# Protobuf cannot serialize a message of 2 GiB or more; such models need external data files.
_PROTOBUF_LIMIT = 2**31 - 1


def is_onnx_model(model: Any) -> bool:
    """True for an ``onnx.ModelProto`` or a path ending in ``.onnx`` (checked lazily: a bad file fails on load)."""
    if isinstance(model, onnx.ModelProto):
        return True
    return isinstance(model, (str, os.PathLike)) and Path(model).suffix.lower() == ".onnx"


def as_model_proto(model: Any) -> onnx.ModelProto:
    """A private copy of ``model`` as a validated ``ModelProto``.

    Args:
        model: an ``onnx.ModelProto`` or the path of an ``.onnx`` file (external data next to it is read).

    Raises:
        UnsupportedModelError: ``model`` is neither.
        ModelLoadError: the file is missing, is not an ONNX model, or fails the ONNX checker.
    """
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        where = "the given ModelProto"
    elif isinstance(model, (str, os.PathLike)):
        proto = _read_file(Path(model))
        where = repr(str(model))
    else:
        raise UnsupportedModelError(
            f"The onnx backend takes an onnx.ModelProto or the path of an .onnx file, got a {type(model).__name__}. "
            "Export the model to ONNX first (torch.onnx.export, tf2onnx, skl2onnx)."
        )
    if not proto.graph.node:
        raise ModelLoadError(f"{where} has an empty graph (no nodes); it is not a usable ONNX model.")
    try:
        if proto.ByteSize() < _PROTOBUF_LIMIT:
            onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ModelLoadError(
            f"{where} is not a valid ONNX model: {_first_line(exc)}. Re-export it, or check it with "
            "`python -m onnx.checker` (or onnx.checker.check_model) to find the broken node."
        ) from exc
    return proto


def _read_file(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        hint = " (it is a directory)" if path.is_dir() else ""
        raise ModelLoadError(f"No ONNX model file at {str(path)!r}{hint}; give the path of an existing .onnx file.")
    try:
        proto = onnx.load_model(str(path))
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"{str(path)!r} is not an ONNX model (protobuf could not parse it: {_first_line(exc)}). "
            "Check that the file is complete and really is an .onnx export."
        ) from exc
    except (OSError, onnx.checker.ValidationError) as exc:
        raise ModelLoadError(f"Could not read the ONNX model {str(path)!r}: {_first_line(exc)}.") from exc
    if not proto.graph.node and not proto.opset_import:
        # protobuf parses many arbitrary byte strings into an empty message without complaint.
        raise ModelLoadError(
            f"{str(path)!r} is not an ONNX model: it parsed to an empty message (no graph, no opset). "
            "Check that the file is complete and really is an .onnx export."
        )
    return proto


def check_runtime_loads(proto: onnx.ModelProto, *, where: str = "the model") -> ort.InferenceSession:
    """An ONNX Runtime CPU session for ``proto``, or a ModelLoadError saying why ORT refuses it."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own pybind exception types (Fail, InvalidGraph, NotImplemented, ...)
        raise ModelLoadError(
            f"ONNX Runtime {ort.__version__} cannot load {where}: {_first_line(exc)}. Quantization runs the model "
            "through ONNX Runtime's CPU provider, so every op must be one it implements; replace custom ops "
            "or register their library before quantizing."
        ) from exc


def digest(proto: onnx.ModelProto) -> str:
    """A content hash of ``proto`` (identifies the model a calibration belongs to)."""
    return hashlib.blake2b(proto.SerializeToString(deterministic=True), digest_size=16).hexdigest()


def save_model(proto: Any, path: Path) -> None:
    """Write ``proto`` to ``path`` as one self-contained .onnx file (the caller makes it atomic)."""
    if not isinstance(proto, onnx.ModelProto):
        proto = as_model_proto(proto)
    if proto.ByteSize() >= _PROTOBUF_LIMIT:
        raise SaveError(
            f"Cannot write the model to {str(path)!r} as one file: it is {proto.ByteSize() / 2**30:.1f} GiB, over "
            "protobuf's 2 GiB limit. Save it with onnx.save_model(..., save_as_external_data=True) instead."
        )
    try:
        onnx.save_model(proto, str(path))
    except (OSError, ValueError, TypeError) as exc:  # onnx raises ValueError for a model it cannot serialize
        raise SaveError(f"Could not write the ONNX model to {str(path)!r}: {exc}.") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]
