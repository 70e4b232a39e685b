"""What a training-mode capture records that a QAT model must not do in evaluation, nor its INT8 model.

``prepare_qat`` captures the model in training mode (PT2E: exported; FX: symbolically traced). torchao's train/eval
switch then rewrites ``aten.dropout`` and batch norm only, and an FX graph has no switch at all but for the modules
it calls. Training-only behaviours recorded as graph constants or ops of their own: a transformers model's
attention dropout (``dropout_p`` of ``scaled_dot_product_attention``), stochastic depth's random mask, and on FX
every function traced with ``training=self.training`` as the constant True (``F.dropout``, torchvision's
``stochastic_depth``, ``F.batch_norm``). Left on, the evaluated QAT model and its INT8 model were random (different
outputs on every call) or normalised each batch by its own statistics.
"""

from __future__ import annotations

import inspect
import logging
import operator
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "drop_path_masks", "erase_drop_path", "mark_training_flags", "switch_attention_dropout", "switch_drop_path",
    "switch_training_arguments", "training_flag_calls", "warn_mode_dependent_outputs",
]

log = logging.getLogger("inc")

_SDPA_DROPOUT = 4  # scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, ...)


def switch_attention_dropout(graph_module: torch.fx.GraphModule, *, train: bool) -> None:
    """Set the attention dropout the training-mode export wrote into each ``scaled_dot_product_attention`` as a
    constant (a transformers model passes ``dropout_p=0.1 if self.training else 0.0``) to 0 for evaluation, and
    back for training. torchao's train/eval switch rewrites ``aten.dropout`` only: the QAT model and its INT8
    model dropped a tenth of the attention weights at inference, different on every call (BERT hidden states at
    cosine 0.98 to FP32 where post-training INT8 is at 0.9998)."""
    changed = False
    for node in graph_module.graph.nodes:
        if node.target not in (torch.ops.aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention):
            continue
        args, kwargs = list(node.args), dict(node.kwargs)
        trained = node.meta.setdefault("inc_dropout_p", kwargs.get("dropout_p", args[_SDPA_DROPOUT] if len(args) > _SDPA_DROPOUT else 0.0))
        wanted = trained if train else 0.0
        if "dropout_p" in kwargs:
            kwargs["dropout_p"] = wanted
        elif len(args) > _SDPA_DROPOUT:
            args[_SDPA_DROPOUT] = wanted
        else:
            continue
        if (tuple(args), kwargs) != (node.args, dict(node.kwargs)):
            node.args, node.kwargs = tuple(args), kwargs
            changed = True
    if changed:
        graph_module.recompile()


# The probability parameter that makes a function with a ``training`` flag a random drop (F.dropout and its kin,
# torchvision's stochastic_depth, timm's drop_path): where a model's two traces cannot say which calls pass
# ``self.training`` (see :func:`mark_training_flags`), those calls are the ones switched.
_DROP_PROBABILITY = ("p", "drop_prob", "dropout_p", "drop_rate")
_FOLLOWS = "inc_follows_training"  # node meta: the call's ``training`` flag is the model's mode (from the two traces)


def _parameter_names(node: torch.fx.Node) -> list[str]:
    if node.op != "call_function":
        return []
    try:
        return list(inspect.signature(node.target).parameters)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # a builtin without a signature
        return []


def _flag_argument(node: torch.fx.Node) -> str | int | None:
    """Where a traced call takes ``training`` as a constant flag: its keyword, or its position."""
    names = _parameter_names(node)
    if "training" not in names:
        return None
    if isinstance(node.kwargs.get("training"), bool):
        return "training"
    position = names.index("training")
    return position if position < len(node.args) and isinstance(node.args[position], bool) else None


def _flag(node: torch.fx.Node, where: str | int) -> bool:
    return bool(node.kwargs[where] if isinstance(where, str) else node.args[where])


def _training_argument(node: torch.fx.Node) -> str | int | None:
    """Where a call's constant ``training`` flag is the model's mode: known from the two traces, else guessed for
    random drops only (the flag of a call whose every trace passes True, a Monte Carlo dropout, stays True)."""
    where = _flag_argument(node)
    if where is None:
        return None
    follows = node.meta.get(_FOLLOWS)
    if follows is None:
        follows = any(name in _parameter_names(node) for name in _DROP_PROBABILITY)
    return where if follows else None


def _flags_by_function(model: torch.nn.Module, leaves: tuple[type, ...]) -> dict[object, list[bool]]:
    """Each function's ``training`` flags in one symbolic trace of ``model`` in its current mode, in call order."""

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, module: torch.nn.Module, qualified_name: str) -> bool:
            return isinstance(module, leaves) or super().is_leaf_module(module, qualified_name)

    flags: dict[object, list[bool]] = defaultdict(list)
    for node in _Tracer().trace(model).nodes:
        where = _flag_argument(node)
        if where is not None:
            flags[node.target].append(_flag(node, where))
    return flags


def training_flag_calls(model: torch.nn.Module, *, leaves: tuple[type, ...] = ()) -> dict[object, list[bool]]:
    """Which calls of each function pass ``training=self.training``: a trace in training mode and one in eval
    mode, compared call by call (True then False). A flag that is a constant in the model's code (``training=True``)
    is the same in both. A function called a different number of times in the two modes (under ``if
    self.training``) is left out: its calls cannot be paired. ``model`` is traced in both modes and left in its own."""
    mode = model.training
    try:
        model.train(True)
        trained = _flags_by_function(model, leaves)  # traced in this mode before (propagated_fx_graph)
        model.train(False)
        try:
            evaluated = _flags_by_function(model, leaves)
        except Exception as exc:  # QAT needs the training-mode trace only: the mode's flags are then guessed
            log.info("The model does not trace in eval mode (%s): only random-drop calls switch with train()/eval().", exc)
            return {}
    finally:
        model.train(mode)
    return {
        target: [t and not e for t, e in zip(flags, evaluated[target])]
        for target, flags in trained.items()
        if len(flags) == len(evaluated.get(target, ()))
    }


def mark_training_flags(graph_module: torch.fx.GraphModule, calls: dict[object, list[bool]]) -> None:
    """Record on each call of ``graph_module`` (traced in training mode) whether its ``training`` flag follows the
    model's mode, from :func:`training_flag_calls`; :func:`switch_training_arguments` switches exactly those."""
    seen: dict[object, int] = defaultdict(int)
    for node in graph_module.graph.nodes:
        if _flag_argument(node) is None or node.target not in calls:
            continue
        index = seen[node.target]
        seen[node.target] += 1
        if index < len(calls[node.target]):
            node.meta[_FOLLOWS] = calls[node.target][index]


def switch_training_arguments(graph_module: torch.fx.GraphModule, *, train: bool) -> None:
    """The ``training`` flag a symbolic trace wrote as a constant into each function call (``F.dropout(x, p,
    training=self.training)``, torchvision's ``stochastic_depth(x, p, mode, self.training)``, ``F.batch_norm(...,
    training=self.training)``, traced in training mode: True) set False for evaluation and back to its traced
    value for training. The FX QAT model of torchvision's EfficientNet-B0 in eval mode, and its INT8 model, dropped
    residual branches at random: cosine 0.53 to the QAT model, its graph at 0.35 to FP32 with fake quantization
    off; a functional batch norm normalised by the statistics of each evaluated batch."""
    changed = False
    for node in graph_module.graph.nodes:
        where = _training_argument(node)
        if where is None:
            continue
        traced = node.meta.setdefault("inc_training", _flag(node, where))
        wanted = traced and train
        if isinstance(where, str):
            if node.kwargs[where] != wanted:
                node.kwargs = {**node.kwargs, where: wanted}
                changed = True
        elif node.args[where] != wanted:
            node.args = (*node.args[:where], wanted, *node.args[where + 1 :])
            changed = True
    if changed:
        graph_module.recompile()


# Stochastic depth's mask as an export (aten ops) or a symbolic trace (tensor methods, operators) writes it
_BERNOULLI = ("aten.bernoulli_.float", "aten.bernoulli.p", "aten.bernoulli.default", "bernoulli_", "bernoulli")
_DIVIDE = (
    "aten.div_.Scalar", "aten.div.Scalar", "aten.div_.Tensor", "aten.div.Tensor", "div_", "div",
    str(operator.truediv), str(torch.div),
)
_MULTIPLY = ("aten.mul.Tensor", "mul", str(operator.mul), str(torch.mul))


_RAND = ("aten.rand.default", str(torch.rand))
_ADD = ("aten.add.Tensor", "add", str(operator.add), str(torch.add))
_FLOOR = ("aten.floor.default", "aten.floor_.default", "floor", "floor_", str(torch.floor))


def _bernoulli_mask(node: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    """torchvision's ``stochastic_depth``, timm's ``drop_path``: a Bernoulli draw into an empty tensor, divided by
    the survival rate (timm's unscaled form: not divided)."""
    mask, drawing = node, [node]
    users = list(node.users)
    if len(users) == 1 and str(users[0].target) in _DIVIDE and users[0].args[0] is node:
        mask = users[0]
        drawing.insert(0, mask)
    drawn = node.args[0] if node.args else None
    if isinstance(drawn, torch.fx.Node) and len(drawn.users) == 1 and "empty" in str(drawn.target):
        drawing.append(drawn)  # the uninitialised tensor drawn into
    return mask, drawing


def _rounded_mask(node: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    """transformers' ``drop_path`` (Swin, BEiT, ConvNeXt...): ``floor(keep + rand(shape))``, a 0/1 mask that
    multiplies ``input.div(keep)``."""
    users = list(node.users)
    if len(users) != 1 or str(users[0].target) not in _ADD or not any(isinstance(a, float) for a in users[0].args):
        return None
    add = users[0]
    rounded = list(add.users)
    if len(rounded) != 1 or str(rounded[0].target) not in _FLOOR:
        return None
    return rounded[0], [rounded[0], add, node]


def drop_path_masks(graph_module: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, list[torch.fx.Node]]]:
    """The random masks of stochastic depth, as torchvision, timm and transformers write it. Each mask with the
    nodes computing it (last first)."""
    masks = []
    for node in graph_module.graph.nodes:
        if str(node.target) in _BERNOULLI:
            masks.append(_bernoulli_mask(node))
        elif str(node.target) in _RAND and (found := _rounded_mask(node)) is not None:
            masks.append(found)
    return masks


def _set_arg(node: torch.fx.Node, index: int, value: float) -> bool:
    """Set a float argument for evaluation, keeping the traced arguments in the node's meta for training."""
    if index >= len(node.args) or not isinstance(node.args[index], float) or node.args[index] == value:
        return False
    node.meta.setdefault("inc_drop_path", node.args)
    node.args = (*node.args[:index], value, *node.args[index + 1 :])
    return True


def _constants_for_evaluation(mask: torch.fx.Node, drawing: list[torch.fx.Node]) -> bool:
    """Make the mask all ones, and undo a division of the branch by the survival rate.

    The graph keeps every node and edge, only float arguments change: a dead-code pass (torchao's train/eval switch
    runs one) would otherwise remove mask nodes evaluation leaves unread, and training could not have them back.
    A draw whose probability is a tensor (``torch.bernoulli(probs)``) has no such argument: its mask is replaced by
    1 in the multiplications instead."""
    changed = False
    if str(drawing[-1].target) in _RAND:  # transformers: input.div(keep) * floor(keep + rand)
        add = drawing[1]
        index = next(i for i, a in enumerate(add.args) if isinstance(a, float))
        keep = add.meta.get("inc_drop_path", add.args)[index]
        changed |= _set_arg(add, index, 1.0)
        for user in mask.users:
            branch = next((a for a in user.args if a is not mask), None)
            if isinstance(branch, torch.fx.Node) and str(branch.target) in _DIVIDE and len(branch.users) == 1:
                if branch.meta.get("inc_drop_path", branch.args)[1:2] == (keep,):
                    changed |= _set_arg(branch, 1, 1.0)
        return changed
    bernoulli = next(n for n in drawing if str(n.target) in _BERNOULLI)  # torchvision, timm: bernoulli(keep) / keep
    if not (len(bernoulli.args) > 1 and isinstance(bernoulli.args[1], float)):
        for user in list(mask.users):
            user.meta.setdefault("inc_drop_path", user.args)
            user.args, changed = tuple(1.0 if arg is mask else arg for arg in user.args), True
        return changed
    changed |= _set_arg(bernoulli, 1, 1.0)
    if mask is not bernoulli:
        changed |= _set_arg(mask, 1, 1.0)
    return changed


def switch_drop_path(graph_module: torch.fx.GraphModule, *, train: bool) -> None:
    """Stochastic depth off for evaluation (each mask all ones), on again for training.

    The training-mode export records the random mask as graph ops, which no train/eval switch knows: the QAT
    model in eval mode and its INT8 model dropped residual branches at random (torchvision EfficientNet-B0: INT8
    outputs different on every call, cosine 0.26 to FP32 against PTQ's 0.93; transformers' Swin, whose default
    ``drop_path_rate`` is 0.1, the same)."""
    changed = False
    if train:
        for node in graph_module.graph.nodes:
            saved = node.meta.pop("inc_drop_path", None)
            if saved is not None:
                node.args, changed = saved, True
    else:
        for mask, drawing in drop_path_masks(graph_module):
            if mask.users and all(
                str(user.target) in _MULTIPLY and not (user.op == "call_method" and user.args[0] is mask)
                for user in mask.users
            ):  # a mask multiplying a branch
                changed |= _constants_for_evaluation(mask, drawing)
    if changed:
        graph_module.recompile()


def erase_drop_path(graph_module: torch.fx.GraphModule) -> None:
    """Take the masks out of an evaluation graph (the INT8 model's, after :func:`switch_drop_path`): each branch
    multiplied by its all-ones mask is the branch itself, and an in-place Bernoulli draw would run on every call."""
    graph = graph_module.graph
    for mask, drawing in drop_path_masks(graph_module):
        ones = any("inc_drop_path" in node.meta for node in drawing)  # made all ones for evaluation
        for user in list(mask.users) if ones else ():
            branch = next((a for a in user.args if a is not mask), None)
            if not isinstance(branch, torch.fx.Node):
                continue
            divided = branch if str(branch.target) in _DIVIDE and branch.args[1:2] == (1.0,) else None
            if divided is not None and len(divided.users) == 1:  # input.div(1.0): transformers' form, evaluated
                branch = divided.args[0]
            user.replace_all_uses_with(branch)
            graph.erase_node(user)
            if divided is not None and not divided.users:
                graph.erase_node(divided)
        if not mask.users:
            for node in drawing:
                graph.erase_node(node)
    for node in graph.nodes:
        node.meta.pop("inc_drop_path", None)
    graph_module.recompile()


def _described(spec: Any) -> str:
    if spec.is_leaf():
        return "one value"
    container = spec.context if isinstance(spec.context, type) else spec.type  # a namedtuple's class is its context
    kind = getattr(container, "__name__", str(container))
    return f"a {kind} of {spec.num_leaves} value{'s' if spec.num_leaves != 1 else ''}"


def warn_mode_dependent_outputs(model: torch.nn.Module, trained: Any, evaluated: Any) -> None:
    """Say so where ``model`` returns other outputs in training mode than in eval mode (``trained``: the tree
    spec of the training-mode capture's outputs; ``evaluated``: the outputs of one eval-mode call): an auxiliary
    head under ``if self.training``, as torchvision's GoogLeNet and Inception v3 have. The QAT model is captured in
    training mode, so it returns the training-mode outputs in eval mode too, and so does its INT8 model."""
    from torch.utils._pytree import tree_structure

    spec = tree_structure(evaluated)
    if trained is None or trained == spec:
        return
    log.warning(
        "%s returns %s in training mode and %s in eval mode. prepare_qat captures the training-mode forward, so the "
        "QAT model returns the training-mode outputs in eval mode too, and so does the INT8 model of convert (any "
        "auxiliary head then runs in every inference). For the eval-mode outputs, prepare a model whose forward "
        "returns them in training mode as well (torchvision's GoogLeNet and Inception v3: aux_logits=False).",
        type(model).__name__, _described(trained), _described(spec),
    )
