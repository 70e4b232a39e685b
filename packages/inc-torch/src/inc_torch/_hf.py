"""Hugging Face transformers models as the torch paths meet them, without importing transformers.

- HF ``Conv1D`` (``transformers.pytorch_utils.Conv1D``, GPT-2's projections) is a Linear layer whose weight
  is stored ``[in, out]`` and applied with ``addmm``; no quantizer recognises it. It is listed as an op of
  type ``Conv1D`` and, in the copy inc quantizes, swapped for the ``nn.Linear`` it computes (weight
  transposed, same module name), so PT2E static and dynamic quantization treat it as the Linear it is.
- Models returning a key/value cache (``DynamicCache``) cannot be captured by ``torch.export``; the copy
  inc captures runs with ``config.use_cache=False``, and the log says so.
- Inputs checked against the model's limits before anything runs, so a bad batch is an error naming the
  input and the limit instead of an IndexError from inside an embedding.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn

from inc_core.calibration import check_no_empty_samples, check_sequence_length, check_token_ids
from inc_core.errors import DatasetError
from inc_torch._inputs import Inputs

__all__ = [
    "CONV1D_AS_LINEAR_ATTR",
    "CONV1D_TYPE",
    "check_hf_inputs",
    "drop_label_inputs",
    "is_hf_conv1d",
    "is_hf_model",
    "linearize_conv1d",
    "prepare_for_capture",
]

log = logging.getLogger("inc")

CONV1D_TYPE = "Conv1D"
# Attribute of a returned model naming the HF Conv1D layers it holds as (dynamic) Linear layers, so that
# a saved model can be rebuilt from its transformers class.
CONV1D_AS_LINEAR_ATTR = "_inc_conv1d_as_linear"


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for ``transformers.pytorch_utils.Conv1D`` (a Linear with its weight stored ``[in, out]``)."""
    cls = type(module)
    if cls.__name__ != CONV1D_TYPE or not cls.__module__.startswith("transformers."):
        # Checked first: reading ``weight`` of a parametrized layer computes it, and a spectral norm in train
        # mode then updates its power-iteration buffers in the user's model.
        return False
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and hasattr(module, "nf")
    )


def is_hf_model(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel``: it carries a config that rebuilds it (``config_class``, ``to_dict``)."""
    config = getattr(model, "config", None)
    return getattr(type(model), "config_class", None) is not None and callable(getattr(config, "to_dict", None))


def _as_linear(conv1d: nn.Module) -> nn.Linear:
    weight: torch.Tensor = conv1d.weight  # type: ignore[assignment]
    bias = getattr(conv1d, "bias", None)
    in_features, out_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if bias is not None:
            linear.bias.copy_(bias)
    linear.train(conv1d.training)
    return linear


def linearize_conv1d(model: nn.Module, names: tuple[str, ...] | None = None) -> list[str]:
    """Swap HF ``Conv1D`` submodules of ``model`` (all, or those in ``names``) for ``nn.Linear``, in place.

    Returns:
        The names of the swapped modules.
    """
    swapped = []
    for name, module in list(model.named_modules()):
        if not name or not is_hf_conv1d(module) or (names is not None and name not in names):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _as_linear(module))
        swapped.append(name)
    return swapped


def prepare_for_capture(model: nn.Module) -> None:
    """Make the (copied) model capturable by ``torch.export``: Conv1D as Linear, no key/value cache."""
    swapped = linearize_conv1d(model)
    if swapped:
        log.info("HF Conv1D layers quantized as Linear (weight transposed): %d layer(s)", len(swapped))
    # An encoder-decoder's decoder (T5's, BART's) holds a config of its own, copied from the model's: each one off.
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules()) if getattr(c, "use_cache", False) is True}
    for config in configs.values():
        config.use_cache = False
    if id(getattr(model, "config", None)) in configs:
        log.info(
            "%s exported with use_cache=False: torch.export cannot capture its key/value cache, so the INT8 "
            "model returns no past_key_values and has no generate(); for text generation quantize with "
            "approach='dynamic', which keeps the model's class, its cache and generate()", type(model).__name__,
        )


def _limit(config: Any, name: str) -> int | None:
    value = getattr(config, name, None)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _position_limit(model: nn.Module) -> int | None:
    """The longest sequence the model's learned position table takes (None: no table, e.g. T5)."""
    config = getattr(model, "config", None)
    limit = _limit(config, "max_position_embeddings")
    if limit is None:
        return None
    # RoBERTa-style embeddings number positions from padding_idx + 1.
    for module in model.modules():
        if hasattr(module, "position_embeddings") and isinstance(getattr(module, "padding_idx", None), int):
            return limit - int(module.padding_idx) - 1
    return limit


def _vocab_size(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except Exception:  # a model without input embeddings (e.g. a vision model) raises NotImplementedError
        return None
    return int(embedding.num_embeddings) if isinstance(embedding, nn.Embedding) else None


def label_parameters(model: nn.Module) -> set[str]:
    """The forward parameters of a transformers model that take labels (as ``transformers.utils.find_labels``
    reads them: names holding "label", and a QA head's answer positions)."""
    try:
        names = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return set()
    return {name for name in names if "label" in name or name in ("start_positions", "end_positions")}


def drop_label_inputs(model: nn.Module, inputs: Inputs, where: str | None = None) -> Inputs:
    """``inputs`` without the label arguments of a transformers model, for a capture of its inference forward.

    A batch from a Hugging Face data collator carries ``labels`` next to the model inputs; captured with them,
    the INT8 graph computes the loss and can only be called with labels ("forward() missing 1 required positional
    argument: 'labels'").
    """
    args, kwargs = inputs
    if not kwargs or not is_hf_model(model):
        return inputs
    labels = sorted(label_parameters(model) & set(kwargs))
    if not labels:
        return inputs
    kept = {k: v for k, v in kwargs.items() if k not in labels}
    if "labels" in labels and not {"decoder_input_ids", "decoder_inputs_embeds"} & set(kwargs) and _is_encoder_decoder(model):
        # A seq2seq model (T5, BART) starts its decoder from the labels shifted right when no decoder input is
        # given, as a collator without the model leaves it: make that input, as the model itself would.
        shift = getattr(model, "prepare_decoder_input_ids_from_labels", None)
        if not callable(shift):
            return inputs
        kept["decoder_input_ids"] = shift(labels=kwargs["labels"])
    if where:  # said once, for the first batch
        log.info("%s: %s left out (labels compute a loss; the INT8 model takes the inputs alone)", where, labels)
    return args, kept


def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _named(inputs: Inputs, model: nn.Module) -> dict[str, Any]:
    """The inputs by forward parameter name (positional arguments bound in signature order)."""
    args, kwargs = inputs
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    except TypeError:
        return dict(kwargs)
    return {k: v for k, v in bound.items() if isinstance(v, torch.Tensor)}


def check_hf_inputs(model: nn.Module, inputs: Inputs, where: str) -> None:
    """Check one batch against a transformers model's limits.

    Raises:
        DatasetError: an input name the forward does not take, ``input_ids`` outside the vocabulary,
            a sequence longer than the position table, or a sample whose ``attention_mask`` is all zeros.
    """
    if not is_hf_model(model):
        return
    params = inspect.signature(model.forward).parameters
    named_params = [p.name for p in params.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    unknown = [k for k, v in inputs[1].items() if isinstance(v, torch.Tensor) and k not in named_params]
    if unknown:
        raise DatasetError(
            f"{where}: input(s) {unknown} are not inputs of {type(model).__name__}.forward, which takes "
            f"{named_params[:8]}; name the batch's keys as the tokenizer does (e.g. 'input_ids', 'attention_mask')."
        )
    named = _named(inputs, model)
    ids = named.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.numel() and not ids.is_floating_point():
        cls = type(model).__name__
        vocab = _vocab_size(model)
        if vocab is not None:
            values = ids.detach().cpu().numpy()
            check_token_ids(values, name="input_ids", rows=vocab, where=where, table=f"the vocabulary of {cls} (vocab_size={vocab})")
        limit = _position_limit(model)
        if limit is not None and ids.dim() >= 2:
            check_sequence_length(
                int(ids.shape[-1]), name="input_ids", limit=limit, where=where,
                table=f"{cls}, which takes {limit} positions (max_position_embeddings)",
            )
    mask = named.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        check_no_empty_samples(mask.detach().cpu().numpy(), name="attention_mask", where=where)
