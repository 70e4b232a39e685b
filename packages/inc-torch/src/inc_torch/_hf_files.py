"""Hugging Face models (FP32 or dynamically quantized) saved as config + state dict instead of TorchScript.

``torch.jit.script`` cannot compile transformers models (``**kwargs``, dataclass outputs, caches), and a
traced one loses the ``ModelOutput`` the user's code reads. The model is rebuilt instead: the file is a
``torch.save`` archive holding the model class, its config, which layers inc changed (HF ``Conv1D`` turned
``nn.Linear``, Linear layers turned dynamic INT8) and the state dict (int8 weights as quantized tensors).
Loading rebuilds the class from the config, applies the same changes and loads the state dict with
``weights_only=True``, so the loaded model is the same transformers class, with the same outputs.
"""

from __future__ import annotations

import importlib
import json
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inc_core.errors import ModelLoadError, SaveError
from inc_torch._compat import quiet
from inc_torch._hf import CONV1D_AS_LINEAR_ATTR, linearize_conv1d
from inc_torch.ptq import _dynamic
from inc_torch.ptq._lookups import QUANTIZED_LOOKUPS, contiguous_lookups

__all__ = ["FORMAT", "is_state_archive", "load_hf_state", "save_hf_state"]

FORMAT = "inc-torch/hf-state-dict/1"


def _dynamic_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if name and isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]


def _quantized_lookups(model: nn.Module) -> list[list[str]]:
    """The paths of each quantized lookup, a group per module (one table may sit at several paths: T5's)."""
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name and isinstance(module, QUANTIZED_LOOKUPS):
            paths.setdefault(id(module), []).append(name)
    return list(paths.values())


def save_hf_state(model: nn.Module, path: Path, metadata: dict[str, Any]) -> None:
    """Write ``model`` (a transformers ``PreTrainedModel``, FP32 or dynamic INT8) as config + state dict.

    Raises:
        SaveError: the model holds layers this format cannot rebuild, or the file cannot be written.
    """
    unknown = sorted(
        {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("torch.ao.nn.") and not isinstance(m, (torch.ao.nn.quantized.dynamic.Linear, *QUANTIZED_LOOKUPS))}
        - {"LinearPackedParams", "EmbeddingPackedParams"}
    )
    if unknown:
        raise SaveError(
            f"{type(model).__name__} holds {unknown} layers, which the transformers state-dict format cannot rebuild; "
            "save the PT2E model (format='pt2e') or a dynamic model whose only INT8 layers are Linear layers and "
            "embedding tables."
        )
    lookups = _quantized_lookups(model)
    state = model.state_dict()
    for _, *others in lookups:  # a table at several paths is written once (its state dict repeats it per path)
        for key in [k for k in state if any(k.startswith(f"{name}.") for name in others)]:
            del state[key]
    cls = type(model)
    record = {
        "format": FORMAT,
        "class": [cls.__module__, cls.__qualname__],
        # JSON text: the archive is read back with weights_only=True, which takes plain data and tensors only.
        "config": model.config.to_json_string(use_diff=False),  # type: ignore[operator,union-attr]
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "conv1d_as_linear": list(getattr(model, CONV1D_AS_LINEAR_ATTR, ())),
        "dynamic_linear": _dynamic_layers(model),
        "quantized_lookups": lookups,
        "metadata": json.dumps(metadata, default=str),
        "state_dict": state,
    }
    try:
        torch.save(record, path)
    except Exception as exc:
        raise SaveError(f"torch.save could not write {str(path)!r}: {type(exc).__name__}: {exc}") from exc


def is_state_archive(path: Path) -> bool:
    """True for a ``torch.save`` archive (no TorchScript code inside)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/data.pkl") for n in names) and not any("/code/" in n for n in names)


def load_hf_state(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model written by :func:`save_hf_state`; returns it (eval mode) and its metadata record.

    Raises:
        ModelLoadError: not such a file, transformers missing, or the state does not fit the rebuilt model.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated.*")  # torch's own qtensor rebuild
            record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower():
            # torch.save(model) pickles the module's classes; reading them back runs code from the file.
            raise ModelLoadError(
                f"{str(path)!r} holds a pickled Python object (torch.save(model)); inc does not unpickle files, "
                "which runs code from them. Load it yourself if you trust it (torch.load(path, weights_only=False)) "
                "and call inc.quantize(model, ...) from Python."
            ) from exc
        raise ModelLoadError(f"{str(path)!r} is not a readable torch file: {type(exc).__name__}: {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ModelLoadError(
            f"{str(path)!r} is a torch.save archive but not a model saved by inc (format {FORMAT!r}); load it with torch.load."
        )
    module_name, qualname = record["class"]
    try:
        cls: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            cls = getattr(cls, part)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(
            f"{str(path)!r} holds a {qualname} from {module_name}, which cannot be imported here ({exc}); "
            "install the transformers version it was saved with."
        ) from exc
    try:
        config = cls.config_class.from_dict(json.loads(record["config"]))
        if record.get("attn_implementation"):
            config._attn_implementation = record["attn_implementation"]
        model: nn.Module = cls(config).eval()
        swapped = linearize_conv1d(model, tuple(record["conv1d_as_linear"]))
        if swapped:
            setattr(model, CONV1D_AS_LINEAR_ATTR, tuple(swapped))
        dynamic = record["dynamic_linear"]
        lookups = record.get("quantized_lookups", [])  # files of earlier versions have none
        if dynamic or lookups:
            spec = {name: _dynamic.dynamic_qconfig("per_tensor") for name in dynamic}
            spec.update({name: _dynamic.lookup_qconfig() for group in lookups for name in group})
            with quiet():
                torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
        state = record["state_dict"]  # in place: its _metadata holds the layers' versions, which a copy would lose
        for first, *others in lookups:
            for key in [k for k in state if k.startswith(f"{first}.")]:
                state.update({f"{name}{key[len(first):]}": state[key] for name in others})
        model.load_state_dict(state, strict=True)
        contiguous_lookups(model)
        for first, *others in lookups:  # one table again where it was one when saved
            for name in others:
                model.set_submodule(name, model.get_submodule(first))
    except Exception as exc:
        raise ModelLoadError(f"{str(path)!r}: the saved state does not rebuild {qualname}: {type(exc).__name__}: {exc}") from exc
    metadata = json.loads(record.get("metadata") or "{}")
    if metadata.get("dynamic_activations") == "full_range":
        _dynamic.full_range_activations(model)  # a loaded state dict resets the layers to 7 bits
    return model, metadata
