"""Output fidelity of inc's static paths against the frameworks' own flows on the same model and data.

inc feeds the ranges of its own observers into torch.ao FX and torchao PT2E; on a MobileNetV3-style
network (hardswish, squeeze-excite with a shared-observer average pool and a fixed-qparams
hardsigmoid, residual add) the result must be at least as close to FP32 as each flow with its own
observers (before a shared observer was filled from every tensor it watches, inc FX erred 24 times more).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch_helpers import split

import inc_core as inc
from inc_core.testing import cosine
from inc_torch.ptq._calibration import calibrate, load_statistics
from inc_torch.ptq._capture import fx_prepare, positional
from inc_torch.ptq._fx import op_table, qconfig_mapping
from inc_torch.ptq._observers import is_activation_observer
from inc_torch.ptq._ops import quantizable_ops

CALIBRATION = 100
BATCH = 25
# "On par": inc's error (1 - cosine) at most this many times the flow's own; the two pick ranges by
# different methods (minmax here, histogram search there), so neither wins by construction.
ON_PAR = 1.5


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // 2, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(channels // 2, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.relu(self.fc1(self.avgpool(x)))))


class TinyMobileNet(nn.Module):
    """One MobileNetV3 inverted-residual block with squeeze-excite, on 1x8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Hardswish())
        self.expand = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.Hardswish())
        self.depthwise = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.Hardswish())
        self.se = SqueezeExcite(32)
        self.project = nn.Sequential(nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.se(self.depthwise(self.expand(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """Random weights, batch-norm statistics estimated on data: activations of realistic scale."""
    torch.manual_seed(0)
    net = TinyMobileNet().train()
    with torch.no_grad():
        net(torch.from_numpy(split()[0][:256]))
    return net.eval()


def _calibration_batches() -> list[torch.Tensor]:
    x = torch.from_numpy(split()[0][:CALIBRATION])
    return list(x.split(BATCH))


def _error(model: nn.Module, quantized: nn.Module) -> float:
    """1 - cosine of the logits on the held-out digits."""
    test = torch.from_numpy(split()[2])
    with torch.no_grad():
        return 1.0 - cosine(model(test).numpy(), quantized(test).numpy())


def _inc(model: nn.Module, fmt: str) -> nn.Module:
    dataset = inc.Dataset(split()[0][:CALIBRATION], batch_size=BATCH)
    return inc.quantize(model, inc.QuantConfig(format=fmt, calib_samples=CALIBRATION), dataset=dataset)


def test_fx_is_as_close_to_fp32_as_torch_ao_fx(model: nn.Module) -> None:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    batches = _calibration_batches()
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (batches[0],))
    with torch.no_grad():
        for batch in batches:
            prepared(batch)
    reference = _error(model, convert_fx(prepared))
    ours = _error(model, _inc(model, "fx"))
    assert ours <= ON_PAR * reference, (ours, reference)


def test_pt2e_is_as_close_to_fp32_as_torchao_pt2e(model: nn.Module) -> None:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    batches = _calibration_batches()
    batch_dim = {0: torch.export.Dim.AUTO}
    exported = torch.export.export(copy.deepcopy(model), (batches[0],), dynamic_shapes=(batch_dim,)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in batches:
            prepared(batch)
    reference = _error(model, convert_pt2e(prepared))
    ours = _error(model, _inc(model, "pt2e").graph_module)
    assert ours <= ON_PAR * reference, (ours, reference)


def test_a_shared_observer_covers_every_tensor_it_watches(model: nn.Module) -> None:
    """FX shares one observer between an average pool's input and output; both ranges must fit in it."""
    config = inc.QuantConfig(format="fx", calib_samples=CALIBRATION)
    dataset = inc.Dataset(split()[0][:CALIBRATION], batch_size=BATCH)
    calibration = calibrate(model, dataset, config, "fx")
    work = copy.deepcopy(model).eval()
    ops = quantizable_ops(model, config, "fx")
    prepared = fx_prepare(work, qconfig_mapping(config, ops, op_table(model)), positional(work, calibration.example))
    load_statistics(prepared, calibration)
    watched: dict[int, tuple[nn.Module, set[str]]] = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module" and is_activation_observer(prepared.get_submodule(node.target)):
            observer = prepared.get_submodule(node.target)
            watched.setdefault(id(observer), (observer, set()))[1].add(node.args[0].name)
    shared = [(observer, sources) for observer, sources in watched.values() if len(sources) > 1]
    assert any("se_avgpool" in sources for _, sources in shared), [sorted(s) for _, s in shared]
    for observer, sources in shared:
        lo, hi = observer.histogram.min, observer.histogram.max
        for source in sources:
            seen = calibration.histograms[source]
            assert lo <= seen.min and hi >= seen.max, (source, (lo, hi), (seen.min, seen.max))
        assert np.isclose(hi, max(calibration.histograms[s].max for s in sources))


class CeilPoolNet(nn.Module):
    """GoogLeNet's stem pattern: conv + ReLU, then a stride-2 max-pool with ceil_mode=True, then a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.pool(nn.functional.relu(self.conv1(x))))


def test_int8_ceil_mode_pool_keeps_its_output_size_when_compiled() -> None:
    # 24x24 pooled by 3/2: 12x12 with ceil_mode, 11x11 without. torch 2.13's INT8 max-pool lowering drops
    # ceil_mode, so the compiled model returned 11x11 maps here (and GoogLeNet a cosine of 0.66).
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    net = CeilPoolNet().eval()
    data = torch.randn(32, 3, 24, 24)
    counters.clear()  # inc.quantize compiles the model once, to check it runs
    q = inc.quantize(net, inc.QuantConfig(), dataset=inc.Dataset(data[:16].numpy(), batch_size=8))
    x = data[16:24]
    with torch.no_grad():
        expected, reference, got = net(x), q.graph_module(x), q(x)
    assert got.shape == expected.shape == (8, 8, 12, 12), (got.shape, expected.shape)
    assert cosine(got.numpy(), reference.numpy()) > 0.999  # the same int8 numerics, compiled
    assert cosine(got.numpy(), expected.numpy()) > 0.99
    assert counters["inductor"]["qmaxpool2d_matcher_count"] >= 1, "the pool no longer runs on int8 data"


def test_compiled_outputs_are_checked_against_the_graph_they_were_compiled_from(monkeypatch: pytest.MonkeyPatch) -> None:
    # A lowering defect of inductor (a kernel that reads an argument wrongly) gives a model that runs and answers
    # wrongly; inc.quantize compares the compiled output with the uncompiled graph's and refuses the model.
    from inc_torch._failures import check_compiled_agrees
    from inc_torch.ptq._compiled import CompiledQuantizedModule

    torch.manual_seed(0)
    fp32 = torch.randn(64)
    near, far = fp32 + 0.5 * torch.randn(64), fp32 + 0.5 * torch.randn(64)  # two roundings of one graph: ~0.9 each
    check_compiled_agrees(near, far, fp32, "pt2e")  # as close to FP32 as the uncompiled graph: accepted
    with pytest.raises(inc.errors.UnsupportedModelError, match=r"output 0 has shape \(63,\) instead of \(64,\)"):
        check_compiled_agrees(near[:63], far, fp32, "pt2e")
    with pytest.raises(inc.errors.UnsupportedModelError, match=r"output 1 has cosine -1.000 to the FP32 model's.*format='fx'"):
        check_compiled_agrees((near, -fp32), (far, fp32), (fp32, fp32), "pt2e")

    torch.manual_seed(0)
    net = CeilPoolNet().eval()
    data = torch.randn(16, 3, 24, 24).numpy()
    compiled_run = CompiledQuantizedModule._run
    monkeypatch.setattr(CompiledQuantizedModule, "_run", lambda self, args, kwargs: -compiled_run(self, args, kwargs))
    with pytest.raises(inc.errors.UnsupportedModelError, match=r"compiled by inductor does not compute what its graph"):
        inc.quantize(net, inc.QuantConfig(), dataset=inc.Dataset(data, batch_size=8))


def test_the_compiled_check_leaves_a_training_mode_model_untouched(model: nn.Module) -> None:
    # the check's FP32 reference is the exported graph, never the user's module: run in training mode, the module
    # itself would update its batch-norm statistics
    net = copy.deepcopy(model).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    inc.quantize(net, inc.QuantConfig(), dataset=inc.Dataset(split()[0][:50], batch_size=BATCH))
    assert net.training
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


class _InputResidual(nn.Module):
    """``head((x + down(relu(up(x)))) * s)``: the model's own input summed with an INT8 Linear's output, then a
    float multiply (a residual in front of SmoothQuant's input scaling, or any float op)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.head = nn.Linear(16, 10)
        self.register_buffer("scale", torch.rand(16) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x + self.down(torch.relu(self.up(x)))) * self.scale)


def _without_the_correction(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a torch whose inductor lacks the check inc corrects (it is private): inc's fallbacks must hold."""
    import inc_torch.ptq._inplace_sums

    monkeypatch.setattr(inc_torch.ptq._inplace_sums, "_fusion_module", lambda: None)


# corrected: inductor kept from summing into the input; copies: without the correction, the compiled model is given
# copies of inputs the graph pattern says it would overwrite; check: neither, a lowering the pattern does not
# predict, caught when the returned model is checked
@pytest.mark.parametrize(
    ("runtime", "protection"), [("compile", "corrected"), ("aoti", "corrected"), ("compile", "copies"), ("compile", "check")]
)
def test_the_callers_input_and_calibration_data_stay_as_they_were(
    runtime: str, protection: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """inductor summed the INT8 Linear's output into the caller's tensor in place (oneDNN's sum post-op on a graph
    input): every call overwrote the input with the residual sum, and inc's own check run overwrote the first
    calibration batch, the user's array."""
    if protection != "corrected":
        _without_the_correction(monkeypatch)
    if protection == "check":
        import inc_torch.ptq._inplace_sums

        monkeypatch.setattr(inc_torch.ptq._inplace_sums, "sums_inputs_with_linears", lambda graph_module: False)
    data = np.random.default_rng(0).normal(size=(64, 4, 16)).astype(np.float32)
    kept = data.copy()
    model = _InputResidual().eval()
    quantized = inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset(data, batch_size=16))
    np.testing.assert_array_equal(data, kept)  # the calibration arrays
    # corrected, the compiled program reads the caller's tensor without a copy per call
    assert quantized.__dict__["_copies_inputs"] is (protection != "corrected")
    quantized.runtime = runtime
    x = torch.from_numpy(data[:16])
    with torch.no_grad():
        out = quantized(x)
        assert torch.equal(x, torch.from_numpy(kept[:16]))
        assert torch.equal(quantized(x), out)  # the same input, the same output
        assert cosine(model(x).numpy(), out.numpy()) > 0.99


class _PositionedProjection(nn.Module):
    """``head((proj(x) + pos) * scale)``: a learned table of the projection's output shape (batch 1) added to an INT8
    Linear's output, then a float op."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.pos = nn.Parameter(torch.randn(1, 8, 16))
        self.register_buffer("scale", torch.rand(16) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.proj(x) + self.pos) * self.scale)


def test_an_int8_linear_summed_with_a_constant_gives_the_same_outputs_on_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """inductor summed the INT8 Linear's output into the model's table in place: the first call was right and each
    later one added the projection again (cosine 0.66 to FP32 by the third call), and that model was returned.

    Without the correction (a torch where inc cannot make it) such a model is refused, naming the way out. That
    attempt runs first on purpose: were its compiled program kept in inductor's FX graph cache (torch 2.13 bypasses
    that cache for these graphs, their prepacked oneDNN weights cannot be pickled), the corrected compile after it
    must not be served it."""
    import inc_torch

    data = np.random.default_rng(0).normal(size=(16, 8, 16)).astype(np.float32)
    model = _PositionedProjection().eval()
    x = torch.from_numpy(data[:1])
    with monkeypatch.context() as uncorrected:
        _without_the_correction(uncorrected)
        with pytest.raises(inc.errors.UnsupportedModelError, match=r"other outputs on a second call.*: proj\)") as caught:
            inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset(data, batch_size=1))
        assert "exclude=inc.LayerFilter(names=('proj',))" in str(caught.value)
        # the way out it names: that Linear in FP32, the head in INT8, outputs the same on every call
        kept_float = inc.quantize(
            model, inc.QuantConfig(exclude=inc.LayerFilter(names=("proj",))), dataset=inc.Dataset(data, batch_size=1)
        )
        with torch.no_grad():
            outputs = [kept_float(x) for _ in range(3)]
            assert all(torch.equal(outputs[0], o) for o in outputs[1:])
            assert cosine(model(x).numpy(), outputs[-1].numpy()) > 0.99
    quantized = inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset(data, batch_size=1))
    assert {"proj", "head"} <= set(inc_torch.quantized_ops(quantized))
    with torch.no_grad():
        outputs = [quantized(x) for _ in range(3)]
        assert all(torch.equal(outputs[0], o) for o in outputs[1:])
        assert cosine(model(x).numpy(), outputs[-1].numpy()) > 0.99


def test_the_in_place_sum_correction_keeps_the_users_post_grad_passes_and_marks_the_cache_key() -> None:
    import torch._inductor.config as inductor_config
    from torch._inductor.custom_graph_pass import CustomGraphPass

    from inc_torch.ptq import _inplace_sums
    from inc_torch.ptq._aoti_cache import int8_inductor

    class UsersPass(CustomGraphPass):
        def __call__(self, graph: torch.fx.graph.Graph) -> None:
            return None

        def uuid(self) -> str:
            return "the user's pass"

    with inductor_config.patch(post_grad_custom_post_pass=None), int8_inductor():
        assert inductor_config.post_grad_custom_post_pass.uuid() == _inplace_sums.CACHE_MARK
    users = UsersPass()
    with inductor_config.patch(post_grad_custom_post_pass=users):
        with int8_inductor():
            passes = inductor_config.post_grad_custom_post_pass
            assert passes[0] is users
            assert [p.uuid() for p in passes] == ["the user's pass", _inplace_sums.CACHE_MARK]
        assert inductor_config.post_grad_custom_post_pass is users
