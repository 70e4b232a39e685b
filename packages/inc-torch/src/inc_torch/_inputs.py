"""Turning inc Dataset batches (numpy arrays, tuples, mappings) into the arguments of a module's forward."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_leaves, tree_map

from inc_core.errors import DatasetError

__all__ = ["Inputs", "float_dtype", "to_inputs", "describe_inputs", "batch_size", "widened", "dynamic_shapes"]

# (positional args, keyword args) of one forward call.
Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def float_dtype(model: torch.nn.Module) -> torch.dtype:
    """The floating dtype of the model's first floating parameter or buffer (float32 when it has none)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _tensor(value: Any, dtype: torch.dtype) -> Any:
    # numpy gives float64 by default; a float32 model would reject it, so floats follow the model's dtype.
    if isinstance(value, np.ndarray):
        if not (np.issubdtype(value.dtype, np.number) or np.issubdtype(value.dtype, np.bool_)):
            raise DatasetError(
                f"Input data of dtype {value.dtype} (shape {value.shape}) cannot be a torch tensor; a torch model takes "
                f"numbers (the model computes in {str(dtype).replace('torch.', '')}). Pass numeric arrays, e.g. "
                "x.astype(np.float32), or tokenize text before calibration."
            )
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        return tensor.to(dtype) if tensor.is_floating_point() else tensor
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype == torch.float64 else value
    # Structured arguments (DLRM's lists of index and offset tensors, a dict of features) are converted inside.
    if isinstance(value, Mapping):
        return {k: _tensor(v, dtype) for k, v in value.items()}
    if isinstance(value, (tuple, list)) and any(isinstance(v, (np.ndarray, torch.Tensor, tuple, list, Mapping)) for v in value):
        return type(value)(_tensor(v, dtype) for v in value)
    return value


def to_inputs(batch: Any, dtype: torch.dtype = torch.float32) -> Inputs:
    """A batch as ``(args, kwargs)``: a mapping gives keyword arguments, a tuple/list positional ones."""
    if isinstance(batch, Mapping):
        return (), {str(k): _tensor(v, dtype) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(_tensor(v, dtype) for v in batch), {}
    return (_tensor(batch, dtype),), {}


def _tensors(inputs: Inputs) -> list[torch.Tensor]:
    args, kwargs = inputs
    return [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]


def describe_inputs(inputs: Inputs) -> str:
    """Shapes and dtypes of the inputs, for error messages."""
    args, kwargs = inputs

    def one(v: Any) -> str:
        return f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" if isinstance(v, torch.Tensor) else type(v).__name__

    parts = [one(v) for v in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return ", ".join(parts) or "no inputs"


def batch_size(inputs: Inputs) -> int:
    """Leading dimension of the first tensor input (1 when there is none)."""
    tensors = [t for t in _tensors(inputs) if t.dim() > 0]
    return int(tensors[0].shape[0]) if tensors else 1


def widened(inputs: Inputs, size: int = 2) -> Inputs:
    """The inputs with every batched tensor repeated to ``size`` rows.

    torch.export specializes a dimension of size 1, so tracing with a batch of one would fix the batch
    size of the exported graph; tracing with two rows keeps it dynamic.
    """

    def grow(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 1:
            return v.expand(size, *v.shape[1:]).contiguous()
        return v

    args, kwargs = inputs
    # every tensor, inside lists and dicts too (DLRM's per-table offsets hold one row per sample)
    return tuple(tree_map(grow, v) for v in args), {k: tree_map(grow, v) for k, v in kwargs.items()}


def _free_dims(value: torch.Tensor) -> dict[int, Any]:
    # The batch, and the sequence dimension of integer inputs (token ids, attention masks, token type
    # ids), whose users expect any length up to the model's limit. AUTO lets export keep a dimension
    # static where the model needs it, so float inputs of convnets (whose spatial size is fixed by
    # their weights) are never marked.
    dims = {0: torch.export.Dim.AUTO}
    if value.dim() >= 2 and not value.dtype.is_floating_point and not value.dtype.is_complex and value.dtype != torch.bool:
        dims[1] = torch.export.Dim.AUTO
    return dims


def dynamic_shapes(module: Any, inputs: Inputs) -> Any:
    """torch.export ``dynamic_shapes`` for ``inputs``: batch and token-sequence dimensions marked ``Dim.AUTO``."""
    args, kwargs = inputs
    collection = torch.export.ShapesCollection()
    for value in tree_leaves((args, kwargs)):  # tensors inside lists and dicts too (DLRM's index lists)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            collection[value] = _free_dims(value)
    return collection.dynamic_shapes(module, args, kwargs)
