"""Pruning in ``model.fit``: a Keras callback that follows inc-core's pruning schedule.

Keras callbacks see neither the batch nor the gradients, so :class:`PruningCallback` wraps the
compiled optimizer's ``apply`` for the duration of ``fit`` (and retraces the train function so the
wrapper is part of it). Inside the traced step, for each pruned kernel the wrapper:

- copies the raw gradient into a variable (only for the ``snip`` criteria, which score ``|w * g|``);
- multiplies the gradient by the mask, so Adam's moments and SGD's momentum never build up behind a
  pruned weight;
- multiplies the kernel by the mask after the update, so pruned weights are exactly zero after every
  batch whatever the optimizer did (weight decay, epsilon terms).

After each batch the callback counts optimizer steps and hands the weights (and the captured
gradients) to inc-core's :class:`~inc_core.sparsity.Pruner`, which owns the criteria, schedules and
masks. When masks change they are applied at once, and the optimizer's slot variables (Adam ``m``/``v``,
SGD momentum) are zeroed at the pruned positions. The gradients the ``snip`` criteria see are those of
the step just taken, and the weights those after it (inc-torch scores just before the same step);
``pattern_lock`` reads its zeros when ``fit`` starts, before any update.
At the end of ``fit`` the optimizer is restored and the train function is retraced on the next fit.
"""

from __future__ import annotations

import logging
from typing import Any

import keras
import numpy as np

from inc_core._prune_config import PruneConfig
from inc_core.errors import ConfigError
from inc_core.sparsity import Pruner, check_shape
from inc_tf.prune._layers import PrunableKernel, prunable_kernels

__all__ = ["PruningCallback"]

log = logging.getLogger("inc")


def _variable_name(kernel: str, what: str) -> str:
    # Keras variable names cannot hold "/" (a kernel found again under another layer is named by its path)
    return f"{kernel.replace('/', '_')}_{what}"


class _KernelState:
    """The mask (and captured gradient) variables of one pruned kernel."""

    def __init__(self, kernel: PrunableKernel, needs_grad: bool) -> None:
        self.kernel = kernel
        variable = kernel.variable
        self.mask = keras.Variable(
            np.ones(kernel.shape, dtype=variable.dtype), trainable=False, name=_variable_name(kernel.name, "prune_mask")
        )
        self.grad = (
            keras.Variable(np.zeros(kernel.shape, dtype=variable.dtype), trainable=False, name=_variable_name(kernel.name, "prune_grad"))
            if needs_grad
            else None
        )


class PruningCallback(keras.callbacks.Callback):
    """Prunes a Keras model while ``model.fit`` trains it, following one :class:`~inc_core.PruneConfig`.

    Use it as ``model.fit(x, y, epochs=..., callbacks=[inc_tf.PruningCallback(inc.PruneConfig(...))])``
    on a compiled model. Steps of the schedule are optimizer steps (the first one is 0), counted from
    the first ``fit`` the callback joins; reuse the same callback object to continue a schedule over
    several ``fit`` calls. Pruned layers: Dense, EinsumDense, Conv1D/2D/3D(Transpose) and DepthwiseConv1D/2D
    kernels; each kernel of SeparableConv1D/2D (``<layer>.depthwise_kernel``, ``<layer>.pointwise_kernel``) and
    of LSTM, GRU, SimpleRNN and ConvLSTM1D/2D/3D layers (``<layer>.kernel``, ``<layer>.recurrent_kernel``);
    biases are never pruned; picked with ``include_types`` (Keras class names) and ``exclude``
    (a ``LayerFilter`` over layer names). The current sparsity of the pruned kernels is added to the
    ``logs`` as ``"sparsity"`` (progress bar and ``History``). Finish with :func:`inc_tf.strip`.

    With ``steps_per_execution > 1`` the callback runs once per execution: schedule steps inside an
    execution are handled at its end (masks change at execution boundaries).

    Args:
        config: the pruning recipe.

    Raises:
        ConfigError: (at the start of ``fit``) the model has no compiled optimizer, layer names or
            types match nothing, or the pattern does not fit a layer's shape (named with its shape).
    """

    def __init__(self, config: PruneConfig) -> None:
        super().__init__()
        if not isinstance(config, PruneConfig):
            raise ConfigError(f"PruningCallback: config must be an inc.PruneConfig, got {type(config).__name__}.")
        self.config = config
        self.pruner: Pruner | None = None
        self.step = 0  # optimizer steps taken under this callback (the schedule's step of the next one)
        self.sparsity = 0.0  # fraction of zeros the current masks impose on the pruned kernels
        self._states: dict[str, _KernelState] = {}
        self._optimizer: Any = None
        self._iterations = 0
        self._model_ref: Any = None

    # --- setup and teardown -------------------------------------------------------------------

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        model = self.model
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None or not isinstance(optimizer, keras.optimizers.Optimizer):
            raise ConfigError(
                f"PruningCallback: the model {model.name!r} has no compiled optimizer (got {type(optimizer).__name__}); "
                "masks follow the optimizer's steps. Call model.compile(optimizer=..., loss=...) before "
                "model.fit(..., callbacks=[inc_tf.PruningCallback(config)])."
            )
        if self.pruner is not None and self._model_ref is not model:
            raise ConfigError(
                f"PruningCallback: this callback already prunes the model {self._model_ref.name!r}; create one "
                "callback per model."
            )
        wrapped = vars(optimizer).get("apply")
        if wrapped is not None and getattr(wrapped, "_inc_pruning_callback", None) is self:
            del optimizer.apply  # a fit this callback joined ended in an exception: wrap afresh
        elif wrapped is not None:
            raise ConfigError(
                "PruningCallback: the model's optimizer is already wrapped by a pruning callback; pass one "
                "PruningCallback per fit."
            )
        self._optimizer = optimizer
        if self.pruner is None:
            try:
                self._start(model)
            except Exception:
                self._optimizer = None
                raise
            self._model_ref = model
        self._iterations = int(optimizer.iterations.numpy())
        self._wrap_optimizer(optimizer)
        model.make_train_function(force=True)  # fit traced its step before this hook: retrace with the wrapper

    def _start(self, model: keras.Model) -> None:
        kernels = prunable_kernels(model, self.config)
        shapes = {k.name: k.core_shape for k in kernels}
        try:
            pruner = Pruner(self.config, shapes)
        except ConfigError as exc:
            # the layers the pattern misfits, in Keras's own kernel layout ((h, w, in, out) for a Conv2D)
            keras_shapes = {k.name: k.shape for k in kernels if not _fits(self.config.pattern, k.core_shape)}
            raise ConfigError(f"PruningCallback: {exc} Their Keras kernel shapes: {keras_shapes}.") from exc
        needs_grad = next(iter(pruner.criteria.values())).needs_grad
        trained = {id(v) for v in model.trainable_variables}
        frozen = [k.name for k in kernels if id(k.variable) not in trained]
        if needs_grad and frozen:
            raise ConfigError(
                f"PruningCallback: criterion {self.config.criterion!r} scores weights by their gradients, but the "
                f"kernels of {frozen} are not trainable (trainable=False), so they get none. Exclude them with "
                f"exclude=inc.LayerFilter(names={tuple(frozen)!r}), make them trainable, or use criterion='magnitude'."
            )
        self.pruner = pruner
        self._states = {k.name: _KernelState(k, needs_grad) for k in kernels}
        if self.config.criterion == "pattern_lock":
            # The zeros to keep are those the weights have now, before the first update can move them.
            self._prune_step()
        log.info("pruning %d layers of %s: %s", len(kernels), model.name, list(self._states))

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._apply_masks()
        if self._optimizer is not None and "apply" in vars(self._optimizer):
            del self._optimizer.apply
        self._optimizer = None
        self.model.train_function = None  # the traced step holds the wrapper: trace again on the next fit

    def _wrap_optimizer(self, optimizer: keras.optimizers.Optimizer) -> None:
        by_id = {id(s.kernel.variable): s for s in self._states.values()}
        original = optimizer.apply

        def apply(grads: Any, trainable_variables: Any = None) -> Any:
            variables = list(trainable_variables) if trainable_variables is not None else optimizer._trainable_variables
            grads = list(grads)
            pruned = []
            for i, (grad, variable) in enumerate(zip(grads, variables)):
                state = by_id.get(id(variable))
                if state is None or grad is None:
                    continue
                if state.grad is not None:
                    state.grad.assign(grad)
                grads[i] = grad * state.mask
                pruned.append(state)
            result = original(grads, trainable_variables)
            for state in pruned:
                state.kernel.variable.assign(state.kernel.variable * state.mask)
            return result

        apply._inc_pruning_callback = self  # type: ignore[attr-defined]
        optimizer.apply = apply

    # --- every batch --------------------------------------------------------------------------

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        assert self.pruner is not None and self._optimizer is not None  # set in on_train_begin
        iterations = int(self._optimizer.iterations.numpy())
        taken, self._iterations = iterations - self._iterations, iterations
        for _ in range(max(taken, 0)):
            self._prune_step()
            self.step += 1
        if logs is not None:
            logs["sparsity"] = self.sparsity

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:
            logs["sparsity"] = self.sparsity

    def _prune_step(self) -> None:
        assert self.pruner is not None
        if not self.pruner.needs_data(self.step):
            return
        weights = {name: s.kernel.to_core(keras.ops.convert_to_numpy(s.kernel.variable)) for name, s in self._states.items()}
        grads = None
        if any(s.grad is not None for s in self._states.values()):
            grads = {name: s.kernel.to_core(keras.ops.convert_to_numpy(s.grad)) for name, s in self._states.items() if s.grad is not None}
        masks = self.pruner.step(self.step, weights, grads)
        if masks is not None:
            self._set_masks(masks)

    def _set_masks(self, masks: dict[str, np.ndarray]) -> None:
        zeros = total = 0
        slots = self._optimizer.variables if self._optimizer is not None else []
        for name, core_mask in masks.items():
            state = self._states[name]
            mask = state.kernel.from_core(core_mask)
            state.mask.assign(mask.astype(state.mask.dtype))
            zeros += int(mask.size - np.count_nonzero(mask))
            total += int(mask.size)
            # Slot variables are named after the kernel's path (Keras' add_variable_from_reference).
            prefix = state.kernel.variable.path.replace("/", "_") + "_"
            for slot in slots:
                if slot.name.startswith(prefix) and tuple(slot.shape) == mask.shape:
                    slot.assign(slot * state.mask)
        self._apply_masks()
        self.sparsity = zeros / total if total else 0.0
        assert self.pruner is not None
        log.info(
            "pruning step %d: sparsity %.4f (target %.4f)",
            self.step,
            self.pruner.schedule.sparsity_at(self.step),
            self.pruner.schedule.target_sparsity,
        )

    def _apply_masks(self) -> None:
        for state in self._states.values():
            state.kernel.variable.assign(state.kernel.variable * state.mask)

    @property
    def masks(self) -> dict[str, np.ndarray]:
        """name -> the current boolean mask in the kernel's own layout (``True`` = kept); empty before pruning."""
        if self.pruner is None or not self.pruner.masks:
            return {}
        return {name: keras.ops.convert_to_numpy(s.mask).astype(bool) for name, s in self._states.items()}


def _fits(pattern: str, shape: tuple[int, ...]) -> bool:
    try:
        check_shape(pattern, shape)
    except ConfigError:
        return False
    return True
