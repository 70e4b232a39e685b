"""Which weights of a module pruning touches, and how each maps to inc-core's output-first layout."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from inc_core import Op
from inc_core._prune_config import PruneConfig
from inc_core.errors import ConfigError
from inc_core.sparsity import select_layers
from inc_torch._parametrized import parametrized_layers

log = logging.getLogger("inc")

__all__ = ["PrunableLayer", "prunable_layers"]

# Layers whose rank >= 2 weight is not a GEMM operand; pruned only when include_types names them.
_SKIPPED_BY_DEFAULT = (nn.Embedding, nn.EmbeddingBag)


@dataclass(eq=False)
class PrunableLayer:
    """One weight to prune.

    Attributes:
        name: the owning module's qualified name (what ``LayerFilter`` and reports use).
        op_type: the owning module's class name.
        weight: the parameter itself (masks are applied to it in place).
        transposed: the weight is stored input-first (HF ``Conv1D``, ``ConvTranspose``) and is
            transposed to ``(out, in, *kernel)`` for inc-core's pattern math.
    """

    name: str
    op_type: str
    weight: nn.Parameter
    transposed: bool

    def to_core(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (shaped like the weight) in inc-core's output-first layout."""
        return tensor.transpose(0, 1) if self.transposed else tensor

    def from_core(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.transpose(0, 1) if self.transposed else tensor

    @property
    def core_shape(self) -> tuple[int, ...]:
        return tuple(self.to_core(self.weight.detach()).shape)


def _is_transposed(module: nn.Module) -> bool:
    # HF transformers' Conv1D (GPT-2) stores (in, out); ConvTranspose stores (in, out/groups, *kernel).
    return type(module).__name__ == "Conv1D" or isinstance(module, nn.modules.conv._ConvTransposeNd)


def _matrices(name: str, module: nn.Module) -> list[PrunableLayer]:
    """The weight matrices of a module that holds several and no ``weight``: each its own entry, of the module's type.

    An LSTM/GRU/RNN's input, recurrent (and projection) matrices, per layer and direction
    (``<module>.weight_ih_l0``, ``<module>.weight_hh_l0_reverse``...), and a MultiheadAttention's packed query/key/
    value projection (``<module>.in_proj_weight``, or ``q_proj_weight``... when key and value widths differ; its
    ``out_proj`` is a Linear of its own). All are stored output-first, like a Linear's weight.
    """
    op_type = type(module).__name__
    return [
        PrunableLayer(f"{name}.{param}", op_type, weight, False)
        for param, weight in module.named_parameters(recurse=False)
        if param.endswith("weight") or param.startswith("weight_")
        if weight.dim() == 2
    ]


def prunable_layers(model: nn.Module, config: PruneConfig) -> list[PrunableLayer]:
    """The layers ``config`` prunes: modules owning a ``weight`` of rank >= 2, filtered by ``include_types``/``exclude``.

    A recurrent module (LSTM, GRU, RNN) or a MultiheadAttention gives one entry per weight matrix (:func:`_matrices`).

    Raises:
        ConfigError: ``include_types`` or ``exclude`` name nothing in the model, or nothing is left to prune
            (:func:`inc_core.sparsity.select_layers`).
    """
    candidates: list[PrunableLayer] = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.RNNBase, nn.MultiheadAttention)) and name:
            if not config.include_types or type(module).__name__ in config.include_types:
                candidates.extend(_matrices(name, module))
            continue
        weight = module._parameters.get("weight")
        if not isinstance(weight, nn.Parameter) or weight.dim() < 2 or not name:
            continue
        op_type = type(module).__name__
        if config.include_types:
            if op_type not in config.include_types:
                continue
        elif isinstance(module, _SKIPPED_BY_DEFAULT):
            continue
        candidates.append(PrunableLayer(name, op_type, weight, _is_transposed(module)))
    computed = parametrized_layers(model)
    if computed:
        # Masks zero a weight parameter in place; these layers compute theirs from other parameters on every call.
        listed = ", ".join(f"{name} ({how})" for name, how in computed.items())
        advice = (
            "To prune them, fold the norm into a plain weight first: torch.nn.utils.parametrize."
            "remove_parametrizations(layer, 'weight') (torch.nn.utils.remove_weight_norm / remove_spectral_norm "
            "for the older hook-based ones)."
        )
        if not candidates:
            raise ConfigError(f"PruneConfig: every weight layer of {type(model).__name__} computes its weight: {listed}. {advice}")
        log.warning("pruning leaves %d layer(s) dense, whose weight is computed: %s. %s", len(computed), listed, advice)
    ops = [Op(layer.name, layer.op_type) for layer in candidates]
    types = [type(m).__name__ for n, m in model.named_modules() if n]
    selected = set(select_layers(ops, config, model_types=types, model=type(model).__name__))
    return [layer for layer in candidates if layer.name in selected]
