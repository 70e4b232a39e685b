"""Grouped convolutions whose INT8 kernel is wrong on the CPU at hand stay FP32 (inc_torch.ptq._grouped_conv).

On an Intel Xeon with AMX, torch's oneDNN INT8 kernel computes grouped convolutions with 8-16 channels per group and
a kernel of 8 or 16 taps wrongly (wav2vec2's positional convolution: PT2E's compiled model was refused by inc's
compiled-model check, FX's INT8 model answered with cosine ~0.7 to FP32, without a word). The same kernel is right
on an AMD EPYC, so these tests hold on both: what the check predicts is compared with what torchao's own flow
computes on the same CPU, and inc's INT8 models must be close to FP32 wherever they run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inc_core as inc
import inc_torch
from inc_torch.ptq import _grouped_conv


class _PositionalConvNet(nn.Module):
    """wav2vec2's shape: a grouped Conv1d with a long kernel (its positional embedding) between ungrouped ones."""

    def __init__(self, per_group: int = 16, kernel: int = 16) -> None:
        super().__init__()
        self.conv_in = nn.Conv1d(8, 4 * per_group, 3, padding=1)
        self.pos = nn.Conv1d(4 * per_group, 4 * per_group, kernel, padding=kernel // 2, groups=4)
        self.head = nn.Conv1d(4 * per_group, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv_in(x))
        x = x + F.gelu(self.pos(x)[..., : x.shape[-1]])
        return self.head(x)


def _data(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 8, 120)).astype(np.float32)


def _torchao_compiled_cosine(per_group: int, kernel: int) -> float:
    """torchao's own PT2E flow (X86InductorQuantizer defaults, inductor) on one grouped conv of that shape."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(4 * per_group, 4 * per_group, (1, kernel), padding=(0, kernel // 2), groups=4)).eval()
    x = torch.randn(2, 4 * per_group, 1, 64)
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(torch.export.export(conv, (x,)).module(), quantizer)
    prepared(x)
    converted = convert_pt2e(prepared)
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        got = torch.compile(converted)(x)
        torch._dynamo.reset()
        return float(F.cosine_similarity(got.flatten(), conv(x).flatten(), 0))


@pytest.mark.parametrize(("per_group", "kernel"), [(16, 16), (16, 9), (8, 16), (32, 16)])
def test_the_kernel_check_predicts_what_torchaos_own_int8_model_computes(per_group: int, kernel: int) -> None:
    # (16, 16) and (8, 16) are wrong on an Intel Xeon with AMX, all four right on an AMD EPYC
    wrong = _grouped_conv.miscomputed_grouped_convs(_PositionalConvNet(per_group, kernel))
    assert set(wrong) <= {"pos"}
    assert ("pos" in wrong) == (_torchao_compiled_cosine(per_group, kernel) < 0.9)


@pytest.mark.parametrize("fmt", ["pt2e", "fx"])
def test_inc_int8_model_of_a_positional_conv_is_right_on_this_cpu(fmt: str) -> None:
    """Fails without the check on AMX: PT2E refused by the compiled-model check, FX silently at cosine ~0.7."""
    torch.manual_seed(0)
    model = _PositionalConvNet().eval()
    wrong = _grouped_conv.miscomputed_grouped_convs(model)
    listed = [op.name for op in inc.describe(model, inc.QuantConfig(format=fmt)).ops if op.op_type == "Conv1d"]
    assert listed == [name for name in ("conv_in", "pos", "head") if name not in wrong]
    quantized = inc.quantize(model, inc.QuantConfig(format=fmt), dataset=inc.Dataset(_data(32, 0), batch_size=8))
    assert set(inc_torch.quantized_ops(quantized)) & {"conv_in", "pos", "head"} == set(listed)
    x = torch.from_numpy(_data(8, 1))
    with torch.no_grad():
        cosine = F.cosine_similarity(quantized(x).flatten(1), model(x).flatten(1)).min()
    assert cosine >= 0.98


@pytest.mark.parametrize("fmt", ["pt2e", "fx"])
def test_a_grouped_conv_the_kernel_gets_wrong_stays_fp32_on_every_path(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the check standing in for an AMX CPU (this shape wrong): not listed, FP32 after PTQ and after QAT."""
    real = _grouped_conv._int8_agreement
    monkeypatch.setattr(_grouped_conv, "_int8_agreement", lambda key: 0.0 if key[7] == 4 else real(key))
    torch.manual_seed(0)
    model = _PositionalConvNet().eval()
    assert _grouped_conv.miscomputed_grouped_convs(model) == {
        "pos": "torch's oneDNN INT8 kernel on this CPU computes a grouped convolution of this shape (4 groups) wrongly"
    }
    config = inc.QuantConfig(format=fmt)
    assert [op.name for op in inc.describe(model, config).ops if op.op_type == "Conv1d"] == ["conv_in", "head"]
    quantized = inc.quantize(model, config, dataset=inc.Dataset(_data(32, 0), batch_size=8))
    assert "pos" not in inc_torch.quantized_ops(quantized)
    assert {"conv_in", "head"} <= set(inc_torch.quantized_ops(quantized))
    int8_convs = inc.get_backend("torch").int8_op_counts(quantized)
    assert sum(count for kind, count in int8_convs.items() if "conv" in kind.lower()) == 2, int8_convs

    qat = inc_torch.prepare_qat(model, inc.QATConfig(format=fmt), torch.from_numpy(_data(8, 0)))
    qat(torch.from_numpy(_data(8, 2))).sum().backward()
    converted = inc_torch.convert(qat.eval())
    assert "pos" not in inc_torch.quantized_ops(converted)
    assert {"conv_in", "head"} <= set(inc_torch.quantized_ops(converted))
