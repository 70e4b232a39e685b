"""QAT in the user's own loop: prepare_qat, train with your optimizer and loss, convert to INT8."""

from __future__ import annotations

import collections
import copy
import functools
import logging
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_helpers import DigitsCNN, accuracy, relative_loss, same_state, split, state, trained_cnn

import inc_core as inc
import inc_torch
from inc_core.errors import ConfigError, DatasetError, UnsupportedModelError


def _example() -> torch.Tensor:
    x, _, _, _ = split()
    return torch.from_numpy(x[:4])


@functools.cache
def _converged() -> nn.Module:
    """The digits CNN trained to convergence: Adam with a cosine-decayed learning rate.

    A model stopped at a constant learning rate sits on a noisy point: any further step, in FP32 or with
    fake quantization, moves its test accuracy by a few samples either way (that, not the INT8 kernels,
    made the QAT check pass on one CPU and fail on another). From a converged model, fine-tuning at a
    fine-tuning rate stays on the plateau, so the comparison with FP32 measures quantization.
    """
    torch.manual_seed(0)
    model = DigitsCNN()
    _user_loop(model, "adam", 5e-3, epochs=15, decay=True)
    return model.eval()


def _user_loop(model: nn.Module, optimizer_name: str, lr: float, *, epochs: int, decay: bool = False, seed: int = 0) -> None:
    """A plain training loop (the user's): mini-batches of 50, cross-entropy, the given optimizer."""
    x, y, _, _ = split()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    if optimizer_name == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    steps = epochs * -(-len(xt) // 50)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if decay else None
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), 50):
            idx = order[start : start + 50]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()


@pytest.mark.parametrize(("optimizer_name", "lr"), [("adam", 1e-4), ("sgd", 1e-3)])
@pytest.mark.parametrize("fmt", ["pt2e", "fx"])
def test_qat_on_digits_ends_within_one_percent_of_fp32(fmt: str, optimizer_name: str, lr: float) -> None:
    model = copy.deepcopy(_converged())
    before = state(model)
    fp32 = accuracy(model)
    # 3 epochs of 28 steps: batch norm frozen after half of them, ranges after three quarters
    config = inc.QATConfig(format=fmt, freeze_bn_step=42, freeze_observer_step=63)
    qat_model = inc_torch.prepare_qat(model, config, _example())
    assert same_state(state(model), before), "prepare_qat modified the user's model"
    _user_loop(qat_model, optimizer_name, lr, epochs=3, seed=1)
    int8 = inc_torch.convert(qat_model)  # what users run: PT2E compiled by inductor, FX x86 modules
    assert inc_torch.quantized_ops(int8) == ["conv1", "conv2", "fc1", "fc2"]
    if fmt == "pt2e":  # the conv2d batch norms folded into their convs (see _fold_bn)
        targets = [str(n.target) for n in int8.graph_module.graph.nodes if n.op == "call_function"]
        assert "aten.conv2d.default" in targets and not any("batch_norm" in t for t in targets), targets
    assert relative_loss(fp32, accuracy(int8)) <= 0.01, (fp32, accuracy(int8))


def test_qat_weight_ranges_follow_the_weights() -> None:
    """Weight fake-quant uses the current weights' range at each step, the range convert quantizes with."""
    qat_model = inc_torch.prepare_qat(_converged(), inc.QATConfig(format="fx"), _example())
    qat_model(_example()).sum().backward()  # the first step sees the initial weights
    with torch.no_grad():
        qat_model.fc2.weight.mul_(3.0)  # weights that grew (a slow average would lag at ~1.02x)
    qat_model(_example()).sum().backward()
    fake_quant = qat_model.fc2.weight_fake_quant
    expected = qat_model.fc2.weight.detach().abs().amax(dim=1) / 127.5
    torch.testing.assert_close(fake_quant.scale, expected, rtol=1e-2, atol=1e-6)


def test_freeze_steps_follow_the_training_loop() -> None:
    model = trained_cnn()
    config = inc.QATConfig(format="fx", freeze_observer_step=3, freeze_bn_step=5)
    qat_model = inc_torch.prepare_qat(model, config, _example())
    fake_quants = [m for m in qat_model.modules() if isinstance(m, torch.ao.quantization.FakeQuantizeBase)]
    bn_convs = [m for m in qat_model.modules() if isinstance(m, torch.ao.nn.intrinsic.qat.ConvBn2d)]
    assert fake_quants and len(bn_convs) == 1
    x = _example()
    optimizer = torch.optim.SGD(qat_model.parameters(), lr=1e-3)
    for step in range(1, 7):
        optimizer.zero_grad()
        qat_model(x).sum().backward()
        optimizer.step()
        observing = all(bool(fq.observer_enabled[0]) for fq in fake_quants)
        assert observing == (step <= 3), step
        assert bn_convs[0].freeze_bn == (step > 5), step
    with torch.no_grad():
        qat_model.eval()
        qat_model(x)  # evaluation passes are not training steps
    assert qat_model._inc_qat_state.steps == 6


def test_pt2e_qat_freezes_batch_norm_statistics() -> None:
    qat_model = inc_torch.prepare_qat(trained_cnn(), inc.QATConfig(freeze_bn_step=1), _example())
    x = _example()
    running = {k: v.clone() for k, v in qat_model.state_dict().items() if "running_mean" in k}
    assert running
    qat_model(x).sum().backward()
    after = {k: v.clone() for k, v in qat_model.state_dict().items() if "running_mean" in k}
    assert all(not torch.equal(running[k], after[k]) for k in running)  # step 1 updates the statistics
    for _ in range(2):
        qat_model(x).sum().backward()
    # from step 2 on batch norm is frozen (the graph rewrite once took effect a step late: step 2 updated them too)
    snapshot = {k: v.clone() for k, v in qat_model.state_dict().items() if k in after}
    assert all(torch.equal(after[k], snapshot[k]) for k in after)
    qat_model(x).sum().backward()
    qat_model.train()  # re-entering training mode keeps batch norm frozen
    qat_model(x).sum().backward()
    assert all(torch.equal(snapshot[k], v) for k, v in qat_model.state_dict().items() if k in snapshot)


def test_wrong_example_inputs_are_a_dataset_error() -> None:
    model = trained_cnn()
    before = state(model)
    with pytest.raises(DatasetError, match=r"example_inputs \(\(2, 3, 8, 8\) float32\)"):
        inc_torch.prepare_qat(model, inc.QATConfig(), torch.zeros(2, 3, 8, 8))
    assert same_state(state(model), before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("fmt", ["pt2e", "fx"])
def test_a_model_not_in_float32_is_refused_before_preparation(dtype: torch.dtype, fmt: str) -> None:
    """Preparation of a bfloat16 model went through (both formats) and the user's first training step raised
    torch.ao's "expected scalar type Float but found BFloat16" from inside their forward."""
    model = trained_cnn().to(dtype)
    before = state(model)
    name = str(dtype).replace("torch.", "")
    with pytest.raises(UnsupportedModelError, match=rf"holds {name} parameters; QAT trains the FP32 model.*model\.float\(\)"):
        inc_torch.prepare_qat(model, inc.QATConfig(format=fmt), _example().to(dtype))
    assert same_state(state(model), before)


def test_bad_qat_calls() -> None:
    with pytest.raises(ConfigError, match="QATConfig"):
        inc_torch.prepare_qat(trained_cnn(), inc.QuantConfig(), _example())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="format='onnx'"):
        inc_torch.prepare_qat(trained_cnn(), inc.QATConfig(format="onnx"), _example())
    with pytest.raises(ConfigError, match="activation_dtype='int8'"):
        inc_torch.prepare_qat(trained_cnn(), inc.QATConfig(activation_dtype="int8"), _example())
    with pytest.raises(ConfigError, match="conv9"):
        inc_torch.prepare_qat(trained_cnn(), inc.QATConfig(exclude=inc.LayerFilter(names=("conv9",))), _example())
    with pytest.raises(UnsupportedModelError, match="prepare_qat"):
        inc_torch.convert(DigitsCNN())


def test_excluded_layer_stays_fp32_after_qat() -> None:
    config = inc.QATConfig(format="fx", exclude=inc.LayerFilter(names=("fc2",)))
    qat_model = inc_torch.prepare_qat(trained_cnn(), config, _example())
    int8 = inc_torch.convert(qat_model)
    assert inc_torch.quantized_ops(int8) == ["conv1", "conv2", "fc1"]
    assert type(int8.fc2) is nn.Linear


class _EmbeddingMLP(nn.Module):
    """Category codes looked up in an nn.Embedding next to numeric features (a tabular wide-and-deep model)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, numeric: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        features = torch.cat([numeric, self.embed(category).flatten(1)], dim=1)
        return self.fc2(torch.relu(self.fc1(features)))


@pytest.mark.parametrize("fmt", ["fx", "pt2e"])
def test_qat_on_a_model_with_an_embedding_keeps_the_lookup_float(fmt: str) -> None:
    # FX QAT swapped nn.Embedding for torch.ao's QAT Embedding, which asserts on any weight qscheme but
    # float_qparams: prepare_qat failed for every model with an embedding (reported as a tracing failure)
    torch.manual_seed(0)
    numeric, category = torch.randn(64, 4), torch.randint(0, 10, (64, 1))
    labels = torch.randint(0, 3, (64,))
    qat = inc_torch.prepare_qat(_EmbeddingMLP(), inc.QATConfig(format=fmt), {"numeric": numeric[:8], "category": category[:8]})
    optimizer = torch.optim.Adam(qat.parameters(), lr=1e-3)
    qat.train()
    for start in range(0, 64, 16):
        optimizer.zero_grad()
        batch = slice(start, start + 16)
        nn.functional.cross_entropy(qat(numeric=numeric[batch], category=category[batch]), labels[batch]).backward()
        optimizer.step()
    qat.eval()
    fake_quant = qat(numeric=numeric, category=category)
    int8 = inc_torch.convert(qat)
    counts = inc.get_backend("torch").int8_op_counts(int8)
    assert sum(n for op, n in counts.items() if "inear" in op) == 2, counts  # fc1, fc2; the lookup stays float
    out = int8(numeric=numeric, category=category)
    assert nn.functional.cosine_similarity(fake_quant.flatten(), out.flatten(), dim=0) >= 0.99


class _DataDependentBranch(nn.Module):
    """Control flow on a tensor's value: torch.fx cannot trace it (torch.export can, as a cond or a guard)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return self.fc(-x)


@pytest.mark.parametrize(
    ("qat", "dynamic_named"), [(True, False), (False, True)], ids=["fx_qat", "fx_ptq"]
)
def test_an_untraceable_model_names_only_the_ways_that_apply(qat: bool, dynamic_named: bool) -> None:
    model = _DataDependentBranch()
    x = torch.ones(2, 8)
    with pytest.raises(UnsupportedModelError) as caught:
        if qat:
            inc_torch.prepare_qat(model, inc.QATConfig(format="fx"), x)
        else:
            inc.quantize(model, inc.QuantConfig(format="fx"), dataset=inc.Dataset(x.numpy()))
    message = str(caught.value)
    assert "torch.fx could not trace _DataDependentBranch" in message and "format='pt2e'" in message
    assert ("approach='dynamic'" in message) == dynamic_named  # QAT has no dynamic counterpart


class _DropPath(nn.Module):
    """Stochastic depth as torchvision's ``stochastic_depth`` and timm's ``DropPath`` write it."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        noise = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)
        return x * noise


def _stochastic_depth(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """As torchvision's ``stochastic_depth``: a function symbolic tracing keeps as one call (``torch.fx.wrap``),
    with ``training`` an argument (traced in training mode: the constant True)."""
    if not training or p == 0.0:
        return x
    return x * torch.empty((x.shape[0], 1, 1, 1)).bernoulli_(1.0 - p) / (1.0 - p)


torch.fx.wrap("_stochastic_depth")


class _ResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()) for _ in range(3))
        self.drop = nn.ModuleList(_DropPath(0.3) for _ in range(3))
        self.head = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        for block, drop in zip(self.blocks, self.drop):
            x = x + drop(block(x))
        x = x + _stochastic_depth(F.relu(self.blocks[0](x)), 0.3, self.training)
        return self.head(F.dropout(x.flatten(1), 0.2, training=self.training))


@pytest.mark.parametrize("fmt", ["pt2e", "fx"])
def test_stochastic_depth_is_off_in_the_evaluated_and_the_int8_qat_model(fmt: str) -> None:
    """The training-mode capture records stochastic depth's random mask as graph ops (a Bernoulli draw divided by
    the survival rate; on FX also a traced call's training=True and F.dropout's); no train/eval switch knew them, so
    the QAT model in eval mode and its INT8 model dropped residual branches at random (torchvision EfficientNet-B0:
    INT8 different on every call, cosine 0.26 to FP32 on PT2E, 0.53 to the QAT model on FX)."""
    torch.manual_seed(0)
    model = _ResidualNet().eval()
    x = _example()
    with torch.no_grad():
        reference = model(x)
    qat = inc_torch.prepare_qat(model, inc.QATConfig(format=fmt, freeze_observer_step=2), x)
    for _ in range(3):
        qat(x).sum().backward()
    with torch.no_grad():
        assert not torch.equal(qat(x), qat(x))  # training: branches dropped at random
        qat.eval()
        first = qat(x)
        assert torch.equal(first, qat(x))
    assert F.cosine_similarity(first.flatten(), reference.flatten(), dim=0) > 0.99
    int8 = inc_torch.convert(qat)
    assert not [n for n in getattr(int8, "graph_module", int8).graph.nodes if "bernoulli" in str(n.target)]
    outputs = int8(x)
    assert torch.equal(outputs, int8(x))
    assert F.cosine_similarity(outputs.flatten(), reference.flatten(), dim=0) > 0.99
    qat.train()
    with torch.no_grad():
        assert not torch.equal(qat(x), qat(x))  # the masks are back for training


_AuxOutputs = collections.namedtuple("_AuxOutputs", ["logits", "aux"])


class _AuxHeadNet(nn.Module):
    """An auxiliary head in training mode only, as torchvision's GoogLeNet and Inception v3 have."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(8 * 8 * 8, 10)
        self.aux = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> Any:
        features = F.relu(self.conv(x)).flatten(1)
        if self.training:
            return _AuxOutputs(self.head(features), self.aux(features))
        return self.head(features)


@pytest.mark.parametrize("fmt", ["pt2e", "fx"])
def test_outputs_that_differ_between_training_and_eval_mode_are_said(fmt: str, caplog: pytest.LogCaptureFixture) -> None:
    """The QAT model is captured in training mode: where forward returns more in training mode (an auxiliary head),
    the evaluated QAT model and its INT8 model return that too, and ran the head in every inference, unsaid."""
    with caplog.at_level(logging.WARNING, logger="inc"):
        qat = inc_torch.prepare_qat(_AuxHeadNet().eval(), inc.QATConfig(format=fmt), _example())
    said = [r.getMessage() for r in caplog.records if "in training mode and" in r.getMessage()]
    assert len(said) == 1
    assert "_AuxHeadNet returns a _AuxOutputs of 2 values in training mode and one value in eval mode" in said[0]
    assert "aux_logits=False" in said[0]
    with torch.no_grad():
        assert isinstance(qat.eval()(_example()), tuple)  # what the warning says
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="inc"):
        inc_torch.prepare_qat(DigitsCNN().eval(), inc.QATConfig(format=fmt), _example())
    assert not [r for r in caplog.records if "in training mode and" in r.getMessage()]


def test_a_compiled_pt2e_qat_model_trains_from_its_first_step() -> None:
    """``torch.compile(qat_model)`` for faster training: the first compiled step failed inside inductor ("expected
    size 8==1" in the fused observer: per-channel weight ranges were sized at the first call). The compiled steps
    count towards the freezes, and the compiled model trains as the eager one does."""
    torch.manual_seed(0)
    images, labels, _, _ = split()
    x, y = torch.from_numpy(images[:64]), torch.from_numpy(labels[:64]).long()
    config = inc.QATConfig(freeze_observer_step=2, freeze_bn_step=3)
    models = [inc_torch.prepare_qat(DigitsCNN().eval(), config, x[:4]) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    compiled = torch.compile(models[0])
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    for _ in range(4):
        for run, optimizer in zip((compiled, models[1]), optimizers):
            optimizer.zero_grad()
            F.cross_entropy(run(x), y).backward()
            optimizer.step()
    assert int(models[0].state_dict()["inc_qat_steps"]) == 4
    for model in models:
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(models[0](x), models[1](x), atol=0.05, rtol=0.0)  # compiled arithmetic differs slightly
    assert inc_torch.convert(models[0])(x).shape == (64, 10)
