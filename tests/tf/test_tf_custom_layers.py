"""A .keras file whose model uses a custom layer, handed to the CLI: the class is registered by importing its module.

Before, loading it said only that Keras could not deserialize a Functional, and the CLI had no way to import the
module; now the error names the class and its module, and ``--import-module`` imports it (in benchmark instances too).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

LAYERS = textwrap.dedent(
    """
    import keras

    @keras.saving.register_keras_serializable(package="tests")
    class Scale(keras.layers.Layer):
        def __init__(self, factor=2.0, **kwargs):
            super().__init__(**kwargs)
            self.factor = factor

        def call(self, x):
            return x * self.factor

        def get_config(self):
            return {**super().get_config(), "factor": self.factor}
    """
)

MAKE = textwrap.dedent(
    """
    import keras
    from my_layers import Scale

    inputs = keras.Input((16,))
    hidden = Scale()(keras.layers.Dense(32, activation="relu", name="dense_in")(inputs))
    keras.Model(inputs, keras.layers.Dense(4, name="dense_out")(hidden)).save("custom.keras")
    """
)


def _inc(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, "-m", "inc_core.cli", *args], cwd=folder, capture_output=True, text=True, timeout=600, env=env
    )


def test_a_custom_layer_is_named_and_imported_with_import_module(tmp_path: Path) -> None:
    (tmp_path / "my_layers.py").write_text(LAYERS)
    subprocess.run([sys.executable, "-c", MAKE], cwd=tmp_path, check=True, capture_output=True, timeout=600)
    failed = _inc(tmp_path, "describe", "custom.keras")
    assert failed.returncode == 2
    assert "uses the custom class 'Scale' (module 'my_layers')" in failed.stderr
    assert "--import-module my_layers" in failed.stderr
    listed = _inc(tmp_path, "describe", "custom.keras", "--import-module", "my_layers")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "dense_in" in listed.stdout and "dense_out" in listed.stdout
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32))
    bench = _inc(tmp_path, "bench", "custom.keras", "--inputs", "x.npz", "--iterations", "5", "--warmup", "1",
                 "--instances", "2", "--import-module", "my_layers")
    assert bench.returncode == 0, bench.stderr[-2000:]  # each instance imported the module before loading
    assert "2 instance(s)" in bench.stdout
