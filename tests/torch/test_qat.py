"""QAT in the user's own loop: prepare_qat, train with your optimizer and loss, convert to INT8."""

from __future__ import annotations

import copy
import functools

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


class _LinearBnMLP(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear on flattened digits: FX QAT fuses the pair into a LinearBn1d."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(torch.flatten(x, 1)))))


def test_fx_qat_freezes_linear_batch_norm_statistics() -> None:
    torch.manual_seed(0)
    qat_model = inc_torch.prepare_qat(_LinearBnMLP(), inc.QATConfig(format="fx", freeze_bn_step=2), _example())
    fused = [m for m in qat_model.modules() if isinstance(m, torch.ao.nn.intrinsic.qat.LinearBn1d)]
    assert len(fused) == 1
    x, _, _, _ = split()
    batches = [torch.from_numpy(x[i : i + 16]) for i in range(0, 80, 16)]
    for batch in batches[:2]:
        qat_model(batch).sum().backward()
    assert not fused[0].freeze_bn
    frozen = fused[0].bn.running_mean.clone()
    for batch in batches[2:]:
        qat_model(batch).sum().backward()
    assert fused[0].freeze_bn
    torch.testing.assert_close(fused[0].bn.running_mean, frozen, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["pt2e", "fx"])
def test_qat_prepares_from_a_one_sample_example_of_a_linear_batch_norm_model(fmt: str) -> None:
    """FX QAT runs its training-mode trace once on the example to find what it must keep float; a batch norm in
    training mode refuses a batch of one sample, which example inputs often are, so the trace runs in eval mode."""
    torch.manual_seed(0)
    qat_model = inc_torch.prepare_qat(_LinearBnMLP(), inc.QATConfig(format=fmt), _example()[:1])
    qat_model(_example()).sum().backward()
    assert inc_torch.quantized_ops(inc_torch.convert(qat_model)) == ["fc1", "fc2"]



def test_pt2e_qat_fold_for_a_conv_kind_the_graph_lacks_leaves_the_graph_as_torchao_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """convert skips torchao's 24 pattern exports per conv kind the graph does not call (about 20 s of the 25 s its
    convert took on the digits CNN); what the skipped fold does to the graph must be what torchao's fold does."""
    from torchao.quantization.pt2e import qat_utils

    from inc_torch.qat._fold_bn import folding_only_qat_conv_bn_pairs

    qat_model = inc_torch.prepare_qat(trained_cnn(), inc.QATConfig(), _example())
    qat_model(_example()).sum().backward()
    example_1d = tuple(torch.randn(*shape) for shape in [(1, 1, 3), (1, 1, 1), (1,), (1,), (1,), (1,)])
    torchao_helper = qat_utils._fold_conv_bn_qat_helper
    theirs = torchao_helper(copy.deepcopy(qat_model), torch.nn.functional.conv_transpose1d, example_1d, is_cuda=False)

    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pattern was exported for a conv kind the graph does not call")

    monkeypatch.setattr(qat_utils, "_get_aten_graph_module_for_pattern", no_export)
    with folding_only_qat_conv_bn_pairs():
        assert qat_utils._fold_conv_bn_qat_helper is not torchao_helper
        ours = qat_utils._fold_conv_bn_qat_helper(
            copy.deepcopy(qat_model), torch.nn.functional.conv_transpose1d, example_1d, is_cuda=False
        )
    assert qat_utils._fold_conv_bn_qat_helper is torchao_helper, "the block left torchao patched"
    assert ours.code == theirs.code
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    assert all(torch.equal(ours_state[k], theirs_state[k]) for k in ours_state)


class _DenseBlock(nn.Module):
    """DenseNet's shape: each layer's batch norm reads the concatenation of the features before it, so no
    convolution precedes it and PT2E leaves it in the graph (as in torchvision's DenseNets)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, 8, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(24)
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([x, torch.relu(x)], 1)
        x = torch.cat([x, self.conv1(torch.relu(self.norm1(x)))], 1)
        return self.head(torch.relu(self.norm2(x)).mean((2, 3)))


def test_post_training_convert_of_a_graph_with_batch_norms_exports_no_qat_pattern(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch norm left in the graph made torchao's convert export its 96 QAT conv-bn patterns (12-25 s per
    inc.quantize, per tuning trial), though a post-training graph holds no QAT pair; the graph is torchao's."""
    from torchao.quantization.pt2e import qat_utils

    from inc_torch.qat._fold_bn import folding_only_qat_conv_bn_pairs

    torch.manual_seed(0)
    model = _DenseBlock()
    x, _, held_out, _ = split()
    with torch.no_grad():  # batch-norm statistics of real data, so the INT8 model has something to match
        model.train()(torch.from_numpy(x[:256]))
    model.eval()
    calibration = inc.Dataset(x[:128], batch_size=32)
    sample = torch.from_numpy(held_out[:64])

    # torchao's conv2d fold, unpatched, on the prepared graph: what the skipped fold must leave
    from inc_torch._compat import torchao_pt2e

    ao = torchao_pt2e()
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = ao.prepare_pt2e(torch.export.export(copy.deepcopy(model), (sample,)).module(), quantizer)
    prepared(sample)
    assert sum("batch_norm" in str(n.target) for n in prepared.graph.nodes) == 2
    example_2d = tuple(torch.randn(*shape) for shape in [(1, 1, 3, 3), (1, 1, 1, 1), (1,), (1,), (1,), (1,)])
    theirs = qat_utils._fold_conv_bn_qat_helper(copy.deepcopy(prepared), F.conv2d, example_2d, is_cuda=False)

    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("a QAT conv-bn pattern was exported for a post-training graph")

    monkeypatch.setattr(qat_utils, "_get_aten_graph_module_for_pattern", no_export)
    with folding_only_qat_conv_bn_pairs():
        ours = qat_utils._fold_conv_bn_qat_helper(copy.deepcopy(prepared), F.conv2d, example_2d, is_cuda=False)
    assert ours.code == theirs.code
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())

    quantized = inc.quantize(model, inc.QuantConfig(), dataset=calibration)
    assert inc_torch.quantized_ops(quantized) == ["stem", "conv1", "head"]
    with torch.no_grad():
        reference = model(sample)
        cosine = torch.nn.functional.cosine_similarity(quantized(sample), reference).min()
    assert cosine > 0.99, cosine


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


class _FunctionalNormNet(nn.Module):
    """A batch norm written as a function over the module's own statistics (``training=self.training``, keyword
    and positional), and a Monte Carlo dropout whose ``training=True`` is the model's code, in eval mode too."""

    def __init__(self, *, mc_dropout: bool = False) -> None:
        super().__init__()
        self.mc_dropout = mc_dropout
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        for name in ("norm", "norm2"):
            self.register_buffer(f"{name}_mean", torch.zeros(16))
            self.register_buffer(f"{name}_var", torch.ones(16))
        self.norm_weight = nn.Parameter(torch.ones(16))
        self.head = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(self.conv(x), self.norm_mean, self.norm_var, self.norm_weight, None, training=self.training)
        x = F.relu(x)
        x = F.batch_norm(self.conv2(x), self.norm2_mean, self.norm2_var, None, None, self.training, 0.1, 1e-5)
        x = F.relu(x).flatten(1)
        if self.mc_dropout:
            x = F.dropout(x, 0.5, training=True)
        return self.head(x)


@pytest.mark.parametrize("fmt", ["pt2e", "fx"])
def test_a_functional_batch_norm_uses_running_statistics_in_the_evaluated_and_the_int8_qat_model(fmt: str) -> None:
    """A symbolic trace in training mode writes ``F.batch_norm(..., training=self.training)`` as the constant True:
    the FX QAT model in eval mode, and its INT8 model, normalised every batch by its own statistics (a sample's
    output depended on the batch around it). The flags that follow the model's mode are found by tracing it in both
    modes; a flag the model's code sets (a Monte Carlo dropout's ``training=True``) is left as written. On PT2E,
    the batch norm without a weight failed the first training step (torchao's conv-bn rewrite divided None)."""
    torch.manual_seed(0)
    model = _FunctionalNormNet()
    x = torch.cat([_example(), _example() * 3.0 + 1.0])
    for _ in range(20):  # running statistics away from batch ones
        model(x)
    model.eval()
    with torch.no_grad():
        reference = model(x)
    qat = inc_torch.prepare_qat(model, inc.QATConfig(format=fmt, freeze_observer_step=2), x)
    for _ in range(3):
        qat(x).sum().backward()
    qat.eval()
    with torch.no_grad():
        evaluated = qat(x)
        torch.testing.assert_close(qat(x[:2]), evaluated[:2])  # each sample by the running statistics, not its batch's
    assert F.cosine_similarity(evaluated.flatten(), reference.flatten(), dim=0) > 0.99
    int8 = inc_torch.convert(qat)
    with torch.no_grad():
        outputs = int8(x)
        torch.testing.assert_close(int8(x[:2]), outputs[:2])
    assert F.cosine_similarity(outputs.flatten(), reference.flatten(), dim=0) > 0.99
    if fmt == "pt2e":  # torchao's train/eval switch turns every aten.dropout off in eval, a written True too
        return
    mc = inc_torch.prepare_qat(_FunctionalNormNet(mc_dropout=True).eval(), inc.QATConfig(format="fx"), x).eval()
    dropout = [n for n in mc.graph.nodes if n.target is F.dropout]
    assert len(dropout) == 1 and dropout[0].kwargs["training"] is True  # as the model runs in eval mode
    with torch.no_grad():
        assert not torch.equal(mc(x), mc(x))


@pytest.mark.parametrize("fmt", ["pt2e", "fx"])
def test_qat_trains_and_converts_batch_norms_without_affine_parameters(fmt: str) -> None:
    """``BatchNorm2d(affine=False)`` after a conv: PT2E's first training step failed with a bare RuntimeError
    (torchao's conv-bn rewrite divided a None weight), FX refused it ("Only support fusing BatchNorm2d with affine
    set to True"). The QAT model normalises with a fixed unit scale, and the user's model stays as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16, affine=False), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16, affine=False), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10),
    )
    x = torch.cat([_example(), _example() * 3.0 + 1.0])
    for _ in range(20):
        model(x)
    model.eval()
    before = state(model)
    with torch.no_grad():
        reference = model(x)
    qat = inc_torch.prepare_qat(model, inc.QATConfig(format=fmt, freeze_observer_step=2), x)
    optimizer = torch.optim.SGD([p for p in qat.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        F.mse_loss(qat(x), reference).backward()
        optimizer.step()
    assert same_state(state(model), before) and not model[1].affine
    qat.eval()
    with torch.no_grad():
        evaluated = qat(x)
        torch.testing.assert_close(qat(x[:2]), evaluated[:2])  # running statistics in eval
    assert F.cosine_similarity(evaluated.flatten(), reference.flatten(), dim=0) > 0.99  # three small steps apart
    int8 = inc_torch.convert(qat)
    with torch.no_grad():
        outputs = int8(x)
        torch.testing.assert_close(int8(x[:2]), outputs[:2])
    assert F.cosine_similarity(outputs.flatten(), evaluated.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("fmt", ["pt2e", "fx"])
@pytest.mark.parametrize("qat", [False, True], ids=["ptq", "qat"])
def test_a_batch_norm_without_running_statistics_after_a_conv_is_refused_naming_it(fmt: str, qat: bool) -> None:
    """``track_running_stats=False``: the batch norm normalises by each batch's statistics in eval mode too and
    cannot fold into its conv. PT2E QAT failed at the first training step with a bare RuntimeError, PT2E post-training
    advised excluding the conv (which does not help), FX said it could not trace the model."""
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16, track_running_stats=False), nn.ReLU(), nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    ).eval()
    x = _example()
    with pytest.raises(UnsupportedModelError, match="track_running_stats=False") as caught:
        if qat:
            inc_torch.prepare_qat(model, inc.QATConfig(format=fmt), x)
        else:
            inc.quantize(model, inc.QuantConfig(format=fmt), dataset=inc.Dataset(x.numpy(), batch_size=2))
    if fmt == "pt2e":
        assert "The batch norm '1' after the convolution '0'" in str(caught.value)
    assert "track_running_stats=True" in str(caught.value)


@pytest.mark.parametrize("fmt", ["pt2e", "fx"])
def test_a_run_resumed_from_a_checkpoint_trains_as_the_uninterrupted_run(fmt: str) -> None:
    """A QAT checkpoint (model and optimizer state dicts) loaded into a new ``prepare_qat`` model: the resumed
    model had counted no steps, so its batch norms, frozen in the checkpointed run, updated their statistics again
    (the freeze is a graph rewrite on PT2E, a module attribute on FX: neither in a state dict)."""
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    images, labels, _, _ = split()
    x, y = torch.from_numpy(images[:64]), torch.from_numpy(labels[:64]).long()
    config = inc.QATConfig(format=fmt, freeze_observer_step=2, freeze_bn_step=3)

    def step(qat: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()
        F.cross_entropy(qat(x), y).backward()
        optimizer.step()

    qat = inc_torch.prepare_qat(model, config, x[:4])
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.05, momentum=0.9)
    for _ in range(4):
        step(qat, optimizer)
    checkpoint = copy.deepcopy({"model": qat.state_dict(), "optimizer": optimizer.state_dict()})
    assert int(checkpoint["model"]["inc_qat_steps"]) == 4

    resumed = inc_torch.prepare_qat(model, config, x[:4])
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    for _ in range(2):
        step(qat, optimizer)
        step(resumed, resumed_optimizer)
    assert same_state(state(resumed), state(qat))
    qat.eval()
    resumed.eval()
    with torch.no_grad():
        assert torch.equal(resumed(x), qat(x))

    if fmt == "fx":  # a state dict without the step count (saved before it was kept) loads as before
        legacy = {k: v for k, v in checkpoint["model"].items() if k != "inc_qat_steps"}
        inc_torch.prepare_qat(model, config, x[:4]).load_state_dict(legacy)


def test_a_batch_norm_keeps_its_eps_and_momentum_through_qat_and_convert() -> None:
    """torchao writes the batch norms of its QAT graphs with eps 1e-5 and momentum 0.1, and folds them into the INT8
    convs with eps 1e-5 (torchvision's MobileNetV3 has eps 1e-3: INT8 cosine 0.54 to FP32, PTQ 0.96)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16, eps=0.1, momentum=0.3), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16, eps=0.1, momentum=0.3), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 10),
    )
    x = _example()
    with torch.no_grad():
        for bn in (model[1], model[4]):  # statistics where eps matters: variances near it
            bn.running_var.uniform_(0.02, 0.2)
            bn.running_mean.normal_(0.0, 0.1)
    model.eval()
    qat = inc_torch.prepare_qat(model, inc.QATConfig(freeze_observer_step=2, freeze_bn_step=0), x)

    def settings() -> set[tuple[float, float]]:
        bn = {(n.args[6], n.args[7]) for n in qat.graph.nodes if n.target is torch.ops.aten.batch_norm.default}
        # the scale factor bn.weight / sqrt(running_var + eps) the conv's weight is fake-quantized with
        scale = {n.args[1] for n in qat.graph.nodes if n.target is torch.ops.aten.add.Tensor
                 and str(getattr(n.args[0], "target", "")).endswith("running_var")}
        return {(*pair, eps) for pair in bn for eps in scale}

    assert settings() == {(0.3, 0.1, 0.1)}
    for _ in range(3):
        qat(x).sum().backward()
    qat.eval()
    assert settings() == {(0.3, 0.1, 0.1)}
    with torch.no_grad():
        evaluated = qat(x)  # batch norm stepped once (the freeze takes effect from the next call)
    int8 = inc_torch.convert(qat)  # each batch norm folded with its own eps (with 1e-5: cosine far below)
    assert F.cosine_similarity(int8(x).flatten(), evaluated.flatten(), dim=0) > 0.999
    # The folded weights fill the int8 range their QAT ranges were learned for: each output channel reaches
    # +-127. With the scale factor at eps 1e-5 and the fold at 0.1, some reached 55.
    weights = [t for t in int8.graph_module.state_dict().values() if t.dtype == torch.int8 and t.dim() == 4]
    assert len(weights) == 2
    for weight in weights:
        assert weight.flatten(1).to(torch.int16).abs().amax(dim=1).min() >= 126
    qat.train()
    assert settings() == {(0.3, 0.1, 0.1)}
