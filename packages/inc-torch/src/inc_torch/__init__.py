"""inc-torch: INT8 for PyTorch through the inc toolkit.

``inc.quantize(model, inc.QuantConfig(), dataset=...)`` on an ``nn.Module`` uses :class:`TorchBackend`:
PT2E (torch.export + torchao's X86InductorQuantizer + inductor, the default), FX graph mode
(``format="fx"``) or dynamic quantization (``approach="dynamic"``). ``backend="ipex"`` uses
intel-extension-for-pytorch. Quantization-aware training runs in the user's own loop::

    qat_model = inc_torch.prepare_qat(model, inc.QATConfig(), example_inputs)
    ...  # train qat_model with your optimizer and loss
    int8_model = inc_torch.convert(qat_model)

Pruning and distillation hook into the same loop::

    model = inc_torch.prepare(model, inc.PruneConfig(target_sparsity=0.7), optimizer=opt)  # masks follow opt.step()
    kd = inc_torch.DistillationLoss(teacher, inc.DistillConfig())                         # loss = kd(logits, x, y)
    sparse = inc_torch.convert(model)                                                     # hooks off, zeros in place
"""

from __future__ import annotations

from inc_torch._backend import TorchBackend
from inc_torch._convert import convert
from inc_torch._inspect import quantized_ops
from inc_torch.distill import DistillationLoss
from inc_torch.prune import prepare, sparsity_report
from inc_torch.ptq._bf16 import bf16_ops
from inc_torch.ptq._compiled import CompiledQuantizedModule
from inc_torch.ptq._ipex import IpexBackend
from inc_torch.qat._qat import prepare_qat

__version__ = "0.1.0"

__all__ = [
    "CompiledQuantizedModule",
    "DistillationLoss",
    "IpexBackend",
    "TorchBackend",
    "__version__",
    "bf16_ops",
    "convert",
    "prepare",
    "prepare_qat",
    "quantized_ops",
    "sparsity_report",
]
