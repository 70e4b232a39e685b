"""Dynamic INT8 of Linear and LSTM layers (BERT-style and RNN-T-style models)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch_helpers import accuracy, relative_loss, same_state, state, trained_mlp

import inc_core as inc
import inc_torch
from inc_core.errors import ConfigError, DatasetError, UnsupportedModelError
from inc_core.testing import cosine
from inc_torch.ptq import _dynamic
from inc_torch.ptq._dynamic import activation_range, has_vnni


class Transducer(nn.Module):
    """An RNN-T-shaped encoder: LSTM over features, then a Linear joint projection."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.LSTM(16, 32, num_layers=2, batch_first=True)
        self.joint = nn.Linear(32, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.joint(self.encoder(x)[0])


def test_mlp_accuracy_within_one_percent() -> None:
    model = trained_mlp()
    quantized = inc.quantize(model, inc.QuantConfig(approach="dynamic"))
    assert inc_torch.quantized_ops(quantized) == ["fc1", "fc2", "fc3"]
    for name in ("fc1", "fc2", "fc3"):
        layer = quantized.get_submodule(name)
        assert isinstance(layer, torch.ao.nn.quantized.dynamic.Linear)
        assert layer.weight().dtype == torch.qint8
    fp32, int8 = accuracy(model), accuracy(quantized)
    assert fp32 > 0.85
    assert relative_loss(fp32, int8) <= 0.01, (fp32, int8)


def test_lstm_and_linear_are_swapped_and_track_fp32() -> None:
    torch.manual_seed(0)
    model = Transducer().eval()
    before = state(model)
    space = inc.describe(model, inc.QuantConfig(approach="dynamic"))
    assert [(op.name, op.op_type) for op in space.ops] == [("encoder", "LSTM"), ("joint", "Linear")]
    assert space.options["LSTM"]["granularity"] == ("per_tensor",)
    quantized = inc.quantize(model, inc.QuantConfig(approach="dynamic"))
    assert isinstance(quantized.encoder, torch.ao.nn.quantized.dynamic.LSTM)
    assert isinstance(quantized.joint, torch.ao.nn.quantized.dynamic.Linear)
    assert same_state(state(model), before)
    x = torch.randn(4, 20, 16)
    with torch.no_grad():
        assert cosine(model(x).numpy(), quantized(x).numpy()) >= 0.99


@pytest.mark.parametrize(("granularity", "qscheme"), [("per_channel", torch.per_channel_affine), ("per_tensor", torch.per_tensor_affine)])
def test_linear_granularity(granularity: str, qscheme: torch.qscheme) -> None:
    quantized = inc.quantize(trained_mlp(), inc.QuantConfig(approach="dynamic", granularity=granularity))
    assert quantized.fc1.weight().qscheme() == qscheme


def test_excluded_layer_stays_float() -> None:
    config = inc.QuantConfig(approach="dynamic", exclude=inc.LayerFilter(names=("fc3",)))
    quantized = inc.quantize(trained_mlp(), config)
    assert type(quantized.fc3) is nn.Linear
    assert inc_torch.quantized_ops(quantized) == ["fc1", "fc2"]


def test_dynamic_needs_no_tracing() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) if x.sum() > 0 else self.b(x)

    quantized = inc.quantize(Branchy().eval(), inc.QuantConfig(approach="dynamic"))
    assert inc_torch.quantized_ops(quantized) == ["a", "b"]
    out = quantized(torch.ones(2, 8))
    assert out.shape == (2, 8) and np.isfinite(out.detach().numpy()).all()


class Identity(nn.Module):
    """One Linear whose weight is the identity: its INT8 output is the input's quantization, dequantized."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(width))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


# x = k/255 for k in 0..255: exact on the full u8 grid (scale 1/255), while the 7-bit grid (scale 1/127)
# rounds most of them. An identity Linear outputs the quantized input times its int8 weight's diagonal.
_X = (torch.arange(256, dtype=torch.float32) / 255).reshape(1, 256)
_SEVEN_BIT = torch.round(_X * 127) / 127
AVX2_ONLY = frozenset({"fpu", "sse2", "avx2", "fma"})
VNNI = frozenset({"fpu", "sse2", "avx2", "avx512f", "avx512bw", "avx512_vnni"})


def _fake_cpu(monkeypatch: pytest.MonkeyPatch, flags: frozenset[str]) -> None:
    monkeypatch.setattr(_dynamic, "cpu_flags", lambda: flags)


def _expected(quantized: nn.Module, full_range: bool) -> torch.Tensor:
    diagonal = quantized.fc.weight().dequantize().diagonal()
    return (_X if full_range else _SEVEN_BIT) * diagonal


def test_auto_activation_range_follows_the_cpu(tmp_path: Path) -> None:
    assert (_X - _SEVEN_BIT).abs().max() > 1e-3
    quantized = inc.quantize(Identity(256).eval(), inc.QuantConfig(approach="dynamic"))
    assert isinstance(quantized.fc, torch.ao.nn.quantized.dynamic.Linear)
    assert activation_range(quantized) == ("full_range" if has_vnni() else "reduce_range")
    expected = _expected(quantized, has_vnni())  # VNNI accumulates in int32: the eighth bit is safe
    assert inc_torch.quantized_ops(quantized) == ["fc"]
    with torch.no_grad():
        torch.testing.assert_close(quantized(_X), expected, atol=1e-6, rtol=0)
        loaded = inc.load(inc.save(quantized, tmp_path / "identity.pt"))  # TorchScript keeps the range
        assert inc_torch.quantized_ops(loaded) == ["fc"]
        torch.testing.assert_close(loaded(_X), expected, atol=1e-6, rtol=0)


def test_reduce_range_is_the_same_on_every_cpu() -> None:
    backend = inc_torch.TorchBackend(dynamic_activations="reduce_range")
    quantized = inc.quantize(Identity(256).eval(), inc.QuantConfig(approach="dynamic"), backend=backend)
    assert activation_range(quantized) == "reduce_range"
    with torch.no_grad():
        torch.testing.assert_close(quantized(_X), _expected(quantized, False), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("flags", "expected"), [(VNNI, "full_range"), (AVX2_ONLY, "reduce_range")])
def test_auto_picks_the_range_from_the_cpu_flags(monkeypatch: pytest.MonkeyPatch, flags: frozenset[str], expected: str) -> None:
    _fake_cpu(monkeypatch, flags)
    quantized = inc.quantize(Identity(8).eval(), inc.QuantConfig(approach="dynamic"))
    assert activation_range(quantized) == expected


def test_full_range_is_refused_on_a_cpu_without_vnni(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cpu(monkeypatch, AVX2_ONLY)
    model = trained_mlp()
    before = state(model)
    backend = inc_torch.TorchBackend(dynamic_activations="full_range")
    with pytest.raises(ConfigError, match=r"avx512_vnni.*dynamic_activations='reduce_range'"):
        inc.quantize(model, inc.QuantConfig(approach="dynamic"), backend=backend)
    assert same_state(state(model), before)


def test_op_errors_measure_the_chosen_range(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cpu(monkeypatch, VNNI)
    model = Identity(256).eval()
    data = inc.Dataset(_X.repeat(4, 1).numpy(), batch_size=2)  # exact on the 8-bit grid, rounded on the 7-bit one
    config = inc.QuantConfig(approach="dynamic")
    errors = {
        choice: inc_torch.TorchBackend(dynamic_activations=choice).op_errors(model, config, calibration=None, dataset=data)["fc"]
        for choice in ("full_range", "reduce_range")
    }
    with torch.no_grad():
        for choice, error in errors.items():
            layer = _dynamic.quantize_one(model.fc, "per_channel", choice)
            assert error == pytest.approx(float(((layer(_X) - model.fc(_X)) ** 2).mean()), rel=1e-3), choice
    # The int8 weight's own error (its diagonal is 254/255) is common to both; the eighth bit removes the rest.
    assert errors["full_range"] < errors["reduce_range"] - 1e-6, errors


@pytest.mark.parametrize("value", ["full", "", None, 8])
def test_bad_dynamic_activations_is_a_config_error(value: object) -> None:
    with pytest.raises(ConfigError, match="reduce_range"):
        inc_torch.TorchBackend(dynamic_activations=value)  # type: ignore[arg-type]


def test_full_range_model_loaded_on_a_cpu_without_vnni_falls_back_to_seven_bits(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_cpu(monkeypatch, VNNI)  # quantized on a VNNI host
    backend = inc_torch.TorchBackend(dynamic_activations="full_range")
    quantized = inc.quantize(Identity(256).eval(), inc.QuantConfig(approach="dynamic"), backend=backend)
    path = inc.save(quantized, tmp_path / "identity.pt")
    extra = {"inc.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    assert '"dynamic_activations": "full_range"' in extra["inc.json"].decode()

    _fake_cpu(monkeypatch, AVX2_ONLY)  # loaded on an AVX2-only host: the 8-bit path would overflow
    with pytest.warns(UserWarning, match=r"identity\.pt.*full-range.*1 dynamic Linear layer.*7 bits"):
        loaded = inc.load(path)
    assert activation_range(loaded) == "reduce_range"
    with torch.no_grad():
        torch.testing.assert_close(loaded(_X), _expected(quantized, False), atol=1e-6, rtol=0)

    _fake_cpu(monkeypatch, VNNI)  # and on a VNNI host it keeps its 8 bits, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        again = inc.load(path)
    assert activation_range(again) == "full_range"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu sse2 avx2 avx512f avx512bw avx512_vnni", True),
        ("fpu sse2 avx2 avx_vnni", True),
        ("fpu sse2 avx2 avx512f avx512bw", False),  # AVX-512 without VNNI still adds in int16
        ("fpu sse2 avx2 avx512_vnni_extra", False),  # whole flags only
    ],
)
def test_has_vnni_reads_the_cpu_flags(tmp_path: Path, flags: str, expected: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\n")
    assert has_vnni(cpuinfo) is expected


def test_has_vnni_without_cpuinfo_keeps_seven_bits(tmp_path: Path) -> None:
    assert has_vnni(tmp_path / "missing") is False


class WindowAttention(nn.Module):
    """Hands its Linear layers' weights to a function and never calls them (torchvision's Swin Transformer)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = nn.functional.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        attended = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
        return nn.functional.linear(attended, self.proj.weight, self.proj.bias)


class DtypeReader(nn.Module):
    """Reads its Linear layer's weight and calls it (Hugging Face T5's feed-forward casts to the weight's dtype)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = WindowAttention()
        self.wo = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(x)
        if isinstance(self.wo.weight, torch.Tensor) and x.dtype != self.wo.weight.dtype:
            x = x.to(self.wo.weight.dtype)
        return self.wo(x)


def test_layers_whose_weight_the_code_around_them_computes_with_stay_float() -> None:
    torch.manual_seed(0)
    model = DtypeReader().eval()
    config = inc.QuantConfig(approach="dynamic")
    assert inc.describe(model, config).names == ("wo",)
    quantized = inc.quantize(model, config)
    assert inc_torch.quantized_ops(quantized) == ["wo"]
    assert isinstance(quantized.attn.qkv, nn.Linear) and isinstance(quantized.attn.proj, nn.Linear)
    x = torch.randn(2, 6, 16)
    with torch.no_grad():  # swapped, the window attention's layers would make F.linear refuse a method as weight
        assert cosine(model(x).numpy(), quantized(x).numpy()) >= 0.99


class KeywordWeightAttention(nn.Module):
    """Calls its qkv layer on one branch and hands its weight to F.linear by keyword on the other (timm's BEiT)."""

    def __init__(self, q_bias: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48, bias=False)
        self.q_bias = nn.Parameter(torch.randn(16) * 0.1) if q_bias else None
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            qkv_bias = torch.cat((self.q_bias, torch.zeros(32)))
            qkv = nn.functional.linear(x, weight=self.qkv.weight, bias=qkv_bias)
        q, k, v = qkv.chunk(3, dim=-1)
        return self.proj(torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v)


class KeywordWeightNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = KeywordWeightAttention(q_bias=True)
        self.fc = nn.Linear(16, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x + self.attn(x))))


def test_a_layer_whose_weight_is_handed_to_a_function_on_one_branch_stays_float() -> None:
    # the module calls qkv too, so "read but never called" missed it: the INT8 model failed at its first run
    # (F.linear: argument 'weight' must be Tensor, not method), as torch.ao's own flow does on timm's BEiT
    torch.manual_seed(0)
    model = KeywordWeightNet().eval()
    quantized = inc.quantize(model, inc.QuantConfig(approach="dynamic"))
    assert sorted(inc_torch.quantized_ops(quantized)) == ["attn.proj", "fc", "head"]
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        assert cosine(model(x).numpy(), quantized(x).numpy()) >= 0.99


def test_fx_keeps_a_module_with_a_keyword_weight_call_float_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    # torch.ao's FX patterns look for the weight at args[1]: a calibration observer saw no weight and convert
    # failed ("A weight observer saw no weight"; torch.ao's own flow asserts "Dequantize index 1 exceeded ...")
    torch.manual_seed(0)
    model = KeywordWeightNet().eval()
    x = torch.randn(32, 6, 16)
    listed = inc.describe(model, inc.QuantConfig(format="fx")).names
    assert {"fc", "head"} <= set(listed) and not [n for n in listed if n.startswith("attn")]  # what it will quantize
    with caplog.at_level("WARNING", logger="inc_torch"):
        quantized = inc.quantize(model, inc.QuantConfig(format="fx"), dataset=inc.Dataset(x.numpy(), batch_size=8))
    assert "FX keeps 'attn' in FP32" in caplog.text and "format='pt2e'" in caplog.text
    assert sorted(inc_torch.quantized_ops(quantized)) == ["fc", "head"]
    with torch.no_grad():
        assert cosine(model(x).numpy(), quantized(x).numpy()) >= 0.99


def test_fx_qat_trains_a_module_with_a_keyword_weight_call_in_float(caplog: pytest.LogCaptureFixture) -> None:
    # prepare_qat accepted the model, the user trained it, and convert then failed ("Dequantize index 1 exceeded
    # reference node's arg length 1")
    torch.manual_seed(0)
    model = KeywordWeightNet().eval()
    x = torch.randn(32, 6, 16)
    with caplog.at_level("WARNING", logger="inc_torch"):
        qat = inc_torch.prepare_qat(model, inc.QATConfig(format="fx"), x[:8].numpy())
    assert "FX keeps 'attn' in FP32" in caplog.text
    optimizer = torch.optim.SGD(qat.parameters(), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        qat(x).pow(2).mean().backward()
        optimizer.step()
    converted = inc_torch.convert(qat)
    assert sorted(inc_torch.quantized_ops(converted)) == ["fc", "head"]
    with torch.no_grad():
        assert cosine(model(x).numpy(), converted(x).numpy()) >= 0.99


@pytest.mark.parametrize("padding_mask", [False, True], ids=["no_mask", "padding_mask"])
def test_transformer_encoder_runs_after_dynamic_quantization(padding_mask: bool) -> None:
    # torch's fused encoder fast path (eval, batch_first=True) reads linear1/linear2's weights as tensors
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    model = nn.Sequential()
    model.add_module("encoder", nn.TransformerEncoder(layer, 2))
    model.eval()
    before = state(model)
    quantized = inc.quantize(model, inc.QuantConfig(approach="dynamic"))
    assert sorted(inc_torch.quantized_ops(quantized)) == [f"encoder.layers.{i}.linear{j}" for i in (0, 1) for j in (1, 2)]
    x = torch.randn(3, 7, 32)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[1, 4:] = True
    kwargs = {"src_key_padding_mask": mask} if padding_mask else {}
    with torch.no_grad():
        want, got = model.encoder(x, **kwargs), quantized.encoder(x, **kwargs)
    keep = ~mask if padding_mask else torch.ones_like(mask)
    assert cosine(want[keep].numpy(), got[keep].numpy()) >= 0.99
    assert same_state(state(model), before)
    assert model.encoder.use_nested_tensor and not model.encoder.layers[0]._forward_pre_hooks  # the user's model is untouched


class Recurrent(nn.Module):
    def __init__(self, rnn: nn.Module, features: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.fc = nn.Linear(features, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x)[0])


@pytest.mark.parametrize(
    ("rnn", "features", "reason"),
    [
        (lambda: nn.LSTM(8, 16, proj_size=6, batch_first=True), 6, "proj_size"),  # swapped, it fails when run
        (lambda: nn.LSTM(8, 16, bias=False, batch_first=True), 16, "no biases"),  # torch.ao refuses to swap it
        (lambda: nn.GRU(8, 16, bias=False, batch_first=True), 16, "no biases"),
    ],
    ids=["lstm_projection", "lstm_without_bias", "gru_without_bias"],
)
def test_recurrent_layers_torch_ao_cannot_swap_stay_float(
    rnn: Any, features: int, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    model = Recurrent(rnn(), features).eval()
    config = inc.QuantConfig(approach="dynamic")
    assert inc.describe(model, config).names == ("fc",)
    with caplog.at_level("INFO", logger="inc"):
        quantized = inc.quantize(model, config)
    assert inc_torch.quantized_ops(quantized) == ["fc"]
    assert any("stay FP32 (rnn)" in r.getMessage() and reason in r.getMessage() for r in caplog.records), caplog.text
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        assert cosine(model(x).numpy(), quantized(x).numpy()) >= 0.99


def test_a_dynamic_model_that_does_not_run_on_the_given_data_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # With the layers torch.ao cannot swap offered anyway (the next construct inc does not know of yet), a
    # dataset given to inc.quantize turns the broken model into an error naming the module that failed.
    from inc_torch.ptq import _ops

    monkeypatch.setattr(_ops, "kept_in_float", lambda model, names: {})
    torch.manual_seed(0)
    model = DtypeReader().eval()
    before = state(model)
    config = inc.QuantConfig(approach="dynamic")
    x = np.random.default_rng(0).normal(size=(8, 6, 16)).astype(np.float32)
    quantized = inc.quantize(model, config)  # no data: nothing to run it on
    assert isinstance(quantized.attn.qkv, torch.ao.nn.quantized.dynamic.Linear)
    with pytest.raises(UnsupportedModelError, match=r"does not run on the first batch of the dataset at op 'attn'"):
        inc.quantize(model, config, dataset=inc.Dataset(x, batch_size=4))
    with pytest.raises(DatasetError, match="cannot run on the first batch of the dataset"):
        inc.quantize(model, config, dataset=inc.Dataset(x[..., :5], batch_size=4))  # wrong width: the data's fault
    assert same_state(state(model), before)
    monkeypatch.undo()
    assert inc_torch.quantized_ops(inc.quantize(model, config, dataset=inc.Dataset(x, batch_size=4))) == ["wo"]


def test_autotune_fails_a_dynamic_trial_whose_model_does_not_run_on_the_data(monkeypatch: pytest.MonkeyPatch) -> None:
    # The same broken model as above, found by autotune: the trial that made it fails with the op named (the
    # run goes on to the next trial), instead of the model reaching eval_fn and ending the run there.
    from inc_core.tuning import autotune
    from inc_torch.ptq import _ops

    monkeypatch.setattr(_ops, "kept_in_float", lambda model, names: {})
    torch.manual_seed(0)
    model = DtypeReader().eval()
    before = state(model)
    x = np.random.default_rng(0).normal(size=(8, 6, 16)).astype(np.float32)
    seen: list[bool] = []

    def fidelity(candidate: nn.Module) -> float:
        seen.append(isinstance(candidate.attn.qkv, torch.ao.nn.quantized.dynamic.Linear))
        with torch.no_grad():
            return cosine(model(torch.from_numpy(x)).numpy(), candidate(torch.from_numpy(x)).numpy())

    config = inc.TuningConfig(base=inc.QuantConfig(approach="dynamic"), tolerable_loss=0.05, max_trials=6)
    result = autotune(model, config, eval_fn=fidelity, dataset=inc.Dataset(x, batch_size=4))
    first = result.trials[0]
    assert first.failed and "does not run on the first batch of the dataset at op 'attn'" in (first.error or ""), first
    assert not result.trial.failed and "attn" in result.trial.change, result.trials
    assert inc_torch.quantized_ops(result.model) == ["wo"]
    assert not any(seen), seen  # eval_fn never saw the broken model
    assert same_state(state(model), before)


class ZeroedHead(nn.Module):
    """torchvision's ViT: ``__init__`` zeroes ``self.heads.head.weight``; forward calls ``self.heads``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.heads = nn.Sequential()
        self.heads.add_module("head", nn.Linear(32, 4))
        nn.init.zeros_(self.heads.head.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(torch.relu(self.fc(x)))


def test_a_layer_whose_weight_is_only_set_up_by_the_code_around_it_is_quantized() -> None:
    # A read of the weight in __init__ counted as code computing with it: ViT's classifier head stayed FP32.
    config = inc.QuantConfig(approach="dynamic")
    assert inc.describe(ZeroedHead().eval(), config).names == ("fc", "heads.head")
    assert inc_torch.quantized_ops(inc.quantize(ZeroedHead().eval(), config)) == ["fc", "heads.head"]
