"""FX path: convs that run on FBGEMM's depthwise kernels get 7-bit weights, so the int8 kernel never saturates.

torch's x86 engine runs a quantized conv with more than 100 groups on FBGEMM's depthwise kernels on every
CPU; they add pairs of u8 x s8 products in int16, which overflows with 8-bit activations and int8 weights
(on torchvision's MobileNetV2 that cost the FX output cosine several points against plain torch.ao).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch_helpers import split

import inc_core as inc
import inc_torch.ptq._fx as inc_fx

CHANNELS = 128  # > inc_fx.FBGEMM_DEPTHWISE_GROUPS: FBGEMM's depthwise kernel on every x86 CPU


class _DepthwiseNet(nn.Module):
    """A 1x1 stem to 128 channels, ReLU6, a 3x3 depthwise conv with positive weights, a linear head."""

    def __init__(self, channels: int = CHANNELS) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 1), nn.ReLU6())
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.head = nn.Linear(channels * 64, 10)
        with torch.no_grad():
            self.stem[0].weight.uniform_(0.5, 6.0)  # digits pixels in [0, 1]: most of ReLU6's range is used
            self.depthwise.weight.uniform_(0.5, 1.0)  # same-sign neighbours: their int16 pair sums overflow at 8 bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.depthwise(self.stem(x)), 1))


def _depthwise_run(quantized: torch.fx.GraphModule, x: torch.Tensor) -> tuple[float, int, int]:
    """(largest error of the int8 depthwise conv against float math on its own int8 input and weight, in
    output steps; largest code of that input; largest magnitude of its weight codes)."""
    conv = quantized.get_submodule("depthwise")
    seen: dict[str, torch.Tensor] = {}
    handle = conv.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        quantized(x)
    handle.remove()
    expected = nn.functional.conv2d(
        seen["x"].dequantize(), conv.weight().dequantize(), conv.bias(), conv.stride, conv.padding, conv.dilation, conv.groups
    )
    expected = torch.quantize_per_tensor(expected, conv.scale, conv.zero_point, torch.quint8).dequantize()
    error = float((seen["y"].dequantize() - expected).abs().max() / conv.scale)
    return error, int(seen["x"].int_repr().max()), int(conv.weight().int_repr().abs().max())


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return _DepthwiseNet().eval()


def _quantize(model: nn.Module) -> torch.fx.GraphModule:
    x, _, _, _ = split()
    return inc.quantize(model, inc.QuantConfig(format="fx"), dataset=inc.Dataset(x[:64], batch_size=32))


def test_depthwise_weights_use_7_bit_codes_and_the_kernel_matches_float_math(model: nn.Module) -> None:
    quantized = _quantize(model)
    _, _, x_test, _ = split()
    error, top_input, top_weight = _depthwise_run(quantized, torch.from_numpy(x_test[:32]))
    assert error <= 1.0
    assert top_weight == 64 and top_input > 127  # 7-bit weights; activations keep their 8 bits


def test_with_8_bit_codes_the_same_kernel_saturates(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """The failure the 7-bit codes prevent, shown on this CPU's kernel (it would pass if nothing saturated)."""
    monkeypatch.setattr(inc_fx, "reduce_depthwise_weights", lambda prepared: [])
    _, _, x_test, _ = split()
    error, _, top_weight = _depthwise_run(_quantize(model), torch.from_numpy(x_test[:32]))
    assert top_weight == 127 and error > 4.0


def test_narrow_depthwise_convs_keep_8_bit_weights() -> None:
    """At most 100 groups torch runs oneDNN (no int16 pair sums) where VNNI/AMX exists: 8 bits stay."""
    torch.manual_seed(0)
    quantized = _quantize(_DepthwiseNet(channels=64).eval())
    _, _, x_test, _ = split()
    _, _, top_weight = _depthwise_run(quantized, torch.from_numpy(x_test[:32]))
    assert top_weight == 127


def test_fx_qat_trains_and_converts_depthwise_weights_at_7_bits(model: nn.Module) -> None:
    import inc_torch

    x, _, x_test, _ = split()
    qat_model = inc_torch.prepare_qat(model, inc.QATConfig(format="fx"), torch.from_numpy(x[:8]))
    fake_quant = qat_model.get_submodule("depthwise").weight_fake_quant
    assert (fake_quant.quant_min, fake_quant.quant_max) == (-64, 63)
    qat_model(torch.from_numpy(x[:32])).sum().backward()  # one training step: ranges observed
    error, _, top_weight = _depthwise_run(inc_torch.convert(qat_model), torch.from_numpy(x_test[:32]))
    assert top_weight <= 64 and error <= 1.0
