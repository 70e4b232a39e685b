"""Graph repairs made during preparation, for exporter habits that ONNX Runtime's quantizers mishandle.

Each repair keeps the model's function: the FP32 outputs of the repaired graph equal those of the
given one. They exist because a quantizer that meets these constructs either raises from deep inside
ORT or, worse, writes an INT8 model that ORT refuses to load.
"""

from __future__ import annotations

import collections
import logging

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = [
    "BIAS_SLOTS",
    "bodies",
    "flatten_row_biases",
    "float_reads_for_subgraphs",
    "free_name",
    "merge_opsets",
    "outer_reads",
    "rename_new_initializers",
    "unshare_biases",
]

log = logging.getLogger("inc")

# Op type -> index of the input the quantizers turn into an int32 bias (scale = input scale x weight scale).
BIAS_SLOTS = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}
# Op type -> index of a constant input the quantizers rewrite for each node: the biases, and Pad's constant_value,
# which the QOperator quantizer replaces by its quantized value (and drops the float one) node by node.
_PER_NODE_CONSTANTS = {**BIAS_SLOTS, "Pad": 2}


def merge_opsets(model: onnx.ModelProto) -> None:
    """Keep one ``opset_import`` entry per domain (the highest version).

    skl2onnx writes the default domain twice when a model needs only ``ai.onnx.ml`` ops (e.g. a
    LogisticRegression or RandomForest converted without ZipMap). ONNX Runtime loads such a model,
    but its quantizers look the default opset up and give up ("Failed to find proper ai.onnx domain").
    """
    versions: dict[str, int] = {}
    for opset in model.opset_import:
        domain = "" if opset.domain == "ai.onnx" else opset.domain
        versions[domain] = max(versions.get(domain, 0), opset.version)
    if len(versions) == len(model.opset_import):
        return
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in versions.items())


def unshare_biases(model: onnx.ModelProto) -> int:
    """Give every bias input of a Conv/ConvTranspose/Gemm, and every Pad's constant value, its own initializer;
    returns how many were copied.

    Exporters (and ORT's own constant sharing) let several nodes read one initializer, typically a zero
    bias. The QOperator quantizer quantizes a bias once, with the first node's input scale, and then
    hands that int32 tensor to every other reader: a second Gemm gets a bias on the wrong scale, and
    an Add that reads the same tensor becomes a QLinearAdd with an int32 input, which ORT rejects
    (``INVALID_GRAPH ... tensor(int32) ... QLinearAdd``). A Pad's constant value shared by several Pads
    (timm's EfficientViT: four) is replaced by the first one's quantized copy and removed, and the
    quantizer then fails on the next ("Invalid model with unknown initializers/tensors"). These tensors
    are small, so copying them is cheap.
    """
    initializers = {init.name: init for init in model.graph.initializer}
    uses: collections.Counter[str] = collections.Counter(
        name for node in model.graph.node for name in node.input if name in initializers
    )
    taken = {*initializers, *(o for node in model.graph.node for o in node.output), *(v.name for v in model.graph.input)}
    copied = 0
    for node in model.graph.node:
        slot = _PER_NODE_CONSTANTS.get(node.op_type)
        if node.domain or slot is None or len(node.input) <= slot:
            continue
        name = node.input[slot]
        if name not in initializers or uses[name] < 2:
            continue
        new_name = free_name(f"{name}.{node.name}", taken)
        copy = onnx.TensorProto()
        copy.CopyFrom(initializers[name])
        copy.name = new_name
        model.graph.initializer.append(copy)
        node.input[slot] = new_name
        uses[name] -= 1
        copied += 1
    if copied:
        log.info("gave %d shared bias or pad-value initializer use(s) their own copy", copied)
    return copied


def flatten_row_biases(model: onnx.ModelProto) -> int:
    """Store a Gemm's ``[1, N]`` bias as ``[N]``; returns how many were changed.

    scikit-learn converters write intercepts as one-row matrices. Gemm broadcasts ``[1, N]`` and
    ``[N]`` the same way, but ORT's int32-bias scale check indexes the bias per output channel and
    raises numpy's "truth value of an array is ambiguous" on a 2-D one (per-channel weights).
    """
    initializers = {init.name: init for init in model.graph.initializer}
    uses: collections.Counter[str] = collections.Counter(name for node in model.graph.node for name in node.input)
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Gemm" or node.domain or len(node.input) < 3:
            continue
        init = initializers.get(node.input[2])
        if init is None or len(init.dims) != 2 or init.dims[0] != 1 or uses[init.name] != 1:
            continue
        array = numpy_helper.to_array(init)
        flat = numpy_helper.from_array(np.ascontiguousarray(array.reshape(-1)), init.name)
        init.CopyFrom(flat)
        changed += 1
    return changed


def rename_new_initializers(model: onnx.ModelProto, *, known: set[str]) -> int:
    """Rename the initializers ORT's optimizer added during preparation; returns how many were renamed.

    ORT names an initializer it creates with ``Graph::GenerateNodeName``, which makes a name unique among
    *node* names only. When a graph that ORT already optimized once (our prepared graph) is loaded again
    and the same fusion fires on more nodes, ORT generates the same name a second time and refuses the
    model ("AddInitializedOrtValue Attempt to replace the existing tensor"). That happens after
    quantization: ``MatMulAddFusion`` fuses a static-shape linear layer with its float bias ``Add`` and
    writes a ``gemm_input_shape`` initializer for its Reshape; a layer that preparation left unfused
    (ORT keeps attention projections for its attention fusion) is fused on load, with the same name.
    A ``/prepared`` suffix is one ORT never generates (its names are ``base`` or ``base_token_N``).
    """
    graph = model.graph
    renames = {init.name: "" for init in graph.initializer if init.name not in known}
    if not renames:
        return 0
    taken = {*known, *(init.name for init in graph.initializer), *(o for node in graph.node for o in node.output)}
    for old in renames:
        renames[old] = free_name(f"{old}/prepared", taken)
    for init in graph.initializer:
        init.name = renames.get(init.name, init.name)
    for value in (*graph.input, *graph.output, *graph.value_info):
        value.name = renames.get(value.name, value.name)
    _rename_inputs(graph, renames)
    return len(renames)


def float_reads_for_subgraphs(model: onnx.ModelProto) -> int:
    """Give each node output that a Loop/If/Scan body reads from the outer scope a float ``Identity`` reader.

    ORT's quantizers do not look into subgraphs for readers: when every main-graph reader of a tensor is
    quantized, the QOperator quantizer replaces the tensor by its INT8 version and the body's reference dangles
    ("Invalid model with unknown initializers/tensors": a torch EmbeddingBag's export reads the gathered rows in
    a Loop). The body now reads the Identity's output, which stays float (ORT dequantizes for it).
    """
    graph = model.graph
    produced = {out for node in graph.node for out in node.output if out}
    types = {v.name: v.type for v in graph.value_info}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    outer = sorted(
        name
        for name in produced & {name for node in graph.node for name in outer_reads(node)}
        # integer tensors (indices, offsets, counts) are never quantized
        if name not in types or not types[name].HasField("tensor_type") or types[name].tensor_type.elem_type in floats
    )
    if not outer:
        return 0
    taken = {*produced, *(i.name for i in graph.input), *(i.name for i in graph.initializer), *_all_names(graph)}
    renames = {name: free_name(f"{name}/float", taken) for name in outer}
    for node in graph.node:
        for sub in bodies(node):
            _rename_inputs(sub, renames)
    nodes = list(graph.node)
    del graph.node[:]
    for node in nodes:  # each Identity right after its producer: the graph stays in topological order
        graph.node.append(node)
        for name in node.output:
            if name in renames:
                graph.node.append(onnx.helper.make_node("Identity", [name], [renames[name]], name=renames[name]))
                if name in types:
                    graph.value_info.append(onnx.helper.make_value_info(renames[name], types[name]))
    log.debug("%d tensors read inside subgraphs were given float Identity readers", len(renames))
    return len(renames)


def bodies(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs ``node`` holds as attributes (a Loop's body, an If's branches, a Scan's body)."""
    return [sub for attr in node.attribute for sub in ((attr.g, *attr.graphs) if attr.HasField("g") else attr.graphs)]


def outer_reads(node: onnx.NodeProto) -> set[str]:
    """The names ``node``'s bodies read from the scope around ``node`` (at any depth) without defining them."""
    reads: set[str] = set()
    for sub in bodies(node):
        defined = {*(i.name for i in sub.input), *(i.name for i in sub.initializer)}
        defined.update(out for inner in sub.node for out in inner.output)
        used = {name for inner in sub.node for name in (*inner.input, *outer_reads(inner)) if name}
        reads |= used - defined
    return reads


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {out for node in graph.node for out in node.output}
    for sub in (body for node in graph.node for body in bodies(node)):
        names |= {i.name for i in sub.input} | {i.name for i in sub.initializer} | _all_names(sub)
    return names


def _rename_inputs(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Rewrite node inputs of ``graph`` and of the subgraphs its nodes hold (they may read outer names)."""
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in renames:
                node.input[k] = renames[name]
        for sub in bodies(node):
            _rename_inputs(sub, renames)


def free_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base`` with a numbered suffix, that is not in ``taken``; reserved there."""
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name
