"""inc-torch: INT8 for PyTorch through the inc toolkit.

``inc.quantize(model, inc.QuantConfig(), dataset=...)`` on an ``nn.Module`` uses :class:`TorchBackend`:
PT2E (torch.export + torchao's X86InductorQuantizer + inductor, the default), FX graph mode
(``format="fx"``) or dynamic quantization (``approach="dynamic"``). ``backend="ipex"`` uses
intel-extension-for-pytorch. Quantization-aware training runs in the user's own loop::

    qat_model = inc_torch.prepare_qat(model, inc.QATConfig(), example_inputs)
    ...  # train qat_model with your optimizer and loss
    int8_model = inc_torch.convert(qat_model)
"""

from __future__ import annotations

from inc_torch._backend import TorchBackend
from inc_torch._compiled import CompiledQuantizedModule
from inc_torch._inspect import quantized_ops
from inc_torch._ipex import IpexBackend
from inc_torch._qat import convert, prepare_qat

__version__ = "0.1.0"

__all__ = [
    "CompiledQuantizedModule",
    "IpexBackend",
    "TorchBackend",
    "__version__",
    "convert",
    "prepare_qat",
    "quantized_ops",
]
