"""Graph preparation before quantization: unique node names, ORT's pre-processing, shape inference.

The prepared graph is what :func:`describe` reports and what every trial quantizes, so it is made
once per model content and cached: op names stay stable across calls, and a tuning run does not
re-optimize the model for every trial.
"""

from __future__ import annotations

import collections
import logging
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnxruntime.quantization.quant_utils import add_infer_metadata
from onnxruntime.quantization.shape_inference import quant_pre_process

from inc_onnx._float32_graph import as_float32_graph
from inc_onnx._model_io import _PROTOBUF_LIMIT, as_model_proto, check_runtime_loads, digest
from inc_onnx._repair import (
    flatten_row_biases,
    float_reads_for_subgraphs,
    merge_opsets,
    rename_new_initializers,
    unshare_biases,
)
from inc_onnx.ptq._conv_transpose import conv_transpose_as_conv, layer_type

__all__ = ["InputSpec", "Prepared", "prepare", "same_model"]

log = logging.getLogger("inc")

_CACHE_SIZE = 2
# Digest suffix of a model prepared with its ConvTranspose ops as sub-pixel Convs.
_SUBPIXEL = ":subpixel"
# What ORT's symbolic shape inference saves in the current directory when it gives up on a graph.
_SYMBOLIC_LEFTOVER = "sym_shape_infer_temp.onnx"
_cache: collections.OrderedDict[str, Prepared] = collections.OrderedDict()
_lock = threading.Lock()


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """One graph input the data must feed: its name, numpy dtype and shape (``None`` or a name for free dims)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None

    def describe(self) -> str:
        dims = "?" if self.shape is None else "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"
        return f"{self.name}: {self.dtype} {dims}"


@dataclass(frozen=True, kw_only=True)
class Prepared:
    """A model ready for calibration and quantization.

    Attributes:
        model: the prepared graph (never handed out without copying: quantizers edit in place).
        digest: content hash of the user's model, and ``:subpixel`` when preparation turned ConvTranspose ops into
            sub-pixel Convs, to match calibrations to models.
        inputs: the graph inputs data must provide, in graph order.
        float_tensors: names of every float32 activation with known type (calibration candidates).
        value_info: the shape annotations (``graph.value_info``) of the user's model as given, before
            preparation added inferred ones; the quantized model carries these only.
    """

    model: onnx.ModelProto
    digest: str
    inputs: tuple[InputSpec, ...]
    float_tensors: frozenset[str]
    value_info: tuple[onnx.ValueInfoProto, ...]

    def copy(self) -> onnx.ModelProto:
        proto = onnx.ModelProto()
        proto.CopyFrom(self.model)
        return proto


def prepare(model: Any, *, subpixel: bool = True) -> Prepared:
    """Load (if a path), validate and prepare ``model``; cached by model content.

    ``subpixel``: each ConvTranspose that has one becomes its sub-pixel convolution, the form ONNX Runtime's CPU
    provider runs in INT8 (see :mod:`inc_onnx.ptq._conv_transpose`); ``False`` keeps them (OpenVINO runs a QDQ
    ConvTranspose in INT8 itself, and faster than the sub-pixel form).

    Raises:
        ModelLoadError: the model cannot be read, is invalid, or ONNX Runtime cannot load it.
    """
    proto = as_model_proto(model)
    key = digest(proto)
    entry = f"{key}{_SUBPIXEL}" if subpixel else key
    with _lock:
        if entry in _cache:
            _cache.move_to_end(entry)
            return _cache[entry]
    where = repr(str(model)) if not isinstance(model, onnx.ModelProto) else "the given ModelProto"
    check_runtime_loads(proto, where=where)
    as_float32_graph(proto)
    value_info = tuple(_copy_value_info(v) for v in proto.graph.value_info)
    prepared_proto = _prepare_graph(proto, subpixel=subpixel)
    # The digest names the sub-pixel form only where it differs from the model as given.
    rewritten = any(layer_type(node) != node.op_type for node in prepared_proto.graph.node)
    prepared = Prepared(
        model=prepared_proto,
        digest=entry if rewritten else key,
        inputs=_input_specs(prepared_proto),
        float_tensors=frozenset(_float_tensors(prepared_proto)),
        value_info=value_info,
    )
    with _lock:
        _cache[entry] = prepared
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return prepared


def same_model(digest_a: str, digest_b: str) -> bool:
    """True when two preparation digests are of the same user model (prepared in the same or another form)."""
    return digest_a.split(":")[0] == digest_b.split(":")[0]


def _why(exc: BaseException) -> str:
    # ORT's symbolic inference raises some exceptions without a message (a bare AssertionError on a Loop body)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _prepare_graph(proto: onnx.ModelProto, *, subpixel: bool) -> onnx.ModelProto:
    known = _tensor_names(proto)
    _name_nodes(proto)
    merge_opsets(proto)
    proto = _with_opset_for_int8(proto)
    try:
        prepared = _symbolic_pre_process(proto)
    except Exception as exc:  # symbolic inference fails on some graphs; the rest of the pipeline still helps
        log.info("symbolic shape inference failed (%s); preparing with ONNX shape inference only", _why(exc))
        try:
            prepared = _ort_pre_process(proto, symbolic=False)
        except Exception as exc2:
            log.info("ONNX Runtime pre-processing failed (%s); quantizing the graph as given", _why(exc2))
            try:
                prepared = onnx.shape_inference.infer_shapes(proto)
            except Exception as exc3:  # onnx raises InferenceError and others; the graph itself loaded in ORT
                log.info("ONNX shape inference failed (%s); quantizing the graph without inferred shapes", _why(exc3))
                prepared = onnx.ModelProto()
                prepared.CopyFrom(proto)
    _restore_fused_names(prepared)
    rename_new_initializers(prepared, known=known)
    # ORT's optimizer may add nodes without names; the quantizer and fallback need every node named.
    _name_nodes(prepared)
    merge_opsets(prepared)
    prepared = _type_ml_outputs(prepared)
    flatten_row_biases(prepared)
    unshare_biases(prepared)
    float_reads_for_subgraphs(prepared)
    if subpixel:
        conv_transpose_as_conv(prepared)
    add_infer_metadata(prepared)
    return prepared


# Per-channel QuantizeLinear/DequantizeLinear (their ``axis``) came with opset 13. ORT's QDQ quantizer writes them
# into an older graph all the same (it raises only opsets below 10), and the model it returns does not load
# ("Unrecognized attribute: axis for operator DequantizeLinear": every torch.onnx export at opset_version=11).
MIN_OPSET = 13


def _with_opset_for_int8(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` converted to :data:`MIN_OPSET` by ONNX's version converter when it is older (names are kept)."""
    version = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is None or version >= MIN_OPSET or proto.ByteSize() >= _PROTOBUF_LIMIT:
        return proto
    try:
        converted = onnx.version_converter.convert_version(proto, MIN_OPSET)
    except Exception as exc:  # the converter raises RuntimeError/ValueError/ConvertError for ops it cannot adapt
        log.warning(
            "the model uses ONNX opset %d, and ONNX's version converter could not raise it to %d (%s); per-channel "
            "QDQ needs opset %d: if the INT8 model does not load, re-export the model with opset_version>=%d or "
            "use granularity='per_tensor'",
            version, MIN_OPSET, exc, MIN_OPSET, MIN_OPSET,
        )
        return proto
    log.info("the model uses ONNX opset %d; it is quantized at opset %d (per-channel INT8 needs it)", version, MIN_OPSET)
    return converted


# ai.onnx.ml operators whose output is float32 whatever they read (ONNX-ML's type constraints), which ONNX's
# shape inference leaves untyped. skl2onnx follows a StandardScaler's Scaler with a Cast to float that ORT's
# optimizer removes, and without a type on the Scaler's output no op after it (an MLP's MatMuls) counts as
# reading float: nothing would be quantized.
_ML_FLOAT_OUTPUTS = frozenset({"Scaler", "Normalizer", "OneHotEncoder", "FeatureVectorizer", "LinearRegressor"})


def _type_ml_outputs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Type the float outputs of ai.onnx.ml operators, and infer the types after them again."""
    graph = proto.graph
    typed = {v.name for v in (*graph.input, *graph.value_info, *graph.output) if v.type.tensor_type.elem_type}
    typed.update(i.name for i in graph.initializer)
    missing = [
        node.output[0]
        for node in graph.node
        if node.domain == "ai.onnx.ml" and node.op_type in _ML_FLOAT_OUTPUTS and node.output and node.output[0] not in typed
    ]
    if not missing:
        return proto
    for name in missing:
        graph.value_info.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    try:
        return onnx.shape_inference.infer_shapes(proto)
    except Exception as exc:  # onnx raises InferenceError and others; the typed outputs themselves still count
        log.info("ONNX shape inference after typing %s failed (%s)", ", ".join(missing), exc)
        return proto


def _symbolic_pre_process(proto: onnx.ModelProto) -> onnx.ModelProto:
    """:func:`_ort_pre_process` with symbolic shape inference, leaving no files behind.

    When ORT's symbolic shape inference gives up on a graph, it saves its partial result as
    ``sym_shape_infer_temp.onnx`` in the current directory, with the weights in a new external data
    file next to it (a full copy of the model's weights); those files are removed here.
    """
    try:
        leftover: Path | None = Path.cwd() / _SYMBOLIC_LEFTOVER
    except OSError:  # the current directory no longer exists; ORT cannot write there either
        leftover = None
    before = _mtime(leftover)
    try:
        return _ort_pre_process(proto, symbolic=True)
    finally:
        if leftover is not None and _mtime(leftover) not in (None, before):
            _remove_with_external_data(leftover)


def _mtime(path: Path | None) -> int | None:
    try:
        return path.stat().st_mtime_ns if path is not None else None
    except OSError:
        return None


def _remove_with_external_data(path: Path) -> None:
    """Delete an ONNX file and the external data files (next to it) that it references."""
    try:
        saved = onnx.load_model(str(path), load_external_data=False)
        locations = {
            entry.value
            for init in saved.graph.initializer
            for entry in init.external_data
            if entry.key == "location" and Path(entry.value).name == entry.value
        }
        for location in sorted(locations):
            (path.parent / location).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    except (OSError, DecodeError) as exc:
        log.warning("could not remove %s, left by ONNX Runtime's symbolic shape inference: %s", path, exc)


def _ort_pre_process(proto: onnx.ModelProto, *, symbolic: bool) -> onnx.ModelProto:
    """ORT's own preparation: symbolic shape inference, basic graph optimization (BN folding, constant
    folding), ONNX shape inference. ORT reads the model from a file and writes its result to one."""
    quant_logger = logging.getLogger("onnxruntime.quantization.shape_inference")
    previous = quant_logger.level
    # ORT logs a failed optimization at ERROR and carries on; we report the outcome ourselves.
    quant_logger.setLevel(logging.CRITICAL)
    try:
        with tempfile.TemporaryDirectory(prefix="inc-onnx-prep-") as tmp:
            source, out = Path(tmp) / "model.onnx", Path(tmp) / "prepared.onnx"
            large = proto.ByteSize() >= _PROTOBUF_LIMIT
            _save_for_ort(proto, source, large=large)
            # A path, not the ModelProto: given a ModelProto to optimize without symbolic inference, ORT
            # moves the weights out of it and writes an optimized model that points at a weights file
            # ("foo.bin") it never creates, so neither the result nor the given proto is usable after.
            quant_pre_process(str(source), str(out), skip_symbolic_shape=not symbolic, save_as_external_data=large)
            return onnx.load_model(str(out))
    finally:
        quant_logger.setLevel(previous)


def _save_for_ort(proto: onnx.ModelProto, path: Path, *, large: bool) -> None:
    if not large:
        onnx.save_model(proto, str(path))
        return
    # Over protobuf's 2 GiB limit the weights go to a side file; saving that way rewrites the
    # tensors of the proto it is given, so it is given a copy.
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=f"{path.name}.data")


def _name_nodes(proto: onnx.ModelProto) -> None:
    """Give every unnamed or duplicate-named node a unique, deterministic name."""
    seen: set[str] = set()
    for index, node in enumerate(proto.graph.node):
        name = node.name
        if not name or name in seen:
            base = f"{node.op_type}_{index}"
            name, k = base, 1
            while name in seen:
                name, k = f"{base}_{k}", k + 1
            node.name = name
        seen.add(name)


def _restore_fused_names(proto: onnx.ModelProto) -> None:
    """Give a fused node (``fc1/MatMulAddFusion``) back its first node's name, so the names users see in
    ``inc.describe`` and pass to ``exclude=`` are the ones in their model, where that name is free."""
    names = {node.name for node in proto.graph.node}
    for node in proto.graph.node:
        base, sep, suffix = node.name.partition("/")
        if sep and base and suffix.endswith("Fusion") and base not in names:
            names.discard(node.name)
            node.name = base
            names.add(base)


def _tensor_names(proto: onnx.ModelProto) -> set[str]:
    graph = proto.graph
    return {
        *(init.name for init in graph.initializer),
        *(value.name for value in graph.input),
        *(name for node in graph.node for name in node.output),
    }


def _copy_value_info(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    return copy


def _input_specs(proto: onnx.ModelProto) -> tuple[InputSpec, ...]:
    initializers = {init.name for init in proto.graph.initializer}
    specs = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue  # old exporters list weights as inputs; they have defaults
        tensor_type = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)) if tensor_type.elem_type else None
        shape: tuple[int | str | None, ...] | None = None
        if tensor_type.HasField("shape"):
            shape = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim
            )
        specs.append(InputSpec(name=value.name, dtype=dtype if dtype is not None else np.dtype(np.float32), shape=shape))
    return tuple(specs)


def _float_tensors(proto: onnx.ModelProto) -> set[str]:
    initializers = {init.name for init in proto.graph.initializer}
    names = set()
    for value in (*proto.graph.input, *proto.graph.value_info, *proto.graph.output):
        if value.name not in initializers and value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            names.add(value.name)
    return names
