"""``inc_torch.convert``: finish what ``prepare``/``prepare_qat`` started, whichever (or both) it was."""

from __future__ import annotations

from torch import nn

from inc_core.errors import UnsupportedModelError
from inc_torch.prune import finish_pruning, is_pruning
from inc_torch.qat._qat import _STATE as _QAT_STATE
from inc_torch.qat._qat import convert as _convert_qat

__all__ = ["convert"]


def convert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The finished model of :func:`inc_torch.prepare` (pruning) and/or :func:`inc_torch.prepare_qat` (QAT).

    - pruned model: the pruning hooks are removed from the optimizer, the final masks applied, and a
      plain module with the zeros in place is returned (a copy unless ``inplace``);
    - QAT model: the INT8 model (PT2E: a :class:`CompiledQuantizedModule`; FX: x86 quantized modules);
    - a QAT model pruned with ``criterion="pattern_lock"``: pruning is finished first, so the INT8
      weights keep its zeros.

    Raises:
        UnsupportedModelError: ``model`` was prepared by neither.
    """
    qat = getattr(model, _QAT_STATE, None) is not None
    if is_pruning(model):
        finished = finish_pruning(model, inplace=inplace or qat)  # QAT conversion below copies anyway
        if not qat:
            return finished
    elif not qat:
        raise UnsupportedModelError(
            f"convert() takes a model returned by inc_torch.prepare (pruning) or inc_torch.prepare_qat (QAT); got a "
            f"{type(model).__name__} prepared by neither. For post-training quantization use "
            "inc.quantize(model, inc.QuantConfig(), dataset=...)."
        )
    return _convert_qat(model, inplace=inplace)
