"""Conformance checks every backend must pass, as a pytest base class that plugin tests subclass.

Usage in a plugin's tests::

    from inc_core.testing import BackendConformance

    class TestOnnxConformance(BackendConformance):
        backend_name = "onnx"
        def make_model(self): ...
        ...

The class name does not start with ``Test``, so pytest collects only the subclasses. This module
needs pytest, which only test environments have.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

import inc_core as inc
from inc_core.errors import CalibrationError, ConfigError, DatasetError, EvaluationError, SaveError

__all__ = ["BackendConformance", "cosine"]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two flattened arrays (1.0 for identical directions)."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    denom = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y) / denom if denom else float(np.allclose(x, y))


def _with_nan(inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return {k: _with_nan(v) for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(_with_nan(v) for v in inputs)
    arr = np.array(inputs, copy=True)
    if np.issubdtype(arr.dtype, np.floating):
        arr[...] = np.nan
    return arr


class BackendConformance:
    """The same checks for every backend: a new model back, INT8 kernels present, bad input errors.

    Subclasses set :attr:`backend_name` and implement the ``make_*`` hooks and the inspection hooks.
    """

    backend_name: ClassVar[str]
    #: whether ``approach="dynamic"`` is supported by the backend
    supports_dynamic: ClassVar[bool] = True
    #: file suffix :func:`inc.save` writes for this backend
    model_suffix: ClassVar[str] = ".bin"
    #: minimum cosine similarity of INT8 vs FP32 outputs on the calibration data
    min_cosine: ClassVar[float] = 0.98
    #: set for a backend the user names explicitly (``backend="ipex"``) rather than one found from the model
    explicit_backend: ClassVar[bool] = False

    # --- hooks ----------------------------------------------------------------------------------
    def make_model(self) -> Any:
        """A small FP32 model (trained, so accuracy checks mean something)."""
        raise NotImplementedError

    def make_dataset(self) -> inc.Dataset:
        """Valid calibration data for :meth:`make_model`."""
        raise NotImplementedError

    def make_wrong_shape_dataset(self) -> inc.Dataset:
        """Data whose shape the model cannot take."""
        raise NotImplementedError

    def fingerprint(self, model: Any) -> Any:
        """A comparable snapshot of the model's weights and structure (to prove it was not modified)."""
        raise NotImplementedError

    def run(self, model: Any, inputs: Any) -> np.ndarray:
        """Run the FP32 or INT8 model on one batch and return its (first) output as numpy."""
        raise NotImplementedError

    def int8_ops(self, quantized: Any) -> list[str]:
        """Names of the ops of ``quantized`` that run INT8 kernels (or hold INT8 weights)."""
        raise NotImplementedError

    def is_quantized(self, quantized: Any, op_name: str) -> bool:
        """Whether the op ``op_name`` (a name from ``inc.describe``) runs in INT8 in ``quantized``."""
        raise NotImplementedError

    # --- helpers --------------------------------------------------------------------------------
    @property
    def _backend_arg(self) -> str | None:
        return self.backend_name if self.explicit_backend else None

    def _quantize(self, model: Any, config: inc.QuantConfig, dataset: Any = None) -> Any:
        return inc.quantize(model, config, dataset=dataset, backend=self._backend_arg)

    def _first_batch(self) -> Any:
        inputs, _ = next(iter(self.make_dataset()))
        return inputs

    def _ops(self, model: Any) -> list[str]:
        return [op.name for op in inc.describe(model, backend=self.backend_name).ops]

    # --- the checks -----------------------------------------------------------------------------
    def test_backend_is_found_from_the_model(self) -> None:
        assert inc.resolve_backend(self.make_model(), self._backend_arg).name == self.backend_name

    def test_describe_lists_unique_ops(self) -> None:
        names = self._ops(self.make_model())
        assert names, "describe() found no quantizable op"
        assert len(names) == len(set(names)), f"duplicate op names: {names}"

    def test_static_quantize_gives_new_int8_model_and_leaves_input_alone(self) -> None:
        model = self.make_model()
        before = self.fingerprint(model)
        quantized = self._quantize(model, inc.QuantConfig(calib_samples=32), self.make_dataset())
        assert quantized is not model
        assert self.fingerprint(model) == before, "quantize() modified the user's model"
        assert self.int8_ops(quantized), "no INT8 op in the quantized model"

    def test_int8_outputs_track_fp32(self) -> None:
        model = self.make_model()
        quantized = self._quantize(model, inc.QuantConfig(calib_samples=32), self.make_dataset())
        batch = self._first_batch()
        sim = cosine(self.run(model, batch), self.run(quantized, batch))
        assert sim >= self.min_cosine, f"INT8 output cosine {sim:.4f} < {self.min_cosine}"

    def test_excluded_op_stays_fp32(self) -> None:
        model = self.make_model()
        first = self._ops(model)[0]
        config = inc.QuantConfig(calib_samples=16, exclude=inc.LayerFilter(names=(first,)))
        quantized = self._quantize(model, config, self.make_dataset())
        assert not self.is_quantized(quantized, first)
        others = [n for n in self._ops(model) if n != first]
        assert not others or any(self.is_quantized(quantized, n) for n in others)

    def test_unknown_exclude_name_is_rejected(self) -> None:
        config = inc.QuantConfig(exclude=inc.LayerFilter(names=("no_such_layer_xyz",)))
        with pytest.raises(ConfigError, match="no_such_layer_xyz"):
            self._quantize(self.make_model(), config, self.make_dataset())

    def test_unknown_format_lists_choices(self) -> None:
        with pytest.raises(ConfigError, match="format"):
            self._quantize(self.make_model(), inc.QuantConfig(format="no-such-format"), self.make_dataset())

    def test_static_without_dataset_is_rejected(self) -> None:
        with pytest.raises(DatasetError):
            self._quantize(self.make_model(), inc.QuantConfig())

    def test_empty_dataset_is_rejected(self) -> None:
        with pytest.raises(DatasetError):
            self._quantize(self.make_model(), inc.QuantConfig(), inc.Dataset([]))

    def test_wrong_shape_dataset_is_rejected(self) -> None:
        model = self.make_model()
        before = self.fingerprint(model)
        with pytest.raises(DatasetError):
            self._quantize(model, inc.QuantConfig(), self.make_wrong_shape_dataset())
        assert self.fingerprint(model) == before

    def test_nan_activations_are_rejected(self) -> None:
        batch = _with_nan(self._first_batch())
        with pytest.raises(CalibrationError, match="(?i)nan"):
            self._quantize(self.make_model(), inc.QuantConfig(), inc.Dataset([batch]))

    def test_dynamic_quantization(self) -> None:
        if not self.supports_dynamic:
            with pytest.raises(ConfigError):
                self._quantize(self.make_model(), inc.QuantConfig(approach="dynamic"))
            return
        model = self.make_model()
        quantized = self._quantize(model, inc.QuantConfig(approach="dynamic"))
        assert self.int8_ops(quantized), "no INT8 op in the dynamically quantized model"

    def test_save_load_round_trip(self, tmp_path: Path) -> None:
        quantized = self._quantize(self.make_model(), inc.QuantConfig(calib_samples=16), self.make_dataset())
        path = tmp_path / f"model{self.model_suffix}"
        inc.save(quantized, path)
        loaded = inc.load(path)
        batch = self._first_batch()
        np.testing.assert_allclose(self.run(loaded, batch), self.run(quantized, batch), rtol=1e-4, atol=1e-4)
        assert self.int8_ops(loaded)

    def test_save_into_missing_directory_writes_nothing(self, tmp_path: Path) -> None:
        quantized = self._quantize(self.make_model(), inc.QuantConfig(calib_samples=16), self.make_dataset())
        target = tmp_path / "missing" / f"model{self.model_suffix}"
        with pytest.raises(SaveError, match="does not exist"):
            inc.save(quantized, target)
        assert not target.parent.exists()
        assert list(tmp_path.iterdir()) == []

    def test_autotune_calibrates_once_and_meets_a_loose_goal(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from inc_core.tuning import autotune

        model = self.make_model()
        backend = inc.get_backend(self.backend_name)
        calls = {"n": 0}
        original = backend.calibrate

        def counting(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(backend, "calibrate", counting)
        batch = self._first_batch()
        reference = self.run(model, batch)

        def eval_fn(candidate: Any) -> float:
            return cosine(reference, self.run(candidate, batch))

        tuning = inc.TuningConfig(
            base=inc.QuantConfig(calib_samples=16), tolerable_loss=0.5, max_trials=3, keep_searching=True
        )
        result = autotune(model, tuning, eval_fn=eval_fn, dataset=self.make_dataset(), backend=self.backend_name)
        assert calls["n"] == 1, f"calibration ran {calls['n']} times across {len(result.trials)} trials"
        assert result.met and math.isfinite(result.score)
        assert self.int8_ops(result.model)

    def test_eval_fn_that_raises_is_reported(self) -> None:
        from inc_core.tuning import autotune

        def broken(candidate: Any) -> float:
            raise RuntimeError("metric exploded")

        with pytest.raises(EvaluationError, match="metric exploded"):
            autotune(
                self.make_model(),
                inc.TuningConfig(max_trials=1),
                eval_fn=broken,
                dataset=self.make_dataset(),
                backend=self._backend_arg,
            )
