"""Import torchvision's model definitions next to the CPU build of torch.

Why this is needed: the torchvision 0.28.0 wheel on PyPI (the release built for torch 2.13.0) is a CUDA
build. Its compiled ops library ``torchvision/_C.so`` links ``libcudart.so.13`` and ``libtorch_cuda.so``,
which the CPU wheel of torch does not ship, so loading it fails. torchvision is written for that case:
``torchvision.extension`` catches the failed load, records ``_has_ops() == False`` and every op that needs
the library (``torchvision.ops.nms``, ``roi_align``, ...) raises torchvision's own "Couldn't load custom C++
ops" error when called. One registration does not follow that rule: ``torchvision/_meta_registrations.py``
registers fake (meta) kernels for ``torchvision::nms`` and ``torchvision::qnms`` unconditionally, and
``torch.library.register_fake`` refuses an operator that was never defined, so ``import torchvision`` stops
with "operator torchvision::nms does not exist".

The fix used here: define those two operator *schemas* (exactly the strings ``_C.so`` registers) before
importing torchvision, when the library did not define them. No kernel is registered, so calling them
still fails loudly, and nothing else of torchvision is patched. The classification models (ResNet,
MobileNetV3, EfficientNet, RegNet, ShuffleNet, SqueezeNet, ConvNeXt, ViT) are pure Python + torch and never
call a torchvision op.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["torchvision_models"]

# Schemas as torchvision's csrc/ops/nms.cpp (and its quantized variant) declare them.
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
# A torch.library.Library drops its definitions when garbage-collected: keep it for the process lifetime.
_LIBRARY: torch.library.Library | None = None


def _defined(op: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{op}", "")
    except RuntimeError:
        return False
    return True


def _compiled_ops_load() -> bool:
    """Load ``torchvision/_C.so`` the way ``torchvision.extension`` does, without importing the package."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("torchvision is not installed; install torchvision==0.28.0 (see constraints/corpus.txt).")
    library = Path(next(iter(spec.submodule_search_locations))) / "_C.so"
    try:
        torch.ops.load_library(str(library))
    except OSError:  # the CUDA runtime it links is missing: the case this module exists for
        return False
    return True


def torchvision_models() -> ModuleType:
    """``torchvision.models``, importable whether or not torchvision's compiled ops load on this machine."""
    global _LIBRARY
    if "torchvision" not in sys.modules and not _compiled_ops_load():
        missing = [op for op in _SCHEMAS if not _defined(op)]
        if missing:
            _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
            for op in missing:
                _LIBRARY.define(_SCHEMAS[op])
    return importlib.import_module("torchvision.models")
