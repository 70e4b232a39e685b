"""torchao's QAT conv + batch-norm rewrite (``prepare_qat_pt2e``) and fold (``convert_pt2e``), without exporting
patterns that cannot match.

torchao's ``convert_pt2e`` folds each QAT conv + batch-norm pair by pattern matching. For every one of four conv
kinds (conv1d, conv2d, conv_transpose1d, conv_transpose2d) it exports 12 match and 12 replacement patterns with
``torch.export`` (strict), about 0.25 s each, whenever the graph holds any batch norm: on the digits CNN of the
tests (conv2d only) QAT convert took 29 s. Post-training convert pays the same wherever a batch norm was left
unfolded (one reading a concatenation, as in DenseNet, or a transposed convolution): 12-25 s per ``inc.quantize``, per
tuning trial, for a fold that has nothing to do.

Every QAT pattern divides the conv's output by the batch norm's scale factor (``conv(x, w * s) / s``, as
``prepare_qat_pt2e`` writes a conv + batch-norm pair), so a pattern of one conv kind can only match a graph where a
conv of that kind feeds a division. The fold of any other kind is skipped: its cheap graph steps still run, the
pattern exports do not, and the folded graph is the one torchao builds.

``prepare_qat_pt2e`` does the same before training: for each conv kind it exports the conv + batch-norm pattern and
its two QAT replacements (``prepare_qat`` of the tests' digits CNN, conv2d only: 1.9 s, 1.0 s without the three
kinds it lacks). Its pattern is a conv whose output a batch norm reads, so a kind none of whose calls feeds a batch
norm is skipped.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from inc_torch.ptq._capture import conv_batch_norms

__all__ = [
    "batch_norm_settings", "folding_only_qat_conv_bn_pairs", "folding_with_batch_norm_settings",
    "fusing_only_present_conv_bn_pairs", "qat_ready_batch_norms", "restore_batch_norm_settings", "with_affine_batch_norms",
]


def _aten_packets() -> dict[Callable[..., Any], Any]:
    aten = torch.ops.aten
    return {
        F.conv1d: aten.conv1d,
        F.conv2d: aten.conv2d,
        F.conv_transpose1d: aten.conv_transpose1d,
        F.conv_transpose2d: aten.conv_transpose2d,
    }


def _feeds_a_division(graph_module: torch.fx.GraphModule, packet: Any) -> bool:
    """Whether a conv of kind ``packet`` has its output divided, as in every QAT conv + batch-norm pattern."""
    divide = torch.ops.aten.div
    return any(
        getattr(node.target, "overloadpacket", None) is packet
        and any(getattr(user.target, "overloadpacket", None) is divide for user in node.users)
        for node in graph_module.graph.nodes
    )


@contextlib.contextmanager
def folding_only_qat_conv_bn_pairs() -> Iterator[None]:
    """Within the block, torchao's QAT conv-bn fold skips each conv kind none of whose calls feeds a division.

    Where torchao's internals differ from what this expects (another release), nothing is patched and
    ``convert_pt2e`` runs as torchao ships it.
    """
    try:
        from torchao.quantization.pt2e import qat_utils

        original = qat_utils._fold_conv_bn_qat_helper
        duplicate_dequantize = qat_utils._duplicate_dequantize_node
        remove_extra_dequantize = qat_utils._remove_extra_dequantize
    except (ImportError, AttributeError):
        yield
        return
    packets = _aten_packets()

    def fold(m: torch.fx.GraphModule, conv_fn: Callable[..., Any], example_inputs: Any, is_cuda: bool) -> Any:
        packet = packets.get(conv_fn)
        if packet is None or _feeds_a_division(m, packet):
            return original(m, conv_fn, example_inputs, is_cuda=is_cuda)
        # The helper's own steps around a match that finds nothing, so the graph leaves as it would have.
        m.graph.eliminate_dead_code()
        m.recompile()
        duplicate_dequantize(m)
        m.recompile()
        remove_extra_dequantize(m)
        m.graph.eliminate_dead_code()
        m.recompile()
        return m

    qat_utils._fold_conv_bn_qat_helper = fold
    try:
        yield
    finally:
        qat_utils._fold_conv_bn_qat_helper = original


def _feeds_a_batch_norm(graph_module: torch.fx.GraphModule, packet: Any, is_batch_norm: Callable[[Any], bool]) -> bool:
    """Whether a conv of kind ``packet`` has its output read by a batch norm, as in torchao's conv + batch-norm pattern."""
    return any(
        getattr(node.target, "overloadpacket", None) is packet and any(is_batch_norm(user) for user in node.users)
        for node in graph_module.graph.nodes
    )


@contextlib.contextmanager
def fusing_only_present_conv_bn_pairs() -> Iterator[None]:
    """Within the block, ``prepare_qat_pt2e``'s conv + batch-norm rewrite skips each conv kind none of whose calls
    feeds a batch norm (its helper's graph clean-up still runs; where torchao differs from this, nothing is patched)."""
    try:
        from torchao.quantization.pt2e import qat_utils
        from torchao.quantization.pt2e.utils import _is_bn_node

        original = qat_utils._fuse_conv_bn_qat_helper
    except (ImportError, AttributeError):
        yield
        return
    packets = _aten_packets()

    def fuse(m: torch.fx.GraphModule, conv_fn: Callable[..., Any], example_inputs: Any, is_cuda: bool) -> Any:
        packet = packets.get(conv_fn)
        if packet is None or _feeds_a_batch_norm(m, packet, _is_bn_node):
            return original(m, conv_fn, example_inputs, is_cuda=is_cuda)
        m.graph.eliminate_dead_code()  # the helper's own first steps; nothing matches after them
        m.recompile()
        return m

    qat_utils._fuse_conv_bn_qat_helper = fuse
    try:
        yield
    finally:
        qat_utils._fuse_conv_bn_qat_helper = original


# Batch-norm settings. torchao writes every batch norm of a QAT graph with the defaults (eps 1e-5, momentum 0.1):
# its QAT conv-bn rewrite, its train/eval switch, and the plain conv-bn pattern its convert folds from (its own
# "TODO: allow setting eps"). torchvision's MobileNetV3 (eps 1e-3) drifted layer by layer: cosine 0.46 to FP32 with
# fake quantization off, and its INT8 weights were folded with the wrong eps. inc gives each batch norm its
# module's settings again, found by the module path of the running mean it reads.

Settings = dict[str, tuple[float | None, float]]

# (momentum, eps) positions of the batch-norm ops in a training-mode export
_BATCH_NORM_ARGS = {"aten.batch_norm.default": (6, 7), "aten._native_batch_norm_legit.default": (6, 7)}


def batch_norm_settings(model: nn.Module) -> Settings:
    """Each batch norm's (momentum, eps), by module path."""
    return {
        name: (module.momentum, module.eps)
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    }


def _set(node: torch.fx.Node, settings: Settings) -> bool:
    positions = _BATCH_NORM_ARGS.get(str(node.target))
    if positions is None or len(node.args) <= positions[1]:
        return False
    running_mean = node.args[3]
    if not isinstance(running_mean, torch.fx.Node) or running_mean.op != "get_attr":
        return False
    found = settings.get(str(running_mean.target).rpartition(".")[0])
    if found is None:
        return False
    args = list(node.args)
    momentum, eps = found
    if momentum is not None:  # None (a cumulative average) has no graph form: left as torchao writes it
        args[positions[0]] = momentum
    args[positions[1]] = eps
    if tuple(args) == node.args:
        return False
    node.args = tuple(args)
    return True


def _set_scale_factor_eps(node: torch.fx.Node, settings: Settings) -> bool:
    """The ``running_var + eps`` of torchao's QAT conv-bn scale factor (``bn.weight / sqrt(running_var + eps)``).

    The conv's weight is fake-quantized scaled by that factor, and ``convert`` folds the batch norm with its own
    eps: written with 1e-5 for a batch norm of eps 1e-3, the weight ranges trained for a weight that the fold then
    scales otherwise (GoogLeNet's INT8 model at cosine 0.93 to its QAT model; torchao's own flow, self-consistent
    at 1e-5, 0.966).
    """
    if str(node.target) != "aten.add.Tensor" or len(node.args) != 2 or not isinstance(node.args[1], float):
        return False
    running_var = node.args[0]
    if not isinstance(running_var, torch.fx.Node) or running_var.op != "get_attr":
        return False
    path, _, leaf = str(running_var.target).rpartition(".")
    found = settings.get(path) if leaf == "running_var" else None
    if found is None or node.args[1] == found[1]:
        return False
    node.args = (running_var, found[1])
    return True


def restore_batch_norm_settings(graph_module: torch.fx.GraphModule, settings: Settings) -> None:
    """Give each batch norm of a QAT graph its module's ``eps`` and ``momentum`` again (in place), in the batch
    norm op and in the scale factor of a conv folded with it."""
    changed = [_set(node, settings) or _set_scale_factor_eps(node, settings) for node in graph_module.graph.nodes]
    if any(changed):
        graph_module.recompile()


@contextlib.contextmanager
def folding_with_batch_norm_settings(settings: Settings) -> Iterator[None]:
    """Within the block, torchao's convert folds each batch norm into its conv with the module's ``eps``."""
    try:
        from torchao.quantization.pt2e import qat_utils

        original = qat_utils.fold_bn_weights_into_conv_node
    except (ImportError, AttributeError):  # another torchao: folded as it ships
        yield
        return

    def fold(conv_node: Any, conv_weight_node: Any, conv_bias_node: Any, bn_node: Any, m: Any, *args: Any, **kwargs: Any) -> Any:
        _set(bn_node, settings)
        return original(conv_node, conv_weight_node, conv_bias_node, bn_node, m, *args, **kwargs)

    qat_utils.fold_bn_weights_into_conv_node = fold
    try:
        yield
    finally:
        qat_utils.fold_bn_weights_into_conv_node = original


# A batch norm without affine parameters (affine=False, or F.batch_norm without a weight) gives torchao's QAT
# conv-bn rewrite no weight: its scale factor ``bn.weight / sqrt(running_var + eps)`` divided None, and the
# first training step failed in the user's loop with a bare RuntimeError, after prepare_qat had succeeded.
def qat_ready_batch_norms(graph_module: torch.fx.GraphModule) -> None:
    """Before ``prepare_qat_pt2e``: give each batch norm after a conv without a weight a constant weight of ones
    (what ``affine=False`` computes; a buffer, so training leaves it at one, and convert folds it as such)."""
    added = 0
    for _, node in conv_batch_norms(graph_module):
        running_mean = node.args[3] if len(node.args) > 3 else None
        if node.args[1] is not None or not isinstance(running_mean, torch.fx.Node) or running_mean.op != "get_attr":
            continue  # a weight already, or no running statistics (refused when captured: check_foldable_batch_norms)
        name = f"_inc_batch_norm_weight_{added}"
        added += 1
        graph_module.register_buffer(name, torch.ones_like(graph_module.get_buffer(str(running_mean.target))))
        with graph_module.graph.inserting_before(node):
            weight = graph_module.graph.get_attr(name)
        node.args = (node.args[0], weight, *node.args[2:])
    if added:
        graph_module.recompile()


def with_affine_batch_norms(model: nn.Module) -> nn.Module:
    """``model``, or a copy whose ``affine=False`` batch norms have a weight of ones and a bias of zeros that do not
    train (the same computation). torch.ao's FX QAT fuses each conv with its batch norm into one module and
    refused one without affine parameters ("Only support fusing BatchNorm2d with affine set to True")."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.affine for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.affine:
            module.affine = True
            module.weight = nn.Parameter(torch.ones(module.num_features), requires_grad=False)
            module.bias = nn.Parameter(torch.zeros(module.num_features), requires_grad=False)
    return model
