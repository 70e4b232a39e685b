"""Framework failures as inc errors: which call failed, at which op, and the way out.

torch, torchao and IPEX raise builtin exceptions (ValueError, RuntimeError, AssertionError...) from deep
inside their passes. The public verbs of inc-torch turn them into :class:`UnsupportedModelError` naming
the framework call, the op of the user's model it was working on (found from the graph node or module
the failing frames were handling), and what to do: keep that op in FP32, or use another path.
"""

from __future__ import annotations

import contextlib
import functools
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

from inc_core.errors import IncError, UnsupportedModelError
from inc_torch.ptq._conv1d import is_depthwise_conv1d

__all__ = [
    "check_compiled_agrees", "check_constructs", "check_repeatable", "check_returned_model", "failing_op", "framework_errors",
    "wrap_framework_errors",
]

_FRAMEWORKS = ("torch", "torchao", "intel_extension_for_pytorch")
_OTHER_PATHS = {
    "pt2e": "format='fx' or approach='dynamic'",
    "fx": "format='pt2e' or approach='dynamic'",
    "torchscript": "the default torch backend (backend=None) or approach='dynamic'",
    "dynamic": "static quantization (approach='static')",
}

F = TypeVar("F", bound=Callable[..., Any])


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (inductor wraps the original error)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__ or getattr(current, "inner_exception", None)
    return seen


def _framework_call(exc: BaseException) -> str | None:
    """The first torch/torchao/IPEX function the failing call entered, e.g. ``prepare_pt2e (torchao)``."""
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        root = str(frame.f_globals.get("__name__", "")).split(".")[0]
        if root in _FRAMEWORKS:
            return f"{frame.f_code.co_name} ({root})"
    return None


def _name_of(value: Any, module_names: dict[int, str]) -> str | None:
    if isinstance(value, torch.fx.Node):
        if value.op == "call_module":
            return str(value.target)
        stack = value.meta.get("nn_module_stack")
        if stack:
            path = str(list(stack.values())[-1][0])
            return path or None
        return None
    if isinstance(value, nn.Module):
        return module_names.get(id(value))
    return None


def failing_op(exc: BaseException, model: nn.Module | None = None) -> str | None:
    """The name (as in ``model.named_modules()``) of the op the failing frames were handling, if any.

    Looks, from the innermost frame outwards, for a local variable holding a graph node (named by the
    module it came from) or one of ``model``'s submodules.
    """
    module_names = {id(m): n for n, m in model.named_modules() if n} if model is not None else {}
    for error in _chain(exc):
        for frame, _ in reversed(list(traceback.walk_tb(error.__traceback__))):
            for value in list(frame.f_locals.values()):
                name = _name_of(value, module_names)
                if name:
                    return name
    return None


def _way_out(op: str | None, fmt: str, op_names: frozenset[str]) -> str:
    other = _OTHER_PATHS.get(fmt, "another format")
    if op is not None and op in op_names:
        return f"Keep that op in FP32 with exclude=inc.LayerFilter(names=({op!r},)), or use {other}."
    if op is not None:
        return f"inc does not quantize {op!r} itself but the framework failed on it: use {other}."
    return f"Use {other}, or exclude the op the message names (inc.describe(model) lists the ops)."


def _unsupported(step: str, exc: BaseException, fmt: str, model: nn.Module | None, op_names: frozenset[str]) -> UnsupportedModelError:
    op = failing_op(exc, model)
    call = _framework_call(exc)
    where = f" at op {op!r}" if op else ""
    by = f" in {call}" if call else ""
    return UnsupportedModelError(
        f"{step} failed{where}{by} ({_first_line(exc)}). {_way_out(op, fmt, op_names)}"
    )


@contextlib.contextmanager
def framework_errors(
    step: str, fmt: str, model: nn.Module | None = None, op_names: frozenset[str] = frozenset()
) -> Iterator[None]:
    """Turn any non-inc exception raised inside into an :class:`UnsupportedModelError`.

    Args:
        step: what was being done, e.g. ``"PT2E quantization (format='pt2e')"``.
        fmt: the path, to suggest another one.
        model: the user's model, to name the failing op.
        op_names: the ops inc quantizes (those can be excluded).
    """
    try:
        yield
    except (IncError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise _unsupported(step, exc, fmt, model, op_names) from exc


def wrap_framework_errors(step: str) -> Callable[[F], F]:
    """Decorator form of :func:`framework_errors` for a public function ``fn(model, config=None, ...)``.

    The format, for the way out, is read from the ``config`` argument when there is one.
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            model = kwargs.get("model", args[0] if args else None)
            config = kwargs.get("config", args[1] if len(args) > 1 else None)
            module = model if isinstance(model, nn.Module) else None
            with framework_errors(step, _format_of(config), module):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def _format_of(config: Any) -> str:
    if config is None:
        return "unknown"
    if getattr(config, "approach", None) == "dynamic":
        return "dynamic"
    fmt = getattr(config, "format", "default")
    return "pt2e" if fmt == "default" else str(fmt)


# Conv padding modes the x86 INT8 paths cannot run: FX's quantized convolutions take zero padding only;
# torchao's X86InductorQuantizer rejects the pad node such a conv exports to, even for an excluded conv.
_ZERO_PADDING = "zeros"


def check_constructs(model: nn.Module, fmt: str, excluded: set[str]) -> None:
    """Refuse, before any work, constructs the chosen path is known to fail on, naming the way out.

    Raises:
        UnsupportedModelError: a convolution with ``padding_mode`` other than ``"zeros"`` that FX would
            quantize, or any such convolution on the PT2E path.
    """
    if fmt not in ("pt2e", "fx"):
        return
    for name, module in model.named_modules():
        mode = getattr(module, "padding_mode", _ZERO_PADDING)
        if not isinstance(module, nn.modules.conv._ConvNd) or mode == _ZERO_PADDING:
            continue
        if fmt == "pt2e" and isinstance(module, nn.Conv1d) and not is_depthwise_conv1d(module):
            continue  # rewritten as conv2d before the quantizer sees it, its padding a separate op (see ptq._conv1d)
        what = f"{type(module).__name__} {name!r} has padding_mode={mode!r}"
        if fmt == "pt2e":
            raise UnsupportedModelError(
                f"{what}, which torchao's X86InductorQuantizer (format='pt2e') cannot process, even with the op "
                f"excluded. Use format='fx' with exclude=inc.LayerFilter(names=({name!r},)) to keep it in FP32, "
                "or approach='dynamic'."
            )
        if name not in excluded:
            raise UnsupportedModelError(
                f"{what}; torch's quantized convolutions (format='fx') take zero padding only. Keep it in FP32 "
                f"with exclude=inc.LayerFilter(names=({name!r},)), or pad explicitly (torch.nn.functional.pad) "
                "before a zero-padded convolution."
            )


def check_returned_model(
    model: nn.Module,
    example: Any,
    fmt: str,
    user_model: nn.Module,
    op_names: frozenset[str],
    fp32_graph: torch.fx.GraphModule | None = None,
    batch: str = "the first calibration batch",
) -> None:
    """Run the INT8 model once, as the user will (PT2E: compiled by inductor), on a calibration batch.

    ``fp32_graph``: the exported FP32 graph the INT8 one was made from (PT2E), the reference of the
    compiled-vs-uncompiled check; the user's module itself is never run here (a module left in training
    mode would update its batch-norm statistics).

    Raises:
        UnsupportedModelError: the model does not run; names the op where that can be told.
    """
    args, kwargs = example
    compiled = bool(getattr(model, "inductor", False))
    inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)] if compiled else []
    before = [t.clone() for t in inputs]
    try:
        with torch.no_grad():
            output = model(*args, **kwargs)
    except Exception as exc:
        if isinstance(exc, (MemoryError, KeyboardInterrupt)):
            raise
        # The user's module names, then the returned model's (FX keeps them; PT2E's graph names nodes by them).
        op = None
        for owner in (user_model, model, getattr(model, "graph_module", None)):
            op = op or (failing_op(exc, owner) if isinstance(owner, nn.Module) else None)
        where = f" at op {op!r}" if op else ""
        raise UnsupportedModelError(
            f"The INT8 model ({fmt}) was built but does not run on {batch}{where} "
            f"({_first_line(exc)}). {_way_out(op, fmt, op_names)}"
        ) from exc
    if any(not torch.equal(t, b) for t, b in zip(inputs, before)):
        # an inductor lowering wrote into its input (see ptq._inplace_sums): the batch (the user's data) is put back,
        # and every later call of the model gets copies of its inputs
        with torch.no_grad():
            for t, b in zip(inputs, before):
                t.copy_(b)
        model.copy_inputs_on_each_call()
    graph_module = getattr(model, "graph_module", None)
    if compiled and isinstance(graph_module, torch.fx.GraphModule):
        with torch.no_grad():
            check_repeatable(output, model(*args, **kwargs), graph_module, fmt)
            uncompiled = graph_module(*args, **kwargs)
            fp32 = None if fp32_graph is None else fp32_graph(*args, **kwargs)
        check_compiled_agrees(output, uncompiled, fp32, fmt)


def check_repeatable(first: Any, second: Any, graph_module: torch.fx.GraphModule, fmt: str) -> None:
    """The compiled INT8 model must give the same outputs on a second call with the same inputs.

    torch 2.13's inductor sums an INT8 Linear's output into the other summand in place (oneDNN's ``sum`` post-op);
    where that summand is a constant of the model of the same shape (a positional table added to a projection at
    batch 1), every call adds into the constant: the first call is right, each later one drifts (cosine 0.66 to FP32
    by the third). inc keeps inductor from doing so (see ``ptq._inplace_sums``) where the torch at hand allows it;
    elsewhere inputs are copied, but a model's own constants cannot be, so such a model is refused here rather
    than returned.

    Raises:
        UnsupportedModelError: outputs differ between the two calls; names the Linear layers summed with a constant.
    """
    from torch.utils import _pytree

    pairs = zip(_pytree.tree_leaves(first), _pytree.tree_leaves(second))
    if all(
        not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or torch.allclose(a, b, rtol=1e-4, atol=1e-5)
        for a, b in pairs
    ):
        return
    from inc_torch._module_stack import module_path
    from inc_torch.ptq._inplace_sums import linears_summed_with

    linears = [module_path(n) or n.name for n in linears_summed_with(graph_module, "get_attr")]
    named = list(dict.fromkeys(linears))
    exclude = f" or keep {named[0]!r} in FP32 with exclude=inc.LayerFilter(names=({named[0]!r},))" if named else ""
    raise UnsupportedModelError(
        f"The INT8 model ({fmt}) compiled by inductor gives other outputs on a second call with the same inputs: a "
        f"compiled kernel writes into the model's own constants (inductor sums an INT8 Linear's output into a "
        f"constant of its shape in place{': ' + ', '.join(named) if named else ''}). Use "
        f"{_OTHER_PATHS.get(fmt, 'another format')} or backend='ipex'{exclude}."
    )


# How much closer to the FP32 model the uncompiled INT8 graph may be than the compiled one. Kernel rounding
# moves a deep random-weight network either way (efficientnet_b0 in the corpus: 0.85 compiled, 0.84 uncompiled,
# only 0.81 to each other), so the two are compared by their distance to FP32, not to each other; a lowering
# that computes something else loses far more (MiniLM under the CPP GEMM template: 0.98 -> 0.07; GoogLeNet's
# ceil_mode pools: 0.96 -> 0.66).
COMPILED_FIDELITY_DROP = 0.1


def check_compiled_agrees(compiled: Any, uncompiled: Any, fp32: Any | None, fmt: str) -> None:
    """The inductor-compiled INT8 model must compute what its graph computes, up to kernel rounding.

    Inductor lowers the INT8 graph with pattern-matched kernels; a lowering that mis-reads an argument
    (torch 2.13's INT8 max-pool dropped ``ceil_mode``; its CPP GEMM template returned unrelated values) gives
    a model that runs and answers wrongly. Checked on the first calibration batch: each output must have the
    uncompiled graph's shape, and (given ``fp32``, the FP32 graph's outputs) its cosine to the FP32 output may
    be at most :data:`COMPILED_FIDELITY_DROP` below the uncompiled graph's.

    Raises:
        UnsupportedModelError: an output of another shape, or one that far from the FP32 model's.
    """
    from torch.utils import _pytree

    from inc_core.testing import cosine

    got, want = _pytree.tree_leaves(compiled), _pytree.tree_leaves(uncompiled)
    ideal = [] if fp32 is None else _pytree.tree_leaves(fp32)
    problems = []
    if len(got) != len(want):
        problems.append(f"{len(got)} outputs instead of {len(want)}")
    for index, (a, b) in enumerate(zip(got, want)):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            continue
        if a.shape != b.shape:
            problems.append(f"output {index} has shape {tuple(a.shape)} instead of {tuple(b.shape)}")
            continue
        f = ideal[index] if index < len(ideal) and len(ideal) == len(want) else None
        if not (a.is_floating_point() and isinstance(f, torch.Tensor) and f.shape == b.shape):
            continue
        reference = f.detach().double().numpy()
        compiled_cos = cosine(a.detach().double().numpy(), reference)
        uncompiled_cos = cosine(b.detach().double().numpy(), reference)
        if not compiled_cos >= uncompiled_cos - COMPILED_FIDELITY_DROP:
            problems.append(
                f"output {index} has cosine {compiled_cos:.3f} to the FP32 model's, against {uncompiled_cos:.3f} "
                "for the same graph uncompiled"
            )
    if problems:
        raise UnsupportedModelError(
            f"The INT8 model ({fmt}) compiled by inductor does not compute what its graph computes on the first "
            f"calibration batch: {'; '.join(problems)}. This is a defect of inductor's INT8 lowering on this "
            f"model, not of the data. Use {_OTHER_PATHS.get(fmt, 'another format')} (no inductor compile), or "
            "the IPEX backend (backend='ipex')."
        )
