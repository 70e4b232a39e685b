"""SmoothQuant on the torch backend: exact rescaling in FP32, closer static INT8, tried by the tuner.

The model is a transformer-like block on the digits images (each image as 4 tokens of 16 pixels):
an nn.LayerNorm whose weight makes three channels 50x larger than the others (the activation
outliers SmoothQuant is for), query and value Linears reading it (one shared scale, folded into the
LayerNorm), Add, ReLU, and an output Linear reading the ReLU (nothing to fold into: with PT2E it
multiplies its input; FX leaves it). The outlier channels' weights are small, as in trained
transformers, so every channel matters to the output.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch_helpers import digits_tokens, relative_mse, same_state, state

import inc_core as inc
import inc_torch
from inc_core.errors import CalibrationError
from inc_torch import TorchBackend
from inc_torch.ptq._smooth_quant import SmoothedLinear

OUTLIERS = [2, 7, 12]
SQ = inc.SmoothQuant(alpha=0.5)


class OutlierBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ln = nn.LayerNorm(16)
        self.query = nn.Linear(16, 32)
        self.value = nn.Linear(16, 32)
        self.out = nn.Linear(32, 10)
        with torch.no_grad():
            self.ln.weight[OUTLIERS] = 50.0
            self.ln.bias.normal_(std=0.1)
            for layer in (self.query, self.value):
                layer.weight.mul_(2.0)
                layer.weight[:, OUTLIERS] /= 50.0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.ln(tokens)
        return self.out(torch.relu(self.query(h) + self.value(h)))


@pytest.fixture(scope="module")
def data() -> tuple[inc.Dataset, torch.Tensor]:
    return inc.Dataset(digits_tokens(0, 200), batch_size=50), torch.from_numpy(digits_tokens(1200))


@pytest.mark.parametrize("fmt", ["pt2e", "fx"])
def test_rescaled_fp32_model_computes_what_the_original_does(fmt: str, data: tuple[inc.Dataset, torch.Tensor]) -> None:
    model = OutlierBlock().eval()
    before = state(model)
    calibration = TorchBackend().calibrate(model, data[0], inc.QuantConfig(format=fmt, smooth_quant=SQ))
    smoothed = calibration.model
    assert calibration.folded == ("ln",)  # query and value are the LayerNorm's only readers: folded
    assert calibration.wrapped == (("out",) if fmt == "pt2e" else ())
    assert isinstance(smoothed.out, SmoothedLinear) == (fmt == "pt2e")
    assert float(smoothed.ln.weight.detach()[OUTLIERS].max()) < 10.0  # the outliers moved out of the activation
    x = data[1]
    with torch.no_grad():
        torch.testing.assert_close(smoothed(x), model(x), rtol=1e-4, atol=1e-4)
    assert same_state(state(model), before)  # the user's model untouched


@pytest.mark.parametrize("fmt", ["pt2e", "fx"])
def test_smooth_quant_brings_static_int8_closer_to_fp32(fmt: str, data: tuple[inc.Dataset, torch.Tensor]) -> None:
    model = OutlierBlock().eval()
    calib, x = data
    plain = inc.quantize(model, inc.QuantConfig(format=fmt), dataset=calib)
    smooth = inc.quantize(model, inc.QuantConfig(format=fmt, smooth_quant=SQ), dataset=calib)
    before, after = relative_mse(model, plain, x), relative_mse(model, smooth, x)
    # The outliers make the LayerNorm output's int8 step 50x too coarse for the other channels; with the
    # scales migrated the error drops several-fold (a margin INT8 rounding on any x86 CPU does not close).
    assert after < 0.3 * before, (before, after)
    assert inc_torch.quantized_ops(smooth) == ["query", "value", "out"]


def test_calibration_of_another_smooth_quant_setting_is_refused(data: tuple[inc.Dataset, torch.Tensor]) -> None:
    model = OutlierBlock().eval()
    backend = TorchBackend()
    smoothed = backend.calibrate(model, data[0], inc.QuantConfig(format="fx", smooth_quant=SQ))
    with pytest.raises(CalibrationError, match=r"collected with smooth_quant=SmoothQuant\(alpha=0.5\) but the config asks for smooth_quant=None"):
        backend.quantize(model, inc.QuantConfig(format="fx"), calibration=smoothed)


def test_a_model_without_linear_layers_is_refused_clearly(data: tuple[inc.Dataset, torch.Tensor]) -> None:
    conv = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU()).eval()
    with pytest.raises(CalibrationError, match="SmoothQuant found no nn.Linear layer it can rescale in Sequential"):
        inc.quantize(conv, inc.QuantConfig(format="fx", smooth_quant=SQ), dataset=data[0])


def test_tuner_tries_smooth_quant_when_the_base_misses_the_goal(data: tuple[inc.Dataset, torch.Tensor]) -> None:
    model = OutlierBlock().eval()
    calib, x = data
    base = inc.QuantConfig(format="fx")
    plain = relative_mse(model, inc.quantize(model, base, dataset=calib), x)

    def fidelity(candidate: nn.Module) -> float:
        return 1.0 - relative_mse(model, candidate, x)

    # The goal: half the base config's error (SmoothQuant gets well below that, see above).
    config = inc.TuningConfig(
        base=base, smooth_quant_alphas=(0.5,), tolerable_loss=0.5 * plain, loss_type="absolute", max_trials=4
    )
    result = inc.autotune(model, config, eval_fn=fidelity, dataset=calib)
    assert [t.change for t in result.trials] == ["base", "smooth_quant(alpha=0.5)"], [t.change for t in result.trials]
    assert result.met and result.config.smooth_quant == SQ
    assert inc_torch.quantized_ops(result.model) == ["query", "value", "out"]
