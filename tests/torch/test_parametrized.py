"""Layers whose weight is computed (weight norm, spectral norm): audio models' convolutions, quantized and pruned.

Torch's ``parametrizations.weight_norm`` turns a Conv1d into a ``ParametrizedConv1d`` whose weight is recomputed
on every call; the older ``nn.utils.weight_norm`` does it in a forward pre-hook. inc folds the norm into a plain
weight on its own copy (inference output unchanged) and leaves the user's model as it was.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import inc_core as inc
import inc_torch
from inc_core.errors import ConfigError
from inc_core.testing import cosine


class Vocoder(nn.Module):
    """HiFi-GAN's layout in small: weight-normed Conv1d layers with leaky ReLUs, a spectral-normed one, a Linear."""

    def __init__(self, hooks: bool = False) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # nn.utils.weight_norm is deprecated, and still used
            norm = nn.utils.weight_norm if hooks else weight_norm
            spectral = nn.utils.spectral_norm if hooks else spectral_norm
            self.c1 = norm(nn.Conv1d(8, 16, 7, padding=3))
            self.c2 = norm(nn.Conv1d(16, 16, 3, padding=1))
            self.c3 = spectral(nn.Conv1d(16, 4, 3, padding=1))
            self.fc = norm(nn.Linear(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.leaky_relu(self.c1(x), 0.1)
        x = nn.functional.leaky_relu(self.c2(x), 0.1)
        return torch.tanh(self.fc(self.c3(x).transpose(1, 2)))


def _audio() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(8, 8, 64)).astype(np.float32)


def _snapshot(model: nn.Module) -> tuple:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m).__name__ for m in model.modules()]
    hooks = [len(m._forward_pre_hooks) for m in model.modules()]
    return state, kinds, hooks


def _same(a: tuple, b: tuple) -> bool:
    return a[1:] == b[1:] and a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


@pytest.mark.parametrize("hooks", [False, True], ids=["parametrizations", "hook_based"])
@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (inc.QuantConfig(), ["c1", "c2", "c3", "fc"]),
        (inc.QuantConfig(format="fx"), ["c1", "c2", "c3", "fc"]),
        (inc.QuantConfig(approach="dynamic"), ["fc"]),
    ],
    ids=["pt2e", "fx", "dynamic"],
)
def test_weight_normed_layers_quantize_and_the_users_model_keeps_its_norms(
    hooks: bool, config: inc.QuantConfig, expected: list[str]
) -> None:
    torch.manual_seed(0)
    model = Vocoder(hooks).eval()
    x = _audio()
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    before = _snapshot(model)
    assert list(inc.describe(model, config).names)[:1] == expected[:1]
    quantized = inc.quantize(model, config, dataset=inc.Dataset(x, batch_size=4))
    assert inc_torch.quantized_ops(quantized) == expected
    with torch.no_grad():
        assert cosine(reference, quantized(torch.from_numpy(x)).numpy()) >= 0.99
    # the user's model still computes its weights from g and v, and gives the same output
    assert _same(_snapshot(model), before)
    assert hooks or parametrize.is_parametrized(model.c1)
    with torch.no_grad():
        np.testing.assert_array_equal(model(torch.from_numpy(x)).numpy(), reference)


def test_pt2e_quantizes_conv1d_even_where_a_group_norm_reads_it(caplog: pytest.LogCaptureFixture) -> None:
    # inductor's INT8 conv1d lowering gives a buffer of the wrong length to a group_norm that reads it (wav2vec2's
    # feature encoder); inc runs each Conv1d as the conv2d it is (inc_torch.ptq._conv1d), which has no such fault.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(8, 16, 3), nn.ReLU(), nn.Conv1d(16, 16, 3), nn.GroupNorm(4, 16), nn.Flatten(), nn.Linear(16 * 60, 3))
    assert inc.describe(model.eval(), inc.QuantConfig()).names == ("0", "2", "5")
    x = _audio()
    with caplog.at_level("WARNING", logger="inc"):
        quantized = inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset(x, batch_size=4))
    assert "leaves" not in caplog.text
    assert inc_torch.quantized_ops(quantized) == ["0", "2", "5"]
    assert inc.get_backend("torch").int8_op_counts(quantized) == {"conv2d": 2, "linear": 1}
    with torch.no_grad():
        assert cosine(model(torch.from_numpy(x)).numpy(), quantized(torch.from_numpy(x)).numpy()) >= 0.99


def test_pruning_names_the_layers_whose_weight_is_computed(caplog: pytest.LogCaptureFixture) -> None:
    model = Vocoder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"every weight layer of Vocoder computes its weight: c1 \(parametrization _WeightNorm\).*remove_parametrizations"):
        inc_torch.prepare(model, inc.PruneConfig(target_sparsity=0.5, end_step=4), optimizer=optimizer)
    torch.manual_seed(0)
    net = nn.Sequential(weight_norm(nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 4))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with caplog.at_level("WARNING", logger="inc"):
        pruned = inc_torch.prepare(net, inc.PruneConfig(target_sparsity=0.5, start_step=0, end_step=2), optimizer=optimizer)
    assert "pruning leaves 1 layer(s) dense, whose weight is computed: 0 (parametrization _WeightNorm)" in caplog.text
    for _ in range(3):
        optimizer.zero_grad()
        pruned(torch.randn(4, 8)).sum().backward()
        optimizer.step()
    sparse = inc_torch.convert(pruned)
    assert float((sparse[2].weight == 0).float().mean()) == 0.5 and not bool((sparse[0].weight == 0).any())


@pytest.mark.parametrize("fmt", ["pt2e", "fx"])
def test_qat_trains_the_folded_weights_of_weight_normed_layers(fmt: str) -> None:
    torch.manual_seed(0)
    model = Vocoder()
    before = _snapshot(model)
    x = torch.from_numpy(_audio())
    prepared = inc_torch.prepare_qat(model, inc.QATConfig(format=fmt), example_inputs=x[:2])
    optimizer = torch.optim.SGD(prepared.parameters(), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        prepared(x).sum().backward()
        optimizer.step()
    assert inc_torch.quantized_ops(inc_torch.convert(prepared)) == ["c1", "c2", "c3", "fc"]
    assert _same(_snapshot(model), before)
