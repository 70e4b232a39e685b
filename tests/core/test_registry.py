"""Backend registry: entry points found by model type or file suffix, only the needed one imported."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

import inc_core as inc
from inc_core import _registry
from inc_core.errors import BackendNotFoundError, ConfigError

PLUGIN = textwrap.dedent(
    '''
    from inc_core.backend import Backend, Op, TuningSpace

    class ArrayBackend(Backend):
        name = "fakearray"
        package = "inc-fakearray"

        def accepts(self, model):
            return hasattr(model, "shape") or str(model).endswith(".fakearr")
        def describe(self, model, config):
            return TuningSpace((Op("w", "MatMul"),))
        def calibrate(self, model, dataset, config):
            return None
        def quantize(self, model, config, *, calibration, inplace=False):
            return model
        def save(self, model, path):
            raise NotImplementedError
        def load(self, path):
            return "loaded"
        def runner(self, model, inputs, *, threads=None):
            return lambda: None

    class FailingInit(ArrayBackend):
        def __init__(self):
            raise OSError("libfake.so: cannot open shared object file")

    class SaysWhatIsMissing(ArrayBackend):
        def __init__(self):
            from inc_core.errors import BackendNotFoundError
            raise BackendNotFoundError("fakelib needs numbers<5: pip install 'numbers<5'")
    '''
)


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch):
    """Install two entry points: `numpy`/`fakearr` -> a working plugin, `boom` -> one that fails to import."""
    (tmp_path / "inc_fake_array.py").write_text(PLUGIN)
    (tmp_path / "inc_fake_boom.py").write_text("raise RuntimeError('this plugin must never be imported')\n")
    dist = tmp_path / "inc_fake-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: inc-fake\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[inc_core.backends]\nnumpy = inc_fake_array:ArrayBackend\nfakearr = inc_fake_array:ArrayBackend\n"
        "boom = inc_fake_boom:Nothing\nmissing = inc_fake_not_there:Nothing\n"
        "noattr = inc_fake_array:NoSuchClass\nbadinit = inc_fake_array:FailingInit\n"
        "explains = inc_fake_array:SaysWhatIsMissing\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    _registry._instance.cache_clear()
    yield
    _registry._instance.cache_clear()
    for mod in ("inc_fake_array", "inc_fake_boom"):
        sys.modules.pop(mod, None)


def test_backend_found_from_model_type_without_importing_other_plugins(fake_plugins):
    backend = inc.resolve_backend(np.zeros(3))
    assert backend.name == "fakearray"
    assert "inc_fake_boom" not in sys.modules
    assert {"numpy", "fakearr", "boom"} <= set(inc.installed_backends())


def test_backend_found_from_file_suffix(fake_plugins, tmp_path):
    path = tmp_path / "m.fakearr"
    path.write_text("x")
    assert inc.load(path) == "loaded"


def test_directory_without_suffix_found_from_the_suffixes_of_its_files(fake_plugins, tmp_path):
    export = tmp_path / "export"  # a model directory such as a SavedModel export ("saved_model.pb" inside)
    export.mkdir()
    (export / "graph.fakearr").write_text("x")
    (export / "variables").mkdir()
    (export / "README").write_text("no suffix")
    assert _registry._candidate_keys(export) == ["fakearr"]  # then the backend's accepts() decides


def test_unknown_model_type_names_the_type_the_fix_and_installed_backends(fake_plugins):
    class Net:
        pass

    with pytest.raises(BackendNotFoundError) as info:
        inc.resolve_backend(Net())
    message = str(info.value)
    assert "Net" in message and "pip install" in message and "'fakearr'" in message
    assert isinstance(info.value, ImportError)


def test_known_framework_without_plugin_names_the_package(monkeypatch):
    fake_module_type = type("Module", (), {"__module__": "torch.nn.modules.module"})
    with pytest.raises(BackendNotFoundError, match=r"pip install inc-torch"):
        inc.resolve_backend(fake_module_type())


def test_named_backend_missing_or_broken(fake_plugins, monkeypatch):
    # Hide a real IPEX plugin where one is installed (the ipex venv): the message for a missing one is under test.
    installed = _registry._entry_points
    monkeypatch.setattr(_registry, "_entry_points", lambda: {k: v for k, v in installed().items() if k != "ipex"})
    with pytest.raises(BackendNotFoundError, match=r"pip install inc-torch\[ipex\]"):
        inc.get_backend("ipex")
    with pytest.raises(BackendNotFoundError, match="could not be imported"):
        inc.get_backend("missing")


def test_named_backend_that_rejects_the_model(fake_plugins):
    with pytest.raises(BackendNotFoundError, match="does not accept"):
        inc.resolve_backend(object(), "fakearr")


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("boom", r"could not be imported: RuntimeError: this plugin must never be imported"),
        ("noattr", r"could not be imported: AttributeError"),
        ("badinit", r"could not be started: OSError: libfake.so"),
    ],
)
def test_a_plugin_failing_to_import_or_start_is_a_backend_not_found_error(fake_plugins, name, match):
    with pytest.raises(BackendNotFoundError, match=match) as info:
        inc.get_backend(name)
    assert "pip install inc-" in str(info.value) and info.value.__cause__ is not None


def test_a_plugin_that_says_what_is_missing_is_not_told_to_reinstall(fake_plugins):
    # Its own advice (another dependency's version) is the fix; "reinstall the plugin" would send users astray.
    with pytest.raises(BackendNotFoundError) as info:
        inc.get_backend("explains")
    assert str(info.value) == (
        "The 'explains' backend (inc_fake_array:SaysWhatIsMissing) could not be started: "
        "fakelib needs numbers<5: pip install 'numbers<5'"
    )


@pytest.mark.parametrize("thing", [object, int, "npmat"])
def test_registering_something_that_is_not_a_backend_class_is_a_config_error(thing):
    with pytest.raises(ConfigError, match="is not a Backend subclass"):
        inc.register_backend("not_a_backend", thing)
