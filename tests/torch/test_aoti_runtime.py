"""The PT2E model's AOTInductor runtime (``runtime="aoti"``): same INT8 kernels and outputs, no Python guards."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_helpers import accuracy, calib_data, relative_loss, split, trained_cnn

import inc_core as inc
import inc_torch


@pytest.fixture(scope="module", autouse=True)
def aoti_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A cache folder of this module's own, so that the first compilation here is a real one."""
    folder = tmp_path_factory.mktemp("aoti_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INC_AOTI_CACHE_DIR", str(folder))
        yield folder


def programs(model: inc_torch.CompiledQuantizedModule) -> list:
    return list(model.__dict__["_programs"].values())


@pytest.fixture(scope="module")
def quantized() -> inc_torch.CompiledQuantizedModule:
    return inc.quantize(trained_cnn(), inc.QuantConfig(), dataset=calib_data())


@pytest.fixture(scope="module")
def on_aoti(quantized: inc_torch.CompiledQuantizedModule) -> inc_torch.CompiledQuantizedModule:
    model = copy.deepcopy(quantized)
    model.runtime = "aoti"
    return model


def test_default_runtime_is_torch_compile(quantized: inc_torch.CompiledQuantizedModule) -> None:
    assert quantized.runtime == "compile"
    assert "runtime='compile'" in repr(quantized)


def test_aoti_runs_the_same_int8_graph_as_torch_compile(
    quantized: inc_torch.CompiledQuantizedModule, on_aoti: inc_torch.CompiledQuantizedModule
) -> None:
    x = torch.from_numpy(split()[2])  # held-out digits, one shape for both runtimes
    with torch.no_grad():
        expected = quantized(x)
        got = on_aoti(x)
    assert on_aoti.__dict__["_programs"], "runtime='aoti' did not build an AOTInductor program"
    assert all(program is not None for program in on_aoti.__dict__["_programs"].values()), "AOTInductor fell back to torch.compile"
    # Same inductor lowering and oneDNN INT8 kernels: equal up to float summation order.
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), float((got - expected).abs().max())
    assert relative_loss(accuracy(trained_cnn()), accuracy(on_aoti)) < 0.02


def test_aoti_model_saves_and_loads_on_aoti_from_the_cache(on_aoti: inc_torch.CompiledQuantizedModule, aoti_cache: Path, tmp_path: Path) -> None:
    x = torch.from_numpy(split()[2])
    path = tmp_path / "model.pt2"
    inc.save(on_aoti, path)
    loaded = inc.load(path)
    assert isinstance(loaded, inc_torch.CompiledQuantizedModule)
    assert loaded.runtime == "aoti", "the runtime recorded in the .pt2 was not restored"
    with torch.no_grad():
        first = loaded(x)
        # int8 kernels on both sides: the loaded graph compiles to the same library code
        np.testing.assert_allclose(first.numpy(), on_aoti(x).numpy(), rtol=1e-4, atol=1e-4)
    assert [p.from_cache for p in programs(loaded)] == [False], "a graph never compiled before came from the cache"
    entries = sorted(aoti_cache.glob("*.pt2"))
    assert len(entries) == 2, entries  # on_aoti's graph and the loaded one

    again = inc.load(path)  # e.g. a service restarting: the package is loaded, not compiled
    with torch.no_grad():
        second = again(x)
    assert [p.from_cache for p in programs(again)] == [True]
    np.testing.assert_allclose(second.numpy(), first.numpy(), rtol=1e-5, atol=1e-5)

    for entry in entries:  # a damaged entry is compiled again, never trusted
        entry.write_bytes(b"not a package")
    damaged = inc.load(path)
    with torch.no_grad():
        third = damaged(x)
    assert [p.from_cache for p in programs(damaged)] == [False]
    np.testing.assert_allclose(third.numpy(), first.numpy(), rtol=1e-5, atol=1e-5)
    restored = inc.load(path)  # the package compiled in place of the damaged entry serves the next load
    with torch.no_grad():
        restored(x)
    assert [p.from_cache for p in programs(restored)] == [True]


def test_default_runtime_model_loads_on_the_default(quantized: inc_torch.CompiledQuantizedModule, tmp_path: Path) -> None:
    path = tmp_path / "model.pt2"
    inc.save(quantized, path)
    assert inc.load(path).runtime == "compile"


def test_unknown_runtime_is_a_config_error(quantized: inc_torch.CompiledQuantizedModule) -> None:
    model = copy.deepcopy(quantized)
    with pytest.raises(inc.errors.ConfigError, match="runtime must be one of 'compile', 'aoti', got 'jit'"):
        model.runtime = "jit"
    assert model.runtime == "compile"
    with pytest.raises(inc.errors.ConfigError, match="got 'ort'"):
        inc_torch.CompiledQuantizedModule(quantized.graph_module, quantized.example, runtime="ort")


def test_cache_key_follows_the_settings_the_package_is_compiled_under(
    quantized: inc_torch.CompiledQuantizedModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch._inductor.config as inductor_config

    from inc_torch.ptq import _inplace_sums
    from inc_torch.ptq._aoti_cache import INT8_INDUCTOR_SETTINGS, package_key

    signature = ("x", (1, 1, 8, 8))
    key = package_key(quantized.graph_module, signature)
    # a user's global setting that inc overrides for every INT8 compile builds the same package: same entry
    overridden = {"freezing": False, "max_autotune_gemm_backends": "CPP,ATEN"}
    assert set(overridden) == set(INT8_INDUCTOR_SETTINGS)
    with inductor_config.patch(overridden):
        assert package_key(quantized.graph_module, signature) == key
    # one that stays in force changes the package: a different entry
    with inductor_config.patch(max_autotune=not inductor_config.max_autotune):
        assert package_key(quantized.graph_module, signature) != key
    assert package_key(quantized.graph_module, ("x", (2, 1, 8, 8))) != key
    # compiled without inc's in-place sum correction (a torch where it cannot be made): another package
    monkeypatch.setattr(_inplace_sums, "_fusion_module", lambda: None)
    assert package_key(quantized.graph_module, signature) != key


class _Recorded(Exception):
    """Stops the compile once the settings it runs under are recorded."""


def test_aoti_compiles_under_the_int8_settings_whatever_the_user_set(
    quantized: inc_torch.CompiledQuantizedModule, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # torch 2.13's CPP GEMM template gives wrong INT8 outputs (see INT8_INDUCTOR_SETTINGS): a user's global
    # max_autotune with the CPP backend must not reach the package inc builds
    import torch._inductor.config as inductor_config

    from inc_torch.ptq import _aoti_cache

    monkeypatch.setenv("INC_AOTI_CACHE_DIR", str(tmp_path))
    seen: dict[str, object] = {}

    def recording_compile(program: object, package_path: str) -> None:
        seen.update(
            freezing=inductor_config.freezing,
            backends=inductor_config.max_autotune_gemm_backends,
            max_autotune=inductor_config.max_autotune,
        )
        raise _Recorded

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", recording_compile)
    x = torch.from_numpy(split()[2][:1])
    user = {"freezing": False, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
    with inductor_config.patch(user), pytest.raises(_Recorded):
        _aoti_cache.load_or_compile(quantized.graph_module, (x,), {}, ("x", tuple(x.shape)))
    assert seen == {"freezing": True, "backends": "ATEN", "max_autotune": True}, seen
    assert inductor_config.max_autotune_gemm_backends != "CPP,ATEN"  # the user's setting ends with their block
    assert not list(tmp_path.glob("*.pt2")), "a package that was never built was left in the cache"
