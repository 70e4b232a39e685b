"""SmoothQuant on decoder-LLM-shaped blocks (torch): scales folded into RMS norms and into a gated MLP's up
projection, and tied weights left alone.

A block as in Llama, Qwen2 and Mistral on the digits images (each image 4 tokens of 16 pixels): an RMS norm whose
weight makes three channels 40x larger (the activation outliers SmoothQuant is for), gate and up projections
reading it, ``down(silu(gate(h)) * up(h))``, and a head. Before, only an ``nn.LayerNorm`` took the scales: with PT2E
every projection got an FP32 multiply in front, and FX refused SmoothQuant for such a model ("no Linear reads a
tensor only LayerNorm-produced"). A head tied to an embedding (Gemma, GPT-2, BERT heads) had its columns rescaled,
changing the embedding too: the FP32 model no longer computed what it did (Gemma: logits off by 0.12 of 1.48).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch_helpers import digits_tokens, relative_mse, same_state, state

import inc_core as inc
import inc_torch
from inc_torch import TorchBackend
from inc_torch.ptq._smooth_quant import SmoothedLinear

OUTLIERS = [2, 7, 12]
SQ = inc.SmoothQuant(alpha=0.5)


class OnePlusRMSNorm(nn.Module):
    """Gemma's RMS norm: the output is scaled by ``1 + weight`` (a zero weight is the identity)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class SquaredWeightNorm(nn.Module):
    """A norm whose weight enters squared: no division of the weight divides its output exactly."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight**2


class GatedBlock(nn.Module):
    def __init__(self, norm: str = "rms") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = {"rms": lambda: nn.RMSNorm(16), "one_plus": lambda: OnePlusRMSNorm(16), "squared": lambda: SquaredWeightNorm(16)}[norm]()
        self.gate = nn.Linear(16, 32, bias=False)
        self.up = nn.Linear(16, 32, bias=False)
        self.down = nn.Linear(32, 16, bias=False)
        self.head = nn.Linear(16, 10)
        with torch.no_grad():
            if norm == "one_plus":
                self.norm.weight[OUTLIERS] = 39.0  # 1 + w = 40
            elif norm == "squared":
                self.norm.weight[OUTLIERS] = 40.0**0.5
            else:
                self.norm.weight[OUTLIERS] = 40.0
            for layer in (self.gate, self.up):
                layer.weight.mul_(2.0)
                layer.weight[:, OUTLIERS] /= 40.0
            # Some product channels far larger than the rest: down's input has outliers of its own.
            self.up.weight[[1, 9]] *= 20.0
            self.down.weight[:, [1, 9]] /= 20.0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(tokens)
        return self.head(tokens + self.down(nn.functional.silu(self.gate(h)) * self.up(h)))


@pytest.fixture(scope="module")
def data() -> tuple[inc.Dataset, torch.Tensor]:
    return inc.Dataset(digits_tokens(0, 200), batch_size=50), torch.from_numpy(digits_tokens(1200))


@pytest.mark.parametrize(
    ("fmt", "norm", "folded"),
    [
        ("pt2e", "rms", ("norm", "up")),  # gate and up read the norm; down reads silu(gate) * up
        ("fx", "rms", ("norm", "up")),
        ("pt2e", "one_plus", ("norm", "up")),
        # FX traces through a norm written in Python (only torch.nn modules stay calls): nothing to fold into.
        ("fx", "one_plus", ("up",)),
    ],
)
def test_scales_fold_into_the_rms_norm_and_the_up_projection(
    fmt: str, norm: str, folded: tuple[str, ...], data: tuple[inc.Dataset, torch.Tensor]
) -> None:
    model = GatedBlock(norm).eval()
    before = state(model)
    calibration = TorchBackend().calibrate(model, data[0], inc.QuantConfig(format=fmt, smooth_quant=SQ))
    assert calibration.folded == folded
    assert calibration.wrapped == (("head",) if fmt == "pt2e" else ())  # the residual sum has no weight to take them
    smoothed = calibration.model
    gain = smoothed.norm.weight.detach() + (1 if norm == "one_plus" else 0)
    assert (float(gain[OUTLIERS].max()) < 10.0) == ("norm" in folded)  # the outliers moved out of the activation
    with torch.no_grad():
        torch.testing.assert_close(smoothed(data[1]), model(data[1]), rtol=1e-4, atol=1e-4)  # the FP32 model computes what it did
    assert same_state(state(model), before)


@pytest.mark.parametrize("fmt", ["pt2e", "fx"])
def test_smooth_quant_brings_the_gated_block_closer_to_fp32(fmt: str, data: tuple[inc.Dataset, torch.Tensor]) -> None:
    model = GatedBlock().eval()
    calib, x = data
    plain = relative_mse(model, inc.quantize(model, inc.QuantConfig(format=fmt), dataset=calib), x)
    smooth_model = inc.quantize(model, inc.QuantConfig(format=fmt, smooth_quant=SQ), dataset=calib)
    smooth = relative_mse(model, smooth_model, x)
    assert smooth < 0.3 * plain, (plain, smooth)
    assert set(inc_torch.quantized_ops(smooth_model)) >= {"gate", "up", "down"}


def test_a_norm_no_weight_division_rescales_gets_a_multiply_instead(data: tuple[inc.Dataset, torch.Tensor]) -> None:
    model = GatedBlock("squared").eval()
    calibration = TorchBackend().calibrate(model, data[0], inc.QuantConfig(smooth_quant=SQ))
    assert calibration.folded == ("up",)
    assert set(calibration.wrapped) == {"gate", "up", "head"}
    assert isinstance(calibration.model.gate, SmoothedLinear)
    with torch.no_grad():
        torch.testing.assert_close(calibration.model(data[1]), model(data[1]), rtol=1e-4, atol=1e-4)


class TiedHead(nn.Module):
    """A token model whose output projection is its embedding matrix (tied weights, as in GPT-2 and Gemma)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        self.norm = nn.LayerNorm(16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight
        with torch.no_grad():
            self.norm.weight[OUTLIERS] = 40.0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.head(self.norm(h + self.mix(h)))


def test_a_head_tied_to_the_embedding_is_not_rescaled() -> None:
    model = TiedHead().eval()
    ids = torch.randint(0, 50, (8, 6), generator=torch.Generator().manual_seed(1))
    calibration = TorchBackend().calibrate(model, inc.Dataset(ids.numpy(), batch_size=4), inc.QuantConfig(smooth_quant=SQ))
    smoothed = calibration.model
    assert "head" not in calibration.wrapped and calibration.folded == ()
    assert smoothed.head.weight is smoothed.embed.weight  # still one tensor
    torch.testing.assert_close(smoothed.embed.weight, model.embed.weight)
    with torch.no_grad():
        torch.testing.assert_close(smoothed(ids), model(ids), rtol=1e-4, atol=1e-4)
