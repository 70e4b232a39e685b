"""Code that reads a layer's weight itself, which torch.ao's dynamic layers do not hold as a tensor.

A dynamically quantized ``nn.Linear`` keeps its int8 weight packed: ``.weight`` becomes a method. Code around
the layer that reads ``layer.weight`` to compute with it breaks once the layer is swapped, when the model
runs, not when it is quantized. Two kinds are met in models users bring:

- a module that hands the layer's weight to a function instead of calling the layer: never (torchvision's Swin
  Transformer: ``shifted_window_attention(x, self.qkv.weight, self.proj.weight, ...)``), or on some of its
  branches (timm's BEiT: ``F.linear(x, weight=self.qkv.weight, bias=qkv_bias)`` when the model has q/v biases,
  ``self.qkv(x)`` otherwise). Such a layer is not dynamically quantizable: :func:`weights_read_without_calls`
  finds it from the module's source, and the dynamic path neither lists nor swaps it;
- ``nn.TransformerEncoderLayer``'s fused fast path (eval mode, ``batch_first=True``), which collects the float
  weights of the layers it otherwise calls (pytorch/pytorch#109987). :func:`keep_to_module_path` keeps a
  quantized encoder layer on its module path, which calls the swapped layers.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any

import torch
from torch import nn

__all__ = ["keep_to_module_path", "weights_handed_on", "weights_read_without_calls"]


_READ = re.compile(r"\bself\.([A-Za-z_][\w.]*)\.(?:weight|bias)\b")
_CALL = re.compile(r"\bself\.([A-Za-z_][\w.]*?)(?:\.forward)?\s*\(")
# The weight itself handed on (to F.linear, into a tuple...), not a look at its dtype or device, a comparison
# (``self.proj.bias is not None``), an assignment, nor an isinstance check (Hugging Face's T5 compares
# ``self.wo.weight.dtype`` only when the weight is still a tensor).
_PASS = re.compile(
    r"(?<!isinstance\()\bself\.([A-Za-z_][\w.]*)\.(?:weight|bias)\b(?!\s*[.\[=!])(?!\s+(?:is|and|or)\b)"
)
# Methods that set weights up rather than compute with them.
_SETUP = re.compile(r"init|reset|tie|resize|set_")
# Modules whose code hands on the weights of layers it also calls, on a fast path inc keeps them off instead
# (keep_to_module_path).
_HANDLED_ELSEWHERE = (nn.TransformerEncoderLayer,)


@functools.cache
def _uses(cls: type) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """The attribute paths whose weight/bias the computing code of ``cls`` (and of its bases below ``nn.Module``) reads,
    those it calls, and those whose weight/bias its computing methods hand on as tensors."""
    reads: set[str] = set()
    calls: set[str] = set()
    passes: set[str] = set()
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            continue
        for key, attribute in vars(klass).items():
            # the functions one by one: finding a whole class's source parses its whole file
            function = getattr(attribute, "fget", None) or getattr(attribute, "__func__", attribute)
            if not inspect.isfunction(function):
                continue
            try:
                source = inspect.getsource(function)
            except (OSError, TypeError):
                continue  # made at run time: no source kept to read
            calls.update(_CALL.findall(source))
            if not _SETUP.search(key):
                # reads while setting up (torchvision's ViT zeroing its head's weight in __init__) run before any swap
                reads.update(_READ.findall(source))
                passes.update(_PASS.findall(source))
    return frozenset(reads), frozenset(calls), frozenset(passes)


def _enclosing_readers(model: nn.Module, names: tuple[str, ...], rule: Any) -> dict[str, str]:
    """Per module of ``names``, the nearest enclosing module (``""``: the model) whose code ``rule(owner, path,
    reads, calls, passes)`` says computes with its weight."""
    modules = dict(model.named_modules())
    found: dict[str, str] = {}
    for name in names:
        parts = name.split(".")
        for cut in range(len(parts) - 1, -1, -1):
            owner, path = ".".join(parts[:cut]), ".".join(parts[cut:])
            if rule(modules[owner], path, *_uses(type(modules[owner]))):
                found[name] = owner
                break
    return found


def weights_read_without_calls(model: nn.Module, names: tuple[str, ...]) -> dict[str, str]:
    """Of the modules ``names``, those whose weight or bias an enclosing module's code reads, never calling them, or
    hands on to a function.

    Returns:
        Per such module, the name of the enclosing module whose code reads it (``""``: the model itself).
    """

    def rule(owner: nn.Module, path: str, reads: frozenset[str], calls: frozenset[str], passes: frozenset[str]) -> bool:
        handed_on = path in passes and not isinstance(owner, _HANDLED_ELSEWHERE)
        return path in reads and (path not in calls or handed_on)

    return _enclosing_readers(model, names, rule)


def weights_handed_on(model: nn.Module, names: tuple[str, ...]) -> dict[str, str]:
    """Of the modules ``names``, those an enclosing module's computing code never calls but hands the weight (or
    bias) of to a function (Swin's attention), each with that module's name (``""``: the model itself). A layer
    whose weight is only read while setting up (an ``__init__`` zeroing it) or which is also called is not one."""
    return _enclosing_readers(model, names, lambda owner, path, reads, calls, passes: path in passes and path not in calls)


def _module_path(module: nn.Module, args: Any) -> None:
    """A forward pre-hook that changes nothing: torch takes no fused fast path for a module with hooks."""
    return None


def _is_dynamic(module: nn.Module) -> bool:
    return isinstance(module, torch.ao.nn.quantized.dynamic.Linear)


def keep_to_module_path(model: nn.Module) -> int:
    """Keep the encoder layers of ``model`` whose Linear layers were swapped off torch's fused fast path.

    Returns:
        How many encoder layers were changed.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and (_is_dynamic(module.linear1) or _is_dynamic(module.linear2)):
            module.register_forward_pre_hook(_module_path)
            changed += 1
        elif isinstance(module, nn.TransformerEncoder):
            # its own fast path (a padding mask given) packs the input into a nested tensor for the fused layers
            if any(_is_dynamic(m) for m in module.modules()):
                module.use_nested_tensor = False
    return changed
