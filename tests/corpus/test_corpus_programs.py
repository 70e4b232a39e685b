"""torchvision models exported by the user (torch.export.export's default, non-strict capture, free batch size)
quantize on the PT2E path exactly as the nn.Module does: same op names, int8 ops and outputs."""

from __future__ import annotations

import pytest
import torch
from corpus_models import image_crops, torchvision_model

import inc_core as inc
import inc_torch
from inc_core.testing import cosine

# ResNet calls one nn.ReLU per block twice; GoogLeNet calls F.relu inside its blocks, concatenates four branches and
# pools with ceil_mode. (The other torchvision corpus models gave equal results too; left out for CI time.)
PROGRAM_MODELS = ("resnet18", "googlenet")


@pytest.mark.parametrize("name", PROGRAM_MODELS)
def test_exported_torchvision_program_quantizes_like_its_module(name: str) -> None:
    model = torchvision_model(name)
    calibration = inc.Dataset(image_crops(32, seed=1), batch_size=8)
    x = torch.from_numpy(image_crops(8, seed=2))
    program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))

    assert inc.describe(program).ops == inc.describe(model).ops
    from_program = inc.quantize(program, inc.QuantConfig(), dataset=calibration)
    from_module = inc.quantize(model, inc.QuantConfig(), dataset=calibration)
    assert inc_torch.quantized_ops(from_program) == inc_torch.quantized_ops(from_module)
    backend = inc.get_backend("torch")
    assert backend.int8_op_counts(from_program) == backend.int8_op_counts(from_module)
    with torch.no_grad():
        assert cosine(from_program(x).numpy(), from_module(x).numpy()) > 0.9999
        assert cosine(from_program(x).numpy(), model(x).numpy()) > 0.9
