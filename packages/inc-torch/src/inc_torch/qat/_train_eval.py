"""What a training-mode export records that a QAT model must not do in evaluation, nor its INT8 model.

``prepare_qat`` exports the model in training mode; torchao's train/eval switch then rewrites ``aten.dropout`` and
batch norm only. Two more training-only behaviours are graph constants or ops of their own: a transformers
model's attention dropout (``dropout_p`` of ``scaled_dot_product_attention``) and stochastic depth's random mask.
Left on, the evaluated QAT model and its INT8 model were random: different outputs on every call.
"""

from __future__ import annotations

import torch

__all__ = ["erase_drop_path", "switch_attention_dropout", "switch_drop_path"]

_SDPA_DROPOUT = 4  # scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, ...)


def switch_attention_dropout(graph_module: torch.fx.GraphModule, *, train: bool) -> None:
    """Set the attention dropout the training-mode export wrote into each ``scaled_dot_product_attention`` as a
    constant (a transformers model passes ``dropout_p=0.1 if self.training else 0.0``) to 0 for evaluation, and
    back for training. torchao's train/eval switch rewrites ``aten.dropout`` only: the QAT model and its INT8
    model dropped a tenth of the attention weights at inference, different on every call (BERT hidden states at
    cosine 0.98 to FP32 where post-training INT8 is at 0.9998)."""
    changed = False
    for node in graph_module.graph.nodes:
        if node.target is not torch.ops.aten.scaled_dot_product_attention.default:
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


_BERNOULLI = ("aten.bernoulli_.float", "aten.bernoulli.p", "aten.bernoulli.default")
_DIVIDE = ("aten.div_.Scalar", "aten.div.Scalar", "aten.div_.Tensor", "aten.div.Tensor")


def _drop_path_masks(graph_module: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, list[torch.fx.Node]]]:
    """The random masks of stochastic depth (torchvision's ``StochasticDepth``, timm's ``DropPath``): a Bernoulli
    draw into an empty tensor, divided by the survival rate. Each mask with the nodes computing it (last first)."""
    masks = []
    for node in graph_module.graph.nodes:
        if str(node.target) not in _BERNOULLI:
            continue
        mask, drawing = node, [node]
        users = list(node.users)
        if len(users) == 1 and str(users[0].target) in _DIVIDE and users[0].args[0] is node:
            mask = users[0]
            drawing.insert(0, mask)
        drawn = node.args[0] if node.args else None
        if isinstance(drawn, torch.fx.Node) and len(drawn.users) == 1 and "empty" in str(drawn.target):
            drawing.append(drawn)  # the uninitialised tensor drawn into
        masks.append((mask, drawing))
    return masks


def switch_drop_path(graph_module: torch.fx.GraphModule, *, train: bool) -> None:
    """Stochastic depth off for evaluation (each branch multiplied by 1), on again for training.

    The training-mode export records the random mask as graph ops, which no train/eval switch knows: the QAT
    model in eval mode and its INT8 model dropped residual branches at random (torchvision EfficientNet-B0: INT8
    outputs different on every call, cosine 0.26 to FP32 against PTQ's 0.93)."""
    changed = False
    if train:
        for node in graph_module.graph.nodes:
            saved = node.meta.pop("inc_drop_path", None)
            if saved is not None:
                node.args, changed = saved, True
    else:
        for mask, _ in _drop_path_masks(graph_module):
            if not mask.users or any(str(user.target) != "aten.mul.Tensor" for user in mask.users):
                continue  # not a mask multiplying a branch
            for user in list(mask.users):
                user.meta["inc_drop_path"] = user.args
                user.args, changed = tuple(1.0 if arg is mask else arg for arg in user.args), True
    if changed:
        graph_module.recompile()


def erase_drop_path(graph_module: torch.fx.GraphModule) -> None:
    """Take the masks an evaluation graph (the INT8 model's, after :func:`switch_drop_path`) no longer reads out of
    it: an in-place Bernoulli draw survives dead-code elimination, and would run on every call."""
    graph = graph_module.graph
    for node in graph.nodes:
        node.meta.pop("inc_drop_path", None)
    for mask, drawing in _drop_path_masks(graph_module):
        if not mask.users:
            for node in drawing:
                graph.erase_node(node)
    graph_module.recompile()
