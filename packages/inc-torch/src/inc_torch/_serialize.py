"""Saving INT8 models in formats a torch user deploys: ExportedProgram (.pt2) and TorchScript (.pt)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inc_core.errors import ModelLoadError, SaveError
from inc_torch._compat import quiet
from inc_torch._compiled import CompiledQuantizedModule
from inc_torch._fx import EXAMPLE_ATTR
from inc_torch._inputs import Inputs, widened

__all__ = ["save_model", "load_model"]


def _export_dynamic(graph_module: torch.fx.GraphModule, example: Inputs) -> torch.export.ExportedProgram:
    wide = widened(example)
    args, kwargs = wide
    collection = torch.export.ShapesCollection()
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            collection[value] = {0: torch.export.Dim.AUTO}
    return torch.export.export(graph_module, args, kwargs, dynamic_shapes=collection.dynamic_shapes(graph_module, args, kwargs))


def save_model(model: nn.Module, path: Path) -> None:
    """PT2E models as an ExportedProgram (``.pt2``), everything else as TorchScript (``.pt``).

    Raises:
        SaveError: the suffix does not match the model's format, or the model cannot be serialized.
    """
    suffix = path.suffix.lower()
    if isinstance(model, CompiledQuantizedModule):
        if suffix != ".pt2":
            raise SaveError(
                f"A PT2E INT8 model is saved as a torch.export ExportedProgram; name the file '*.pt2', got {path.name!r}."
            )
        if model.example is None:
            raise SaveError("This PT2E model carries no example inputs, which torch.export needs to save it.")
        try:
            with quiet():
                torch.export.save(_export_dynamic(model.graph_module, model.example), path)
        except Exception as exc:
            raise SaveError(f"torch.export could not save the PT2E model to {str(path)!r}: {type(exc).__name__}: {exc}") from exc
        return
    if suffix != ".pt":
        raise SaveError(f"This model is saved as TorchScript; name the file '*.pt', got {path.name!r}.")
    torch.jit.save(_script(model), str(path))


def _script(model: nn.Module) -> torch.jit.ScriptModule:
    if isinstance(model, torch.jit.ScriptModule):
        return model
    try:
        with quiet():
            return torch.jit.script(model.eval())
    except Exception as script_error:
        example: Inputs | None = getattr(model, EXAMPLE_ATTR, None)
        if example is None or example[1]:
            raise SaveError(
                f"torch.jit.script cannot compile {type(model).__name__} ({type(script_error).__name__}: "
                f"{str(script_error).strip().splitlines()[0]}). Trace it yourself and save it with "
                "torch.jit.save(torch.jit.trace(model, example_inputs), path)."
            ) from script_error
        try:
            with quiet(), torch.no_grad():
                return torch.jit.trace(model, example[0], check_trace=False)
        except Exception as exc:
            raise SaveError(f"Neither scripting nor tracing could serialize {type(model).__name__}: {exc}") from exc


def load_model(path: Path) -> Any:
    """Read a ``.pt2`` ExportedProgram (as a compiled INT8 module) or a ``.pt`` TorchScript model.

    Raises:
        ModelLoadError: the file is not a readable model of either kind.
    """
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        from inc_torch._compat import torchao_pt2e

        torchao_pt2e()  # registers the quantize/dequantize ops the program refers to
        try:
            program = torch.export.load(path)
        except Exception as exc:
            raise ModelLoadError(f"{str(path)!r} is not a readable torch.export program: {type(exc).__name__}: {exc}") from exc
        example = getattr(program, "example_inputs", None)
        inputs: Inputs | None = (tuple(example[0]), dict(example[1])) if example else None
        return CompiledQuantizedModule(program.module(), inputs)
    if suffix == ".pt":
        if importlib.util.find_spec("intel_extension_for_pytorch") is not None:
            import intel_extension_for_pytorch  # noqa: F401  (registers the ops of IPEX INT8 graphs)
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            hint = ""
            if "ipex" in str(exc).lower() and importlib.util.find_spec("intel_extension_for_pytorch") is None:
                hint = " The file holds IPEX ops: `pip install inc-torch[ipex]` to load it."
            raise ModelLoadError(f"{str(path)!r} is not a readable TorchScript model: {type(exc).__name__}: {exc}.{hint}") from exc
    raise ModelLoadError(f"Cannot tell the format of {str(path)!r}: the torch backend reads '.pt2' (ExportedProgram) and '.pt' (TorchScript).")
