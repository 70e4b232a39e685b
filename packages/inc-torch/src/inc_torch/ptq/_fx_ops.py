"""Every op torch.ao's x86 FX flow quantizes in a model, named so that ``exclude`` and ``overrides`` reach it.

The x86 FX backend quantizes far more than conv and linear: activations (hardswish, ELU), add, mul,
cat, pooling, flatten and reshapes, fixed-range ops (sigmoid, hardsigmoid). To list them exactly the
model is traced and prepared with the mapping inc quantizes with (no data is needed), and each node
whose output becomes a quantized tensor is an op:

- a module call is named by the module's path (``features.0.2``) and typed by its class (``Hardswish``);
  a fused conv+bn+relu keeps the conv's name and type;
- a function or method call is named by the path of the module whose ``forward`` makes it and the
  function's name (``layer1.0.add``; the second ``add`` there is ``layer1.0.add_1``) and typed by that
  name (``add``, ``flatten``, ``view``).

Calls that only move data (view, reshape, flatten, transpose...) are exact on quantized tensors and
are not listed. Each op has a role: ``weighted`` (conv/linear: weight and activation settings), ``activation`` (its own
output range: calibration and scheme), ``shared`` (reuses its input's range: pooling, cat, reshapes),
``fixed`` (a fixed output range: sigmoid, hardsigmoid) or ``lookup`` (an embedding table quantized per row, its
output float; not in QAT, whose Embedding takes no other weight scheme). Shared, fixed and lookup ops have nothing
to set; each op of any role can be kept in FP32.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.observer import ObserverBase

from inc_core.backend import Op
from inc_core.errors import ConfigError
from inc_torch._parametrized import fold_parametrizations
from inc_torch.ptq._ops import LOOKUP_TYPES

__all__ = ["FxOp", "fx_ops", "apply_fx_settings", "ROLE_OPTIONS"]

_QUANTIZED_DTYPES = (torch.quint8, torch.qint8, torch.uint8, torch.int8)
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Calls that only move or re-view data: on a quantized tensor they are exact, so they are not ops that
# quantization changes (torch.ao runs them on the quantized tensor even under a None qconfig).
_LAYOUT = frozenset(
    {"view", "reshape", "flatten", "transpose", "permute", "contiguous", "squeeze", "unsqueeze", "getitem",
     "chunk", "split", "size", "detach", "expand", "repeat", "narrow", "unflatten", "t"}
)
# Overridable settings per role (the values come from inc_core's choices).
ROLE_OPTIONS = {
    "weighted": ("calibration", "granularity", "scheme", "activation_dtype"),
    "activation": ("calibration", "scheme", "activation_dtype"),
    "shared": (),
    "fixed": (),
    "lookup": (),
}


@dataclass(frozen=True)
class FxOp:
    """One op the FX flow quantizes, and how a QConfigMapping addresses it."""

    op: Op
    kind: str  # "module", "function" or "method"
    scope: str  # the module's own path (kind "module") or the path of the module whose forward calls it
    target: Any  # the function object or method name
    index: int  # for functions: how many calls of ``target`` precede this one in ``scope`` (torch.ao's order)
    role: str
    node: str = ""  # the traced graph's node computing it (calibration keys its tensors by these names)
    reads: tuple[str, ...] = ()  # the nodes whose tensors it reads


def _callable_name(target: Any) -> str:
    return str(getattr(target, "__name__", target)).strip("_") or str(target)


def _role(original: nn.Module | None, info: dict[str, Any]) -> str | None:
    ctr = info.get("output_act_obs_or_fq_ctr")
    if ctr is None:
        return None
    observer = ctr()
    if getattr(observer, "dtype", None) not in _QUANTIZED_DTYPES:
        return None
    if isinstance(original, _WEIGHTED):
        return "weighted"
    if "FixedQParams" in type(observer).__name__:
        return "fixed"
    if info.get("input_output_share_observers") or info.get("reuse_input_obs_or_fq"):
        return "shared"
    return "activation"


def _unobserved(node: torch.fx.Node) -> torch.fx.Node:
    """The node an observer (or a chain of them) watches: ``node`` itself when it is none."""
    owner = node.graph.owning_module
    while node.op == "call_module" and owner is not None and node.args and isinstance(node.args[0], torch.fx.Node):
        if not isinstance(owner.get_submodule(str(node.target)), (ObserverBase, FakeQuantizeBase)):
            break
        node = node.args[0]
    return node


def fx_ops(model: nn.Module, mapping: Any, *, qat: bool = False) -> tuple[FxOp, ...]:
    """The ops that ``prepare_fx`` with ``mapping`` (no per-op entries) quantizes, in graph order.

    Raises:
        UnsupportedModelError: the model cannot be traced (from :func:`fx_prepare`).
    """
    return traced_fx_ops(model, mapping, qat=qat)[0]


def traced_fx_ops(model: nn.Module, mapping: Any, *, qat: bool = False) -> tuple[tuple[FxOp, ...], tuple[str, ...]]:
    """:func:`fx_ops`, and the modules to run as opaque float calls (:func:`keyword_weight_scopes`), whose ops
    are not listed: nothing in them is quantized."""
    from inc_torch.ptq._capture import fx_prepare
    from inc_torch.ptq._kept_float import keyword_weight_scopes

    work = fold_parametrizations(copy.deepcopy(model).eval())
    work.train(qat)
    # prepare_fx documents its example inputs as unused; tracing is symbolic.
    prepared = fx_prepare(work, mapping, (), qat=qat)
    scopes: dict[str, tuple[str, Any]] = prepared.meta["_observed_graph_module_attrs"].node_name_to_scope
    originals = dict(model.named_modules())
    seen_calls: dict[tuple[str, Any], int] = defaultdict(int)
    named: dict[tuple[str, str], int] = defaultdict(int)
    found: list[FxOp] = []
    for node in prepared.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        module = prepared.get_submodule(str(node.target)) if node.op == "call_module" else None
        if isinstance(module, (ObserverBase, FakeQuantizeBase)):
            continue  # an observer or fake-quant the mapping inserted
        original = originals.get(str(node.target)) if module is not None else None
        index = 0
        scope = ""
        if node.op != "call_module":
            scope = scopes.get(node.name, ("", None))[0]
        if node.op == "call_function":
            index = seen_calls[(scope, node.target)]
            seen_calls[(scope, node.target)] += 1
        if not qat and original is not None and type(original) in LOOKUP_TYPES:
            role: str | None = "lookup"  # set by name in the mapping (the x86 default keeps the type FP32)
        else:
            role = _role(original, node.meta.get("target_dtype_info", {}))
        if role is None or (module is None and _callable_name(node.target) in _LAYOUT):
            continue
        if node.op == "call_module":
            name = str(node.target)
            op_type = type(original if original is not None else module).__name__
            kind = "module"
            scope = name
        else:
            base = _callable_name(node.target)
            count = named[(scope, base)]
            named[(scope, base)] += 1
            leaf = base if count == 0 else f"{base}_{count}"
            name = f"{scope}.{leaf}" if scope else leaf
            op_type = base
            kind = "function" if node.op == "call_function" else "method"
        reads = tuple(_unobserved(n).name for n in node.all_input_nodes)
        found.append(FxOp(Op(name, op_type), kind, scope, node.target, index, role, node.name, reads))
    hidden = keyword_weight_scopes(prepared)
    found = [op for op in found if not any(op.op.name == h or op.op.name.startswith(f"{h}.") for h in hidden)]
    return tuple(found), tuple(hidden)


def apply_fx_settings(mapping: Any, table: dict[str, FxOp], per_op: dict[str, Any]) -> Any:
    """Set one qconfig (``None``: FP32) per op on ``mapping``, each through the key torch.ao matches it by.

    Raises:
        ConfigError: method calls (``x.view``, ``x.mean``) given different settings: torch.ao's FX flow
            configures a method by its name for the whole model, so they must be set alike.
    """
    methods: dict[str, dict[str, Any]] = defaultdict(dict)
    for name, qconfig in per_op.items():
        entry = table[name]
        if entry.kind == "module":
            mapping.set_module_name(name, qconfig)
        elif entry.kind == "function":
            mapping.set_module_name_object_type_order(entry.scope, entry.target, entry.index, qconfig)
        else:
            methods[str(entry.target)][name] = qconfig
    for method, chosen in methods.items():
        every = sorted(n for n, e in table.items() if e.kind == "method" and str(e.target) == method)
        values = [chosen.get(n, "unset") for n in every]
        if any(v is not values[0] for v in values):
            raise ConfigError(
                f"QuantConfig: method calls .{method}() are set differently ({sorted(chosen)} of {every}); "
                f"torch.ao's FX flow configures a method for the whole model. Exclude or override all of {every} "
                f"together (e.g. exclude=inc.LayerFilter(types=({method!r},))), or use format='pt2e'."
            )
        mapping.set_object_type(method, values[0])
    return mapping
