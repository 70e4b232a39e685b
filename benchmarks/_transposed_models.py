"""Models that up-sample with transposed convolutions, shared by the torch and ONNX benchmarks of them.

- U-Net (Ronneberger et al.; the layout of the widely used milesial/Pytorch-UNet, ``bilinear=False``: four
  DoubleConv downs, four ConvTranspose2d kernel-2 stride-2 ups, base width 32 instead of 64) on a 3x128x128 image;
- the DCGAN generator of PyTorch's DCGAN tutorial (nz 100, ngf 64: five ConvTranspose2d, kernel 4, BatchNorm, ReLU)
  from a latent vector to a 3x64x64 image; it has no other layer;
- transformers' ``SpeechT5HifiGan`` vocoder (the default config: four ConvTranspose1d up-samplings, kernel 8 stride 4,
  each followed by three residual blocks of dilated Conv1d; 74 Conv1d in all) on 62 frames of an 80-bin mel
  spectrogram (about one second of 16 kHz audio).

Random weights (batch-norm statistics of the inputs): speed and fidelity to FP32 do not depend on training.
Each builder returns the model in eval mode and ``make(batch, seed)``, which draws its inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

__all__ = ["MODELS", "dcgan", "hifigan", "unet"]


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """milesial/Pytorch-UNet's UNet (bilinear=False) with a configurable base width."""

    def __init__(self, channels: int = 3, classes: int = 2, width: int = 32) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(5)]
        self.inc = DoubleConv(channels, widths[0])
        self.downs = nn.ModuleList(DoubleConv(widths[i], widths[i + 1]) for i in range(4))
        self.ups = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(4)))
        self.convs = nn.ModuleList(DoubleConv(widths[i + 1], widths[i]) for i in reversed(range(4)))
        self.outc = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(nn.functional.max_pool2d(skips[-1], 2)))
        x = skips.pop()
        for up, conv in zip(self.ups, self.convs):
            x = conv(torch.cat([skips.pop(), up(x)], dim=1))
        return self.outc(x)


class DCGANGenerator(nn.Module):
    """The generator of PyTorch's DCGAN tutorial."""

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _with_statistics(model: nn.Module, make: Callable[[int, int], np.ndarray]) -> nn.Module:
    """Batch-norm statistics of the inputs, as a trained model has."""
    model.train()
    with torch.no_grad():
        for seed in range(8):
            model(torch.from_numpy(make(8, 100 + seed)))
    return model.eval()


def _normal(*shape: int) -> Callable[[int, int], np.ndarray]:
    return lambda batch, seed: np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)


def unet() -> tuple[nn.Module, Callable[[int, int], np.ndarray]]:
    torch.manual_seed(0)
    make = _normal(3, 128, 128)
    return _with_statistics(UNet(), make), make


def dcgan() -> tuple[nn.Module, Callable[[int, int], np.ndarray]]:
    torch.manual_seed(0)
    make = _normal(100, 1, 1)
    return _with_statistics(DCGANGenerator(), make), make


def hifigan() -> tuple[nn.Module, Callable[[int, int], np.ndarray]]:
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    torch.manual_seed(0)
    return SpeechT5HifiGan(SpeechT5HifiGanConfig()).eval(), _normal(62, 80)


# name in the result tables -> builder
MODELS: dict[str, Callable[[], tuple[nn.Module, Callable[[int, int], np.ndarray]]]] = {
    "U-Net (width 32, 3x128x128)": unet,
    "DCGAN generator (64x64)": dcgan,
    "SpeechT5 HiFi-GAN vocoder (62 mel frames)": hifigan,
}
