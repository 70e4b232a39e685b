"""BF16 mixed precision on the PT2E path: chosen ops run BF16 kernels, in memory and in the saved .pt2."""

from __future__ import annotations

import pytest
import torch
from torch_helpers import accuracy, calib_data, int8_breaking_mlp, split, stand_in_bf16_cpu, trained_cnn, trained_mlp

import inc_core as inc
import inc_torch
from inc_core.errors import ConfigError
from inc_torch.ptq import _bf16


@pytest.fixture
def bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in_bf16_cpu(monkeypatch)


def _test_inputs() -> torch.Tensor:
    _, _, x, _ = split()
    return torch.from_numpy(x)


def _saved_bf16_ops(path: str) -> dict[str, int]:
    """Per aten op, the conv/linear nodes of the saved program whose output is BF16."""
    from inc_torch._compat import torchao_pt2e

    torchao_pt2e()  # registers the quantize/dequantize ops the program refers to
    program = torch.export.load(path)
    counts: dict[str, int] = {}
    for node in program.graph.nodes:
        value = node.meta.get("val")
        name = str(node.target)
        if node.op == "call_function" and name.startswith("aten.") and isinstance(value, torch.Tensor):
            op = name.split(".")[1]
            if op in ("linear", "conv2d") and value.dtype == torch.bfloat16:
                counts[op] = counts.get(op, 0) + 1
    return counts


@pytest.mark.usefixtures("bf16_cpu")
def test_chosen_ops_run_bf16_in_memory_and_in_the_saved_file(tmp_path) -> None:
    model = trained_cnn()
    fp32_accuracy = accuracy(model)
    config = inc.QuantConfig(bf16=inc.LayerFilter(names=("conv2", "fc1")))
    q = inc.quantize(model, config, dataset=calib_data(128))

    assert inc_torch.bf16_ops(q) == ["conv2", "fc1"]
    assert inc_torch.quantized_ops(q) == ["conv1", "fc2"]  # BF16 ops are not counted as INT8
    # conv1 -> torch.relu -> pool: the relu fuses into the INT8 conv, so the pool after it runs INT8 too
    assert inc.get_backend("torch").int8_op_counts(q) == {"conv2d": 1, "max_pool2d": 1, "linear": 1}
    weights = {name: t.dtype for name, t in q.graph_module.state_dict().items()}
    assert sum(dtype == torch.bfloat16 for dtype in weights.values()) == 4  # conv2 and fc1 weight + bias
    assert "conv2.weight" not in weights and "fc1.weight" not in weights  # no FP32 copy left behind
    assert accuracy(q) >= fp32_accuracy - 0.02

    path = tmp_path / "mixed.pt2"
    inc.save(q, path)
    assert _saved_bf16_ops(str(path)) == {"conv2d": 1, "linear": 1}
    loaded = inc.load(path)
    assert inc_torch.bf16_ops(loaded) == ["conv2", "fc1"] and inc_torch.quantized_ops(loaded) == ["conv1", "fc2"]
    x = _test_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), q(x), rtol=1e-3, atol=1e-3)


@pytest.mark.usefixtures("bf16_cpu")
def test_bf16_outputs_stay_close_to_fp32_fallback() -> None:
    model = trained_mlp()
    names = ("fc1", "fc2")
    bf16 = inc.quantize(model, inc.QuantConfig(bf16=inc.LayerFilter(names=names)), dataset=calib_data(128))
    fp32 = inc.quantize(model, inc.QuantConfig(exclude=inc.LayerFilter(names=names)), dataset=calib_data(128))
    assert inc_torch.bf16_ops(bf16) == ["fc1", "fc2"] and inc_torch.bf16_ops(fp32) == []
    x = _test_inputs()
    with torch.no_grad():
        a, b, ref = bf16(x), fp32(x), model(x)
    assert not torch.equal(a, b)  # the BF16 kernels really ran: their rounding differs from FP32's
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert float(cosine.min()) > 0.995
    assert float((a.argmax(1) == b.argmax(1)).float().mean()) >= 0.98
    assert float(torch.nn.functional.cosine_similarity(a, ref, dim=1).mean()) > 0.99


@pytest.mark.usefixtures("bf16_cpu")
def test_exclude_wins_over_bf16() -> None:
    model = trained_cnn()
    config = inc.QuantConfig(bf16=inc.LayerFilter(types=("Linear",)), exclude=inc.LayerFilter(names=("fc1",)))
    assert config.precision("fc1", "Linear") == "fp32" and config.precision("fc2", "Linear") == "bf16"
    q = inc.quantize(model, config, dataset=calib_data(64))
    assert inc_torch.bf16_ops(q) == ["fc2"]
    assert inc_torch.quantized_ops(q) == ["conv1", "conv2"]  # fc1 is neither INT8 nor BF16: FP32


@pytest.mark.usefixtures("bf16_cpu")
def test_every_op_out_of_int8_is_refused_and_the_message_counts_the_bf16_ones() -> None:
    from inc_core.errors import UnsupportedModelError

    model = trained_cnn()
    config = inc.QuantConfig(bf16=inc.LayerFilter(types=("Linear",)), exclude=inc.LayerFilter(types=("Conv2d",)))
    with pytest.raises(UnsupportedModelError, match=r"Every quantizable op \(4\) is excluded \(exclude=\) or run in BF16 \(bf16=: 2\)"):
        inc.quantize(model, config, dataset=calib_data(32))


def test_formats_without_bf16_ops_refuse_it_and_name_pt2e() -> None:
    model = trained_mlp()
    with pytest.raises(ConfigError, match=r"format='fx'.*format='pt2e'.*exclude="):
        inc.quantize(model, inc.QuantConfig(format="fx", bf16=inc.LayerFilter(names=("fc1",))), dataset=calib_data(32))
    with pytest.raises(ConfigError, match=r"approach='dynamic'.*approach='static'"):
        inc.quantize(model, inc.QuantConfig(approach="dynamic", bf16=inc.LayerFilter(names=("fc1",))))
    tuning = inc.TuningConfig(base=inc.QuantConfig(format="fx"), fallback_precision="bf16")
    with pytest.raises(ConfigError, match=r"format='fx'.*fallback_precision='fp32'"):
        inc.autotune(model, tuning, eval_fn=accuracy, dataset=calib_data(32))


def test_bf16_detection_agrees_with_the_cpu_flags() -> None:
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        flags = {word for line in cpuinfo if line.startswith("flags") for word in line.split(":", 1)[1].split()}
    missing = _bf16.cpu_bf16_missing()
    if flags & _bf16.BF16_FLAGS:
        assert missing is None or "oneDNN reports no BF16" in missing
    else:  # e.g. an AMD EPYC before Zen 4, or a Xeon whose hypervisor hides AVX512-BF16/AMX
        assert missing is not None and "no BF16 instructions" in missing
        with pytest.raises(ConfigError, match=r"no BF16 instructions.*Keep those ops in FP32 with exclude="):
            inc.quantize(trained_mlp(), inc.QuantConfig(bf16=inc.LayerFilter(names=("fc1",))), dataset=calib_data(32))


def test_cpu_without_bf16_instructions_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_bf16, "_cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_vnni"}))
    with pytest.raises(ConfigError, match=r"no BF16 instructions.*amx_bf16, avx512_bf16"):
        inc.quantize(trained_mlp(), inc.QuantConfig(bf16=inc.LayerFilter(names=("fc1",))), dataset=calib_data(32))


@pytest.mark.usefixtures("bf16_cpu")
def test_autotune_puts_the_layer_int8_breaks_into_bf16(tmp_path) -> None:
    model = int8_breaking_mlp()
    base = inc.QuantConfig()
    fixed = {key: (str(getattr(base, key)),) for key in ("calibration", "granularity", "scheme", "activation_dtype")}
    config = inc.TuningConfig(  # settings held at the base: only the fallback is searched
        base=base, strategy="mse", tolerable_loss=0.02, max_trials=4, history=None, search_space=fixed,
        fallback_precision="bf16",
    )
    result = inc.autotune(model, config, eval_fn=accuracy, dataset=calib_data(128))
    assert result.met
    assert result.trials[0].change == "base" and result.trials[0].score < 0.5  # all-INT8 loses fc2's input
    assert "bf16: fc2" in result.trials[-1].change
    assert result.precisions == {"fc1": "int8", "fc2": "bf16", "fc3": "int8"}
    assert inc_torch.bf16_ops(result.model) == ["fc2"] and inc_torch.quantized_ops(result.model) == ["fc1", "fc3"]
    report = result.report(tmp_path / "report.md").read_text()
    assert "| bf16 | 1: fc2 |" in report
