"""The corpus: architectures users bring, with random weights at small sizes, and the data they run on.

Images are crops of the two photographs scikit-learn ships (``load_sample_images``): natural-image
statistics without a download. Calibration and held-out crops are drawn from different seeds. Batch-norm
statistics of the randomly initialised networks are re-estimated on calibration crops, as a trained
network would have them; otherwise activations grow or vanish layer by layer and no fidelity figure means
anything. The scikit-learn models are trained on digits and converted by skl2onnx.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from _torchvision import torchvision_models
from torch import nn

__all__ = [
    "IMAGE",
    "SKLEARN_MODELS",
    "TORCHVISION_MODELS",
    "digits_split",
    "image_crops",
    "sklearn_onnx",
    "torchvision_model",
]

IMAGE = 64  # input height/width of every torchvision model: small enough for 2 cores
CLASSES = 100
CALIB_CROPS = 32
HELD_OUT_CROPS = 16
_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]


@functools.cache
def _photos() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float() / 255.0 for img in load_sample_images().images)


@functools.cache
def image_crops(n: int, seed: int) -> np.ndarray:
    """``n`` random crops (random size and place) resized to IMAGE x IMAGE, ImageNet-normalised, (n, 3, H, W)."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    crops = []
    for _ in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        _, h, w = photo.shape
        side = int(rng.integers(IMAGE, min(h, w) // 2))
        top, left = int(rng.integers(h - side)), int(rng.integers(w - side))
        crop = photo[None, :, top : top + side, left : left + side]
        crops.append(nn.functional.interpolate(crop, size=(IMAGE, IMAGE), mode="bilinear", antialias=True)[0].numpy())
    return ((np.stack(crops) - _MEAN) / _STD).astype(np.float32)


def _recalibrate_batch_norm(model: nn.Module) -> nn.Module:
    """Running statistics from the calibration crops (a cumulative average over them), then eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for batch in np.split(image_crops(CALIB_CROPS, seed=0), 4):
            model(torch.from_numpy(batch))
    for m in norms:
        m.momentum = 0.1
    return model.eval()


def _vit_small() -> nn.Module:
    tv = torchvision_models()
    model = tv.VisionTransformer(
        image_size=IMAGE, patch_size=16, num_layers=2, num_heads=4, hidden_dim=128, mlp_dim=512, num_classes=CLASSES
    )
    # torchvision zero-initialises the classification head (for fine-tuning); a zero head outputs its
    # bias alone, whatever the input, and leaves no output to compare.
    nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def _swin_small() -> nn.Module:
    # Swin's window attention hands its Linear layers' weights to a function instead of calling them,
    # which torch.ao's dynamic swap once broke (see inc_torch.ptq._weight_readers)
    return torchvision_models().SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=CLASSES
    )


def _builder(name: str, **options: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return getattr(torchvision_models(), name)(weights=None, num_classes=CLASSES, **options)

    return build


TORCHVISION_MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": _builder("resnet18"),
    "mobilenet_v2": _builder("mobilenet_v2"),  # depthwise convs with up to 960 groups (FBGEMM's kernels on the FX path)
    "mobilenet_v3_small": _builder("mobilenet_v3_small"),
    "efficientnet_b0": _builder("efficientnet_b0"),
    "regnet_x_400mf": _builder("regnet_x_400mf"),
    "shufflenet_v2_x0_5": _builder("shufflenet_v2_x0_5"),
    "squeezenet1_1": _builder("squeezenet1_1"),
    # Inception blocks (four-branch cat) and stride-2 max-pools with ceil_mode=True, which at 64x64 pool to a
    # larger map than without it (inductor's INT8 pool once dropped ceil_mode: see inc_torch.ptq._ceil_pool)
    "googlenet": _builder("googlenet", aux_logits=False, init_weights=True),
    "convnext_tiny": _builder("convnext_tiny"),
    "vit_2layer_64px": _vit_small,
    "swin_2stage_64px": _swin_small,
}


@functools.cache
def _torchvision_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return _recalibrate_batch_norm(TORCHVISION_MODELS[name]())


def torchvision_model(name: str) -> nn.Module:
    """A fresh copy of the corpus model ``name`` (random weights, seeded, batch-norm statistics set, eval mode)."""
    import copy

    return copy.deepcopy(_torchvision_model(name))


@functools.cache
def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn digits as float32 features in [0, 1]: (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    return x[:1400], data.target[:1400], x[1400:], data.target[1400:]


@dataclass(frozen=True)
class _SklearnCase:
    build: Callable[[], object]


def _mlp() -> object:
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=0)


def _scaler_mlp() -> object:
    # skl2onnx writes the scaler as an ai.onnx.ml Scaler, whose output ONNX's shape inference leaves untyped
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=0))


def _logistic() -> object:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=1000)


def _forest() -> object:
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=20, max_depth=8, random_state=0)


SKLEARN_MODELS: dict[str, Callable[[], object]] = {
    "sklearn_mlp": _mlp,
    "sklearn_scaler_mlp": _scaler_mlp,
    "sklearn_logistic": _logistic,
    "sklearn_forest": _forest,
}


@functools.cache
def _sklearn_onnx_bytes(name: str) -> bytes:
    import warnings

    from skl2onnx import to_onnx

    x, y, _, _ = digits_split()
    model = SKLEARN_MODELS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings of the small MLP
        model.fit(x, y)
    # Without ZipMap the probabilities are a plain float tensor, the form a user quantizes and compares.
    proto = to_onnx(model, x[:1], options={id(model): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
    return proto.SerializeToString()


def sklearn_onnx(name: str):  # noqa: ANN201 - onnx is imported lazily
    """The skl2onnx conversion of the corpus model ``name`` (a fresh ``onnx.ModelProto``)."""
    import onnx

    return onnx.load_from_string(_sklearn_onnx_bytes(name))


@functools.cache
def _exported_onnx(name: str) -> bytes:
    """The ONNX export (torch.onnx's default exporter, opset of torch's choosing) of corpus model ``name``."""
    import io
    import logging
    import warnings

    model = torchvision_model(name)
    example = torch.from_numpy(image_crops(CALIB_CROPS, seed=0)[:8])
    buffer = io.BytesIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buffer,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    return buffer.getvalue()


def export_onnx(name: str, path: object) -> None:
    """Write the ONNX export of corpus model ``name`` to ``path`` (exported once per process)."""
    from pathlib import Path

    Path(str(path)).write_bytes(_exported_onnx(name))
