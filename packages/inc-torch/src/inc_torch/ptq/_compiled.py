"""The INT8 module the PT2E path returns: the converted graph, compiled by inductor on first call."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from inc_core.errors import ConfigError, DatasetError
from inc_torch._compat import quiet
from inc_torch._inputs import Inputs
from inc_torch.ptq import _inplace_sums
from inc_torch.ptq._aoti_cache import INT8_INDUCTOR_SETTINGS, int8_inductor_backend, load_or_compile
from inc_torch.ptq._ceil_pool import pad_ceil_mode_pools

__all__ = ["CompiledQuantizedModule", "RUNTIMES", "drop_unread_state"]

log = logging.getLogger("inc")

# How the INT8 graph is run: "compile" runs it through torch.compile (dynamo guards and inductor's Python
# wrapper on each call); "aoti" compiles it ahead of time into a C++ library (AOTInductor) and calls that
# directly. Both use the same inductor passes and oneDNN INT8 kernels, so their outputs agree.
RUNTIMES = ("compile", "aoti")

# Each input shape compiles its own INT8 program (inductor prepacks INT8 weights for static shapes), which
# holds its own copy of the prepacked weights (measured: about the INT8 weights' size per shape). dynamo keeps
# 8 per model by default and runs any further shape uncompiled, through the reference graph: a model serving
# variable sequence lengths silently fell to 3x slower than its compiled calls (slower than FP32). 32 bounds
# the memory at 32 weight copies; past it a warning says how to need fewer shapes.
MAX_COMPILED_SHAPES = 32


def drop_unread_state(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Delete the parameters, buffers and submodules that no node of the graph reads.

    ``convert_pt2e`` folds each quantized weight into a new int8 constant (``_frozen_param*``) but leaves
    the FP32 weight it came from on the module. ``torch.export`` lifts every attribute of the module into
    the program, so a saved INT8 model would carry both copies (1.25x the FP32 size instead of 0.25x),
    and the model in memory would keep the FP32 weights alive. Changes ``graph_module`` in place.
    """
    graph = graph_module.graph
    # A tensor is in use when a get_attr reads it or a called submodule (or a get_attr'd subgraph,
    # e.g. a torch.cond branch) owns it.
    used = {str(n.target) for n in graph.nodes if n.op in ("get_attr", "call_module")}

    def in_use(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in used for i in range(1, len(parts) + 1))

    unread = [
        name
        for name, _ in (*graph_module.named_parameters(remove_duplicate=False), *graph_module.named_buffers(remove_duplicate=False))
        if not in_use(name)
    ]
    for name in unread:
        owner_path, _, attr = name.rpartition(".")
        owner = graph_module.get_submodule(owner_path) if owner_path else graph_module
        if hasattr(owner, attr):  # a tensor shared under two names is gone after the first
            delattr(owner, attr)
    graph_module.delete_all_unused_submodules()
    return graph_module


def _signature(value: Any) -> Any:
    """A hashable key for one call's inputs: what an ahead-of-time compiled program is specialized to."""
    if isinstance(value, torch.Tensor):
        return (value.shape, value.stride(), value.dtype, value.device)
    if isinstance(value, (tuple, list)):
        return (type(value), *(_signature(v) for v in value))
    if isinstance(value, dict):
        return (dict, *((k, _signature(v)) for k, v in value.items()))
    try:
        hash(value)
    except TypeError:
        return (type(value), repr(value))
    return (type(value), value)


def _call_form(graph_module: torch.fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """One input, passed by position or by name, in the form the graph was exported with.

    An exported graph takes its inputs exactly as export saw them: a model calibrated on ``{"x": ...}`` batches (the
    named arrays of an .npz file, as the inc CLI reads them) would refuse ``model(x)``, and one calibrated on arrays
    ``model(x=...)``. With one input there is no doubt which is meant; with several, the graph's own error stands.
    """
    spec = getattr(graph_module, "_in_spec", None)
    if spec is None or len(args) + len(kwargs) != 1:
        return args, kwargs
    # TreeSpec.children(); older torch has children_specs only (deprecated where children() exists)
    children = spec.children() if callable(getattr(spec, "children", None)) else getattr(spec, "children_specs", None)
    if not children or len(children) != 2:
        return args, kwargs
    positional, named = children
    names = list(getattr(named, "context", None) or [])
    if args and positional.num_children == 0 and len(names) == 1:
        return (), {names[0]: args[0]}
    if kwargs and positional.num_children == 1 and not names:
        return (next(iter(kwargs.values())),), {}
    return args, kwargs


def _guard_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the exported graph's check of its inputs against the sizes export fixed."""
    return isinstance(exc, AssertionError) and str(exc).startswith("Guard failed")


def _fixed_size_message(graph_module: torch.fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any], exc: AssertionError) -> str:
    """What the call gave against the sizes the captured graph fixed, and what to do about it."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    given = dict(zip((n.name for n in placeholders), args))
    given.update(kwargs)
    fixed = []
    for node in placeholders:
        captured, value = node.meta.get("val"), given.get(node.name)
        if not (isinstance(captured, torch.Tensor) and isinstance(value, torch.Tensor)) or captured.dim() != value.dim():
            continue
        for dim in range(1, captured.dim()):
            size = captured.shape[dim]
            if is_concrete_int(size) and int(size) != value.shape[dim]:
                fixed.append(f"{node.name!r} dimension {dim} of size {int(size)} (got {value.shape[dim]})")
    where = "; ".join(fixed) if fixed else f"a fixed input size ({str(exc).strip().splitlines()[0]})"
    return (
        f"This INT8 model was captured for {where}: torch.export fixed that size because the model's "
        "forward needs it static (or calibration only showed that size). Calibrate with batches of the "
        "lengths it will run at, or pad/truncate inputs to the captured length."
    )


class _AotiProgram:
    """One input signature's AOTInductor library, called without Python-side guards."""

    def __init__(self, graph_module: torch.fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any], signature: Any) -> None:
        # From the disk cache when this graph, with these weights, was compiled for these inputs before.
        self.compiled, self.from_cache = load_or_compile(graph_module, args, kwargs, signature)
        # Positional tensors only (the usual case) go straight to the library, skipping the per-call
        # (de)serialization of the input/output specs AOTICompiledModel.__call__ does.
        self.positional = not kwargs and all(isinstance(a, torch.Tensor) for a in args)
        loader = getattr(self.compiled, "loader", None)
        self.run_flat = getattr(loader, "boxed_run", None)
        if self.run_flat is not None:
            from torch.utils import _pytree

            self.out_spec = _pytree.treespec_loads(loader.get_call_spec()[1])
            self.unflatten = _pytree.tree_unflatten

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.positional and self.run_flat is not None:
            return self.unflatten(self.run_flat(list(args)), self.out_spec)
        return self.compiled(*args, **kwargs)


class CompiledQuantizedModule(nn.Module):
    """A PT2E INT8 model compiled by inductor with freezing, on first call.

    The converted graph (``graph_module``) holds int8 weights between quantize/dequantize ops; inductor's
    x86 passes fuse those patterns into oneDNN INT8 convolutions and matmuls once weights are frozen
    as constants. Compilation happens on the first call, and again for each new input shape (freezing
    specializes shapes), under ``torch.no_grad()``: this module is for inference.

    ``runtime`` picks how it runs. ``"compile"`` (the default) goes through ``torch.compile``.
    ``"aoti"`` compiles the graph ahead of time with AOTInductor into a C++ library that each call
    enters directly, without dynamo's guard checks and inductor's Python wrapper: faster at small
    batches, where that per-call cost weighs most (benchmarks/results/torch.md). Its first call per
    input shape compiles 3-5x longer than torch.compile's, so it pays off for a model that serves many
    calls, not for a one-off evaluation; each compiled library is kept in a disk cache
    (:mod:`inc_torch.ptq._aoti_cache`, ``$INC_AOTI_CACHE_DIR``), so the same model with the same weights,
    loaded again in any process, starts in seconds instead of recompiling. Set it on a returned model:
    ``q.runtime = "aoti"``; :func:`inc.save` records it in the ``.pt2`` and :func:`inc.load` restores it.

    The FP32 weights ``convert_pt2e`` leaves behind, which the graph no longer reads, are removed from
    ``graph_module`` (see :func:`drop_unread_state`): the module, and the file :func:`inc.save` writes,
    hold the int8 weights only.

    Args:
        graph_module: the model ``convert_pt2e`` returned.
        example: example inputs ``(args, kwargs)``, kept so that :func:`inc.save` can export the model.
        inductor: run through inductor (``True``) or run ``graph_module`` as is (reference numerics, slow).
        runtime: ``"compile"`` (``torch.compile``, the default) or ``"aoti"`` (AOTInductor).

    Raises:
        ConfigError: ``runtime`` (here or set later) is not one of :data:`RUNTIMES`.

    Attributes:
        graph_module: the converted graph; ``inc_torch.quantized_ops`` and ``torch.export`` read it.
    """

    def __init__(
        self, graph_module: torch.fx.GraphModule, example: Inputs | None = None, *, inductor: bool = True, runtime: str = "compile"
    ) -> None:
        super().__init__()
        self.runtime = runtime  # validated before graph_module is touched
        pad_ceil_mode_pools(graph_module)  # exact, and inductor would drop their ceil_mode (see _ceil_pool)
        self.graph_module = drop_unread_state(graph_module)
        self.example = example
        self.inductor = inductor
        # where this torch's inductor cannot be kept from summing an INT8 Linear's output into an input in place
        # (see _inplace_sums), the compiled program gets copies of the inputs
        self.__dict__["_copies_inputs"] = (
            not _inplace_sums.corrects_inplace_sums() and _inplace_sums.sums_inputs_with_linears(graph_module)
        )
        self._reset_compiled()

    @property
    def runtime(self) -> str:
        """``"compile"`` (torch.compile) or ``"aoti"`` (AOTInductor); settable, the next call compiles for it."""
        return str(self.__dict__["_runtime"])

    @runtime.setter
    def runtime(self, value: str) -> None:
        if value not in RUNTIMES:
            raise ConfigError(
                f"CompiledQuantizedModule: runtime must be one of {', '.join(map(repr, RUNTIMES))}, got {value!r}; "
                "'aoti' is faster per call, 'compile' compiles faster."
            )
        self.__dict__["_runtime"] = value

    def copy_inputs_on_each_call(self) -> None:
        """Give the compiled model copies of its input tensors from now on (see ``_inplace_sums``): for a lowering
        found writing into its input when the model was checked, beyond what ``_inplace_sums`` corrects."""
        if not self.__dict__.get("_copies_inputs"):
            log.info("The compiled INT8 model writes into its input tensors (an inductor in-place lowering); each "
                     "call now passes it copies, so the caller's tensors stay as they are")
        self.__dict__["_copies_inputs"] = True

    def _reset_compiled(self) -> None:
        # Not registered submodules: the compiled wrapper shares graph_module's parameters and would
        # otherwise list them twice in state_dict(); compiled libraries are not picklable.
        self.__dict__["_compiled"] = None
        self.__dict__["_programs"] = {}
        self.__dict__["_shapes"] = set()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = _call_form(self.graph_module, args, kwargs)
        try:
            return self._run(args, kwargs)
        except AssertionError as exc:
            # The exported graph checks its inputs against the sizes export fixed ("Guard failed: ...");
            # only that check is turned into a message about the inputs, every other error is the model's.
            if not _guard_failure(exc):
                raise
            raise DatasetError(_fixed_size_message(self.graph_module, args, kwargs, exc)) from exc

    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self.inductor:
            with torch.no_grad():
                return self.graph_module(*args, **kwargs)
        if self.__dict__.get("_copies_inputs"):
            args, kwargs = _inplace_sums.copy_tensor_inputs(args, kwargs)
        if self.runtime == "aoti":
            programs = self.__dict__["_programs"]
            key = (_signature(args), _signature(kwargs))
            if key not in programs:  # None: AOTI failed for this signature, torch.compile runs it
                programs[key] = self._compile_aoti(args, kwargs, key)
            program = programs[key]
            if program is not None:
                with torch.no_grad():
                    return program(args, kwargs)
        compiled = self.__dict__["_compiled"]
        if compiled is None:
            self._init_threads()
            # Static shapes per compilation: inductor's weight prepacking for INT8 needs them. The backend compiles
            # under int8_inductor() each time dynamo compiles (the in-place sum correction is entered there, not
            # around every call: each settings patch costs ~15-30 us, a tenth of a small model's call).
            compiled = torch.compile(self.graph_module, dynamic=False, backend=int8_inductor_backend)
            self.__dict__["_compiled"] = compiled
        self._note_shape(args, kwargs)
        # freezing (the INT8 weight prepack done once) and ATen GEMMs, whatever the user set: see the constant
        # (dynamo reads freezing when it traces, so the settings are in force around the call); one compiled
        # program per input shape, up to MAX_COMPILED_SHAPES of them
        with (
            torch.no_grad(),
            torch._inductor.config.patch(INT8_INDUCTOR_SETTINGS),
            torch._dynamo.config.patch(recompile_limit=MAX_COMPILED_SHAPES),
            quiet(),
        ):
            return compiled(*args, **kwargs)

    def _note_shape(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Say when a call compiles for a new input shape, and when shapes beyond the limit run uncompiled."""
        shapes: set[Any] = self.__dict__.setdefault("_shapes", set())
        key = (_signature(args), _signature(kwargs))
        if key in shapes:
            return
        shapes.add(key)
        if len(shapes) == MAX_COMPILED_SHAPES + 1:
            log.warning(
                "This INT8 model has been compiled for %d input shapes, the most it keeps (each holds its own prepacked "
                "weights): calls of further shapes run uncompiled, several times slower. Pad inputs to a few fixed "
                "lengths and batch sizes (bucketing).",
                MAX_COMPILED_SHAPES,
            )
        elif len(shapes) > 1 and len(shapes) <= MAX_COMPILED_SHAPES:
            # debug: tuning compiles each trial's model for the evaluation's shapes, which would fill the log
            log.debug(
                "Compiling the INT8 model for a new input shape (%d shapes so far; each compiles once and keeps its own "
                "prepacked weights).", len(shapes),
            )

    @staticmethod
    def _init_threads() -> None:
        # Setting the thread count (to its current value) initializes torch's OpenMP pool before
        # inductor's kernels first run; without it they were measured 10-40x slower on some hosts.
        torch.set_num_threads(torch.get_num_threads())

    def _compile_aoti(self, args: tuple[Any, ...], kwargs: dict[str, Any], signature: Any) -> _AotiProgram | None:
        """The AOTInductor program for these inputs, or None (run through torch.compile) where AOTI fails."""
        self._init_threads()
        try:
            with torch.no_grad(), quiet():
                return _AotiProgram(self.graph_module, args, kwargs, signature)
        except Exception as exc:  # the same graph still runs through torch.compile; say why it is slower
            if isinstance(exc, (MemoryError, KeyboardInterrupt)) or _guard_failure(exc):
                raise  # a guard failure is the inputs' fault: forward reports it, torch.compile would fail alike
            log.warning(
                "AOTInductor could not compile this INT8 model (%s: %s); running it through torch.compile instead "
                "(runtime='compile'), which costs more per call.",
                type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
            )
            return None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "generate":  # what users of a Hugging Face language model call next
                raise AttributeError(
                    "A PT2E INT8 model runs the forward torch.export captured, without a key/value cache, and has no "
                    "generate(). For text generation quantize with approach='dynamic': the model keeps its class, its "
                    "cache and generate()."
                ) from None
            raise

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_compiled"], state["_programs"], state["_shapes"] = None, {}, set()
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> CompiledQuantizedModule:
        import copy

        return CompiledQuantizedModule(
            copy.deepcopy(self.graph_module, memo), copy.deepcopy(self.example, memo), inductor=self.inductor, runtime=self.runtime
        )

    def extra_repr(self) -> str:
        return f"inductor={self.inductor}, runtime={self.runtime!r}"
