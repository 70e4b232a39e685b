"""Op-type-wise tuning visits the op types holding the most quantized ops first.

A transformer graph has one patch-embedding Conv (or a Concat) ahead of dozens of MatMuls; walked in model
order, a small trial budget went to the one Conv's settings and ran out before a MatMul setting was tried.
"""

from __future__ import annotations

import _synthetic_backend as sb

import inc_core as inc
from inc_core.tuning import autotune

sb.register()


def _vit_like() -> sb.SyntheticModel:
    """One Conv first, then six MatMuls whose ranges need the KL method (0.02 each otherwise)."""
    matmuls = tuple((f"fc{i}", "MatMul") for i in range(6))
    return sb.SyntheticModel(ops=(("patch", "Conv"), *matmuls), sensitive={})


def test_the_op_type_with_most_ops_is_tuned_first() -> None:
    model = _vit_like()
    base = sb.score(sb.QuantizedSynthetic(model, inc.QuantConfig(), None))
    assert base < 0.99  # 1 - 7 x .001 - 6 x .02
    config = inc.TuningConfig(strategy="basic", max_trials=3, history=None)
    result = autotune(model, config, eval_fn=sb.score, dataset=sb.calib_data(), backend="synthetic")
    # Model order would spend trials 2-4 on the Conv's calibration and granularity and stop unmet.
    assert result.met, [(t.change, t.score) for t in result.trials]
    assert [t.change for t in result.trials] == ["base", "MatMul.calibration=kl"]


def test_op_types_with_as_many_ops_keep_model_order() -> None:
    config = inc.TuningConfig(strategy="basic", max_trials=4, history=None)
    result = autotune(sb.SyntheticModel(), config, eval_fn=sb.score, dataset=sb.calib_data(), backend="synthetic")
    assert [t.change for t in result.trials][1:4] == [
        "Conv.calibration=kl", "Conv.calibration=percentile", "Conv.granularity=per_tensor",
    ]
