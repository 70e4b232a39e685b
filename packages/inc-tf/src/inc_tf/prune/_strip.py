"""After pruning: a plain Keras model with the zeros in place, and a per-layer sparsity report."""

from __future__ import annotations

import keras

from inc_core._prune_config import PruneConfig
from inc_core.errors import UnsupportedModelError
from inc_core.sparsity import SparsityReport
from inc_tf._keras_model import copy_state
from inc_tf.prune._layers import prunable_kernels

__all__ = ["sparsity_report", "strip"]


def strip(model: keras.Model) -> keras.Model:
    """A plain copy of a pruned ``model``: same architecture and weights (zeros included), no training state.

    :class:`~inc_tf.PruningCallback` keeps its masks and optimizer wrapper outside the model, and the
    masks are applied to the kernels after every batch, so the copy holds exactly the pruned weights.
    A compiled ``model`` gives a copy compiled from the same compile config with a fresh optimizer
    (Keras' ``clone_model``): fine-tune it with a ``criterion="pattern_lock"`` callback to keep the
    zeros, or hand it to ``inc.quantize``. ``model`` itself is not changed.

    Raises:
        UnsupportedModelError: ``model`` is not a Keras model, or Keras cannot clone it (a subclassed
            model without ``get_config``).
    """
    if not isinstance(model, keras.Model):
        raise UnsupportedModelError(f"strip takes a keras.Model, got {type(model).__name__}.")
    try:
        clone = keras.models.clone_model(model)
        copy_state(model, clone)
    except Exception as exc:  # Keras raises NotImplementedError/TypeError/ValueError for models it cannot rebuild
        raise UnsupportedModelError(
            f"strip: Keras could not clone {model.name!r} ({type(exc).__name__}: {exc}). Give the model a "
            "get_config()/from_config() (or build it functionally), or use the pruned model itself: its pruned "
            "kernels already hold the zeros."
        ) from exc
    return clone


def sparsity_report(model: keras.Model, config: PruneConfig | None = None) -> SparsityReport:
    """Per-layer sparsity (exact zeros) of ``model``'s prunable kernels, in the kernels' own Keras layout.

    Args:
        model: a Keras model, pruned or not.
        config: selects the layers (``include_types``/``exclude``); default: every prunable kernel.

    Returns:
        A :class:`~inc_core.sparsity.SparsityReport`; ``report.save("sparsity.md")`` writes the table and a PNG.
    """
    kernels = prunable_kernels(model, config if config is not None else PruneConfig(), who="sparsity_report")
    return SparsityReport.from_weights(
        (k.name, k.op_type, keras.ops.convert_to_numpy(k.variable)) for k in kernels
    )
