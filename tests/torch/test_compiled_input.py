"""A model the user already wrapped with ``torch.compile`` is quantized as the module it wraps.

``torch.compile(model)`` returns an ``OptimizedModule`` whose op names carry an ``_orig_mod.`` prefix and which
torch.fx cannot trace ("missing the required forward function"); dynamic quantization returned the wrapper,
which TorchScript cannot save.
"""

from __future__ import annotations

import pytest
import torch
from torch_helpers import calib_data, split, trained_cnn

import inc_core as inc
import inc_torch


def test_describe_names_the_ops_of_the_wrapped_module() -> None:
    model = trained_cnn()
    assert inc.describe(torch.compile(model)).ops == inc.describe(model).ops


@pytest.mark.parametrize(("fmt", "approach"), [("fx", "static"), ("default", "dynamic")])
def test_a_compiled_model_quantizes_saves_and_excludes_by_plain_names(fmt: str, approach: str, tmp_path) -> None:
    model = trained_cnn()
    _, _, x_test, _ = split()
    x = torch.from_numpy(x_test[:64])
    config = inc.QuantConfig(format=fmt, approach=approach, exclude=inc.LayerFilter(names=("fc2",)))
    quantized = inc.quantize(torch.compile(model), config, dataset=calib_data())
    assert not isinstance(quantized, torch._dynamo.eval_frame.OptimizedModule)
    assert (quantized(x).argmax(1) == model(x).argmax(1)).float().mean() >= 0.98
    loaded = inc.load(inc.save(quantized, tmp_path / "model.pt"))
    assert torch.equal(loaded(x).argmax(1), quantized(x).argmax(1))


def test_a_compiled_model_is_pruned_under_its_plain_layer_names() -> None:
    model = torch.compile(trained_cnn())
    x_train, y_train, _, _ = split()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    config = inc.PruneConfig(target_sparsity=0.5, schedule="oneshot", exclude=inc.LayerFilter(names=("fc2",)))
    inc_torch.prepare(model, config, optimizer=optimizer)
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x_train[:32])), torch.from_numpy(y_train[:32]))
    loss.backward()
    optimizer.step()
    report = inc_torch.sparsity_report(model)
    assert [row.name for row in report.layers] == ["conv1", "conv2", "fc1"]
    assert all(abs(row.sparsity - 0.5) < 0.01 for row in report.layers)
