"""Turning an eager module into a graph: torch.export for PT2E, symbolic tracing for FX.

Failures are sorted into what the user can act on: inputs the model cannot take (DatasetError) and
models the chosen tracer cannot capture (UnsupportedModelError, naming the path that may work).
"""

from __future__ import annotations

import copy
import inspect
import re
import traceback
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from inc_core._dataset import LABELS_HINT
from inc_core.errors import DatasetError, UnsupportedModelError
from inc_torch._compat import quiet
from inc_torch._exported import hf_conv1d_as_linear, is_exported_graph, restore_source_partitions, shape_hint
from inc_torch._inputs import Inputs, describe_inputs, dynamic_shapes, widened
from inc_torch._module_stack import module_path
from inc_torch._parametrized import fold_parametrizations

__all__ = ["eval_copy", "check_foldable_batch_norms", "conv_batch_norms", "check_runs", "export_graph", "positional", "fx_prepare"]


def eval_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode, computed weights folded: calibration must not update the user's batch-norm
    statistics, and INT8 kernels take plain weights (see :mod:`inc_torch._parametrized`)."""
    return fold_parametrizations(copy.deepcopy(model).eval())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


_UNEXPECTED_KEYWORD = re.compile(r"unexpected keyword argument '(\w+)'")


def check_runs(model: nn.Module, inputs: Inputs, what: str) -> Any:
    """Run ``model`` once on ``inputs``; return its outputs.

    Raises:
        DatasetError: the forward raised, so the inputs do not fit the model (shape, dtype, names).
    """
    args, kwargs = inputs
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except Exception as exc:
        hint = ""
        if isinstance(exc, TypeError) and len(args) > 1 and not kwargs and "positional argument" in str(exc):
            hint = f" The batch holds {len(args)} values and each went to forward as an argument. {LABELS_HINT}"
        elif isinstance(exc, TypeError) and (unknown := _UNEXPECTED_KEYWORD.search(str(exc))) and "label" in unknown[1]:
            # A dict batch from a collator keeps its labels next to the inputs; forward takes the inputs alone.
            hint = (
                f" The batch's {unknown[1]!r} is no argument of forward: leave the labels out of the batches, or give "
                "inc.Dataset (inputs, labels) pairs with labels=True."
            )
        hint = hint or shape_hint(model, exc)
        raise DatasetError(
            f"The model cannot run on {what} ({describe_inputs(inputs)}): {_first_line(exc)}. "
            f"Give inputs shaped and typed as the model's forward expects (batch dimension first).{hint}"
        ) from exc


def export_graph(model: nn.Module, inputs: Inputs, *, train: bool = False) -> torch.fx.GraphModule:
    """``torch.export`` the model with dynamic batch (and token-sequence) dimensions; return its graph module.

    Raises:
        UnsupportedModelError: export failed (data-dependent control flow, unsupported Python); the
            message points at the FX path and at dynamic quantization, which need no export. Or the graph holds
            what no PT2E flow can quantize (:func:`check_foldable_batch_norms`).
    """
    graph_module = _exported_graph(model, inputs, train=train)
    check_foldable_batch_norms(graph_module)
    return graph_module


def _exported_graph(model: nn.Module, inputs: Inputs, *, train: bool = False) -> torch.fx.GraphModule:
    """``torch.export`` the model with dynamic batch (and token-sequence) dimensions; return its graph module.

    Raises:
        UnsupportedModelError: export failed (data-dependent control flow, unsupported Python); the
            message points at the FX path and at dynamic quantization, which need no export.
    """
    if is_exported_graph(model):
        # The user's own program (see inc_torch._exported), with the shapes it was exported for. Exporting it again
        # would record each aten op as its own source, which torchao's x86 quantizer matches none of its patterns by;
        # the sources a strict export records are filled in instead.
        graph_module = copy.deepcopy(model)
        hf_conv1d_as_linear(graph_module)
        restore_source_partitions(graph_module)
        return graph_module
    failure: Exception | None = None
    # Strict (dynamo) export records one source partition per call site, which the x86 quantizer
    # needs when a module such as a shared nn.ReLU is called several times; non-strict export
    # captures more Python. A batch of two with a dynamic batch dimension comes first; a model that
    # fixes its batch size may still export at the size it was given.
    attempts = [(widened(inputs), True, True), (widened(inputs), True, False), (inputs, False, False)]
    for example, dynamic, strict in attempts:
        args, kwargs = example
        try:
            shapes = dynamic_shapes(model, example) if dynamic else None
            with quiet():
                exported = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=strict)
            graph_module = exported.module()
            restore_source_partitions(graph_module)
            return graph_module
        except Exception as exc:  # export raises many types; each means "cannot capture as is"
            failure = failure or exc
    mode = "training" if train else "inference"
    raise UnsupportedModelError(
        f"torch.export could not capture {type(model).__name__} for {mode} ({_first_line(failure) if failure else 'no attempt'}). "
        "Data-dependent control flow (an `if` on tensor values) and unsupported Python cannot be exported. "
        "Use the FX path with format='fx', quantize with approach='dynamic' (no graph capture), or rewrite "
        "the branch with torch.cond."
    ) from failure


_BATCH_NORMS = ("batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training")
_CONVS = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution")


def _packet(node: Any) -> str:
    return str(getattr(getattr(node, "target", None), "overloadpacket", "")).rpartition(".")[2]


def conv_batch_norms(graph_module: torch.fx.GraphModule) -> Iterator[tuple[torch.fx.Node, torch.fx.Node]]:
    """Each (convolution, batch norm) pair of an exported graph where the batch norm reads the convolution's output:
    the pairs torchao folds when it prepares a graph, post-training and QAT alike."""
    for node in list(graph_module.graph.nodes):
        if _packet(node) in _BATCH_NORMS and node.args and isinstance(node.args[0], torch.fx.Node):
            if _packet(node.args[0]) in _CONVS:
                yield node.args[0], node


def check_foldable_batch_norms(graph_module: torch.fx.GraphModule) -> None:
    """Refuse a batch norm without running statistics after a convolution, which torchao folds into the
    convolution when it prepares a graph (post-training and QAT alike) and failed on with a bare TypeError or, in
    QAT, at the first training step.

    Raises:
        UnsupportedModelError: naming the batch norm and the convolution.
    """
    for conv, node in conv_batch_norms(graph_module):
        if "no_stats" in str(node.target) or len(node.args) < 4 or node.args[3] is None:
            raise UnsupportedModelError(
                f"The batch norm {module_path(node) or node.name!r} after the convolution "
                f"{module_path(conv) or conv.name!r} keeps no running statistics (track_running_stats=False): it "
                "normalises every batch by that batch's statistics, in eval mode too, so it cannot be folded into the "
                "convolution, which INT8 needs. Give it running statistics (track_running_stats=True, then train or run "
                "batches through the model to fill them)."
            )


def positional(model: nn.Module, inputs: Inputs) -> tuple[Any, ...]:
    """The inputs as positional arguments in the order of ``model.forward``'s parameters (FX takes no kwargs)."""
    args, kwargs = inputs
    if not kwargs:
        return args
    params = list(inspect.signature(model.forward).parameters.values())
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    out: list[Any] = []
    last = max(i for i, p in enumerate(params) if p.name in bound)
    for param in params[: last + 1]:
        if param.name in bound:
            out.append(bound[param.name])
        elif param.default is not inspect.Parameter.empty:
            out.append(param.default)
        else:
            raise DatasetError(f"Inputs name {sorted(kwargs)} but not {param.name!r}, which forward requires.")
    return tuple(out)


def fx_prepare(
    model: nn.Module, qconfig_mapping: Any, example: tuple[Any, ...], *, qat: bool = False, leaves: tuple[type, ...] = ()
) -> torch.fx.GraphModule:
    """``prepare_fx``/``prepare_qat_fx`` with tracing failures reported as UnsupportedModelError.

    ``leaves``: module classes traced as opaque calls (kept out of every quantization pattern).
    """
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.quantize_fx import prepare_fx, prepare_qat_fx

    custom = PrepareCustomConfig().set_non_traceable_module_classes(list(leaves)) if leaves else None
    try:
        with quiet():
            prepare = prepare_qat_fx if qat else prepare_fx
            return prepare(model, qconfig_mapping, example, prepare_custom_config=custom)
    except Exception as exc:
        if any("fuser_method" in frame.f_code.co_filename for frame, _ in traceback.walk_tb(exc.__traceback__)):
            raise UnsupportedModelError(
                f"torch.ao's FX path fuses each convolution or linear layer of {type(model).__name__} with the batch "
                f"norm that follows it, and could not ({_first_line(exc)}). A batch norm without running statistics "
                "(track_running_stats=False) normalises every batch by its own statistics, in eval mode too, and "
                "cannot be fused: give it running statistics (track_running_stats=True, then train or run batches "
                "through the model to fill them)."
            ) from exc
        # QAT has no dynamic counterpart: name only the ways that train with fake quantization.
        other_ways = "" if qat else ", quantize with approach='dynamic' (no tracing),"
        raise UnsupportedModelError(
            f"torch.fx could not trace {type(model).__name__} ({_first_line(exc)}). Symbolic tracing cannot follow "
            "control flow on tensor values or calls into untraceable code. Use the PT2E path with format='pt2e' "
            f"(torch.export){other_ways} or move the untraceable part into a submodule listed in exclude=."
        ) from exc
