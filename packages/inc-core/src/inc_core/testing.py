"""Conformance checks every backend must pass, as a pytest base class that plugin tests subclass.

The checks are strict on purpose: the INT8 outputs must stay above a cosine floor the backend
declares (for static and for dynamic quantization), excluding an op must leave exactly that op in
FP32 and every other op ``inc.describe`` lists in INT8, the model must run as two pinned benchmark
instances, and tuning must start from a recipe that misses the goal so the strategy has to work.

Usage in a plugin's tests::

    from inc_core.testing import BackendConformance

    class TestOnnxConformance(BackendConformance):
        backend_name = "onnx"
        min_cosine = 0.99            # static INT8 vs FP32 outputs, measured on this model and data
        min_dynamic_cosine = 0.99    # the same for approach="dynamic"
        def make_model(self): ...
        ...

The class name does not start with ``Test``, so pytest collects only the subclasses. This module
needs pytest, which only test environments have.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

import inc_core as inc
from inc_core.errors import (
    CalibrationError,
    ConfigError,
    DatasetError,
    EvaluationError,
    SaveError,
    UnsupportedModelError,
)

__all__ = ["BackendConformance", "cosine", "LOOSEST_FLOOR"]

#: No backend may declare a cosine floor below this: a check that passes at 0.5 says nothing.
LOOSEST_FLOOR = 0.95
#: Most ops one exclusion check walks through (first, ..., last); each costs one quantization.
MAX_EXCLUSION_CASES = 4


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

    Subclasses set :attr:`backend_name`, :attr:`min_cosine` and :attr:`min_dynamic_cosine` (the floors
    this backend's INT8 outputs must hold on the subclass's model and data; at least
    :data:`LOOSEST_FLOOR`), and implement the ``make_*`` hooks and the inspection hooks.
    """

    backend_name: ClassVar[str]
    #: whether ``approach="dynamic"`` is supported by the backend
    supports_dynamic: ClassVar[bool] = True
    #: file suffix :func:`inc.save` writes for this backend's static INT8 model (``Backend.file_suffix`` must agree)
    model_suffix: ClassVar[str] = ".bin"
    #: minimum cosine similarity of static INT8 vs FP32 outputs (declared per backend; no default)
    min_cosine: ClassVar[float]
    #: minimum cosine similarity of dynamic INT8 vs FP32 outputs (declared per backend; no default)
    min_dynamic_cosine: ClassVar[float]
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

    def make_eval_batch(self) -> Any:
        """One batch the fidelity and tuning checks score on; by default the first calibration batch."""
        inputs, _ = next(iter(self.make_dataset()))
        return inputs

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

    def assert_exactly_quantized(self, quantized: Any, ops: Sequence[inc.Op], expected: set[str]) -> None:
        """Assert that of the described ``ops``, exactly those named in ``expected`` run in INT8.

        The default asks :meth:`is_quantized` for every op. A backend whose output carries no op names
        (a traced graph) overrides it with the strictest check it can make.
        """
        quantized_names = {op.name for op in ops if self.is_quantized(quantized, op.name)}
        assert quantized_names == expected, (
            f"INT8 ops {sorted(quantized_names)}, expected exactly {sorted(expected)} "
            f"(in FP32 instead: {sorted(expected - quantized_names)}; in INT8 though excluded: "
            f"{sorted(quantized_names - expected)})"
        )

    # --- helpers --------------------------------------------------------------------------------
    @property
    def _backend_arg(self) -> str | None:
        return self.backend_name if self.explicit_backend else None

    def _quantize(self, model: Any, config: inc.QuantConfig, dataset: Any = None) -> Any:
        return inc.quantize(model, config, dataset=dataset, backend=self._backend_arg)

    def _first_batch(self) -> Any:
        inputs, _ = next(iter(self.make_dataset()))
        return inputs

    def _described(self, model: Any, config: inc.QuantConfig | None = None) -> tuple[inc.Op, ...]:
        return inc.describe(model, config, backend=self.backend_name).ops

    def _ops(self, model: Any) -> list[str]:
        return [op.name for op in self._described(model)]

    def _exclusion_cases(self, names: Sequence[str]) -> list[str]:
        """Every op for small models; otherwise first, last and evenly spaced ones in between."""
        if len(names) <= MAX_EXCLUSION_CASES:
            return list(names)
        step = (len(names) - 1) / (MAX_EXCLUSION_CASES - 1)
        return list(dict.fromkeys(names[round(i * step)] for i in range(MAX_EXCLUSION_CASES)))

    # --- the checks -----------------------------------------------------------------------------
    def test_declared_floors_are_strict(self) -> None:
        for floor in ("min_cosine", "min_dynamic_cosine"):
            value = getattr(self, floor, None)
            assert isinstance(value, float), f"{type(self).__name__} must declare {floor}"
            assert LOOSEST_FLOOR <= value < 1.0, f"{floor}={value} is not a real floor (expected {LOOSEST_FLOOR} <= floor < 1)"

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
        # describe() is the honest list of what quantize() quantizes: every op it names runs in INT8.
        self.assert_exactly_quantized(quantized, self._described(model), set(self._ops(model)))

    def test_int8_outputs_track_fp32(self) -> None:
        model = self.make_model()
        quantized = self._quantize(model, inc.QuantConfig(calib_samples=32), self.make_dataset())
        batch = self.make_eval_batch()
        sim = cosine(self.run(model, batch), self.run(quantized, batch))
        assert sim >= self.min_cosine, f"static INT8 output cosine {sim:.5f} < {self.min_cosine}"

    def test_excluded_op_stays_fp32_and_every_other_op_is_int8(self) -> None:
        model = self.make_model()
        ops = self._described(model)
        names = [op.name for op in ops]
        for excluded in self._exclusion_cases(names):
            config = inc.QuantConfig(calib_samples=16, exclude=inc.LayerFilter(names=(excluded,)))
            quantized = self._quantize(model, config, self.make_dataset())
            self.assert_exactly_quantized(quantized, ops, set(names) - {excluded})

    def test_excluded_op_type_stays_fp32_and_every_other_type_is_int8(self) -> None:
        model = self.make_model()
        ops = self._described(model)
        types = list(dict.fromkeys(op.op_type for op in ops))
        excluded = types[0]
        config = inc.QuantConfig(calib_samples=16, exclude=inc.LayerFilter(types=(excluded,)))
        try:
            quantized = self._quantize(model, config, self.make_dataset())
        except (ConfigError, UnsupportedModelError):
            # With a single op type nothing is left to quantize; refusing that, naming why, is fine too.
            assert len(types) == 1, f"excluding {excluded} alone was refused, though other op types remain"
            return
        self.assert_exactly_quantized(quantized, ops, {op.name for op in ops if op.op_type != excluded})

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

    def test_dynamic_quantization_keeps_fidelity(self) -> None:
        if not self.supports_dynamic:
            with pytest.raises(ConfigError):
                self._quantize(self.make_model(), inc.QuantConfig(approach="dynamic"))
            return
        model = self.make_model()
        before = self.fingerprint(model)
        config = inc.QuantConfig(approach="dynamic")
        quantized = self._quantize(model, config)
        assert quantized is not model and self.fingerprint(model) == before
        assert self.int8_ops(quantized), "no INT8 op in the dynamically quantized model"
        self.assert_exactly_quantized(quantized, self._described(model, config), {op.name for op in self._described(model, config)})
        batch = self.make_eval_batch()
        sim = cosine(self.run(model, batch), self.run(quantized, batch))
        assert sim >= self.min_dynamic_cosine, f"dynamic INT8 output cosine {sim:.5f} < {self.min_dynamic_cosine}"

    def test_save_load_round_trip(self, tmp_path: Path) -> None:
        quantized = self._quantize(self.make_model(), inc.QuantConfig(calib_samples=16), self.make_dataset())
        suffix = inc.get_backend(self.backend_name).file_suffix(quantized)
        assert suffix == self.model_suffix, f"Backend.file_suffix says {suffix!r}, the backend saves {self.model_suffix!r}"
        path = tmp_path / f"model{suffix}"
        inc.save(quantized, path)
        loaded = inc.load(path)
        batch = self._first_batch()
        np.testing.assert_allclose(self.run(loaded, batch), self.run(quantized, batch), rtol=1e-4, atol=1e-4)
        assert sorted(self.int8_ops(loaded)) == sorted(self.int8_ops(quantized))

    def test_save_into_missing_directory_writes_nothing(self, tmp_path: Path) -> None:
        quantized = self._quantize(self.make_model(), inc.QuantConfig(calib_samples=16), self.make_dataset())
        target = tmp_path / "missing" / f"model{self.model_suffix}"
        with pytest.raises(SaveError, match="does not exist"):
            inc.save(quantized, target)
        assert not target.parent.exists()
        assert list(tmp_path.iterdir()) == []

    def test_two_benchmark_instances_run_the_int8_model(self) -> None:
        quantized = self._quantize(self.make_model(), inc.QuantConfig(calib_samples=16), self.make_dataset())
        batch = self._first_batch()
        result = inc.benchmark(quantized, batch, warmup=1, iterations=3, instances=2, backend=self._backend_arg)
        assert result.instances == 2 and len(result.per_instance) == 2
        assert len({r.pid for r in result.per_instance}) == 2, "the instances did not run in separate processes"
        assert all(r.iterations == 3 and r.throughput > 0 for r in result.per_instance)
        assert result.throughput == pytest.approx(sum(r.throughput for r in result.per_instance))

    def test_every_setting_describe_offers_changes_the_int8_model(self) -> None:
        """A setting ``describe`` lists as tunable for an op type changes what that type's ops compute: autotune
        spends trials on each, and one the backend ignored would be a silent no-op (inc-tf's ``scheme="sym"``
        once was). One other choice per setting, on the first op type. ``activation_dtype`` is left out: int8 and
        uint8 are the same grid shifted by 128 for an asymmetric range, so equal outputs are right there."""
        model = self.make_model()
        base = inc.QuantConfig(calib_samples=32, percentile=99.0)
        space = inc.describe(model, base, backend=self.backend_name)
        op_type = space.op_types[0]
        batch = self.make_eval_batch()
        reference = self.run(self._quantize(model, base, self.make_dataset()), batch)
        ignored = []
        for key, choices in space.options.get(op_type, {}).items():
            other = next((c for c in choices if c != getattr(base, key)), None)
            if key == "activation_dtype" or other is None:
                continue
            config = inc.QuantConfig(calib_samples=32, percentile=99.0, overrides={op_type: {key: other}})
            if np.array_equal(self.run(self._quantize(model, config, self.make_dataset()), batch), reference):
                ignored.append(f"{key}={other!r}")
        assert not ignored, f"describe offers {ignored} for {op_type!r}, but the INT8 model is the same with it"

    def test_autotune_falls_back_from_a_base_that_misses_the_goal(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The goal is set between the base recipe's measured score and FP32, so the first trial misses it."""
        from inc_core.tuning import autotune

        model = self.make_model()
        backend = inc.get_backend(self.backend_name)
        base = inc.QuantConfig(calib_samples=16)
        batch = self.make_eval_batch()
        reference = self.run(model, batch)

        def eval_fn(candidate: Any) -> float:
            return cosine(reference, self.run(candidate, batch))

        first = eval_fn(self._quantize(model, base, self.make_dataset()))
        assert first < 1.0
        # Baseline: cosine(reference, reference) == 1.0; allow half of what the base recipe loses.
        tolerable = (1.0 - first) / 2
        calls = {"n": 0}
        original = backend.calibrate

        def counting(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(backend, "calibrate", counting)
        # Only FP32 fallback is searched (each setting restricted to the base value): one trial per op
        # alone in FP32, then the ranked ops together, until the goal is met.
        fixed = {key: (str(getattr(base, key)),) for key in ("calibration", "granularity", "scheme", "activation_dtype")}
        tuning = inc.TuningConfig(
            base=base, tolerable_loss=tolerable, loss_type="absolute", max_trials=12, search_space=fixed
        )
        result = autotune(model, tuning, eval_fn=eval_fn, dataset=self.make_dataset(), backend=self.backend_name)
        assert calls["n"] == 1, f"calibration ran {calls['n']} times across {len(result.trials)} trials"
        trials = result.trials
        assert trials[0].change == "base" and not trials[0].met
        assert trials[0].score == pytest.approx(first, abs=1e-4), "the base trial scored differently from quantize()"
        assert len(trials) > 1, "tuning stopped after the base trial"
        assert result.threshold == pytest.approx(1.0 - tolerable)
        assert math.isfinite(result.score)
        scored = [t.score for t in trials if t.score is not None]
        if result.met:
            assert result.score >= result.threshold and result.trial_id != 1
            assert result.config.exclude.names, "a passing config must have put ops in FP32"
            assert self.int8_ops(result.model), "the fallback put every op in FP32"
        else:  # honest: nothing reached the goal, and the best trial is returned
            assert all(s < result.threshold for s in scored) and result.score == max(scored)
        assert cosine(reference, self.run(result.model, batch)) == pytest.approx(result.score, abs=1e-4)

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
