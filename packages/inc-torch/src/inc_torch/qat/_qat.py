"""Quantization-aware training in the user's own loop: ``prepare_qat`` -> train as usual -> ``convert``.

``prepare_qat`` returns a copy of the model with fake quantization (PT2E by default, FX on request). It
trains with the user's optimizer (built on the returned model's parameters) and loss, unchanged. Steps
are counted as forward passes in training mode, so QATConfig's ``freeze_observer_step`` (activation and
weight ranges stop moving) and ``freeze_bn_step`` (batch norm uses its running statistics, which stop
updating) take effect without an extra line in the loop.
"""

from __future__ import annotations

import copy
import logging
import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from inc_core._quant_config import QATConfig, QuantConfig
from inc_core.backend import Op
from inc_core.errors import ConfigError, UnsupportedModelError
from inc_torch._compat import quiet, torchao_pt2e
from inc_torch._exported import FROM_MODULE, is_exported_graph
from inc_torch._failures import wrap_framework_errors
from inc_torch._inputs import Inputs, float_dtype, to_inputs
from inc_torch._parametrized import fold_parametrizations
from inc_torch.ptq._capture import check_runs, eval_copy, export_graph, fx_prepare, positional
from inc_torch.ptq._compiled import CompiledQuantizedModule
from inc_torch.ptq._conv1d import conv1d_as_conv2d
from inc_torch.ptq._conv_transpose import conv_transpose_as_conv2d, restore_conv_transpose
from inc_torch.ptq._fx_ops import apply_fx_settings, traced_fx_ops
from inc_torch.ptq._grouped_conv import miscomputed_grouped_convs
from inc_torch.ptq._kept_float import KeptFloat, keep_float, warn_kept_float
from inc_torch.ptq._ops import ACTIVATION_DTYPES, LOOKUP_NAMES, quantizable_ops
from inc_torch.ptq._pt2e import float_only_quantizer_class
from inc_torch.ptq._pt2e_tables import quantize_tables
from inc_torch.ptq._settings import OpSettings
from inc_torch.qat._fold_bn import (
    batch_norm_settings,
    folding_only_qat_conv_bn_pairs,
    folding_with_batch_norm_settings,
    fusing_only_present_conv_bn_pairs,
    qat_ready_batch_norms,
    restore_batch_norm_settings,
    with_affine_batch_norms,
)
from inc_torch.qat._labels import check_label_inputs, drop_label_inputs, label_inputs, without_labels
from inc_torch.qat._train_eval import (
    drop_path_masks,
    erase_drop_path,
    mark_training_flags,
    switch_attention_dropout,
    switch_drop_path,
    switch_training_arguments,
    training_flag_calls,
    warn_mode_dependent_outputs,
)

log = logging.getLogger("inc")

__all__ = ["prepare_qat", "convert", "QAT_FORMATS"]

QAT_FORMATS = ("pt2e", "fx")
# Weight fake-quant ranges follow the current weights at every step (averaging constant 1), as
# ``convert`` quantizes them: a slow average (torch's default 0.01) lags weights that grew during
# training, so they are clipped in the forward and quantized with another scale at convert.
WEIGHT_AVERAGING = 1.0
_STATE = "_inc_qat_state"
# The training steps taken, as a buffer: a checkpoint's state dict carries it (see _resume)
_STEPS = "inc_qat_steps"
# The FX QAT modules that carry a batch norm (conv-bn(-relu) of every rank, linear-bn1d).
_FUSED_BN_QAT = (torch.ao.nn.intrinsic.qat.modules.conv_fused._ConvBnNd, torch.ao.nn.intrinsic.qat.LinearBn1d)


@dataclass
class _QatState:
    format: str
    config: QATConfig
    example: Inputs = field(repr=False)
    steps: int = 0
    observers_frozen: bool = False
    bn_frozen: bool = False
    hook_id: int | None = None
    load_hook_ids: tuple[int | None, int | None] = (None, None)
    tables: frozenset[str] = frozenset()  # PT2E: the Embedding modules whose tables convert stores in 8 bits
    labels: tuple[str, ...] = ()  # PT2E: the label inputs of a transformers model, left out of the INT8 model
    # PT2E: each batch norm's (momentum, eps) by module path, which torchao's QAT graphs replace by the defaults
    batch_norms: dict[str, tuple[float | None, float]] = field(default_factory=dict)


def _check(model: Any, config: Any) -> str:
    if not isinstance(config, QATConfig):
        raise ConfigError(f"prepare_qat: config must be an inc.QATConfig, got {type(config).__name__}.")
    if not isinstance(model, nn.Module) or isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(f"prepare_qat takes a torch.nn.Module, got {type(model).__name__}.")
    if is_exported_graph(model):
        # an inference program has no training form (batch-norm statistics, dropout) to put fake quantization in
        raise UnsupportedModelError(
            "prepare_qat takes the nn.Module to train, not a torch.export program (exported for inference: its "
            f"batch norms and dropouts run in eval mode); {FROM_MODULE}."
        )
    fmt = "pt2e" if config.format == "default" else config.format
    if fmt not in QAT_FORMATS:
        raise ConfigError(
            f"QATConfig: format={config.format!r} is not supported by the torch backend; choose one of "
            f"{', '.join(map(repr, ('default', *QAT_FORMATS)))}."
        )
    if config.activation_dtype not in ACTIVATION_DTYPES:
        raise ConfigError(
            f"QATConfig: activation_dtype={config.activation_dtype!r} is not supported; x86 INT8 kernels take "
            f"{', '.join(map(repr, ACTIVATION_DTYPES))} activations."
        )
    dtype = float_dtype(model)
    if dtype != torch.float32:
        # torch.ao's fake quantization takes float32 only: preparation went through and the first training
        # step raised "expected scalar type Float but found BFloat16" from inside the user's forward.
        name = str(dtype).replace("torch.", "")
        speed = (
            "; for 16-bit speed, train it under torch.autocast('cpu', dtype=torch.bfloat16) with format='pt2e'"
            if dtype != torch.float64 else ""
        )
        raise UnsupportedModelError(
            f"prepare_qat: {type(model).__name__} holds {name} parameters; QAT trains the FP32 model with fake "
            f"quantization. Pass model.float(){speed}."
        )
    return fmt


def _excluded(model: nn.Module, config: QATConfig, ops: tuple[Op, ...]) -> list[str]:
    return config.exclude.select(ops) if config.exclude else []


def _pt2e_qat_config(config: QATConfig) -> Any:
    ao = torchao_pt2e()
    act = ao.QuantizationSpec(
        dtype=torch.uint8,
        quant_min=0,
        quant_max=255,
        qscheme=torch.per_tensor_symmetric if config.scheme == "sym" else torch.per_tensor_affine,
        is_dynamic=False,
        observer_or_fake_quant_ctr=ao.FusedMovingAvgObsFakeQuantize.with_args(eps=2**-12),
    )
    per_channel = config.granularity == "per_channel"
    weight_observer = ao.MovingAveragePerChannelMinMaxObserver if per_channel else ao.MovingAverageMinMaxObserver
    weight = ao.QuantizationSpec(
        dtype=torch.int8,
        quant_min=-128,
        quant_max=127,
        qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric,
        ch_axis=0,
        is_dynamic=False,
        observer_or_fake_quant_ctr=ao.FusedMovingAvgObsFakeQuantize.with_args(
            observer=weight_observer, eps=2**-12, averaging_constant=WEIGHT_AVERAGING
        ),
    )
    return ao.QuantizationConfig(act, act, weight, None, True)


def _reduce_depthwise_fake_quant(prepared: nn.Module, config: QATConfig) -> None:
    """7-bit weight fake quantization for the convs that run on FBGEMM's depthwise kernels after convert.

    The same rule as post-training FX quantization (:func:`inc_torch.ptq._fx.reduce_depthwise_weights`): those
    kernels saturate on full-range int8 weights, so training sees the grid the INT8 model will use.
    """
    from inc_torch.ptq._fx import FBGEMM_DEPTHWISE_GROUPS

    for module in prepared.modules():
        if (
            isinstance(module, nn.modules.conv._ConvNd)
            and module.groups > FBGEMM_DEPTHWISE_GROUPS
            and isinstance(getattr(module, "weight_fake_quant", None), nn.Module)
        ):
            module.weight_fake_quant = _fx_qat_qconfig(config, weight_range=(-64, 63)).weight()


def _fx_qat_qconfig(config: QATConfig, *, weight_range: tuple[int, int] = (-128, 127)) -> Any:
    from torch.ao.quantization import QConfig
    from torch.ao.quantization.fake_quantize import FusedMovingAvgObsFakeQuantize
    from torch.ao.quantization.observer import (
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
    )

    activation = FusedMovingAvgObsFakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_symmetric if config.scheme == "sym" else torch.per_tensor_affine,
    )
    per_channel = config.granularity == "per_channel"
    weight = FusedMovingAvgObsFakeQuantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver if per_channel else MovingAverageMinMaxObserver,
        quant_min=weight_range[0],
        quant_max=weight_range[1],
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric,
        averaging_constant=WEIGHT_AVERAGING,
    )
    return QConfig(activation=activation, weight=weight)


def _fx_qat_mapping(config: QATConfig) -> Any:
    from inc_torch.ptq._fx import base_mapping

    return base_mapping(OpSettings.of(QuantConfig(format="fx")), qat_qconfig=_fx_qat_qconfig(config))


def _size_weight_fake_quants(prepared: torch.fx.GraphModule) -> None:
    """Give each per-channel weight fake quant its channel count before the first call.

    Its scale starts with one element and its range empty, resized by the first call: ``torch.compile`` of the QAT
    model failed there, in the user's first training step (inductor's functional fused observer asserts sizes:
    "expected size 8==1"). Sized from the weight's shape (node metadata); the values are placeholders the first
    step overwrites exactly: weight ranges follow the current weights (averaging constant 1)."""
    for node in prepared.graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        fake_quant = prepared.get_submodule(str(node.target))
        observer = getattr(fake_quant, "activation_post_process", None)
        if fake_quant.__dict__.get("qscheme") not in (torch.per_channel_symmetric, torch.per_channel_affine):
            continue
        if getattr(observer, "averaging_constant", None) != WEIGHT_AVERAGING or observer.min_val.numel() != 0:
            continue  # an activation's moving average, or already sized
        value = node.args[0].meta.get("val")
        channels = value.shape[fake_quant.ch_axis] if isinstance(value, torch.Tensor) else None
        if not isinstance(channels, int) or fake_quant.scale.numel() != 1:
            continue
        with torch.no_grad():
            fake_quant.scale.resize_(channels).fill_(1.0)
            fake_quant.zero_point.resize_(channels).zero_()
            observer.min_val.resize_(channels).zero_()
            observer.max_val.resize_(channels).zero_()


def _pt2e_train_eval(model: torch.fx.GraphModule) -> None:
    """Make ``train()``/``eval()`` switch the exported graph's dropout and batch norm, keeping frozen BN frozen."""
    from torchao.quantization.pt2e import export_utils

    def train(self: torch.fx.GraphModule, mode: bool = True) -> torch.fx.GraphModule:
        if mode:
            export_utils._move_exported_model_to_train(self)
            if getattr(self, _STATE).bn_frozen:
                export_utils._replace_batchnorm(self, train_to_eval=True)
        else:
            export_utils._move_exported_model_to_eval(self)
        switch_attention_dropout(self, train=mode)
        switch_drop_path(self, train=mode)
        restore_batch_norm_settings(self, getattr(self, _STATE).batch_norms)
        self.training = mode
        return self

    _set_train_eval(model, train)


def _set_train_eval(model: torch.fx.GraphModule, train: Any) -> None:
    """``model.train(mode)`` and ``model.eval()`` both run ``train``."""

    def eval_(self: torch.fx.GraphModule) -> torch.fx.GraphModule:
        return train(self, False)  # type: ignore[no-any-return]

    model.train = types.MethodType(train, model)  # type: ignore[method-assign]
    model.eval = types.MethodType(eval_, model)  # type: ignore[method-assign]


def _fx_train_eval(model: torch.fx.GraphModule) -> None:
    """Make ``train()``/``eval()`` switch what the trace recorded for training mode as constants and ops."""

    def train(self: torch.fx.GraphModule, mode: bool = True) -> torch.fx.GraphModule:
        nn.Module.train(self, mode)  # the modules the graph calls (dropout, the QAT conv-bn modules)
        switch_training_arguments(self, train=mode)
        switch_attention_dropout(self, train=mode)
        switch_drop_path(self, train=mode)
        return self

    _set_train_eval(model, train)


def _step_hook(module: nn.Module, args: Any) -> None:
    state: _QatState = getattr(module, _STATE)
    if not (module.training and torch.is_grad_enabled()):
        return
    state.steps += 1
    getattr(module, _STEPS).fill_(state.steps)
    _follow_schedule(module, state)


def _resume(module: nn.Module, incompatible_keys: Any) -> None:
    """After ``load_state_dict``: the step count of the checkpoint, and the freezes it had reached. The fake
    quantizers' own switches are in the state dict; the frozen batch norms are not (a graph rewrite on PT2E, a
    module attribute on FX), so a run resumed from a checkpoint kept updating their statistics."""
    state: _QatState = getattr(module, _STATE)
    state.steps = int(getattr(module, _STEPS))
    _follow_schedule(module, state)


def _without_steps(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """A state dict saved before the step count was kept (or by hand without it) loads as it did: steps as they are."""
    state_dict.setdefault(prefix + _STEPS, getattr(module, _STEPS).clone())


def _follow_schedule(module: nn.Module, state: _QatState) -> None:
    """Freeze observers and batch norms once ``state.steps`` training steps have passed their configured steps."""
    config = state.config
    if config.freeze_observer_step is not None and not state.observers_frozen and state.steps > config.freeze_observer_step:
        _freeze_observers(module, state)
    # PT2E freezes batch norm by rewriting the graph, which takes effect from the next call (nn.Module binds
    # forward before it runs the pre-hooks): rewritten one step ahead, so that both paths update the statistics
    # in exactly freeze_bn_step steps
    ahead = 1 if state.format == "pt2e" else 0
    if config.freeze_bn_step is not None and not state.bn_frozen and state.steps + ahead > config.freeze_bn_step:
        _freeze_bn(module, state)


def _freeze_observers(module: nn.Module, state: _QatState) -> None:
    if state.format == "pt2e":
        module.apply(torchao_pt2e().pt2e.disable_observer)
    else:
        module.apply(torch.ao.quantization.disable_observer)
    state.observers_frozen = True


def _freeze_bn(module: nn.Module, state: _QatState) -> None:
    state.bn_frozen = True
    if state.format == "pt2e":
        from torchao.quantization.pt2e import export_utils

        export_utils._replace_batchnorm(module, train_to_eval=True)
        restore_batch_norm_settings(module, state.batch_norms)  # type: ignore[arg-type]
    else:
        # torch.ao's freeze_bn_stats helper only knows the ConvBn modules; a Linear + BatchNorm1d pair
        # becomes a LinearBn1d, which has the same method, so every fused module is frozen here.
        for sub in module.modules():
            if isinstance(sub, _FUSED_BN_QAT):
                sub.freeze_bn_stats()


@wrap_framework_errors("QAT preparation (prepare_qat)")
def prepare_qat(model: nn.Module, config: QATConfig, example_inputs: Any, *, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` with fake quantization, to train in your own loop.

    Args:
        model: the FP32 model (left unchanged unless ``inplace``).
        config: the QAT recipe; ``format`` ``"default"``/``"pt2e"`` (torch.export graph, converts to an
            inductor INT8 model) or ``"fx"`` (torch.ao FX, converts to x86 quantized modules).
        example_inputs: one batch: a tensor/array, a tuple of them, or a mapping of keyword inputs. A
            transformers model's batch may hold its ``labels``: the QAT model then takes them and returns the
            head's loss (``model(**batch).loss``, as in a Hugging Face loop); the INT8 model of :func:`convert`
            takes the other inputs alone (PT2E).
        inplace: allow FX preparation to reuse ``model``'s modules instead of copying them.

    Returns:
        The model to train. Build the optimizer on its parameters; call ``train()``/``eval()`` as usual.

    Raises:
        ConfigError: bad config, or ``exclude`` naming layers the model lacks.
        DatasetError: ``example_inputs`` do not fit the model.
        UnsupportedModelError: the model cannot be captured by the chosen path.
    """
    fmt = _check(model, config)
    fx_table: dict[str, Any] = {}
    hidden: tuple[str, ...] = ()
    if fmt == "fx":
        model = with_affine_batch_norms(model)  # a copy where it changes one: the user's model stays as it is
        entries, hidden = traced_fx_ops(model, _fx_qat_mapping(config), qat=True)
        fx_table = {entry.op.name: entry for entry in entries}
        ops = tuple(entry.op for entry in fx_table.values())
    else:
        ops = quantizable_ops(model, QuantConfig(format=fmt), fmt)
    excluded = _excluded(model, config, ops)
    example = to_inputs(example_inputs, float_dtype(model))
    eval_outputs = check_runs(eval_copy(model), example, "example_inputs")
    work = fold_parametrizations((model if inplace and fmt == "fx" else copy.deepcopy(model)).eval())
    work.train()
    if fmt == "pt2e":
        ao = torchao_pt2e()
        graph = export_graph(work, example, train=True)
        qat_ready_batch_norms(graph)
        conv1d_as_conv2d(graph).log()  # trained and converted as conv2d (conv-bn folding included)
        conv_transpose_as_conv2d(graph).log()  # trained and converted as the conv2d of its phases
        restore_conv_transpose(graph, frozenset(excluded))  # those kept FP32 as they were
        # The PTQ quantizer class: float tensors only, no conv1d left unrewritten quantized.
        quantizer = float_only_quantizer_class()().set_global(_pt2e_qat_config(config))
        for name in excluded:
            quantizer.set_module_name_qconfig(name, None)
        with quiet(), fusing_only_present_conv_bn_pairs():
            prepared = ao.prepare_qat_pt2e(graph, quantizer)
        _pt2e_train_eval(prepared)
        _size_weight_fake_quants(prepared)
        warn_mode_dependent_outputs(model, getattr(graph, "_out_spec", None), eval_outputs)
    else:
        from inc_torch.ptq._calibration import integer_nodes, propagated_fx_graph, python_value_nodes
        from inc_torch.ptq._fx import integer_ops, onednn_depthwise_conv1d

        trace = propagated_fx_graph(work, example, train=True)  # the graph as the training loop runs it
        warn_mode_dependent_outputs(model, trace.meta["inc_output_spec"], eval_outputs)
        # ops computing on integers (index arithmetic) would get fake quantization of a Long tensor
        integer = integer_ops(fx_table, integer_nodes(trace))
        if integer:
            log.info("%d op(s) compute on integer tensors and stay FP32: %s", len(integer), ", ".join(integer[:5]))
        # ops on Python values (shape arithmetic) would get fake quantization of a tuple; a multiply by a drop
        # path's mask stays float, so that evaluation multiplies by 1 (see switch_drop_path) and nothing rounds it
        python_values = python_value_nodes(trace)
        masks = {mask.name for mask, _ in drop_path_masks(trace)}
        integer += [
            name for name, entry in fx_table.items()
            if entry.node in python_values or masks.intersection(entry.reads)
        ]
        # trained in float: their INT8 kernel can stall, or computes wrongly on this CPU (see ptq._grouped_conv)
        stalling = [*onednn_depthwise_conv1d(work, fx_table), *miscomputed_grouped_convs(work, fx_table)]
        mapping = apply_fx_settings(_fx_qat_mapping(config), fx_table, dict.fromkeys([*excluded, *integer, *stalling]))
        if hidden:  # trained in float as opaque calls: convert_fx could not quantize them (see keyword_weight_scopes)
            warn_kept_float(hidden)
            for scope in hidden:
                keep_float(work, scope)
        flags = training_flag_calls(work, leaves=(KeptFloat,))  # before prepare_qat_fx swaps work's modules
        prepared = fx_prepare(work, mapping, positional(work, example), qat=True, leaves=(KeptFloat,))
        mark_training_flags(prepared, flags)
        _reduce_depthwise_fake_quant(prepared, config)
        _fx_train_eval(prepared)
    tables = frozenset(op.name for op in ops if op.op_type in LOOKUP_NAMES and op.name not in excluded)
    labels = label_inputs(model, example) if fmt == "pt2e" else ()
    if labels:  # the INT8 model will take the inputs alone: refused now, not after training, if it cannot
        check_label_inputs(prepared, labels)
    state = _QatState(
        format=fmt, config=config, example=example, tables=tables if fmt == "pt2e" else frozenset(), labels=labels,
        batch_norms=batch_norm_settings(model) if fmt == "pt2e" else {},
    )
    setattr(prepared, _STATE, state)
    prepared.register_buffer(_STEPS, torch.zeros((), dtype=torch.long))
    state.hook_id = prepared.register_forward_pre_hook(_step_hook).id
    state.load_hook_ids = (
        prepared.register_load_state_dict_pre_hook(_without_steps).id,
        prepared.register_load_state_dict_post_hook(_resume).id,
    )
    prepared.train()
    if config.freeze_bn_step == 0:  # statistics never updated
        _freeze_bn(prepared, state)
    return prepared


@wrap_framework_errors("QAT conversion to INT8 (convert)")
def convert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The INT8 model of a model returned by :func:`prepare_qat` (after training).

    Returns:
        PT2E: a :class:`CompiledQuantizedModule`; FX: a GraphModule of x86 quantized modules.

    Raises:
        UnsupportedModelError: ``model`` was not prepared by :func:`prepare_qat`.
    """
    state: _QatState | None = getattr(model, _STATE, None)
    if state is None:
        raise UnsupportedModelError(
            f"convert() takes a model returned by inc_torch.prepare_qat, got a {type(model).__name__} without QAT "
            "state. For post-training quantization use inc.quantize(model, inc.QuantConfig(), dataset=...)."
        )
    with quiet():
        work = model if inplace else copy.deepcopy(model)
    if state.hook_id is not None:
        work._forward_pre_hooks.pop(state.hook_id, None)
    pre, post = state.load_hook_ids
    work._load_state_dict_pre_hooks.pop(pre, None)
    work._load_state_dict_post_hooks.pop(post, None)
    work._buffers.pop(_STEPS, None)
    work.eval()
    with quiet():
        if state.format == "pt2e":
            erase_drop_path(work)  # off since work.eval(); the INT8 model draws no mask
            with folding_only_qat_conv_bn_pairs(), folding_with_batch_norm_settings(state.batch_norms):
                converted = torchao_pt2e().convert_pt2e(work)
            for attr in ("train", "eval", _STATE):
                converted.__dict__.pop(attr, None)
            # tables train in float (no fake quantization): stored 8 bits per row as post-training PT2E does
            quantize_tables(converted, state.tables)
            if state.labels:  # trained on the head's loss; the INT8 model takes the inputs alone
                drop_label_inputs(converted, state.labels)
            return CompiledQuantizedModule(converted, without_labels(state.example, state.labels))
        from torch.ao.quantization.quantize_fx import convert_fx

        from inc_torch.ptq._fx import EXAMPLE_ATTR

        converted = convert_fx(work)  # type: ignore[arg-type]  # prepare_qat_fx returned a GraphModule
        erase_drop_path(converted)  # off since work.eval(); the INT8 model draws no mask
        for attr in ("train", "eval"):  # its traced training flags stay False: an inference model
            converted.__dict__.pop(attr, None)
    converted.__dict__.pop(_STATE, None)
    setattr(converted, EXAMPLE_ATTR, state.example)
    return converted
