"""The conformance kit's checks fail for backends that break the contract (a check that cannot fail proves nothing)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

# A module import, not the class itself: pytest would collect an imported Test* class here a second time.
import test_conformance_toy as toy_conformance
import toy_backend
from toy_backend import QuantizedLayer, ToyBackend

import inc_core as inc
from inc_core._registry import unregister_backend


class IgnoresExclude(ToyBackend):
    """Quantizes every layer whatever the config excludes."""

    name = "toy_ignores_exclude"

    def quantize(self, model: Any, config: inc.QuantConfig, *, calibration: Any, inplace: bool = False) -> Any:
        return super().quantize(model, dataclasses.replace(config, exclude=inc.LayerFilter()), calibration=calibration)


class CoarseWeights(ToyBackend):
    """Real INT8 layers whose weights keep only 3 bits: the outputs drift from FP32."""

    name = "toy_coarse"

    def quantize(self, model: Any, config: inc.QuantConfig, *, calibration: Any, inplace: bool = False) -> Any:
        quantized = super().quantize(model, config, calibration=calibration)
        for layer in quantized.layers:
            if isinstance(layer, QuantizedLayer):
                layer.weight_q = ((layer.weight_q.astype(np.int32) // 32) * 32).astype(np.int8)
        return quantized


def _kit_for(backend_cls: type[ToyBackend]) -> toy_conformance.TestToyConformance:
    inc.register_backend(backend_cls.name, backend_cls)
    kit = toy_conformance.TestToyConformance()
    kit.backend_name = backend_cls.name
    kit.explicit_backend = True
    return kit


@pytest.fixture(autouse=True)
def _unregister():
    toy_backend.register()
    yield
    for cls in (IgnoresExclude, CoarseWeights):
        unregister_backend(cls.name)


def test_the_exclusion_check_fails_when_an_excluded_op_is_quantized() -> None:
    kit = _kit_for(IgnoresExclude)
    with pytest.raises(AssertionError, match=r"in INT8 though excluded: \['fc0'\]"):
        kit.test_excluded_op_stays_fp32_and_every_other_op_is_int8()


def test_the_fidelity_checks_fail_for_coarse_weights() -> None:
    kit = _kit_for(CoarseWeights)
    with pytest.raises(AssertionError, match=r"static INT8 output cosine 0\.\d+ < 0\.999"):
        kit.test_int8_outputs_track_fp32()
    with pytest.raises(AssertionError, match=r"dynamic INT8 output cosine 0\.\d+ < 0\.999"):
        kit.test_dynamic_quantization_keeps_fidelity()


def test_a_loose_floor_is_refused() -> None:
    kit = toy_conformance.TestToyConformance()
    kit.min_dynamic_cosine = 0.5
    with pytest.raises(AssertionError, match="min_dynamic_cosine=0.5 is not a real floor"):
        kit.test_declared_floors_are_strict()
