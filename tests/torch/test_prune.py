"""Pruning in the user's own loop: masks follow the optimizer's steps, schedules, patterns, and the zeros survive PTQ and QAT."""

from __future__ import annotations

import ast
import copy
import functools
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch_helpers import accuracy, calib_data, same_state, split, state

import inc_core as inc
import inc_torch
from inc_core.errors import ConfigError, UnsupportedModelError
from inc_core.sparsity import Schedule

BATCH = 50
STEPS_PER_EPOCH = 28  # 1400 training samples / 50


class WideMLP(nn.Module):
    """Over-parameterised for digits (83k weights), so 70% of them can go at no accuracy cost."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 256)
        self.fc3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc3(torch.relu(self.fc2(x)))


def train_loop(model: nn.Module, optimizer: torch.optim.Optimizer, epochs: int, *, seed: int = 1) -> nn.Module:
    """A plain training loop: nothing in it knows about pruning."""
    x, y, _, _ = split()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), BATCH):
            idx = order[start : start + BATCH]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            optimizer.step()
    return model.eval()


@functools.cache
def _dense() -> nn.Module:
    torch.manual_seed(0)
    model = WideMLP()
    return train_loop(model, torch.optim.Adam(model.parameters(), lr=2e-3), 12, seed=0)


def dense() -> nn.Module:
    return copy.deepcopy(_dense())


def make_optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    return torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)


@functools.cache
def _dense_finetuned(kind: str) -> float:
    """The dense model trained for the same extra epochs: what the pruned model is compared with."""
    model = dense()
    return accuracy(train_loop(model, make_optimizer(model, kind), 5))


SEVENTY = inc.PruneConfig(target_sparsity=0.7, schedule="iterative", start_step=0, end_step=3 * STEPS_PER_EPOCH, frequency=14)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_seventy_percent_magnitude_within_one_percent_of_dense(kind: str) -> None:
    model = dense()
    optimizer = make_optimizer(model, kind)
    assert inc_torch.prepare(model, SEVENTY, optimizer=optimizer) is model
    train_loop(model, optimizer, 5)
    sparse = inc_torch.convert(model)
    report = inc_torch.sparsity_report(sparse)
    assert [layer.name for layer in report.layers] == ["fc1", "fc2", "fc3"]
    for layer in report.layers:  # each layer reaches the target on its own
        assert layer.sparsity == pytest.approx(0.7, abs=1 / layer.size)
    reference = _dense_finetuned(kind)
    pruned = accuracy(sparse)
    assert (reference - pruned) / reference <= 0.01, f"pruned {pruned:.4f} vs dense {reference:.4f} ({kind})"


def test_two_of_four_keeps_exactly_two_of_every_four_weights() -> None:
    model = dense()
    optimizer = make_optimizer(model, "adam")
    config = inc.PruneConfig(pattern="2:4", schedule="oneshot", start_step=0)
    inc_torch.prepare(model, config, optimizer=optimizer)
    train_loop(model, optimizer, 1)
    sparse = inc_torch.convert(model)
    for name in ("fc1", "fc2", "fc3"):
        groups = getattr(sparse, name).weight.detach().reshape(-1, 4)
        assert torch.all((groups != 0).sum(dim=1) <= 2), name
        assert torch.all((groups == 0).sum(dim=1) >= 2), name
    assert accuracy(sparse) >= 0.85


def test_conv_structured_pattern_uses_input_channels_innermost() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    inc_torch.prepare(model, inc.PruneConfig(pattern="2:4", schedule="oneshot"), optimizer=optimizer)
    model(torch.randn(2, 4, 8, 8)).sum().backward()
    optimizer.step()
    weight = model[0].weight.detach()  # (out, in, kh, kw): groups of 4 input channels at each kernel position
    groups = weight.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.all((groups != 0).sum(dim=1) == 2)


def test_iterative_schedule_sparsity_at_given_steps() -> None:
    model = dense()
    optimizer = make_optimizer(model, "adam")
    config = inc.PruneConfig(target_sparsity=0.6, schedule="iterative", ramp="cubic", start_step=4, end_step=24, frequency=5)
    inc_torch.prepare(model, config, optimizer=optimizer)
    schedule = Schedule.from_config(config)
    x, y, _, _ = split()
    seen = []
    for step in range(30):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(torch.from_numpy(x[:BATCH])), torch.from_numpy(y[:BATCH])).backward()
        optimizer.step()
        seen.append(inc_torch.sparsity_report(model).overall)
        assert seen[-1] == pytest.approx(schedule.sparsity_at(step), abs=1e-3), f"step {step}"
    assert seen[3] == 0.0 and seen[4] == 0.0  # start_step with initial_sparsity 0 prunes nothing yet
    assert 0.0 < seen[9] < seen[14] < seen[23] < 0.6
    assert seen[29] == pytest.approx(0.6, abs=1e-3)


@pytest.mark.parametrize("criterion", ["snip", "snip_momentum"])
def test_gradient_criteria_prune_to_target_and_differ_from_magnitude(criterion: str) -> None:
    masks = {}
    for crit in (criterion, "magnitude"):
        model = dense()
        optimizer = make_optimizer(model, "adam")
        config = inc.PruneConfig(target_sparsity=0.5, criterion=crit, schedule="oneshot", start_step=10)
        inc_torch.prepare(model, config, optimizer=optimizer)
        x, y, _, _ = split()
        for step in range(12):
            idx = slice(step * BATCH, (step + 1) * BATCH)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx])).backward()
            optimizer.step()
        masks[crit] = model.fc2.weight.detach() != 0
        assert inc_torch.sparsity_report(model).overall == pytest.approx(0.5, abs=1e-3)
    assert not torch.equal(masks[criterion], masks["magnitude"])


def test_pruned_weights_stay_zero_and_optimizer_state_does_not_revive_them() -> None:
    model = dense()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    inc_torch.prepare(model, inc.PruneConfig(target_sparsity=0.5, schedule="oneshot", start_step=3), optimizer=optimizer)
    train_loop(model, optimizer, 1)
    zeros = model.fc1.weight.detach() == 0
    assert zeros.float().mean().item() == pytest.approx(0.5, abs=1e-3)
    exp_avg = optimizer.state[model.fc1.weight]["exp_avg"]
    assert torch.all(exp_avg[zeros] == 0), "Adam's moment kept momentum behind pruned weights"
    train_loop(model, optimizer, 1, seed=5)
    assert torch.equal(model.fc1.weight.detach() == 0, zeros)


def test_convert_removes_the_hooks_and_leaves_a_plain_module() -> None:
    model = dense()
    optimizer = make_optimizer(model, "adam")
    inc_torch.prepare(model, inc.PruneConfig(target_sparsity=0.5, schedule="oneshot"), optimizer=optimizer)
    assert optimizer._optimizer_step_pre_hooks and optimizer._optimizer_step_post_hooks
    train_loop(model, optimizer, 1)
    sparse = inc_torch.convert(model)
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    assert type(sparse) is WideMLP and not hasattr(sparse, "_inc_prune_state")
    zeros = sparse.fc1.weight.detach() == 0
    train_loop(model, optimizer, 1)  # the hooks are gone: training the prepared model no longer prunes
    assert not torch.equal(model.fc1.weight.detach() == 0, zeros)
    assert torch.equal(sparse.fc1.weight.detach() == 0, zeros)  # the converted copy kept its zeros


def test_pattern_lock_fine_tunes_a_sparse_model_keeping_its_zeros() -> None:
    sparse = dense()
    with torch.no_grad():
        sparse.fc2.weight[:, ::3] = 0
    zeros = sparse.fc2.weight.detach() == 0
    optimizer = make_optimizer(sparse, "sgd")
    inc_torch.prepare(sparse, inc.PruneConfig(criterion="pattern_lock"), optimizer=optimizer)
    train_loop(sparse, optimizer, 1)
    assert torch.equal(sparse.fc2.weight.detach() == 0, zeros)


def test_sparsity_report_writes_table_and_plot(tmp_path) -> None:
    model = dense()
    with torch.no_grad():
        model.fc3.weight[:5] = 0
    report = inc_torch.sparsity_report(model)
    assert report.layers[2].sparsity == pytest.approx(0.5)
    path = report.save(tmp_path / "sparsity.md")
    text = path.read_text()
    assert "| fc3 | Linear | 10x256 | 1,280 / 2,560 | 50.00% |" in text
    assert (tmp_path / "sparsity.png").read_bytes()[:4] == b"\x89PNG"


def _sparse_model() -> nn.Module:
    model = dense()
    optimizer = make_optimizer(model, "adam")
    inc_torch.prepare(model, SEVENTY, optimizer=optimizer)
    train_loop(model, optimizer, 4)
    return inc_torch.convert(model)


def _int8_weight(module: nn.Module) -> torch.Tensor:
    return module.weight().int_repr()  # FX quantized Linear / LinearReLU: the INT8 weight the kernel reads


def test_prune_then_ptq_keeps_the_zeros_in_the_int8_weights() -> None:
    sparse = _sparse_model()
    q = inc.quantize(sparse, inc.QuantConfig(format="fx"), dataset=calib_data(128, 32))
    modules = dict(q.named_modules())
    for name in ("fc1", "fc2", "fc3"):
        zeros = getattr(sparse, name).weight.detach() == 0
        assert torch.all(_int8_weight(modules[name])[zeros] == 0), name
    assert (accuracy(sparse) - accuracy(q)) / accuracy(sparse) <= 0.01


def test_prune_then_qat_keeps_the_zeros_through_training_and_into_int8() -> None:
    sparse = _sparse_model()
    x, _, _, _ = split()
    qat = inc_torch.prepare_qat(sparse, inc.QATConfig(format="fx"), x[:8])
    optimizer = torch.optim.Adam(qat.parameters(), lr=5e-4)
    inc_torch.prepare(qat, inc.PruneConfig(criterion="pattern_lock"), optimizer=optimizer)
    train_loop(qat, optimizer, 2)
    int8 = inc_torch.convert(qat)
    modules = dict(int8.named_modules())
    for name in ("fc1", "fc2", "fc3"):
        zeros = getattr(sparse, name).weight.detach() == 0
        assert torch.all(_int8_weight(modules[name])[zeros] == 0), name
    assert (accuracy(sparse) - accuracy(int8)) / accuracy(sparse) <= 0.01


# --- bad input -----------------------------------------------------------------------------------


def _untouched(model: nn.Module, before: dict, optimizer: torch.optim.Optimizer) -> None:
    assert same_state(state(model), before)
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    assert not hasattr(model, "_inc_prune_state")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (inc.PruneConfig(exclude=inc.LayerFilter(names=("fc9",))), r"fc9.*match no op"),
        (inc.PruneConfig(include_types=("Conv2d",)), r"include_types \['Conv2d'\] match no prunable layer"),
        (inc.PruneConfig(pattern="4x1"), r"Layer 'fc3'.*shape \(10, 256\)"),
        (inc.PruneConfig(pattern="2:3"), r"Layer 'fc1'.*multiple of 3"),
    ],
    ids=["unknown-layer-name", "unknown-type", "block-does-not-tile", "n-of-m-does-not-divide"],
)
def test_bad_prune_configs_name_the_layer_and_leave_the_model_alone(config: inc.PruneConfig, message: str) -> None:
    model = dense()
    before = state(model)
    optimizer = make_optimizer(model, "adam")
    with pytest.raises(ConfigError, match=message):
        inc_torch.prepare(model, config, optimizer=optimizer)
    _untouched(model, before, optimizer)


class ConvStem(nn.Module):
    """A stem conv on 3 channels, a depthwise conv, a pointwise conv and a 10-way head, as torchvision's
    MobileNets have them: '2:4' fits the pointwise conv and the head only."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(torch.relu(self.dw(torch.relu(self.stem(x)))))
        return self.head(x.mean(dim=(2, 3)))


def test_the_exclusion_the_pattern_error_names_is_the_way_out() -> None:
    torch.manual_seed(0)
    model = ConvStem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ConfigError, match=r"does not fit 2 of the 4 layers") as info:
        inc_torch.prepare(model, inc.PruneConfig(pattern="2:4", end_step=4, frequency=2), optimizer=optimizer)
    assert "'stem' (16, 3, 3, 3), 'dw' (16, 1, 3, 3)." in str(info.value)
    suggested = re.search(r"exclude=inc\.LayerFilter\(names=(\(.*?\))\)\)", str(info.value))
    assert suggested is not None, str(info.value)
    names = ast.literal_eval(suggested.group(1))
    config = inc.PruneConfig(pattern="2:4", end_step=4, frequency=2, exclude=inc.LayerFilter(names=names))
    pruned = inc_torch.prepare(model, config, optimizer=optimizer)
    for _ in range(6):
        optimizer.zero_grad()
        pruned(torch.randn(4, 3, 8, 8)).square().mean().backward()
        optimizer.step()
    sparse = inc_torch.convert(pruned)
    groups = sparse.pw.weight.detach().reshape(32, 16).reshape(32, 4, 4)
    assert bool(((groups != 0).sum(-1) <= 2).all())  # 2 of every 4 input weights kept
    assert bool((sparse.stem.weight != 0).all() and (sparse.dw.weight != 0).all())


@pytest.mark.parametrize("target", [1.0, -0.1, 1.5])
def test_target_sparsity_outside_zero_one_is_rejected(target: float) -> None:
    with pytest.raises(ConfigError, match="target_sparsity"):
        inc.PruneConfig(target_sparsity=target)


def test_missing_optimizer_is_rejected() -> None:
    model = dense()
    with pytest.raises(ConfigError, match="needs optimizer="):
        inc_torch.prepare(model, inc.PruneConfig())
    assert not hasattr(model, "_inc_prune_state")


def test_optimizer_of_another_model_is_rejected() -> None:
    model = dense()
    before = state(model)
    optimizer = torch.optim.Adam(dense().parameters())
    with pytest.raises(ConfigError, match=r"\['fc1', 'fc2', 'fc3'\] are not in the optimizer"):
        inc_torch.prepare(model, inc.PruneConfig(), optimizer=optimizer)
    _untouched(model, before, optimizer)


def test_snip_without_gradients_says_to_run_backward() -> None:
    model = dense()
    optimizer = make_optimizer(model, "adam")
    inc_torch.prepare(model, inc.PruneConfig(criterion="snip", schedule="oneshot"), optimizer=optimizer)
    with pytest.raises(ConfigError, match="needs gradients.*backward"):
        optimizer.step()  # no backward pass: the snip criterion has nothing to score


def test_non_module_and_double_prepare_are_rejected() -> None:
    with pytest.raises(UnsupportedModelError, match="torch.nn.Module"):
        inc_torch.prepare(object(), inc.PruneConfig(), optimizer=None)  # type: ignore[arg-type]
    model = dense()
    optimizer = make_optimizer(model, "adam")
    inc_torch.prepare(model, inc.PruneConfig(), optimizer=optimizer)
    with pytest.raises(ConfigError, match="already being pruned"):
        inc_torch.prepare(model, inc.PruneConfig(), optimizer=optimizer)


def test_convert_of_an_unprepared_model_is_rejected() -> None:
    with pytest.raises(UnsupportedModelError, match="prepared by neither"):
        inc_torch.convert(dense())


def test_hf_style_conv1d_is_pruned_in_its_output_first_view() -> None:
    class Conv1D(nn.Module):  # the layout of transformers' GPT-2 Conv1D: weight (in, out)
        def __init__(self, nx: int, nf: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(nx, nf))
            self.bias = nn.Parameter(torch.zeros(nf))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight + self.bias

    model = nn.Sequential(Conv1D(8, 6))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    inc_torch.prepare(model, inc.PruneConfig(pattern="2:4", schedule="oneshot"), optimizer=optimizer)
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    kept = (model[0].weight.detach().t() != 0).reshape(6, 2, 4).sum(dim=2)  # per output, groups of 4 inputs
    np.testing.assert_array_equal(kept.numpy(), np.full((6, 2), 2))


def test_gradient_criterion_names_layers_the_loss_does_not_use() -> None:
    model = dense()
    optimizer = make_optimizer(model, "adam")
    inc_torch.prepare(model, inc.PruneConfig(criterion="snip_momentum", end_step=10), optimizer=optimizer)
    x = torch.from_numpy(split()[0][:8])
    model.fc2(torch.relu(model.fc1(torch.flatten(x, 1)))).sum().backward()  # fc3 takes no part in this loss
    with pytest.raises(ConfigError, match=r"layers \['fc3'\] got no gradient.*exclude=inc.LayerFilter\(names=\('fc3',\)\)"):
        optimizer.step()


class RowLSTM(nn.Module):
    """Digits as 8 rows of 8 pixels read by a bidirectional LSTM: the recurrent weights hold most parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 64, batch_first=True, bidirectional=True)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.reshape(-1, 8, 8))
        return self.head(out.mean(dim=1))


@functools.cache
def _dense_lstm() -> nn.Module:
    torch.manual_seed(0)
    model = RowLSTM()
    return train_loop(model, torch.optim.Adam(model.parameters(), lr=1e-2), 10, seed=0)


RECURRENT = [f"rnn.weight_{kind}_l0{direction}" for direction in ("", "_reverse") for kind in ("ih", "hh")]


def test_recurrent_weights_are_pruned_per_matrix() -> None:
    model = copy.deepcopy(_dense_lstm())
    reference = copy.deepcopy(model)
    dense_accuracy = accuracy(train_loop(reference, make_optimizer(reference, "adam"), 5))
    optimizer = make_optimizer(model, "adam")
    # half: a recurrent net this small has less slack than WideMLP (70% costs ~4 points here)
    config = inc.PruneConfig(target_sparsity=0.5, schedule="iterative", start_step=0, end_step=3 * STEPS_PER_EPOCH, frequency=14)
    inc_torch.prepare(model, config, optimizer=optimizer)
    train_loop(model, optimizer, 5)
    sparse = inc_torch.convert(model)
    report = inc_torch.sparsity_report(sparse)
    assert sorted((layer.name, layer.op_type) for layer in report.layers) == sorted(
        [(name, "LSTM") for name in RECURRENT] + [("head", "Linear")]
    )
    for name in RECURRENT:
        weight = dict(sparse.named_parameters())[name].detach()
        assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=1 / weight.numel()), name
    assert accuracy(sparse) >= dense_accuracy - 0.02, (accuracy(sparse), dense_accuracy)


def test_recurrent_weights_take_two_of_four_and_are_excluded_by_type() -> None:
    model = copy.deepcopy(_dense_lstm())
    optimizer = make_optimizer(model, "adam")
    inc_torch.prepare(model, inc.PruneConfig(pattern="2:4", schedule="oneshot"), optimizer=optimizer)
    train_loop(model, optimizer, 1)
    sparse = inc_torch.convert(model)
    for name in RECURRENT:
        groups = dict(sparse.named_parameters())[name].detach().reshape(-1, 4)  # (gates * hidden, in): inputs innermost
        assert torch.all((groups != 0).sum(dim=1) <= 2), name
    model = copy.deepcopy(_dense_lstm())
    optimizer = make_optimizer(model, "adam")
    config = inc.PruneConfig(target_sparsity=0.5, schedule="oneshot", exclude=inc.LayerFilter(types=("LSTM",)))
    inc_torch.prepare(model, config, optimizer=optimizer)
    train_loop(model, optimizer, 1)
    sparse = inc_torch.convert(model)
    sparsity = {layer.name: layer.sparsity for layer in inc_torch.sparsity_report(sparse).layers}
    assert sparsity == {**dict.fromkeys(RECURRENT, 0.0), "head": pytest.approx(0.5, abs=1 / 1280)}


def test_attention_projections_are_pruned_with_the_rest_of_a_transformer_layer() -> None:
    """nn.MultiheadAttention keeps its query/key/value projections in ``in_proj_weight``, not in a ``weight``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True), nn.Flatten(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    inc_torch.prepare(model, inc.PruneConfig(pattern="2:4", schedule="oneshot"), optimizer=optimizer)
    x = torch.randn(4, 8, 16)
    model(x).sum().backward()
    optimizer.step()
    sparse = inc_torch.convert(model).eval()
    names = [(layer.name, layer.op_type) for layer in inc_torch.sparsity_report(sparse).layers]
    assert ("0.self_attn.in_proj_weight", "MultiheadAttention") in names and len(names) == 5  # + out_proj, linear1/2, head
    groups = sparse[0].self_attn.in_proj_weight.detach().reshape(-1, 4)
    assert torch.all((groups != 0).sum(dim=1) <= 2)
    with torch.no_grad():
        assert torch.isfinite(sparse(x)).all()
