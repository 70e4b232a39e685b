"""QAT of a transformers model on its own loss: the labels go in while it trains, not into the INT8 model.

A Hugging Face training loop calls ``model(**batch)`` with ``labels`` in the batch and reads ``.loss``. Given such
a batch as ``example_inputs``, ``prepare_qat`` captures the head's loss with the model, so the QAT model trains as
the FP32 one did. The INT8 model runs inference: :func:`drop_label_inputs` takes the label inputs, and the outputs
only they compute (the loss, returned as ``None``), out of the converted graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from inc_core.errors import UnsupportedModelError
from inc_torch._hf import is_hf_model, label_parameters
from inc_torch._inputs import Inputs


def label_inputs(model: nn.Module, example: Inputs) -> tuple[str, ...]:
    """The keyword inputs of ``example`` that take labels, for a transformers model (none for any other)."""
    _, kwargs = example
    if not kwargs or not is_hf_model(model):
        return ()
    return tuple(name for name in kwargs if name in label_parameters(model))


def without_labels(example: Inputs, labels: tuple[str, ...]) -> Inputs:
    args, kwargs = example
    return args, {name: value for name, value in kwargs.items() if name not in labels}


@dataclass
class _LabelUse:
    """What a captured graph does with its label inputs."""

    placeholders: list[torch.fx.Node]
    guards: list[torch.fx.Node]  # torch.export's input checks, indexed by input position
    sizes: dict[torch.fx.Node, tuple[torch.fx.Node, int]]  # a size read from the labels -> the input it equals
    reached: set[torch.fx.Node]  # what the labels compute (the loss)
    output: torch.fx.Node


def _label_use(graph_module: torch.fx.GraphModule, labels: tuple[str, ...]) -> _LabelUse:
    """Raises UnsupportedModelError where the labels compute more than the loss (see :func:`check_label_inputs`)."""
    graph = graph_module.graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder" and node.target in labels]
    inputs = [node for node in graph.nodes if node.op == "placeholder" and node.target not in labels]
    if len(placeholders) != len(labels):
        raise UnsupportedModelError(
            f"QAT: the captured graph's inputs ({[node.target for node in graph.nodes if node.op == 'placeholder']}) "
            f"do not name the label inputs {list(labels)} of example_inputs; leave the labels out of example_inputs "
            "and compute the loss from the model's outputs in the training loop."
        )
    guards = [node for node in graph.nodes if node.op == "call_module" and str(node.target) == "_guards_fn"]
    # the export may take the batch size from the labels (equal to the inputs': a guard said so): from an input
    sizes = {}
    for node in graph.nodes:
        if node.target is torch.ops.aten.sym_size.int and node.args[0] in placeholders:
            source = _same_size(inputs, node.meta.get("val"))
            if source is not None:  # else a size of the labels alone: what reads it is computed from them
                sizes[node] = source
    reached: set[torch.fx.Node] = set()
    pending = list(placeholders)
    while pending:
        node = pending.pop()
        if node not in reached and node not in sizes and node not in guards and node.op != "output":
            reached.add(node)
            pending.extend(node.users)
    output = next(node for node in graph.nodes if node.op == "output")
    _check_only_the_loss(output, reached, getattr(getattr(graph._codegen, "pytree_info", None), "out_spec", None))
    return _LabelUse(placeholders, guards, sizes, reached, output)


def check_label_inputs(graph_module: torch.fx.GraphModule, labels: tuple[str, ...]) -> None:
    """Refuse, before training, a QAT graph whose labels compute more than the loss (a seq2seq decoder starting from
    the labels shifted right): its INT8 model could not run without them."""
    _label_use(graph_module, labels)


def drop_label_inputs(graph_module: torch.fx.GraphModule, labels: tuple[str, ...]) -> None:
    """Remove the ``labels`` inputs of a captured graph (in place), with what only they compute: each output
    computed from them (the loss) becomes ``None``; the rest of the graph is unchanged."""
    use = _label_use(graph_module, labels)
    graph = graph_module.graph
    for node in use.guards:
        # the INT8 model is compiled, and its compile guards the inputs it is given
        graph.erase_node(node)
    for node, source in use.sizes.items():
        node.args = source
    use.output.args = tuple(
        torch.fx.node.map_arg(arg, lambda node: None if node in use.reached else node)  # type: ignore[arg-type,return-value]
        for arg in use.output.args
    )
    # what the labels compute, the placeholders included, last first: the loss and torch.export's checks of the
    # labels' metadata (side effects, which dead-code elimination keeps)
    for node in reversed(list(graph.nodes)):
        if node in use.reached:
            graph.erase_node(node)
    graph.eliminate_dead_code()  # what only the loss read (log-softmax of the logits)
    codegen = graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None:  # torch.export's forward(*args, **kwargs): the kwargs spec loses the label names
        spec = info.in_spec
        args_spec, kwargs_spec = spec.children() if hasattr(spec, "children") else spec.children_specs  # torch 2.8
        kept = [name for name in kwargs_spec.context if name not in labels]
        in_spec = torch.utils._pytree.tree_structure(((0,) * args_spec.num_leaves, dict.fromkeys(kept, 0)))
        codegen.pytree_info = info._replace(orig_args=[a for a in info.orig_args if a not in labels], in_spec=in_spec)
    graph_module.recompile()


def _same_size(inputs: list[torch.fx.Node], size: object) -> tuple[torch.fx.Node, int] | None:
    """An input and a dimension of it whose (symbolic) size is ``size``, if one has it."""
    for node in inputs:
        for dim, found in enumerate(getattr(node.meta.get("val"), "shape", ())):
            if isinstance(found, torch.SymInt) and str(found) == str(size):
                return node, dim
    return None


def _check_only_the_loss(output: torch.fx.Node, reached: set[torch.fx.Node], out_spec: object) -> None:
    """Refuse a graph whose outputs other than the loss are computed from the labels (a seq2seq decoder that starts
    from the labels shifted right): without them the INT8 model would lose those outputs."""
    leaves = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    if out_spec is not None:
        paths = [".".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)
                 for path, _ in torch.utils._pytree.tree_flatten_with_path(
            torch.utils._pytree.tree_unflatten(list(range(len(leaves))), out_spec))[0]]  # type: ignore[arg-type]
    else:
        paths = [str(index) for index in range(len(leaves))]
    computed = [path for path, leaf in zip(paths, leaves) if leaf in reached and "loss" not in path]
    if computed:
        raise UnsupportedModelError(
            f"The QAT model computes output(s) {computed} from its labels (a seq2seq decoder starting from "
            "the labels shifted right), so its INT8 model cannot run on the inputs alone. Give the decoder's "
            "inputs (decoder_input_ids) in example_inputs and in each training batch."
        )
