"""SymbolBlocks from a symbol and arrays, batches as NDArrays, and MXNet's export format on disk.

A saved model is a directory (``model.mxnet``) holding exactly what ``HybridBlock.export`` writes,
``model-symbol.json`` and ``model-0000.params``, so ``gluon.SymbolBlock.imports`` reads it back
without inc, plus ``inputs.json`` with the input names ``imports`` needs.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import gluon

from inc_core._dataset import LABELS_HINT
from inc_core.errors import DatasetError, ModelLoadError

__all__ = ["export_files", "import_dir", "symbol_block", "to_ndarrays"]

_INPUTS_FILE = "inputs.json"


def symbol_block(
    symbol: mx.sym.Symbol, inputs: Sequence[str], params: Mapping[str, mx.nd.NDArray], *, aux: Sequence[str] = ()
) -> gluon.SymbolBlock:
    """A SymbolBlock running ``symbol`` with ``params`` (int8 weights keep their dtype)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "cannot decide type" for untyped inputs; the params decide
        block = gluon.SymbolBlock(symbol, [mx.sym.var(n) for n in inputs])
    aux_names = set(aux) or set(symbol.list_auxiliary_states())
    saved = {("aux:" if k in aux_names else "arg:") + k: v for k, v in params.items()}
    block.collect_params().load_dict(saved, ctx=mx.cpu(), ignore_extra=True, cast_dtype=True, dtype_source="saved")
    # For inference only: with gradients requested, MXNet refuses to build a graph holding an op without
    # one (a quantized LSTM: "_contrib_quantized_rnn is non-differentiable") at the block's first call.
    block.collect_params().setattr("grad_req", "null")
    return block


def block_inputs(block: gluon.SymbolBlock) -> tuple[str, ...]:
    return tuple(s.name for s in block._cached_graph[0])


def to_ndarrays(batch: Any, inputs: Sequence[str], *, where: str) -> list[mx.nd.NDArray]:
    """One batch (array, tuple of arrays, or mapping name -> array) as float32 NDArrays in input order."""
    if isinstance(batch, Mapping):
        unknown = sorted(set(batch) - set(inputs))
        if unknown or len(batch) != len(inputs):
            raise DatasetError(
                f"{where}: got inputs named {sorted(batch)}; the block takes {list(inputs)}. Pass one array per input "
                "(a tuple in hybrid_forward's order, or a mapping with these names)."
            )
        values = [batch[n] for n in inputs]
    elif isinstance(batch, (tuple, list)):
        values = list(batch)
    else:
        values = [batch]
    if len(values) != len(inputs):
        raise DatasetError(
            f"{where}: got {len(values)} input array(s); the block takes {len(inputs)} ({list(inputs)}). Pass a "
            "tuple with one array per hybrid_forward argument." + (f" {LABELS_HINT}" if len(values) == len(inputs) + 1 else "")
        )
    out = []
    for name, value in zip(inputs, values):
        if isinstance(value, mx.nd.NDArray):
            value = value.asnumpy()
        try:
            array = np.asarray(value)
        except Exception as exc:  # ragged lists and other objects numpy cannot take
            raise DatasetError(f"{where}: input {name!r} is not an array ({type(value).__name__}): {exc}.") from exc
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or array.ndim == 0:
            raise DatasetError(
                f"{where}: input {name!r} must be a numeric array with a batch axis, got dtype {array.dtype} and "
                f"shape {array.shape}."
            )
        out.append(mx.nd.array(array, dtype="float32", ctx=mx.cpu()))
    return out


def export_files(symbol: mx.sym.Symbol, params: Mapping[str, mx.nd.NDArray], inputs: Sequence[str], directory: Path) -> None:
    """Write ``symbol`` and ``params`` into ``directory`` (created) the way ``HybridBlock.export`` does."""
    directory.mkdir()
    stem = directory.stem or "model"
    symbol.save(str(directory / f"{stem}-symbol.json"))
    aux = set(symbol.list_auxiliary_states())
    mx.nd.save(str(directory / f"{stem}-0000.params"), {("aux:" if k in aux else "arg:") + k: v for k, v in params.items()})
    (directory / _INPUTS_FILE).write_text(json.dumps({"inputs": list(inputs)}), encoding="utf-8")


def import_dir(path: Path) -> gluon.SymbolBlock:
    """Read a directory written by :func:`export_files` with ``SymbolBlock.imports``."""
    if not path.is_dir():
        raise ModelLoadError(
            f"load: {str(path)!r} is not a directory; inc-mxnet saves a model as a directory holding "
            "<name>-symbol.json and <name>-0000.params. Give the directory inc.save wrote."
        )
    symbols = sorted(path.glob("*-symbol.json"))
    params = sorted(path.glob("*-[0-9][0-9][0-9][0-9].params"))
    if len(symbols) != 1 or len(params) != 1:
        raise ModelLoadError(
            f"load: {str(path)!r} should hold one *-symbol.json and one *-NNNN.params file, found "
            f"{[p.name for p in symbols + params]}. Point to a directory written by inc.save."
        )
    try:
        inputs = json.loads((path / _INPUTS_FILE).read_text(encoding="utf-8"))["inputs"]
    except (OSError, ValueError, KeyError, TypeError):
        inputs = None
    try:
        if inputs is None:  # exported by MXNet itself: every variable that is not a parameter is an input
            saved = {k.split(":", 1)[-1] for k in mx.nd.load(str(params[0]))}
            inputs = [n for n in mx.sym.load(str(symbols[0])).list_inputs() if n not in saved]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return gluon.SymbolBlock.imports(str(symbols[0]), list(inputs), str(params[0]), ctx=mx.cpu())
    except mx.base.MXNetError as exc:
        raise ModelLoadError(
            f"load: MXNet could not read the model in {str(path)!r}: {str(exc).strip().splitlines()[0][:300]}. "
            "The files may be truncated or written by another MXNet version."
        ) from exc
