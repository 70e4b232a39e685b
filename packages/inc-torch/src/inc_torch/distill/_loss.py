"""Knowledge distillation as a loss the user's own loop calls: ``loss = kd(student_logits, inputs, labels)``."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from inc_core._distill_config import DistillConfig
from inc_core.errors import ConfigError, UnsupportedModelError
from inc_torch._hf import drop_label_inputs
from inc_torch._inputs import float_dtype, to_inputs

__all__ = ["DistillationLoss"]


# Keys under which a model returning a dict puts its logits: Hugging Face's, and torchvision's segmentation and
# models ({"out": ..., "aux": ...}: the auxiliary classifier's map next to the main one).
_LOGIT_KEYS = ("logits", "out")


def _logits(output: Any, who: str) -> torch.Tensor:
    """The logits tensor of a model output: a tensor, an HF output with ``.logits``, a dict's ``"logits"``/``"out"``
    (or only) tensor, or a tuple's first item."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping):
        key = next((k for k in _LOGIT_KEYS if isinstance(output.get(k), torch.Tensor)), None)
        tensors = [k for k, v in output.items() if isinstance(v, torch.Tensor)]
        if key is None and len(tensors) == 1:
            key = tensors[0]
        if key is not None:
            return output[key]
        raise UnsupportedModelError(
            f"DistillationLoss: the {who} returned a {type(output).__name__} with keys {list(output)}; expected the "
            f"logits under one of {list(_LOGIT_KEYS)} or as its only tensor. Pass the student's logits tensor "
            "itself, and give a teacher whose output holds them so (wrap it in a module that returns them)."
        )
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise UnsupportedModelError(
        f"DistillationLoss: the {who} returned {type(output).__name__}; expected logits as a tensor, a tuple whose "
        "first item is the logits, a dict holding them under 'logits' or 'out', or an object with a .logits tensor."
    )


def _is_probabilities(tensor: torch.Tensor, axis: int = -1) -> bool:
    """Scores that are non-negative and sum to 1 along ``axis``: a model ending in ``nn.Softmax``. Logits almost never do.

    A 16-bit softmax's rows sum to 1 only within its rounding (bfloat16 keeps 8 bits): the tolerance follows.
    """
    if tensor.ndim < 1 or tensor.shape[axis] < 2 or not tensor.is_floating_point():
        return False
    values = tensor.detach().float()
    tolerance = 1e-4 if tensor.dtype in (torch.float32, torch.float64) else 2e-2
    return bool((values >= 0).all()) and bool(torch.allclose(values.sum(dim=axis), values.new_ones(()), atol=tolerance))


# F.cross_entropy's default ignore_index: label positions holding it (padding tokens in Hugging Face's
# convention) count in neither the task loss nor the soft loss.
IGNORE_INDEX = -100


def _class_axis(logits: torch.Tensor, labels: torch.Tensor | None, *, strict: bool = True) -> int:
    """The dimension of ``logits`` that holds the class scores.

    The last one for a classifier's ``(batch, classes)`` and a sequence model's per-token ``(batch, tokens,
    classes)`` (Hugging Face's token classifiers and language models); dimension 1 for a channels-first map
    ``(batch, classes, height, width)`` (torch's segmentation layout, as ``F.cross_entropy`` reads it).
    Class-index labels settle it where they fit only the other one.

    Raises:
        ConfigError: with ``strict`` (the default task loss reads the labels), integer labels whose shape is not
            the logits' shape without one of those dimensions. A task loss of the user's own reads labels its
            own way: then such labels leave the default dimension.
    """
    if logits.ndim <= 2:
        return logits.ndim - 1
    candidates = (1, logits.ndim - 1) if logits.ndim >= 4 else (logits.ndim - 1, 1)
    if labels is None or labels.is_floating_point():
        return candidates[0]
    for axis in candidates:
        if tuple(labels.shape) == tuple(logits.shape[:axis] + logits.shape[axis + 1 :]):
            return axis
    if not strict:
        return candidates[0]
    raise ConfigError(
        f"DistillationLoss: labels of shape {tuple(labels.shape)} do not fit logits of shape {tuple(logits.shape)}; "
        "class-index labels have the logits' shape without the class dimension: (batch, tokens) for per-token "
        "logits (batch, tokens, classes), (batch, height, width) for a map (batch, classes, height, width)."
    )


def _per_position(scores: torch.Tensor, axis: int) -> torch.Tensor:
    """``(positions, classes)``: every sample, token or pixel's class scores as one row."""
    return scores.movedim(axis, -1).reshape(-1, scores.shape[axis])


def _labels_per_position(labels: torch.Tensor, logits: torch.Tensor, axis: int) -> torch.Tensor:
    """Labels as ``F.cross_entropy`` reads them next to :func:`_per_position` logits.

    Raises:
        ConfigError: probability labels of another shape than the logits, or labels that are not numbers.
    """
    if labels.is_floating_point():  # class probabilities (soft or smoothed labels), one per score
        if labels.shape != logits.shape:
            raise ConfigError(
                f"DistillationLoss: probability labels of shape {tuple(labels.shape)} do not fit logits of shape "
                f"{tuple(logits.shape)}; give class indices, or one probability per class score."
            )
        return _per_position(labels.to(logits.dtype), axis)
    if labels.dtype == torch.bool or labels.is_complex():
        raise ConfigError(f"DistillationLoss: labels must be class indices (an integer tensor), got {labels.dtype}.")
    return labels.reshape(-1).long()  # int32/uint8 labels too: cross-entropy takes int64 only


def _log_probabilities(probabilities: torch.Tensor) -> torch.Tensor:
    """log(p): the logits up to one constant per sample, which the tempered softmax and cross-entropy ignore."""
    return torch.log(probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny))


def _in_dtype(value: Any, dtype: torch.dtype) -> Any:
    """A floating tensor in ``dtype``; token ids and masks (integer tensors) and anything else as they are."""
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype else value


def _modules(model: nn.Module, names: list[str], who: str) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        hints = {m: difflib.get_close_matches(m, list(modules), n=3) for m in missing}
        raise ConfigError(
            f"DistillConfig.layer_mappings: {who} layer(s) {missing} do not exist. Close names: {hints}. "
            f"Use names from {who}.named_modules()."
        )
    return {n: modules[n] for n in names}


class _Capture:
    """Forward hooks that keep the latest output of some modules."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.outputs[name] = _logits(output, f"layer {name!r}")

        return hook

    def take(self, name: str, who: str) -> torch.Tensor:
        if name not in self.outputs:
            raise ConfigError(
                f"DistillationLoss: {who} layer {name!r} produced no output since the last loss; call the {who} "
                "on the batch before kd(...)."
            )
        return self.outputs.pop(name)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _Projection(nn.Module):
    """A learned linear map of a student layer's features to its teacher layer's width (FitNets' regressor).

    Its parameters are created uninitialised and take their shapes from the first batch, in place (the
    way torch's lazy modules do), so an optimizer built from ``kd.parameters()`` before training holds them.
    The feature dimension is the one dimension whose size differs between student and teacher; with equal
    shapes it is dimension 1 of a 4-D/5-D feature map (channels) or the last one, and the map starts as the
    identity. A 1x1 convolution over channels is this same map.
    """

    def __init__(self, student_layer: str, teacher_layer: str) -> None:
        super().__init__()
        self.layers = (student_layer, teacher_layer)
        self.weight = nn.parameter.UninitializedParameter()
        self.bias = nn.parameter.UninitializedParameter()
        self.dim: int | None = None

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.dim is None:
            self._materialize(student, teacher)
        assert self.dim is not None
        s_width, t_width = student.shape[self.dim] if student.ndim > self.dim else None, self.weight.shape[0]
        rest_s = student.shape[: self.dim] + student.shape[self.dim + 1 :]
        rest_t = teacher.shape[: self.dim] + teacher.shape[self.dim + 1 :]
        if student.ndim != teacher.ndim or s_width != self.weight.shape[1] or teacher.shape[self.dim] != t_width or rest_s != rest_t:
            raise ConfigError(
                f"DistillationLoss: the projection of student layer {self.layers[0]!r} maps {self.weight.shape[1]} to "
                f"{t_width} features along dimension {self.dim}, but this batch gives {tuple(student.shape)} against "
                f"teacher layer {self.layers[1]!r}'s {tuple(teacher.shape)}; the layers' other dimensions must match."
            )
        moved = student.movedim(self.dim, -1)
        return nn.functional.linear(moved, self.weight, self.bias).movedim(-1, self.dim)

    def _materialize(self, student: torch.Tensor, teacher: torch.Tensor) -> None:
        s_name, t_name = self.layers
        differ = [d for d in range(student.ndim) if student.ndim == teacher.ndim and student.shape[d] != teacher.shape[d]]
        if student.ndim != teacher.ndim or student.ndim < 2 or len(differ) > 1:
            raise ConfigError(
                f"DistillationLoss: student layer {s_name!r} outputs {tuple(student.shape)} and teacher layer "
                f"{t_name!r} outputs {tuple(teacher.shape)}; layer_projection='linear' maps one feature dimension "
                "(channels or hidden size), so map layers whose outputs differ in that dimension alone."
            )
        dim = differ[0] if differ else (1 if student.ndim >= 4 else student.ndim - 1)
        if dim == 0:
            raise ConfigError(
                f"DistillationLoss: student layer {s_name!r} and teacher layer {t_name!r} differ in dimension 0 "
                f"({tuple(student.shape)} against {tuple(teacher.shape)}), the batch; call both on the same batch."
            )
        s_width, t_width = student.shape[dim], teacher.shape[dim]
        factory = {"device": student.device, "dtype": student.dtype}
        self.weight.materialize((t_width, s_width), **factory)
        self.bias.materialize((t_width,), **factory)
        with torch.no_grad():
            if s_width == t_width:
                nn.init.eye_(self.weight)
                nn.init.zeros_(self.bias)
            else:  # nn.Linear's initialisation
                nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
                bound = 1 / math.sqrt(s_width)
                nn.init.uniform_(self.bias, -bound, bound)
        self.dim = dim


class DistillationLoss(nn.Module):
    """``hard * task_loss + soft * T^2 * soft_loss + layer * sum(layer losses)``, with the teacher run inside.

    Use it in your own loop::

        kd = inc_torch.DistillationLoss(teacher, inc.DistillConfig(temperature=4.0, loss_weights=(0.3, 0.7)))
        for x, y in loader:
            loss = kd(student(x), x, y)
            loss.backward(); optimizer.step(); optimizer.zero_grad()

    The teacher runs on ``inputs`` in eval mode without gradients (its training flag is restored
    afterwards; its weights are never touched). With ``layer_mappings``, pass ``student=`` too: forward
    hooks capture the mapped layers' outputs of both models, and their mean loss (``layer_loss``) is added.
    With ``layer_projection="linear"`` a narrower student layer is first mapped to the teacher layer's width
    by a learned projection held by this loss: give its parameters to the optimizer with the student's::

        kd = inc_torch.DistillationLoss(teacher, config, student=student)
        optimizer = torch.optim.Adam([*student.parameters(), *kd.parameters()])

    A projection that does not change while the student does (left out of the optimizer) is a
    :class:`~inc_core.errors.ConfigError` at the next call, not a silently random map.

    Args:
        teacher: the trained teacher; its output must have the student's logits shape. Outputs whose rows are
            non-negative and sum to 1 (a model ending in ``nn.Softmax``, teacher or student) are probabilities:
            the losses read their logarithm, equal to the logits up to a per-sample constant.
        config: temperature, loss weights, soft loss (``"kl"``/``"ce"``), layer mappings.
        student: the student module, needed only for ``layer_mappings``.
        task_loss: ``task_loss(student_output, labels)`` for the hard part (default: cross-entropy, from the
            log-probabilities of a student that outputs probabilities).

    Attributes:
        last: the unweighted parts of the latest loss (``{"hard": ..., "soft": ..., "layer": ...}``), for logging.
    """

    def __init__(
        self,
        teacher: nn.Module,
        config: DistillConfig | None = None,
        *,
        student: nn.Module | None = None,
        task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        config = DistillConfig() if config is None else config
        if not isinstance(config, DistillConfig):
            raise ConfigError(f"DistillationLoss: config must be an inc.DistillConfig, got {type(config).__name__}.")
        if not isinstance(teacher, nn.Module):
            raise UnsupportedModelError(f"DistillationLoss: teacher must be a torch.nn.Module, got {type(teacher).__name__}.")
        if student is not None and not isinstance(student, nn.Module):
            raise UnsupportedModelError(f"DistillationLoss: student must be a torch.nn.Module, got {type(student).__name__}.")
        if config.layer_mappings and student is None:
            raise ConfigError(
                "DistillationLoss: layer_mappings need the student module to hook its layers; pass student=model."
            )
        self.config = config
        # Not registered as a submodule: the teacher's parameters must stay out of the student's optimizer and state_dict.
        self.__dict__["teacher"] = teacher
        self.task_loss = task_loss if task_loss is not None else F.cross_entropy
        self._default_task_loss = task_loss is None
        weights = config.loss_weights
        self.weights = {"hard": weights[0], "soft": weights[1], "layer": weights[2] if len(weights) == 3 else 0.0}
        self._student_capture: _Capture | None = None
        self._teacher_capture: _Capture | None = None
        self.projections = nn.ModuleList(
            [_Projection(s, t) for s, t in config.layer_mappings] if config.layer_projection == "linear" else []
        )
        self._trained: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # see _check_projections_train
        if config.layer_mappings:
            assert student is not None  # checked above
            s_names = [s for s, _ in config.layer_mappings]
            t_names = [t for _, t in config.layer_mappings]
            student_modules = _modules(student, s_names, "student")
            self._student_capture = _Capture(student_modules)
            self._teacher_capture = _Capture(_modules(teacher, t_names, "teacher"))
            watched = [p for m in student_modules.values() for p in m.parameters() if p.requires_grad]
            self.__dict__["_watched"] = watched or [p for p in student.parameters() if p.requires_grad]
        self.last: dict[str, float] = {}

    def forward(self, student_logits: torch.Tensor, inputs: Any, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The distillation loss of one batch (a scalar with gradients to the student only).

        Per-token logits ``(batch, tokens, classes)`` (a language model, a token classifier) with labels
        ``(batch, tokens)`` and class maps ``(batch, classes, height, width)`` with labels ``(batch, height,
        width)`` are distilled per position: both losses are means over every token or pixel, and positions
        labelled -100 (``F.cross_entropy``'s ignore index, Hugging Face's padding label) count in neither.

        Raises:
            ConfigError: teacher and student outputs (or mapped layers) differ in shape, labels are missing
                while the hard loss has a weight, or labels do not fit the logits' shape.
        """
        student_logits = _logits(student_logits, "student")
        teacher_logits = self._teacher_logits(inputs)  # also runs the teacher's layer hooks
        label_tensor = labels if isinstance(labels, torch.Tensor) else None
        axis = _class_axis(student_logits, label_tensor, strict=self._default_task_loss and self.weights["hard"] > 0)
        # A model ending in nn.Softmax gives probabilities: tempering them as logits would flatten the soft
        # targets toward uniform, and cross-entropy would read them as logits. Their log is exact for both.
        if _is_probabilities(teacher_logits, axis):
            teacher_logits = _log_probabilities(teacher_logits)
        student_output = student_logits  # what a task_loss of the user's own is given
        if _is_probabilities(student_logits, axis):
            student_logits = _log_probabilities(student_logits)
        if self.weights["soft"] > 0 and teacher_logits.shape != student_logits.shape:
            raise ConfigError(
                f"DistillationLoss: the teacher's output has shape {tuple(teacher_logits.shape)} but the student's "
                f"logits have shape {tuple(student_logits.shape)}; distil between models with the same output (same "
                "number of classes), or map a projection of the student's output to the teacher's."
            )
        total = student_logits.new_zeros(())
        self.last = {}
        if self.weights["hard"] > 0:
            if labels is None:
                raise ConfigError(
                    "DistillationLoss: loss_weights gives the task (hard) loss a weight but no labels were passed; "
                    "call kd(student_logits, inputs, labels) or set the hard weight to 0."
                )
            hard = self._hard(student_logits, student_output, labels, axis)
            total = total + self.weights["hard"] * hard
            self.last["hard"] = float(hard.detach())
        if self.weights["soft"] > 0:
            soft = self._soft(student_logits, teacher_logits.to(student_logits.dtype), axis, label_tensor)
            total = total + self.weights["soft"] * soft
            self.last["soft"] = float(soft.detach())
        if self._student_capture is not None and self._teacher_capture is not None:
            layer = self._layers()
            total = total + self.weights["layer"] * layer
            self.last["layer"] = float(layer.detach())
        return total

    def _teacher_logits(self, inputs: Any) -> torch.Tensor:
        teacher: nn.Module = self.__dict__["teacher"]
        was_training = teacher.training
        teacher.eval()
        # A teacher kept in float16/bfloat16 to save memory reads the batch in its own dtype ("mat1 and mat2 must
        # have the same dtype" otherwise); its outputs are compared in the student's dtype.
        dtype = float_dtype(teacher)
        # a mapping gives keyword arguments, a tuple/list positional ones; a collated batch's labels are left out
        # (a transformers teacher would compute its own loss from them, and fail on labels of another head)
        args, kwargs = drop_label_inputs(teacher, to_inputs(inputs, dtype))
        try:
            with torch.no_grad():
                output = teacher(*(_in_dtype(v, dtype) for v in args), **{k: _in_dtype(v, dtype) for k, v in kwargs.items()})
                return _logits(output, "teacher")
        finally:
            teacher.train(was_training)

    def _hard(self, student_logits: torch.Tensor, student_output: torch.Tensor, labels: Any, axis: int) -> torch.Tensor:
        if not self._default_task_loss:
            return self.task_loss(student_output, labels)
        if not isinstance(labels, torch.Tensor):
            raise ConfigError(
                f"DistillationLoss: labels must be a torch.Tensor of class indices, got {type(labels).__name__}; "
                "or pass task_loss= to read them your own way."
            )
        return F.cross_entropy(_per_position(student_logits, axis), _labels_per_position(labels, student_logits, axis))

    def _soft(self, student: torch.Tensor, teacher: torch.Tensor, axis: int, labels: torch.Tensor | None) -> torch.Tensor:
        """The tempered soft loss, averaged over samples (and over the tokens or pixels of per-position outputs)."""
        t = self.config.temperature
        student, teacher = _per_position(student, axis), _per_position(teacher, axis)
        if labels is not None and not labels.is_floating_point() and labels.numel() == student.shape[0]:
            # Positions the task loss ignores (padding) are not distilled either.
            keep = labels.reshape(-1) != IGNORE_INDEX
            if not bool(keep.all()):
                student, teacher = student[keep], teacher[keep]
            if student.shape[0] == 0:
                return student.sum() * 0.0  # every position ignored: no soft targets, a zero that keeps the graph
        log_p_student = F.log_softmax(student / t, dim=-1)
        log_p_teacher = F.log_softmax(teacher / t, dim=-1)
        if self.config.soft_loss == "kl":
            loss = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
        else:  # "ce": cross-entropy against the teacher's soft targets
            loss = -(log_p_teacher.exp() * log_p_student).sum(dim=-1).mean()
        return loss * t * t  # T^2 keeps the soft gradients' scale independent of T (Hinton et al., 2015)

    def _check_projections_train(self) -> None:
        """Raise once the student has changed since the projections were made while they have not."""
        if not self.projections or not torch.is_grad_enabled():
            return
        params = [p for projection in self.projections for p in projection.parameters()]
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in params):
            return  # made on this first batch
        watched: list[torch.Tensor] = self.__dict__["_watched"]
        if self._trained is None:
            self._trained = ([p.detach().clone() for p in params], [p.detach().clone() for p in watched])
            return
        if not self._trained[1]:
            return  # checked already
        student_moved = any(not torch.equal(p.detach(), q) for p, q in zip(watched, self._trained[1]))
        if not student_moved:
            return  # no optimizer step yet (gradient accumulation, warm-up at lr 0)
        if all(torch.equal(p.detach(), q) for p, q in zip(params, self._trained[0])):
            raise ConfigError(
                "DistillationLoss: the student has changed since the first batch but the layer projections "
                "(layer_projection='linear') have not: they are not in the optimizer. Build it with both: "
                "torch.optim.Adam([*student.parameters(), *kd.parameters()])."
            )
        self._trained = (self._trained[0], [])  # they train: nothing more to watch

    def _layers(self) -> torch.Tensor:
        assert self._student_capture is not None and self._teacher_capture is not None
        self._check_projections_train()
        losses = []
        for index, (s_name, t_name) in enumerate(self.config.layer_mappings):
            s = self._student_capture.take(s_name, "student")
            t = self._teacher_capture.take(t_name, "teacher").to(s.dtype)
            if self.projections:
                s = self.projections[index](s, t)
            if s.shape != t.shape:
                raise ConfigError(
                    f"DistillationLoss: student layer {s_name!r} outputs {tuple(s.shape)} but teacher layer {t_name!r} "
                    f"outputs {tuple(t.shape)}; map layers whose outputs have the same shape, or set "
                    "DistillConfig(layer_projection='linear') to learn a map from the student's width to the teacher's."
                )
            if self.config.layer_loss == "mse":
                losses.append(F.mse_loss(s, t))
            elif self.config.layer_loss == "kl":
                losses.append(
                    F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="batchmean")
                )
            else:  # cosine: 1 - cosine similarity of each sample's flattened features
                losses.append((1 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1)).mean())
        return torch.stack(losses).mean()

    def remove_hooks(self) -> None:
        """Detach the layer-mapping hooks from the student and the teacher."""
        for capture in (self._student_capture, self._teacher_capture):
            if capture is not None:
                capture.remove()
