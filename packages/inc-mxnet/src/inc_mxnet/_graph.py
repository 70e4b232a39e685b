"""A Gluon block as MXNet sees it for quantization: its symbol, its parameters and its quantizable layers.

The block is traced by calling it on symbolic inputs, which runs ``hybrid_forward`` with
``F=mx.sym`` and changes nothing on the block (no ``hybridize()``, no cached graph, no parameter
written). The parameters are copied, so nothing done to the graph afterwards reaches the user's
arrays. The oneDNN subgraph backend (``MKLDNN_QUANTIZE``) then fuses conv+bn+act(+sum),
fc+eltwise, and its node names are what MXNet's quantization pass works on; :class:`Layer`
links each of those fused nodes back to the user's layer names (``hybridsequential0_conv0_fwd``),
which is how ``inc.describe`` reports them and how ``exclude=`` names them.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import gluon
from mxnet.contrib import quantization as mxq

from inc_core.errors import UnsupportedModelError

__all__ = ["FUSION_BACKEND", "Layer", "Prepared", "input_names_of", "prepare", "trace"]

# The oneDNN subgraph property that fuses for INT8 (quantize_net uses the same one on CPU).
FUSION_BACKEND = "MKLDNN_QUANTIZE"
# Inside a fused node, the op that names the layer (the others are its fused bn/act/sum).
_ANCHOR_OPS = ("Convolution", "FullyConnected", "Deconvolution")


@dataclass(frozen=True)
class Layer:
    """One quantizable layer: the user's op name, its type, and the fused node that runs it.

    Attributes:
        name: the op name in the block's own symbol (``hybridsequential0_conv0_fwd``).
        op_type: that op's MXNet type (``Convolution``, ``FullyConnected``, ``Pooling`` ...).
        node: the node of the fused graph that holds it (``sg_mkldnn_conv_bn_act_0``).
        fused: the names of the block's ops that node runs (bn, activation, sum ...).
    """

    name: str
    op_type: str
    node: str
    fused: tuple[str, ...]

    @property
    def output(self) -> str:
        """The fused node's output tensor (what MXNet calibrates for this layer)."""
        return f"{self.node}_output"


@dataclass(eq=False)
class Prepared:
    """A traced block: FP32 symbol, fused symbol, copied parameters and quantizable layers."""

    symbol: mx.sym.Symbol
    fused: mx.sym.Symbol
    inputs: tuple[str, ...]
    arg_params: dict[str, mx.nd.NDArray] = field(repr=False)
    aux_params: dict[str, mx.nd.NDArray] = field(repr=False)
    layers: tuple[Layer, ...]
    digest: str
    float_only: tuple[str, ...] = ()

    @property
    def params(self) -> dict[str, mx.nd.NDArray]:
        return {**self.arg_params, **self.aux_params}

    def layer(self, name: str) -> Layer:
        return next(layer for layer in self.layers if layer.name == name)


def input_names_of(count: int) -> tuple[str, ...]:
    """The symbolic input names for a block with ``count`` positional inputs (``data`` for one)."""
    return ("data",) if count == 1 else tuple(f"data{i}" for i in range(count))


def _positional_inputs(block: gluon.HybridBlock) -> int:
    """How many tensors ``hybrid_forward`` takes (after ``F``; parameters arrive as keywords)."""
    if isinstance(block, gluon.SymbolBlock):
        return len(block._cached_graph[0])  # the inputs it was built with
    try:
        signature = inspect.signature(block.hybrid_forward)
    except (TypeError, ValueError):
        return 1
    params = list(signature.parameters.values())[1:]  # drop F
    own = set(block._reg_params)
    count = 0
    for p in params:
        if p.kind is p.VAR_POSITIONAL:
            return max(count, 1)
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty and p.name not in own:
            count += 1
    return max(count, 1)


def check_block(model: Any) -> gluon.HybridBlock:
    """The model as a HybridBlock, or UnsupportedModelError saying how to make it one."""
    if isinstance(model, gluon.HybridBlock):
        return model
    if isinstance(model, gluon.Block):
        raise UnsupportedModelError(
            f"inc-mxnet quantizes Gluon HybridBlocks; got a {type(model).__qualname__}, a plain gluon.Block whose "
            "forward() cannot be turned into a graph. Rewrite it as a gluon.HybridBlock (hybrid_forward(self, F, x) "
            "with F.* operators) or export it to symbol + params and load it with gluon.SymbolBlock.imports."
        )
    raise UnsupportedModelError(
        f"inc-mxnet quantizes Gluon HybridBlocks; got a {type(model).__module__}.{type(model).__qualname__}."
    )


def trace(block: gluon.HybridBlock) -> tuple[mx.sym.Symbol, tuple[str, ...]]:
    """The block's FP32 symbol from symbolic inputs; the block itself is not changed."""
    names = input_names_of(_positional_inputs(block))
    inputs = [mx.sym.var(n, dtype="float32") for n in names]
    try:
        out = block(*inputs)
    except Exception as exc:  # hybrid_forward code that needs concrete arrays fails in many ways
        raise UnsupportedModelError(
            f"inc-mxnet could not trace {type(block).__qualname__} into an MXNet symbol: {_line(exc)}. Its "
            "hybrid_forward must use only F.* operators on its inputs (no .asnumpy(), .shape, Python branching on "
            "values); make it hybridizable, or export the model and load it with gluon.SymbolBlock.imports."
        ) from exc
    if isinstance(out, (list, tuple)):
        out = mx.sym.Group(list(out))
    if not isinstance(out, mx.sym.Symbol):
        raise UnsupportedModelError(
            f"inc-mxnet traced {type(block).__qualname__} but it returned a {type(out).__name__}, not a symbol; "
            "hybrid_forward must return F.* results."
        )
    return out, names


def _copied_params(block: gluon.HybridBlock, symbol: mx.sym.Symbol) -> tuple[dict[str, Any], dict[str, Any]]:
    wanted_args = set(symbol.list_arguments())
    wanted_aux = set(symbol.list_auxiliary_states())
    args: dict[str, Any] = {}
    aux: dict[str, Any] = {}
    for param in block.collect_params().values():
        if param.name not in wanted_args and param.name not in wanted_aux:
            continue
        try:
            data = param.data(mx.cpu())
        except Exception as exc:  # DeferredInitializationError, RuntimeError (not initialized) ...
            raise UnsupportedModelError(
                f"Parameter {param.name!r} of {type(block).__qualname__} has no value yet ({_line(exc)}). Initialize "
                "the block (net.initialize(), or load its parameters) and run it once on a batch so that every "
                "parameter shape is known, then quantize it."
            ) from exc
        (aux if param.name in wanted_aux else args)[param.name] = _as_float32(data)
    return args, aux


def _as_float32(data: mx.nd.NDArray) -> mx.nd.NDArray:
    """A copy of a parameter, in float32 where the block keeps it in 16 bits (``net.cast('float16')``).

    MXNet's CPU backend runs no float16 GEMM ("FP16 gemm on cpu not implemented") and its quantization pass
    expects float32: a block cast to 16 bits (trained on a GPU) is quantized from its exact float32 values.
    """
    if data.dtype == np.float32 or np.issubdtype(np.dtype(data.dtype), np.integer):
        return data.copy()
    return data.astype("float32")


def float_only_nodes(fused: mx.sym.Symbol, input_names: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Nodes MXNet's pass would quantize but that stay FP32 whatever the config says.

    - The recurrent (RNN) layers, which a Gluon block cannot run in INT8. MXNet 1.9's pass marks every RNN node,
      but has a quantized kernel for LSTM only (GRU and vanilla RNN fail in the pass: ``Quantized RNN only
      supports LSTM mode``), and that kernel registers no gradient, which Gluon's CachedOp builds for every
      block: a SymbolBlock holding it fails at its first call (``_contrib_quantized_rnn is non-differentiable``).
    - A BatchNorm that reads a model input (``input_names``): a tabular model's first layer, standardising raw
      features whose scales differ by orders of magnitude. Its INT8 kernel reads them through one per-tensor
      scale, which rounds the small ones to zero (breast-cancer's MLP: accuracy 0.953 -> 0.643, output cosine
      0.25). In FP32 it is exact; its output is quantized for the layer that reads it. (A BatchNorm between
      layers sees activations of one scale and stays INT8.)
    """
    nodes = json.loads(fused.tojson())["nodes"]

    def reads_input(node: dict[str, Any]) -> bool:
        source = nodes[node["inputs"][0][0]] if node.get("inputs") else None
        return source is not None and source["op"] == "null" and source["name"] in input_names

    return tuple(n["name"] for n in nodes if n["op"] == "RNN" or n["op"] == "BatchNorm" and reads_input(n))


def _layers(symbol: mx.sym.Symbol, fused: mx.sym.Symbol, params: set[str], float_only: tuple[str, ...]) -> tuple[Layer, ...]:
    """The layers MXNet's quantization pass would quantize, named as in the block's own symbol."""
    op_types = {n["name"]: n["op"] for n in json.loads(symbol.tojson())["nodes"] if n["op"] != "null"}
    # The pass run on the symbol alone (no parameter is touched) says which fused nodes it quantizes.
    qsym, _ = mxq._quantize_symbol(
        fused, mx.cpu(), excluded_symbols=list(float_only), excluded_operators=[], offline_params=list(params),
        quantized_dtype="auto", quantize_mode="full",
    )
    quantized = {n["name"][len("quantized_"):] for n in json.loads(qsym.tojson())["nodes"] if n["name"].startswith("quantized_")}
    layers: list[Layer] = []
    for node in json.loads(fused.tojson())["nodes"]:
        if node["op"] == "null" or node["name"] not in quantized:
            continue
        inner = [n["name"] for g in node.get("subgraphs", []) for n in g["nodes"] if n["op"] != "null"]
        members = tuple(n for n in inner if n in op_types) or (node["name"],)
        anchor = next((n for n in members if op_types.get(n) in _ANCHOR_OPS), members[0])
        layers.append(Layer(anchor, op_types.get(anchor, node["op"]), node["name"], members))
    return tuple(layers)


def _digest(symbol: mx.sym.Symbol, params: dict[str, Any]) -> str:
    # The JSON's third input index is a variable version that changes from trace to trace: leave it out.
    nodes = [
        (n["op"], n["name"], sorted(n.get("attrs", {}).items()), [i[:2] for i in n["inputs"]])
        for n in json.loads(symbol.tojson())["nodes"]
    ]
    h = hashlib.sha256(json.dumps(nodes).encode())
    for name in sorted(params):
        h.update(name.encode())
        h.update(np.ascontiguousarray(params[name].asnumpy()).tobytes())
    return h.hexdigest()


def prepare(model: Any) -> Prepared:
    """Trace ``model`` (a HybridBlock), copy its parameters and find its quantizable layers.

    Raises:
        UnsupportedModelError: not a HybridBlock, not traceable, or parameters not initialized.
    """
    block = check_block(model)
    symbol, names = trace(block)
    args, aux = _copied_params(block, symbol)
    missing = [a for a in symbol.list_arguments() if a not in args and a not in names]
    if missing:
        raise UnsupportedModelError(
            f"The traced graph of {type(block).__qualname__} reads {missing[:5]} which are neither inputs nor "
            f"parameters of the block; inc-mxnet expects inputs named {list(names)} (one per hybrid_forward "
            "argument) and every other variable to be a registered Parameter."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = symbol.get_backend_symbol(FUSION_BACKEND)
        float_only = float_only_nodes(fused, tuple(names))
        layers = _layers(symbol, fused, set(args), float_only)
    except mx.base.MXNetError as exc:
        raise UnsupportedModelError(
            f"MXNet's oneDNN fusion or quantization pass could not read the graph of {type(block).__qualname__}: "
            f"{_line(exc)}. The block's ops must be ones MXNet 1.9's CPU backend knows."
        ) from exc
    return Prepared(symbol, fused, names, args, aux, layers, _digest(symbol, {**args, **aux}), float_only)


def _line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("Stack trace", "  File"))]
    return (lines[0] if lines else text)[:300]
