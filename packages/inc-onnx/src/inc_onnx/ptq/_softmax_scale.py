"""Calibrated output parameters for QOperator ``QLinearSoftmax``.

ONNX Runtime's QOperator quantizer gives every Softmax output the fixed scale 1/256 (zero point 0 for
uint8, -128 for int8), whatever calibration saw, because probabilities lie in [0, 1]. That step is as
large as the probabilities themselves once attention spreads over many tokens: a ViT-B/16 has 197
tokens, so a typical probability is about 1/197 and rounds to 0 or to one step; the static QOperator
model of a ViT-B/16-shaped transformer loses about 1.5% mean-pooled cosine on it (QDQ, whose fused
Softmax reads the calibrated scale, loses none). The output's real range comes from calibration like
every other activation's: the fixed initializers are replaced by the parameters computed from it.
The readers of the output (the context MatMul) read the same initializers, so they follow.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from inc_core import QuantConfig
from inc_core.calibration import compute_qparams
from inc_onnx.ptq._collect import OnnxCalibration

__all__ = ["calibrate_softmax_outputs"]

_SCALE_SUFFIX = "_scale"
_NODE_SUFFIX = "_quant"


def calibrate_softmax_outputs(model: onnx.ModelProto, config: QuantConfig, calibration: OnnxCalibration) -> int:
    """Give each ``QLinearSoftmax`` of a QOperator model its calibrated output scale and zero point (in place).

    A Softmax whose output was not observed (none is, in practice) keeps ORT's fixed parameters.
    Returns how many Softmax outputs were changed.
    """
    initializers = {init.name: init for init in model.graph.initializer}
    changed = 0
    for node in model.graph.node:
        if node.op_type != "QLinearSoftmax" or len(node.input) < 5:
            continue
        scale_name, zero_name = node.input[3], node.input[4]
        tensor = scale_name[: -len(_SCALE_SUFFIX)] if scale_name.endswith(_SCALE_SUFFIX) else None
        if tensor is None or tensor not in calibration.observers:
            continue
        if scale_name not in initializers or zero_name not in initializers:
            continue
        name = node.name[: -len(_NODE_SUFFIX)] if node.name.endswith(_NODE_SUFFIX) else node.name
        dtype = config.setting(name, "Softmax", "activation_dtype")
        scheme = config.setting(name, "Softmax", "scheme")
        method = config.setting(name, "Softmax", "calibration")
        low, high = calibration.range(tensor, method, percentile=config.percentile, dtype=dtype, scheme=scheme)
        params = compute_qparams(min(low, 0.0), max(high, 0.0), dtype=dtype, scheme=scheme)
        zero_type = initializers[zero_name].data_type
        if onnx.helper.tensor_dtype_to_np_dtype(zero_type) != np.dtype(params.np_dtype):
            continue  # the quantizer chose another type for this tensor; leave its pair consistent
        initializers[scale_name].CopyFrom(numpy_helper.from_array(np.asarray(params.scale, dtype=np.float32), scale_name))
        initializers[zero_name].CopyFrom(
            numpy_helper.from_array(np.asarray(params.zero_point, dtype=params.np_dtype), zero_name)
        )
        changed += 1
    return changed
