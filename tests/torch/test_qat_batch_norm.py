"""QAT and batch norms: eps and momentum kept, freezing, functional and non-affine batch norms, folding, resuming.

Split from test_qat.py, so that the two pytest workers share the QAT tests.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_helpers import DigitsCNN, same_state, split, state, trained_cnn

import inc_core as inc
import inc_torch
from inc_core.errors import UnsupportedModelError


def _example() -> torch.Tensor:
    x, _, _, _ = split()
    return torch.from_numpy(x[:4])


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


def test_pt2e_prepare_qat_exports_conv_bn_patterns_only_for_the_conv_kinds_feeding_a_batch_norm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """prepare_qat_pt2e exported torchao's conv + batch-norm pattern and its two QAT replacements for each of four conv
    kinds (1.9 s -> 1.0 s per prepare_qat of the digits CNN); the graph must stay the one torchao writes."""
    import contextlib

    from torchao.quantization.pt2e import qat_utils

    from inc_torch.qat import _qat

    exported_kinds: list[str] = []
    torchao_export = qat_utils._get_aten_graph_module_for_pattern

    def counting_export(pattern: object, example_inputs: tuple[torch.Tensor, ...], *args: object, **kwargs: object) -> object:
        exported_kinds.append(f"{example_inputs[0].dim() - 2}d")
        return torchao_export(pattern, example_inputs, *args, **kwargs)

    monkeypatch.setattr(qat_utils, "_get_aten_graph_module_for_pattern", counting_export)
    torch.manual_seed(0)
    ours = inc_torch.prepare_qat(trained_cnn(), inc.QATConfig(), _example())
    # one conv kind (conv2d) feeds batch norms: its pattern and the two replacements, nothing for the others
    assert exported_kinds == ["2d", "2d", "2d"]
    assert qat_utils._fuse_conv_bn_qat_helper.__module__ == qat_utils.__name__, "prepare_qat left torchao patched"

    exported_kinds.clear()
    monkeypatch.setattr(_qat, "fusing_only_present_conv_bn_pairs", contextlib.nullcontext)
    torch.manual_seed(0)
    theirs = inc_torch.prepare_qat(trained_cnn(), inc.QATConfig(), _example())
    assert len(exported_kinds) == 12  # torchao's four kinds, unpatched
    assert ours.code == theirs.code
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    assert all(torch.equal(ours_state[k], theirs_state[k]) for k in ours_state)
    x = _example()
    ours(x).sum().backward()
    theirs(x).sum().backward()
    assert torch.equal(ours.eval()(x), theirs.eval()(x))


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
        # each sample by the running statistics, not its batch's (batch statistics moved outputs by 0.74 of ~1.5); the
        # tolerance takes a fake-quant rounding step flipped by another kernel choice for another batch size on another CPU
        torch.testing.assert_close(qat(x[:2]), evaluated[:2], atol=0.05, rtol=0)
    assert F.cosine_similarity(evaluated.flatten(), reference.flatten(), dim=0) > 0.99
    int8 = inc_torch.convert(qat)
    with torch.no_grad():
        outputs = int8(x)
        torch.testing.assert_close(int8(x[:2]), outputs[:2], atol=0.05, rtol=0)
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
        torch.testing.assert_close(qat(x[:2]), evaluated[:2], atol=0.05, rtol=0)  # running statistics in eval
    assert F.cosine_similarity(evaluated.flatten(), reference.flatten(), dim=0) > 0.99  # three small steps apart
    int8 = inc_torch.convert(qat)
    with torch.no_grad():
        outputs = int8(x)
        torch.testing.assert_close(int8(x[:2]), outputs[:2], atol=0.05, rtol=0)
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
