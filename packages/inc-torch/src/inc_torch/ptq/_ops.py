"""Which modules of a model are quantizable, per approach and format, and the options each supports."""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from inc_core._quant_config import CALIBRATIONS, GRANULARITIES, SCHEMES, QuantConfig
from inc_core.backend import Op, TuningSpace
from inc_core.errors import ConfigError, UnsupportedModelError
from inc_torch._exported import exported_ops, is_exported_graph
from inc_torch._hf import is_hf_conv1d
from inc_torch._parametrized import plain_type
from inc_torch.ptq._conv1d import is_depthwise_conv1d
from inc_torch.ptq._grouped_conv import miscomputed_grouped_convs
from inc_torch.ptq._weight_readers import weights_handed_on, weights_read_without_calls

__all__ = [
    "STATIC_TYPES",
    "DYNAMIC_TYPES",
    "LOOKUP_TYPES",
    "LOOKUP_NAMES",
    "lookup_kept_in_float",
    "kept_in_float",
    "quantizable_ops",
    "tuning_space",
    "check_supported",
    "check_overrides",
    "check_something_quantized",
    "require_int8_ops",
]

# Embedding lookups whose tables become 8-bit per row (torch.ao's float_qparams: a float scale and offset per
# row, the only scheme its quantized lookups take); their outputs stay float, so they need no calibration.
# Where the tables of a recommender live, this is most of the model's size (INC 2.x quantizes them alike).
LOOKUP_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)
LOOKUP_NAMES = frozenset(t.__name__ for t in LOOKUP_TYPES)
# Module types whose weights and input activations become INT8, per static format. PT2E: conv1d (as the
# conv2d it is, see _conv1d), conv2d, transposed 1-D/2-D convolutions (as sub-pixel conv2d, see
# _conv_transpose) and linear (torchao has no conv3d), and embedding tables (inc's own rewrite,
# _pt2e_tables); the FX x86 backend config covers conv1d/2d/3d (torch.ao's quantized transposed convolutions
# compute wrong outputs: see _conv_transpose), and its quantized lookups the embedding tables.
STATIC_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "pt2e": (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear, *LOOKUP_TYPES),
    "fx": (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, *LOOKUP_TYPES),
    # IPEX's static flow (traced TorchScript): IPEX 2.8 leaves Conv1d in FP32 (measured: no INT8 op in its graph);
    # it runs transposed 2-D/3-D convolutions in INT8 (grouped and dilated ones too; measured).
    "torchscript": (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear),
}
# Dynamic quantization swaps these for torch.ao's dynamically quantized modules.
DYNAMIC_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell, *LOOKUP_TYPES
)
# Recurrent layers are quantized per tensor by torch.ao's dynamic kernels.
_PER_TENSOR_ONLY = (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
# x86 INT8 kernels (oneDNN/FBGEMM) take unsigned 8-bit activations.
ACTIVATION_DTYPES = ("uint8",)


def _types(config: QuantConfig, fmt: str) -> tuple[type[nn.Module], ...]:
    return DYNAMIC_TYPES if config.approach == "dynamic" else STATIC_TYPES[fmt]


def quantizable_ops(model: nn.Module, config: QuantConfig, fmt: str) -> tuple[Op, ...]:
    """The ops the given approach/format quantizes.

    Static FX: every op torch.ao's x86 flow quantizes (conv/linear, activations, add/mul, pooling,
    reshapes, fixed-range ops), in graph order (see :mod:`inc_torch.ptq._fx_ops`). Otherwise: the leaf
    modules of the quantizable types, in definition order, named as in ``named_modules``.
    """
    if is_exported_graph(model):
        return exported_ops(model, approach=config.approach, fmt=fmt)
    if config.approach == "static" and fmt == "fx":
        return tuple(entry.op for entry in _fx_offered(model).values())
    types = _types(config, fmt)
    # HF Conv1D is the Linear it computes (weight [in, out]); the PT2E and dynamic paths swap it for one.
    conv1d = config.approach == "dynamic" or fmt == "pt2e"
    ops = []
    for name, module in model.named_modules():
        # exact type match: subclasses (e.g. NonDynamicallyQuantizableLinear inside MultiheadAttention)
        # are not swapped by torch.ao, so they are not offered either.
        # A weight-normed layer (ParametrizedConv1d) counts as its own class: inc folds the norm first.
        if fmt == "pt2e" and isinstance(module, nn.modules.conv._ConvTransposeNd) and any(d != 1 for d in module.dilation):
            continue  # a dilated one stays a transposed convolution, in FP32 (see _conv_transpose)
        if fmt == "pt2e" and config.approach == "static" and is_depthwise_conv1d(module):
            continue  # stays FP32: oneDNN's INT8 depthwise conv1d can stall (see _conv1d)
        if name and (plain_type(module) in types or (conv1d and is_hf_conv1d(module))):
            ops.append(Op(name=name, op_type=plain_type(module).__name__))
        elif name and fmt == "pt2e" and config.approach == "static" and isinstance(module, LOOKUP_TYPES):
            # A table subclass (BART's scaled word embedding, 53 such classes in transformers): PT2E rewrites the
            # lookup its forward makes in the graph, whatever the module's class.
            base = nn.EmbeddingBag if isinstance(module, nn.EmbeddingBag) else nn.Embedding
            ops.append(Op(name=name, op_type=base.__name__))
    if fmt == "torchscript":
        # IPEX's flows keep embedding tables FP32 (its INT8 DLRM graph holds no quantized lookup).
        ops = [op for op in ops if op.op_type not in LOOKUP_NAMES]
        if config.approach == "static":  # IPEX's oneDNN shares the grouped-conv defect (see _grouped_conv)
            wrong = miscomputed_grouped_convs(model, [op.name for op in ops])
            ops = [op for op in ops if op.name not in wrong]
    elif config.approach == "dynamic":
        kept = kept_in_float(model, tuple(op.name for op in ops))
        ops = [op for op in ops if op.name not in kept]
    else:
        kept = lookup_kept_in_float(model, tuple(op.name for op in ops), fmt=fmt)
        if fmt == "pt2e":  # a grouped conv this CPU's INT8 kernel computes wrongly stays FP32 (see _grouped_conv)
            kept = {**kept, **miscomputed_grouped_convs(model, [op.name for op in ops])}
        ops = [op for op in ops if op.name not in kept]
        if fmt == "pt2e":
            ops = _named_by_caller(model, ops)
    return tuple(ops)


def _named_by_caller(model: nn.Module, ops: list[Op]) -> list[Op]:
    """PT2E names each op of the graph after the module that called it: a layer whose weight an enclosing module
    hands to a function instead of calling the layer (torchvision's Swin: ``shifted_window_attention(x,
    self.qkv.weight, self.proj.weight, ...)``) computes there, under that module's name. It is listed under that
    name, which ``exclude=`` then reaches (excluding ``attn.qkv`` was silently ignored: the graph has no op of it).
    A layer read so by the model's own ``forward`` has no module name to be selected by; it is left out.
    """
    readers = weights_handed_on(model, tuple(op.name for op in ops if op.op_type not in LOOKUP_NAMES))
    if not readers:
        return ops
    named: dict[str, Op] = {}
    for op in ops:
        name = readers.get(op.name, op.name)
        if name:
            named.setdefault(name, Op(name=name, op_type=op.op_type))
    return list(named.values())


def kept_in_float(model: nn.Module, names: tuple[str, ...]) -> dict[str, str]:
    """Of the layers ``names``, those torch.ao's dynamic swap would break, each with the reason.

    IPEX's traced flow (format "torchscript") is not subject to these: it sees the computation itself.
    """
    kept = lookup_kept_in_float(model, names)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, _PER_TENSOR_ONLY) and not module.bias:
            kept[name] = "has no biases, which torch.ao's dynamic recurrent layers need"
        elif getattr(module, "proj_size", 0):
            kept[name] = "projects its hidden state (proj_size), which torch.ao's dynamic LSTM cannot"
    # A swapped layer's weight is packed, no tensor: code that computes with it itself would break.
    for name, owner in weights_read_without_calls(model, tuple(n for n in names if n not in kept)).items():
        reader = type(model.get_submodule(owner)).__name__
        kept[name] = f"has its weight read by {reader}, which computes with it itself instead of calling the layer"
    return kept


def lookup_kept_in_float(model: nn.Module, names: tuple[str, ...], *, fmt: str = "fx") -> dict[str, str]:
    """Of the layers ``names``, the embedding lookups whose 8-bit form would compute differently, each with the reason.

    torch.ao's quantized lookups (FX, dynamic; checked with its kernels) ignore ``max_norm``, and its bag kernel
    always sums, over every index. PT2E's (``fmt="pt2e"``, :mod:`inc_torch.ptq._pt2e_tables`) reduce with the bag
    op itself, so every mode is kept; only ``max_norm`` and a bag's ``padding_idx`` are not.
    """
    kept = {}
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, LOOKUP_TYPES):
            continue
        if module.max_norm is not None:
            kept[name] = "renormalises the rows it looks up (max_norm), which torch.ao's quantized lookups do not"
        elif fmt == "pt2e" and isinstance(module, nn.EmbeddingBag) and module.padding_idx is not None:
            kept[name] = "leaves its padding_idx out of each bag, which the PT2E 8-bit lookup does not"
        elif fmt != "pt2e" and isinstance(module, nn.EmbeddingBag) and module.mode != "sum":
            kept[name] = f"reduces its bags with mode={module.mode!r}; torch.ao's quantized bag kernel only sums"
        elif fmt != "pt2e" and isinstance(module, nn.EmbeddingBag) and module.padding_idx is not None and bool(
            module.weight[module.padding_idx].detach().any()
        ):
            kept[name] = "leaves its padding_idx out of each bag, which torch.ao's quantized bag kernel adds in"
    return kept


def tuning_space(model: nn.Module, config: QuantConfig, fmt: str) -> TuningSpace:
    """The ops and, per op type, the settings the torch paths support."""
    if config.approach == "static" and fmt == "fx" and not is_exported_graph(model):
        return _fx_tuning_space(model)
    ops = quantizable_ops(model, config, fmt)
    options: dict[str, dict[str, tuple[str, ...]]] = {}
    for op_type in dict.fromkeys(op.op_type for op in ops):
        if op_type in LOOKUP_NAMES:
            options[op_type] = {}  # rows quantized with their own float scale and offset: nothing to choose
        elif config.approach == "dynamic":
            per_tensor = op_type in {t.__name__ for t in _PER_TENSOR_ONLY}
            options[op_type] = {"granularity": ("per_tensor",) if per_tensor else GRANULARITIES}
        else:
            options[op_type] = {
                "calibration": CALIBRATIONS,
                "granularity": GRANULARITIES,
                "scheme": SCHEMES,
                "activation_dtype": ACTIVATION_DTYPES,
            }
    return TuningSpace(ops, options)


_CHOICES = {"calibration": CALIBRATIONS, "granularity": GRANULARITIES, "scheme": SCHEMES, "activation_dtype": ACTIVATION_DTYPES}


def _fx_offered(model: nn.Module) -> dict[str, Any]:
    """The FX op table less the depthwise Conv1d layers that stay FP32 whatever is asked (see _fx)."""
    from inc_torch.ptq._fx import onednn_depthwise_conv1d, op_table

    table = op_table(model)
    kept = set(onednn_depthwise_conv1d(model, table, log_them=False)) | set(miscomputed_grouped_convs(model, table))
    return {name: entry for name, entry in table.items() if name not in kept}


def _fx_tuning_space(model: nn.Module) -> TuningSpace:
    from inc_torch.ptq._fx_ops import ROLE_OPTIONS

    table = _fx_offered(model)
    options: dict[str, dict[str, tuple[str, ...]]] = {}
    for entry in table.values():
        options.setdefault(entry.op.op_type, {key: _CHOICES[key] for key in ROLE_OPTIONS[entry.role]})
    return TuningSpace(tuple(entry.op for entry in table.values()), options)


def check_overrides(config: QuantConfig, space: TuningSpace) -> None:
    """Every ``overrides`` key names an op or an op type of the model, and sets only what that op supports.

    Raises:
        ConfigError: a key naming nothing (listing close names, the op types and where names come
            from), or a setting the op type does not have (e.g. granularity of an add).
    """
    by_name = {op.name: op.op_type for op in space.ops}
    types = list(dict.fromkeys(by_name.values()))
    for key, settings in config.overrides.items():
        op_type = by_name.get(key, key if key in types else None)
        if op_type is None:
            close = difflib.get_close_matches(key, [*by_name, *types], n=3)
            raise ConfigError(
                f"QuantConfig: overrides key {key!r} is neither an op name nor an op type that the torch backend "
                f"quantizes in this model (approach={config.approach!r}); close: {close or 'none'}. Op types: {types}; "
                "op names are listed by inc.describe(model, config)."
            )
        allowed = space.options.get(op_type, {})
        for setting in settings:
            if setting == "calibration" and config.approach == "dynamic":
                continue  # nothing is calibrated in dynamic mode; the setting is harmless
            if setting not in allowed:
                raise ConfigError(
                    f"QuantConfig: overrides[{key!r}] sets {setting!r}, which {op_type} ops do not have here "
                    f"(they take {list(allowed) or 'no settings'}); set it for the whole model on the QuantConfig "
                    "instead, or use exclude= to keep them in FP32."
                )


def check_something_quantized(config: QuantConfig, fmt: str, ops: tuple[Op, ...], excluded: set[str]) -> None:
    """Refuse a run that would quantize no op at all (it would return the FP32 model as if quantized).

    Raises:
        UnsupportedModelError: no op of the kinds this path quantizes, or every one excluded.
    """
    if any(op.name not in excluded for op in ops):
        return
    kinds = ", ".join(t.__name__ for t in _types(config, fmt))
    if config.approach == "dynamic" or fmt == "pt2e":
        kinds += ", HF Conv1D"
    if ops:
        in_bf16 = sum(config.precision(op.name, op.op_type) == "bf16" for op in ops)
        which = f"excluded (exclude=) or run in BF16 (bf16=: {in_bf16})" if in_bf16 else "excluded"
        raise UnsupportedModelError(
            f"Every quantizable op ({len(ops)}) is {which}, so nothing would be quantized; keep fewer ops out of INT8."
        )
    if config.approach == "dynamic":
        way_out = "Use approach='static' (it quantizes Conv and Linear layers with calibration data)."
    elif fmt == "torchscript":
        way_out = "Use the torch backend (backend=None; its default format='pt2e', or format='fx'): it also quantizes Conv1d."
    else:
        way_out = "Use approach='dynamic' for recurrent models, or another format."
    if config.approach == "dynamic":
        path = "dynamic quantization"
    else:
        path = "IPEX static quantization" if fmt == "torchscript" else f"static quantization (format={fmt!r})"
    raise UnsupportedModelError(
        f"The model has no op that {path} can quantize: it looked for "
        f"{kinds} layers and found none. {way_out}"
    )


def require_int8_ops(quantized: nn.Module, config: QuantConfig, fmt: str) -> None:
    """The returned model must hold int8 ops; a model with none is an error, never a silent FP32 result.

    Raises:
        UnsupportedModelError: the framework quantized nothing.
    """
    from inc_torch._inspect import quantized_ops

    if not quantized_ops(quantized):
        raise UnsupportedModelError(
            f"{config.approach.capitalize()} quantization (format={fmt!r}) produced a model without int8 ops: "
            f"the framework matched none of the {', '.join(t.__name__ for t in _types(config, fmt))} layers. "
            "Check inc.describe(model, config) and exclude=, or try the other format."
        )


def check_supported(config: QuantConfig, ops: tuple[Op, ...]) -> None:
    """Reject settings the x86 kernels cannot run, before any work starts.

    Raises:
        ConfigError: ``activation_dtype="int8"`` for a static op (x86 INT8 kernels take uint8 activations).
    """
    if config.approach != "static":
        return
    for op in ops:
        dtype = config.setting(op.name, op.op_type, "activation_dtype")
        if dtype not in ACTIVATION_DTYPES:
            raise ConfigError(
                f"QuantConfig: activation_dtype={dtype!r} for {op.name!r} ({op.op_type}) is not supported by the "
                f"torch backend; x86 INT8 kernels take {', '.join(map(repr, ACTIVATION_DTYPES))} activations. "
                "Use activation_dtype='uint8' (scheme='sym' gives a symmetric range with zero point 128)."
            )
