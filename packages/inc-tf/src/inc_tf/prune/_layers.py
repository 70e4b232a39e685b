"""Which kernels of a Keras model pruning touches, and how each maps to inc-core's output-first layout.

Keras stores kernels input-first (Dense ``(in, out)``, ConvND ``(*kernel, in, out)``); inc-core's
pattern math reads ``(out, in, *kernel)``. Each :class:`PrunableKernel` carries the permutation (and,
for DepthwiseConv2D and EinsumDense, the reshape) between the two, so masks computed by
:class:`~inc_core.sparsity.Pruner` land on the right weights and ``2:4`` groups run along input channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from inc_core import Op
from inc_core._prune_config import PruneConfig
from inc_core.errors import ConfigError, UnsupportedModelError
from inc_core.sparsity import select_layers

__all__ = ["PRUNABLE_TYPES", "PrunableKernel", "prunable_kernels"]

# Layer types whose kernel pruning understands. Embedding is left out on purpose (its table is not a
# GEMM operand, as in inc-torch).
PRUNABLE_TYPES = (
    "Dense", "EinsumDense", "Conv1D", "Conv2D", "Conv3D", "DepthwiseConv1D", "DepthwiseConv2D",
    "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose", "SeparableConv1D", "SeparableConv2D",
    "LSTM", "GRU", "SimpleRNN", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D",
)

# Layers holding more than one kernel: one entry each, named <layer>.<weight>, with the layout it is stored in.
# Recurrent cells keep (in, gates * units) matrices ("Dense" layout); ConvLSTM cells conv kernels.
_SEVERAL_KERNELS: dict[str, tuple[tuple[str, str], ...]] = {
    **dict.fromkeys(("LSTM", "GRU", "SimpleRNN"), (("cell.kernel", "Dense"), ("cell.recurrent_kernel", "Dense"))),
    **dict.fromkeys(("ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D"), (("cell.kernel", "Conv"), ("cell.recurrent_kernel", "Conv"))),
    **dict.fromkeys(("SeparableConv1D", "SeparableConv2D"), (("depthwise_kernel", "Depthwise"), ("pointwise_kernel", "Conv"))),
}


@dataclass(eq=False)
class PrunableKernel:
    """One kernel to prune.

    Attributes:
        name: the owning layer's name (what ``LayerFilter`` and reports use).
        op_type: the owning layer's class name.
        variable: the kernel variable itself (masks are assigned to it).
        perm: axes of the Keras kernel in output-first order.
        core_shape: the output-first shape inc-core sees (after ``perm`` and any reshape).
    """

    name: str
    op_type: str
    variable: keras.Variable
    perm: tuple[int, ...]
    core_shape: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.variable.shape)

    def to_core(self, array: np.ndarray) -> np.ndarray:
        """``array`` (shaped like the kernel) in inc-core's output-first layout."""
        return np.transpose(array, self.perm).reshape(self.core_shape)

    def from_core(self, array: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`to_core`: an output-first array back in the kernel's own layout."""
        permuted_shape = tuple(self.shape[axis] for axis in self.perm)
        return np.transpose(np.reshape(array, permuted_shape), np.argsort(self.perm))


def _einsum_layout(layer: keras.layers.Layer, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """EinsumDense: kernel axes that reach the output are 'out', the contracted ones are 'in'."""
    inputs, output = layer.equation.split("->")
    kernel_spec = inputs.split(",")[1].strip()
    if "." in kernel_spec or len(kernel_spec) != len(shape):
        raise ConfigError(
            f"PruningCallback: EinsumDense layer {layer.name!r} has equation {layer.equation!r}, whose kernel spec "
            f"{kernel_spec!r} does not name each of the kernel's {len(shape)} axes; exclude it with "
            f"exclude=inc.LayerFilter(names=({layer.name!r},))."
        )
    out_axes = tuple(i for i, c in enumerate(kernel_spec) if c in output)
    in_axes = tuple(i for i, c in enumerate(kernel_spec) if c not in output)
    perm = out_axes + in_axes
    out_size = int(np.prod([shape[i] for i in out_axes], dtype=np.int64))
    in_size = int(np.prod([shape[i] for i in in_axes], dtype=np.int64))
    return perm, (out_size, in_size)


def _layout(layer: keras.layers.Layer, op_type: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(perm, core_shape) of ``layer``'s kernel."""
    rank = len(shape)
    if op_type == "Dense":  # (in, out) -> (out, in)
        return (1, 0), (shape[1], shape[0])
    if op_type == "EinsumDense":
        return _einsum_layout(layer, shape)
    if op_type.startswith("Depthwise"):
        # (*k, in, mult) -> (in, mult, *k) -> (in*mult, 1, *k): output channel c*mult+m, as Keras orders them,
        # each seeing one input channel (the layout of torch's depthwise ConvNd weight).
        *kernel, channels, mult = shape
        return (rank - 2, rank - 1, *range(rank - 2)), (channels * mult, 1, *kernel)
    if op_type.endswith("Transpose"):  # ConvNDTranspose: (*kernel, out, in) -> (out, in, *kernel)
        perm = (rank - 2, rank - 1, *range(rank - 2))
        return perm, tuple(shape[axis] for axis in perm)
    # ConvND: (*kernel, in, out) -> (out, in, *kernel)
    perm = (rank - 1, rank - 2, *range(rank - 2))
    return perm, tuple(shape[axis] for axis in perm)


def _layers(model: keras.Model) -> list[keras.layers.Layer]:
    return list(model._flatten_layers(include_self=False, recursive=True))


def _several_kernels(layer: keras.layers.Layer, op_type: str, seen: set[str]) -> list[PrunableKernel]:
    """Each kernel of a layer listed in :data:`_SEVERAL_KERNELS` (an RNN's input and recurrent kernels...)."""
    kernels = []
    for path, layout in _SEVERAL_KERNELS[op_type]:
        owner, _, attribute = path.rpartition(".")
        variable = getattr(getattr(layer, owner) if owner else layer, attribute, None)
        if variable is None:
            continue
        name = f"{layer.name}.{attribute}"
        name = name if name not in seen else variable.path
        seen.add(name)
        perm, core_shape = _layout(layer, layout, tuple(int(s) for s in variable.shape))
        kernels.append(PrunableKernel(name, op_type, variable, perm, core_shape))
    return kernels


def prunable_kernels(model: keras.Model, config: PruneConfig, *, who: str = "PruningCallback") -> list[PrunableKernel]:
    """The kernels ``config`` prunes: those of :data:`PRUNABLE_TYPES`, filtered by ``include_types``/``exclude``.

    Raises:
        UnsupportedModelError: ``model`` is not a built Keras model.
        ConfigError: ``include_types`` names a type pruning does not handle or that the model lacks,
            ``exclude`` names no layer (close names are listed), or nothing is left to prune.
    """
    if not isinstance(model, keras.Model):
        raise UnsupportedModelError(f"{who} takes a keras.Model, got {type(model).__name__}.")
    if not model.built:
        raise UnsupportedModelError(
            f"{who}: the model {model.name!r} is not built (its kernels do not exist yet); build it first, e.g. by "
            "starting it with keras.Input(shape) or calling model.build(input_shape)."
        )
    if config.include_types:
        unknown = [t for t in config.include_types if t not in PRUNABLE_TYPES]
        if unknown:
            raise ConfigError(
                f"PruneConfig: include_types {unknown} are not prunable Keras layer types; expected some of "
                f"{list(PRUNABLE_TYPES)}."
            )
    wanted = config.include_types or PRUNABLE_TYPES
    candidates: list[PrunableKernel] = []
    seen: set[str] = set()
    for layer in _layers(model):
        op_type = type(layer).__name__
        if op_type in _SEVERAL_KERNELS:
            if op_type in wanted:
                candidates.extend(_several_kernels(layer, op_type, seen))
            continue
        if op_type not in wanted or getattr(layer, "kernel", None) is None:
            continue
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            raise ConfigError(
                f"{who}: layer {layer.name!r} is LoRA-enabled or quantized; prune the float model before either, "
                f"or exclude it with exclude=inc.LayerFilter(names=({layer.name!r},))."
            )
        variable = layer.kernel
        name = layer.name if layer.name not in seen else variable.path.rsplit("/", 1)[0]
        seen.add(name)
        shape = tuple(int(s) for s in variable.shape)
        perm, core_shape = _layout(layer, op_type, shape)
        candidates.append(PrunableKernel(name, op_type, variable, perm, core_shape))
    ops = [Op(k.name, k.op_type) for k in candidates]
    types = [type(layer).__name__ for layer in _layers(model)]
    selected = set(select_layers(ops, config, model_types=types, model=repr(model.name)))
    kernels = [k for k in candidates if k.name in selected]
    return kernels
