"""Pruning in the user's own training loop, attached to their optimizer through step hooks.

``prepare(model, PruneConfig(...), optimizer=opt)`` registers two hooks on ``opt``:

- before each step: the criteria see the weights (and their gradients, for the ``snip`` family), the
  schedule decides whether the masks change at this step, and the gradients of pruned weights are
  zeroed so the optimizer's moments do not build up behind them;
- after each step: the masks are applied to the weights, so pruned weights are exactly zero whatever
  the optimizer did (momentum, weight decay).

When the masks change, the optimizer's per-parameter state (Adam's moments, SGD's momentum buffer) is
zeroed at the pruned positions as well, so a pruned weight is never revived by stale state. The loop
itself does not change by one line. The math (criteria, schedules, masks) is inc-core's
:class:`~inc_core.sparsity.Pruner`; this module only moves tensors to and from it.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from inc_core._prune_config import PruneConfig
from inc_core.errors import ConfigError, UnsupportedModelError
from inc_core.sparsity import Pruner, SparsityReport
from inc_torch._compat import unwrap_compiled
from inc_torch.prune._layers import PrunableLayer, prunable_layers

__all__ = ["prepare", "finish_pruning", "is_pruning", "sparsity_report", "STATE_ATTR"]

log = logging.getLogger("inc")

STATE_ATTR = "_inc_prune_state"


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    # bf16/fp16 weights are scored in float32 (numpy has no bfloat16).
    return tensor.detach().to("cpu", torch.float32).numpy()


class _PruningState:
    """The schedule's position, the masks, and the optimizer hooks of one prepared model."""

    def __init__(self, config: PruneConfig, layers: list[PrunableLayer], optimizer: torch.optim.Optimizer) -> None:
        self.config = config
        self.layers = {layer.name: layer for layer in layers}
        self.pruner = Pruner(config, {layer.name: layer.core_shape for layer in layers})
        self.needs_grad = next(iter(self.pruner.criteria.values())).needs_grad
        self.optimizer = optimizer
        self.masks: dict[str, torch.Tensor] = {}  # name -> bool mask in the weight's own layout (True = kept)
        self.step = 0  # optimizer steps taken since prepare (the schedule's step of the next one)
        self.handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.pruner.needs_data(self.step):
            weights = {name: _numpy(layer.to_core(layer.weight)) for name, layer in self.layers.items()}
            grads = None
            if self.needs_grad:
                grads = {
                    name: _numpy(layer.to_core(layer.weight.grad))
                    for name, layer in self.layers.items()
                    if layer.weight.grad is not None
                }
                unused = [name for name in self.layers if name not in grads]
                if grads and unused:  # (no gradient at all: the Pruner says to run a backward pass)
                    raise ConfigError(
                        f"prune: layers {unused} got no gradient at step {self.step} (the loss does not use them), so "
                        f"criterion {self.config.criterion!r} cannot score them. Leave them dense with "
                        f"exclude=inc.LayerFilter(names={tuple(unused)!r}), or use criterion='magnitude'."
                    )
            masks = self.pruner.step(self.step, weights, grads)
            if masks is not None:
                self._set_masks(masks)
        with torch.no_grad():
            for name, mask in self.masks.items():
                grad = self.layers[name].weight.grad
                if grad is not None:
                    grad.masked_fill_(~mask, 0)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.apply_masks()
        self.step += 1

    def _set_masks(self, masks: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name, core_mask in masks.items():
                layer = self.layers[name]
                mask = layer.from_core(torch.from_numpy(np.ascontiguousarray(core_mask))).to(layer.weight.device)
                self.masks[name] = mask.contiguous()
                for value in self.optimizer.state.get(layer.weight, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                        value.masked_fill_(~mask, 0)
        log.info(
            "pruning step %d: sparsity %.4f (target %.4f)",
            self.step,
            self.pruner.schedule.sparsity_at(self.step),
            self.pruner.schedule.target_sparsity,
        )

    def apply_masks(self) -> None:
        with torch.no_grad():
            for name, mask in self.masks.items():
                self.layers[name].weight.masked_fill_(~mask, 0)

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _check_optimizer(model: nn.Module, layers: list[PrunableLayer], optimizer: Any) -> torch.optim.Optimizer:
    if optimizer is None:
        raise ConfigError(
            "prepare: pruning needs optimizer=, the optimizer your loop steps (masks follow its steps). "
            "Build it on model.parameters() first, then call inc_torch.prepare(model, config, optimizer=opt)."
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"prepare: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    outside = [layer.name for layer in layers if id(layer.weight) not in trained]
    if outside:
        raise ConfigError(
            f"prepare: the weights of {outside} are not in the optimizer, so their masks would never be applied. "
            "Build the optimizer on this model's parameters (e.g. torch.optim.Adam(model.parameters())), or exclude "
            "these layers with exclude=inc.LayerFilter(names=...)."
        )
    return optimizer


def prepare(model: nn.Module, config: PruneConfig, *, optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
    """Prune ``model`` as ``optimizer`` trains it, following ``config``'s pattern, criterion and schedule.

    The pruning hooks go on ``optimizer`` (the model's forward is untouched), so the model is prepared
    in place: the optimizer already holds its parameters. Train as usual; steps are counted as
    ``optimizer.step()`` calls from here on. Finish with :func:`inc_torch.convert`, which removes the
    hooks and returns a plain module with the zeros in place.

    Args:
        model: the module to prune (its layers with a rank >= 2 ``weight``: Linear, Conv, HF Conv1D).
        config: the pruning recipe (``include_types`` and ``exclude`` pick the layers).
        optimizer: the optimizer of your loop, built on ``model``'s parameters.

    Returns:
        ``model`` itself, with the pruning hooks attached.

    Raises:
        ConfigError: a bad config, no optimizer, layer names/types that match nothing, a pattern that
            does not fit a layer's shape (the message names the layer and its shape), weights outside
            the optimizer, or a model already prepared.
        UnsupportedModelError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(config, PruneConfig):
        raise ConfigError(f"prepare: config must be an inc.PruneConfig, got {type(config).__name__}.")
    if not isinstance(model, nn.Module) or isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(f"prepare takes a torch.nn.Module, got {type(model).__name__}.")
    if is_pruning(model):
        raise ConfigError(
            "prepare: this model is already being pruned; call inc_torch.convert(model) to finish the first "
            "pruning before preparing it again (e.g. with criterion='pattern_lock')."
        )
    layers = prunable_layers(unwrap_compiled(model), config)  # named as describe names them, without _orig_mod.
    opt = _check_optimizer(model, layers, optimizer)
    state = _PruningState(config, layers, opt)
    setattr(model, STATE_ATTR, state)
    log.info("pruning %d layers of %s: %s", len(layers), type(model).__name__, [layer.name for layer in layers])
    return model


def is_pruning(model: Any) -> bool:
    return isinstance(getattr(model, STATE_ATTR, None), _PruningState)


def finish_pruning(model: nn.Module, *, inplace: bool) -> nn.Module:
    """Remove the hooks and the state from ``model``, with the final masks applied; a copy unless ``inplace``."""
    state: _PruningState = getattr(model, STATE_ATTR)
    state.apply_masks()
    state.remove_hooks()
    delattr(model, STATE_ATTR)
    return model if inplace else copy.deepcopy(model)


def sparsity_report(model: nn.Module, config: PruneConfig | None = None) -> SparsityReport:
    """Per-layer sparsity of ``model``'s prunable weights (those being pruned, for a prepared model).

    Args:
        model: any module; for a model from :func:`prepare`, the layers it prunes are reported.
        config: selects layers (``include_types``/``exclude``) for a model that is not prepared.

    Returns:
        A :class:`~inc_core.sparsity.SparsityReport`; ``report.save("sparsity.md")`` writes the table and a PNG.
    """
    state = getattr(model, STATE_ATTR, None)
    if isinstance(state, _PruningState):
        layers = list(state.layers.values())
    else:
        layers = prunable_layers(unwrap_compiled(model), config if config is not None else PruneConfig())
    return SparsityReport.from_weights((layer.name, layer.op_type, _numpy(layer.weight)) for layer in layers)
