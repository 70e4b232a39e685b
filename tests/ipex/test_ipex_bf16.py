"""BF16 mixed precision on backend="ipex": chosen ops run IPEX's BF16 kernels, in memory and in the saved file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch_helpers import (
    accuracy,
    calib_data,
    int8_breaking_mlp,
    same_state,
    split,
    stand_in_bf16_cpu,
    state,
    trained_cnn,
    trained_mlp,
)

import inc_core as inc
import inc_torch
from inc_core.errors import ConfigError


@pytest.fixture(autouse=True)
def bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in_bf16_cpu(monkeypatch)


def _inputs() -> torch.Tensor:
    return torch.from_numpy(split()[2])


def _bf16_weights(model: torch.jit.ScriptModule) -> int:
    """BF16 tensors the frozen graph holds as constants (the weights and biases of its BF16 ops)."""
    count = 0
    for node in model.graph.nodes():
        if node.kind() == "prim::Constant" and node.output().type().kind() == "TensorType":
            value = node.output().toIValue()
            count += isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16
    return count


def _kernel_inputs(model: torch.jit.ScriptModule) -> dict[str, list[str]]:
    """For each prepacked FP32/BF16 kernel IPEX's passes chose, the dtype its input was cast to ("bf16"/"fp32")."""
    with torch.no_grad():
        graph = model.graph_for(_inputs()[:4])
    found: dict[str, list[str]] = {}
    for node in graph.nodes():
        if node.kind().startswith("ipex_prepack::") and node.kind().endswith("_run"):
            source = node.inputsAt(0).node()
            cast = source.kind() == "aten::to" and source.inputsAt(1).toIValue() == 15
            found.setdefault(node.kind(), []).append("bf16" if cast else "fp32")
    return found


def test_chosen_ops_run_bf16_kernels_and_survive_save_and_load(tmp_path: Path) -> None:
    model = trained_cnn()
    before = state(model)
    config = inc.QuantConfig(bf16=inc.LayerFilter(names=("conv2", "fc1")))
    q = inc.quantize(model, config, dataset=calib_data(), backend="ipex")

    assert inc_torch.bf16_ops(q) == ["conv2", "fc1"]
    assert inc.get_backend("ipex").int8_op_counts(q) == {"convolution": 1, "linear": 1}
    assert inc_torch.quantized_ops(q) == ["conv1", "fc2"]
    assert _bf16_weights(q) == 4  # conv2 and fc1 weight + bias; freezing dropped their FP32 copies
    kernels = _kernel_inputs(q)
    assert sorted(k for k, dtypes in kernels.items() for d in dtypes if d == "bf16") == [
        "ipex_prepack::convolution_run", "ipex_prepack::linear_run"
    ]
    assert accuracy(q) >= accuracy(model) - 0.02
    assert same_state(state(model), before)

    loaded = inc.load(inc.save(q, tmp_path / "mixed.pt", backend="ipex"))
    assert inc_torch.bf16_ops(loaded) == ["conv2", "fc1"] and inc_torch.quantized_ops(loaded) == ["conv1", "fc2"]
    x = _inputs()
    with torch.no_grad():
        for _ in range(2):  # IPEX's fusion passes run on the first calls
            loaded(x)
        torch.testing.assert_close(loaded(x), q(x), rtol=1e-3, atol=1e-3)


def test_bf16_outputs_stay_close_to_fp32_fallback() -> None:
    model = trained_mlp()
    names = ("fc1", "fc2")
    bf16 = inc.quantize(model, inc.QuantConfig(bf16=inc.LayerFilter(names=names)), dataset=calib_data(), backend="ipex")
    fp32 = inc.quantize(model, inc.QuantConfig(exclude=inc.LayerFilter(names=names)), dataset=calib_data(), backend="ipex")
    assert inc_torch.bf16_ops(bf16) == ["fc1", "fc2"] and inc_torch.bf16_ops(fp32) == []
    assert inc.get_backend("ipex").int8_op_counts(bf16) == {"linear": 1} == inc.get_backend("ipex").int8_op_counts(fp32)
    x = _inputs()
    with torch.no_grad():
        for _ in range(2):
            bf16(x), fp32(x)
        a, b, ref = bf16(x), fp32(x), model(x)
    assert not torch.equal(a, b)  # the BF16 kernels really ran: their rounding differs from FP32's
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=1).min()) > 0.995
    assert float((a.argmax(1) == b.argmax(1)).float().mean()) >= 0.98
    assert float(torch.nn.functional.cosine_similarity(a, ref, dim=1).mean()) > 0.99


def test_dynamic_ipex_refuses_bf16_and_says_where_it_runs() -> None:
    with pytest.raises(ConfigError, match=r"approach='dynamic'.*backend='ipex'"):
        inc.quantize(trained_mlp(), inc.QuantConfig(approach="dynamic", bf16=inc.LayerFilter(names=("fc1",))), backend="ipex")


def test_a_bf16_name_matching_no_op_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"fc9"):
        inc.quantize(trained_mlp(), inc.QuantConfig(bf16=inc.LayerFilter(names=("fc9",))), dataset=calib_data(32), backend="ipex")


def test_autotune_puts_the_layer_int8_breaks_into_bf16_on_ipex() -> None:
    model = int8_breaking_mlp()
    base = inc.QuantConfig()
    fixed = {key: (str(getattr(base, key)),) for key in ("calibration", "granularity", "scheme", "activation_dtype")}
    config = inc.TuningConfig(  # settings held at the base: only the fallback is searched
        base=base, strategy="basic", tolerable_loss=0.02, max_trials=6, history=None, search_space=fixed,
        fallback_precision="bf16",
    )
    result = inc.autotune(model, config, eval_fn=accuracy, dataset=calib_data(), backend="ipex")
    assert result.met
    assert result.trials[0].change == "base" and result.trials[0].score < 0.5  # all-INT8 loses fc2's input
    assert result.precisions["fc2"] == "bf16" and "fp32" not in result.precisions.values()
    assert "fc2" in inc_torch.bf16_ops(result.model)
