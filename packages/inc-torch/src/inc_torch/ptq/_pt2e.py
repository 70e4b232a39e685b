"""Static INT8 through PT2E: torchao's X86InductorQuantizer, prepare_pt2e, convert_pt2e, then inductor (embedding
tables 8 bits per row, see :mod:`inc_torch.ptq._pt2e_tables`)."""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any

import torch

from inc_core._quant_config import QuantConfig
from inc_core.backend import Op
from inc_core.errors import CalibrationError
from inc_torch._compat import quiet, torchao_pt2e
from inc_torch.ptq._calibration import TorchCalibration, load_statistics
from inc_torch.ptq._compiled import CompiledQuantizedModule
from inc_torch.ptq._conv_transpose import restore_conv_transpose
from inc_torch.ptq._grouped_conv import is_miscomputed_conv_node
from inc_torch.ptq._observers import pt2e_observer_classes
from inc_torch.ptq._ops import LOOKUP_NAMES
from inc_torch.ptq._pt2e_tables import quantize_tables
from inc_torch.ptq._settings import OpSettings, plan
from inc_torch.qat._fold_bn import folding_only_qat_conv_bn_pairs

log = logging.getLogger("inc")

__all__ = ["quantization_config", "build_quantizer", "float_only_quantizer_class", "quantize_pt2e"]


@functools.cache
def quantization_config(settings: OpSettings) -> Any:
    """The torchao QuantizationConfig for one op's settings (cached: the quantizer compares them by identity)."""
    ao = torchao_pt2e()
    activation_cls: Any
    weight_cls: Any
    activation_cls, weight_cls = pt2e_observer_classes()
    activation = ao.QuantizationSpec(
        dtype=torch.uint8,
        quant_min=0,
        quant_max=255,
        qscheme=torch.per_tensor_affine,
        is_dynamic=False,
        observer_or_fake_quant_ctr=activation_cls.with_args(
            method=settings.calibration, percentile=settings.percentile, scheme=settings.scheme
        ),
    )
    per_channel = settings.granularity == "per_channel"
    weight = ao.QuantizationSpec(
        dtype=torch.int8,
        quant_min=-128,
        quant_max=127,
        qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric,
        ch_axis=0,
        is_dynamic=False,
        observer_or_fake_quant_ctr=weight_cls.with_args(per_channel=per_channel),
    )
    return ao.QuantizationConfig(activation, activation, weight, None, False)


def _float_tensor(node: Any) -> bool:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(value, torch.Tensor) and value.is_floating_point()


@functools.cache
def float_only_quantizer_class() -> type:
    """X86InductorQuantizer that quantizes only float tensors and only the ops ``inc.describe`` lists.

    torchao's x86 recipe also annotates every same-shape ``aten.mul``, integer ones included (RoBERTa's
    position ids: ``mask * cumsum(mask)``, whose observers no float calibration can fill). Casts,
    integer arithmetic and elementwise mul stay in FP32: inc lists conv/linear as the ops a user or a
    tuning strategy can set, and each INT8 op must be one of those (or a pooling/cat between them).
    """
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    mul = torch.ops.aten.mul.Tensor
    conv1d = torch.ops.aten.conv1d.default

    class FloatOnlyX86InductorQuantizer(torchao_pt2e().X86InductorQuantizer):  # type: ignore[misc]
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = super().annotate(model)
            # A conv1d left in the graph stays FP32 (torchao annotates it only before an nn.ReLU): inductor's INT8
            # conv1d lowering gives a buffer of the wrong length when a group_norm reads it (wav2vec2's feature
            # encoder fails at its first call). Those inc could rewrite are conv2d by now (see _conv1d).
            # A grouped conv whose shape this CPU's oneDNN INT8 kernel computes wrongly stays FP32 alike (see
            # _grouped_conv; quantizable_ops does not list its layer).
            for node in model.graph.nodes:
                if node.op == "call_function" and (node.target == conv1d or is_miscomputed_conv_node(node)):
                    xiq._annotate_nodes_not_quantize(node)
                    for user in node.users:  # the ReLU of torchao's pattern no longer ends a quantized pattern
                        if getattr(user.meta.get(xiq.QUANT_ANNOTATION_KEY), "_is_output_of_quantized_pattern", False):
                            xiq._annotate_nodes_not_quantize(user)
            for node in model.graph.nodes:
                annotation = node.meta.get(xiq.QUANT_ANNOTATION_KEY)
                if annotation is None or not (annotation.input_qspec_map or annotation.output_qspec):
                    continue
                tensors = list(annotation.input_qspec_map) + ([node] if annotation.output_qspec is not None else [])
                if node.target == mul or not all(_float_tensor(t) for t in tensors):
                    xiq._annotate_nodes_not_quantize(node)
            return model

    return FloatOnlyX86InductorQuantizer


def build_quantizer(config: QuantConfig, ops: tuple[Op, ...]) -> Any:
    """An x86 inductor quantizer with the global settings, per-op overrides and FP32 fallbacks."""
    default, per_op = plan(config, ops)
    quantizer = float_only_quantizer_class()()
    quantizer.set_global(quantization_config(default))
    for name, settings in per_op.items():
        quantizer.set_module_name_qconfig(name, None if settings is None else quantization_config(settings))
    return quantizer


def quantize_pt2e(config: QuantConfig, ops: tuple[Op, ...], calibration: TorchCalibration) -> CompiledQuantizedModule:
    """Prepare a copy of the exported graph, fill its observers from ``calibration``, convert, wrap for inductor."""
    ao = torchao_pt2e()
    if calibration.exported is None:
        raise CalibrationError(
            "This calibration holds no exported graph, which format='pt2e' needs; pass the result of "
            "TorchBackend.calibrate() with the same config."
        )
    _, per_op = plan(config, ops)
    excluded = {name for name, settings in per_op.items() if settings is None}
    with quiet():
        graph = copy.deepcopy(calibration.exported)
        restore_conv_transpose(graph, frozenset(excluded))  # FP32 runs faster untransformed (see _conv_transpose)
        prepared = ao.prepare_pt2e(graph, build_quantizer(config, ops))
        load_statistics(prepared, calibration, frozenset(op.name for op in ops))
        # Weight observers see their weight on the first forward; activation observers are frozen.
        args, kwargs = calibration.example
        with torch.no_grad():
            prepared(*args, **kwargs)
        with folding_only_qat_conv_bn_pairs():  # a batch norm left unfolded costs no pattern exports
            converted = ao.convert_pt2e(prepared)
    _, shared = quantize_tables(
        converted, frozenset(op.name for op in ops if op.op_type in LOOKUP_NAMES and op.name not in excluded)
    )
    if shared:
        log.info(
            "%d embedding table(s) stay FP32 (%s): the graph also computes with them elsewhere (a tied output "
            "projection), so an 8-bit copy would add memory", len(shared), ", ".join(shared[:4]),
        )
    return CompiledQuantizedModule(converted, calibration.example)
