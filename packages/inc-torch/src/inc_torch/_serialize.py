"""Saving INT8 models in formats a torch user deploys: ExportedProgram (.pt2) and TorchScript (.pt).

Hugging Face transformers models, which TorchScript cannot compile, are saved under ``.pt`` as their
config and state dict (see :mod:`inc_torch._hf_files`) and rebuilt as the same transformers class.

A TorchScript file also carries ``inc.json`` (an extra file of the archive) recording what the model
needs from the CPU that runs it: the activation range of its dynamic Linear layers. Loading checks it.
A ``.pt2`` carries ``inc.json`` too, naming the runtime the PT2E model was set to (``"compile"`` or
``"aoti"``); loading gives the model back on it (files without the record load on the default).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inc_core.errors import ModelLoadError, SaveError
from inc_torch._compat import quiet
from inc_torch._hf import is_hf_model
from inc_torch._hf_files import is_state_archive, load_hf_state, save_hf_state
from inc_torch._inputs import Inputs, dynamic_shapes, widened
from inc_torch.ptq import _dynamic
from inc_torch.ptq._compiled import RUNTIMES, CompiledQuantizedModule
from inc_torch.ptq._fx import EXAMPLE_ATTR

__all__ = ["METADATA_FILE", "save_model", "load_model"]

log = logging.getLogger("inc")

# Name of the JSON record inside a saved TorchScript archive.
METADATA_FILE = "inc.json"


def _export_dynamic(graph_module: torch.fx.GraphModule, example: Inputs) -> torch.export.ExportedProgram:
    args, kwargs = widened(example)
    shapes = dynamic_shapes(graph_module, (args, kwargs))
    return torch.export.export(graph_module, args, kwargs, dynamic_shapes=shapes)


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
            # The record names the runtime the model was set to, so inc.load gives it back on the same one.
            record = {**_base_metadata(), "runtime": model.runtime}
            with quiet():
                torch.export.save(_export_dynamic(model.graph_module, model.example), path, extra_files={METADATA_FILE: json.dumps(record)})
        except Exception as exc:
            raise SaveError(f"torch.export could not save the PT2E model to {str(path)!r}: {type(exc).__name__}: {exc}") from exc
        return
    if suffix != ".pt":
        raise SaveError(f"This model is saved as TorchScript; name the file '*.pt', got {path.name!r}.")
    if is_hf_model(model):
        # TorchScript cannot compile transformers models: rebuilt from their config and state dict instead.
        save_hf_state(model, path, _metadata(model))
        return
    with _eval_mode(model):
        scripted = _script(model)
        metadata = json.dumps(_metadata(scripted))
        try:
            torch.jit.save(scripted, str(path), _extra_files={METADATA_FILE: metadata})
        except Exception as exc:
            raise SaveError(f"torch.jit.save could not write {str(path)!r}: {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode while the model is scripted or traced, then each submodule's own mode back.

    The saved model is for inference (dropout off, batch-norm statistics fixed); the caller's module
    keeps training where it was training. A ScriptModule is saved as it is (IPEX's frozen modules have
    no mode left to set).
    """
    if isinstance(model, torch.jit.ScriptModule):
        yield
        return
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _base_metadata() -> dict[str, Any]:
    return {"saved_by": f"inc-torch {_version()}", "torch": torch.__version__}


def _metadata(model: nn.Module) -> dict[str, Any]:
    record = _base_metadata()
    activations = _dynamic.activation_range(model)
    if activations is not None:
        record["dynamic_activations"] = activations
        if activations == "full_range":
            record["requires_cpu_flags_any"] = sorted(_dynamic.VNNI_FLAGS)
    return record


def _version() -> str:
    try:
        return importlib.metadata.version("inc-torch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _script(model: nn.Module) -> torch.jit.ScriptModule:
    """TorchScript of ``model`` (already in eval mode): scripted, else traced on its example inputs."""
    if isinstance(model, torch.jit.ScriptModule):
        return model
    try:
        with quiet():
            scripted: torch.jit.ScriptModule = torch.jit.script(model)
            return scripted.eval()
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


def _spec_types(path: Path) -> set[str]:
    """The pytree node types (``module.Class``) that the program's input and output specs name."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("models/model.json")), None)
            program = json.loads(archive.read(name)) if name else {}
    except (OSError, zipfile.BadZipFile, KeyError, ValueError):
        return set()  # torch.export.load says what is wrong with the file
    found: set[str] = set()

    def walk(spec: Any) -> None:
        if isinstance(spec, dict):
            if isinstance(spec.get("type"), str):
                found.add(spec["type"])
            for child in spec.get("children_spec", []):
                walk(child)

    for entry in program.get("graph_module", {}).get("module_call_graph", []):
        signature = entry.get("signature") or {}
        for key in ("in_spec", "out_spec"):
            try:
                spec = json.loads(signature[key]) if isinstance(signature.get(key), str) else None
            except ValueError:
                continue
            if isinstance(spec, list) and len(spec) == 2:  # [protocol, tree]
                walk(spec[1])
    return found


def _register_spec_types(path: Path) -> dict[str, str]:
    """Import the modules defining the program's non-builtin input/output types; returns those still unknown,
    each with why.

    torch.export writes a Hugging Face output (``SequenceClassifierOutput``) into the program by its class name,
    and reads it back only once that class is registered, which its module does on import. A process that had
    not imported transformers (``inc bench`` on a saved PT2E transformers model) could not load the file.
    """
    from torch.utils import _pytree

    missing: dict[str, str] = {}
    for type_name in sorted(_spec_types(path)):
        if type_name in _pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            continue
        module = type_name.rpartition(".")[0]
        top = module.split(".")[0]
        try:
            installed = bool(top) and top != "__main__" and importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):
            installed = False
        reason = f"install {top}" if top and top != "__main__" else "define and register it before loading"
        if installed:
            try:
                importlib.import_module(module)
            except Exception as exc:  # noqa: BLE001 - the type stays unknown; the load error names why
                reason = f"importing {module} failed: {type(exc).__name__}: {exc}"
        if type_name not in _pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            missing[type_name] = reason
    return missing


def load_model(path: Path) -> Any:
    """Read a ``.pt2`` ExportedProgram (as a compiled INT8 module) or a ``.pt`` TorchScript model.

    Raises:
        ModelLoadError: the file is not a readable model of either kind.
    """
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        from inc_torch._compat import torchao_pt2e

        torchao_pt2e()  # registers the quantize/dequantize ops the program refers to
        extra = {METADATA_FILE: ""}
        unknown = _register_spec_types(path)
        try:
            program = torch.export.load(path, extra_files=extra)
            example = getattr(program, "example_inputs", None)
            inputs: Inputs | None = (tuple(example[0]), dict(example[1])) if example else None
            model = CompiledQuantizedModule(program.module(), inputs)
        except Exception as exc:
            why = "".join(f" Its inputs or outputs include {name}, which this process cannot rebuild: {reason}." for name, reason in unknown.items())
            raise ModelLoadError(f"{str(path)!r} is not a readable torch.export program: {type(exc).__name__}: {exc}{why}") from exc
        model.runtime = _saved_runtime(_parse_metadata(extra[METADATA_FILE], path), path)
        return model
    if suffix == ".pt":
        if importlib.util.find_spec("intel_extension_for_pytorch") is not None:
            import intel_extension_for_pytorch  # noqa: F401  (registers the ops of IPEX INT8 graphs)
        if is_state_archive(path):
            model, record = load_hf_state(path)
            _fit_to_this_cpu(model, record, path)
            return model
        extra = {METADATA_FILE: ""}
        try:
            model = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as exc:
            hint = ""
            if "ipex" in str(exc).lower() and importlib.util.find_spec("intel_extension_for_pytorch") is None:
                hint = " The file holds IPEX ops: `pip install inc-torch[ipex]` to load it."
            raise ModelLoadError(f"{str(path)!r} is not a readable TorchScript model: {type(exc).__name__}: {exc}.{hint}") from exc
        _fit_to_this_cpu(model, _parse_metadata(extra[METADATA_FILE], path), path)
        return model
    raise ModelLoadError(f"Cannot tell the format of {str(path)!r}: the torch backend reads '.pt2' (ExportedProgram) and '.pt' (TorchScript).")


def _saved_runtime(record: dict[str, Any], path: Path) -> str:
    """The runtime a ``.pt2`` was saved on; files without the record (plain torch.export.save, older inc-torch) get the default."""
    runtime = record.get("runtime", RUNTIMES[0])
    if runtime in RUNTIMES:
        return str(runtime)
    # A runtime this inc-torch does not know (a newer version wrote the file): the graph itself is standard.
    log.warning("%r was saved to run on runtime %r, which this inc-torch does not offer (%s); it runs on %r.", str(path), runtime, ", ".join(RUNTIMES), RUNTIMES[0])
    return RUNTIMES[0]


def _parse_metadata(raw: str | bytes, path: Path) -> dict[str, Any]:
    if not raw:
        return {}  # saved by plain torch.jit.save or an older inc-torch
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"{str(path)!r}: its {METADATA_FILE} record is not valid JSON ({exc}); the file is damaged. Save the model again."
        ) from exc
    if not isinstance(record, dict):
        raise ModelLoadError(f"{str(path)!r}: its {METADATA_FILE} record is not a JSON object; the file is damaged. Save the model again.")
    return record


def _fit_to_this_cpu(model: nn.Module, record: dict[str, Any], path: Path) -> None:
    """Full-range dynamic Linear layers on a CPU without VNNI/AMX: switch them to 7 bits, with a warning.

    The 8-bit activations were chosen for a CPU that accumulates int8 products in int32; here the kernel
    adds pairs of them in saturating int16 and large activations would silently come out wrong. The
    7-bit path is what a model quantized on this CPU would run (same int8 weights), so the model stays
    usable at the accuracy a local quantization gives. The module state decides (it is what runs);
    the record says the same for files saved by inc.
    """
    full_range = _dynamic.activation_range(model) == "full_range" or record.get("dynamic_activations") == "full_range"
    if not full_range or _dynamic.has_vnni():
        return
    switched = _dynamic.use_reduced_range(model)
    if not switched:  # e.g. a frozen graph: the range is a constant of the code now
        raise ModelLoadError(
            f"{str(path)!r} was quantized with full-range (8-bit) dynamic activations, which this CPU cannot run "
            f"(it has none of the CPU flags {', '.join(sorted(_dynamic.VNNI_FLAGS))}), and its layers cannot be switched "
            "to 7 bits. Quantize the model again with inc_torch.TorchBackend(dynamic_activations='reduce_range')."
        )
    message = (
        f"{str(path)!r} was quantized with full-range (8-bit) dynamic activations, which need int8 dot products "
        f"accumulating in int32 (CPU flags {', '.join(sorted(_dynamic.VNNI_FLAGS))}); this CPU has none of them, so "
        f"its {switched} dynamic Linear layer(s) now quantize activations to 7 bits (reduce_range), as a model "
        "quantized on this CPU would. Quantize with inc_torch.TorchBackend(dynamic_activations='reduce_range') "
        "to make a model that runs the same on every x86 CPU."
    )
    log.warning(message)
    warnings.warn(message, UserWarning, stacklevel=2)
