"""Layers whose weight is computed from other parameters: weight norm, spectral norm, any torch parametrization.

Audio models use them widely (HiFi-GAN and WaveNet vocoders, wav2vec2's positional convolution). Such a
layer's ``weight`` is recomputed on every call, from ``parametrizations.weight.original0/1`` (torch's
``parametrizations.weight_norm``, whose module type becomes ``ParametrizedConv1d``) or from ``weight_g`` and
``weight_v`` through a forward pre-hook (the older ``nn.utils.weight_norm``/``spectral_norm``). INT8 kernels
take one plain weight, so inc folds the parametrization into it on its own copy of the model (inference
output unchanged) before quantizing; :func:`plain_type` lets the op listing see ``Conv1d`` in
``ParametrizedConv1d``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm, remove_spectral_norm
from torch.nn.utils.weight_norm import WeightNorm, remove_weight_norm

__all__ = ["plain_type", "parametrized_layers", "fold_parametrizations"]

log = logging.getLogger("inc")


def plain_type(module: nn.Module) -> type[nn.Module]:
    """The layer's own class: ``Conv1d`` for torch's dynamically made ``ParametrizedConv1d``."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def _hooks(module: nn.Module) -> list[WeightNorm | SpectralNorm]:
    return [h for h in module._forward_pre_hooks.values() if isinstance(h, (WeightNorm, SpectralNorm))]


def parametrized_layers(model: nn.Module) -> dict[str, str]:
    """Module name -> what computes its weight, for every layer of ``model`` whose weight is computed."""
    found = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            kinds = {type(p).__name__ for plist in module.parametrizations.values() for p in plist}
            found[name] = "parametrization " + "/".join(sorted(kinds))
        elif hooks := _hooks(module):
            found[name] = "/".join(sorted({type(h).__name__ for h in hooks}))
    return found


def _fold(module: nn.Module) -> None:
    """Make a parametrized module a plain one holding its current tensors as parameters.

    Not ``parametrize.remove_parametrizations``: a deep copy shares its dynamically made class
    (``ParametrizedConv1d``) with the original, and that function deletes the tensor's property from the
    class, which would break the user's model. Here only the copy's own ``__class__`` and modules change.
    """
    plists = module.parametrizations
    plists.eval()  # spectral norm: the stored singular vectors, no power iteration
    with torch.no_grad():
        values = {name: getattr(module, name).detach().clone() for name in plists}
    grads = {name: any(p.requires_grad for p in plists[name].parameters()) for name in plists}
    base = plain_type(module)
    del module._modules["parametrizations"]
    module.__class__ = base
    for name, value in values.items():
        module.register_parameter(name, nn.Parameter(value, requires_grad=grads[name]))


def fold_parametrizations(model: nn.Module) -> nn.Module:
    """Replace each computed weight of ``model`` (a copy inc owns) by its inference value, in place; return it."""
    folded = []
    for name, module in list(model.named_modules()):
        if parametrize.is_parametrized(module):
            _fold(module)
            folded.append(name)
            continue
        for hook in _hooks(module):
            if isinstance(hook, WeightNorm):
                remove_weight_norm(module, hook.name)
            else:
                remove_spectral_norm(module, hook.name)
            folded.append(name)
    if folded:
        shown = ", ".join(folded[:5]) + (f" and {len(folded) - 5} more" if len(folded) > 5 else "")
        # debug: inc folds on each copy it makes (calibration, checks), the same layers each time
        log.debug("%d layer(s) compute their weight (weight/spectral norm): folded into a plain weight for INT8: %s",
                  len(folded), shown)
    return model
