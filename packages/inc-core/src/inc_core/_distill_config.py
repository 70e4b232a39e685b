"""DistillConfig: knowledge distillation from a teacher into a student."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inc_core._checks import check_choice, check_float
from inc_core._serde import SerializableConfig
from inc_core.errors import ConfigError

__all__ = ["DistillConfig", "SOFT_LOSSES", "LAYER_LOSSES", "LAYER_PROJECTIONS"]

SOFT_LOSSES = ("kl", "ce")
LAYER_LOSSES = ("mse", "kl", "cosine")
LAYER_PROJECTIONS = ("none", "linear")


@dataclass(frozen=True, kw_only=True)
class DistillConfig(SerializableConfig):
    """Distillation loss recipe: ``hard * task_loss + soft * T^2 * soft_loss(student/T, teacher/T) + layer * sum(layer losses)``.

    Args:
        temperature: softmax temperature for the soft targets (> 0).
        loss_weights: ``(hard, soft)`` or ``(hard, soft, layer)`` weights, each >= 0, not all zero.
        soft_loss: ``"kl"`` or ``"ce"`` between the softened distributions.
        layer_mappings: ``(student_layer, teacher_layer)`` name pairs whose outputs are matched.
        layer_loss: ``"mse"``, ``"kl"`` or ``"cosine"`` for the mapped layers.
        layer_projection: ``"none"``: each mapped student layer must output the teacher layer's shape.
            ``"linear"``: a learned linear map (FitNets' regressor; a 1x1 convolution on channel-first
            feature maps) takes each student layer's features to its teacher layer's width, so a narrower
            student (hidden 384 against 768, 32 channels against 64) can match a wider teacher. The maps
            train with the student: the framework's distiller holds them (in torch, pass the
            ``DistillationLoss``'s ``parameters()`` to the optimizer too).
    """

    temperature: float = 2.0
    loss_weights: tuple[float, ...] = (0.5, 0.5)
    soft_loss: str = "kl"
    layer_mappings: tuple[tuple[str, str], ...] = ()
    layer_loss: str = "mse"
    layer_projection: str = "none"

    def __post_init__(self) -> None:
        owner = "DistillConfig"
        check_float(owner, "temperature", self.temperature, minimum=0.0, exclusive_min=True)
        weights = self.loss_weights
        if isinstance(weights, list):
            weights = tuple(weights)
        if not isinstance(weights, tuple) or len(weights) not in (2, 3):
            raise ConfigError(f"{owner}: loss_weights must be (hard, soft) or (hard, soft, layer), got {weights!r}.")
        for w in weights:
            check_float(owner, "loss_weights item", w, minimum=0.0)
        if sum(weights) == 0:
            raise ConfigError(f"{owner}: loss_weights {weights!r} are all zero; at least one loss must count.")
        object.__setattr__(self, "loss_weights", tuple(float(w) for w in weights))
        check_choice(owner, "soft_loss", self.soft_loss, SOFT_LOSSES)
        check_choice(owner, "layer_loss", self.layer_loss, LAYER_LOSSES)
        check_choice(owner, "layer_projection", self.layer_projection, LAYER_PROJECTIONS)
        mappings: list[tuple[str, str]] = []
        for pair in self.layer_mappings:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(isinstance(p, str) and p for p in pair):
                raise ConfigError(f"{owner}: each layer mapping must be a (student_layer, teacher_layer) pair, got {pair!r}.")
            mappings.append((pair[0], pair[1]))
        object.__setattr__(self, "layer_mappings", tuple(mappings))
        if mappings and len(self.loss_weights) == 2:
            raise ConfigError(f"{owner}: layer_mappings given but loss_weights has no layer weight; pass (hard, soft, layer).")
        if self.layer_projection != "none" and not mappings:
            raise ConfigError(
                f"{owner}: layer_projection={self.layer_projection!r} projects mapped layers, but layer_mappings is "
                "empty; map (student_layer, teacher_layer) pairs, or leave layer_projection='none'."
            )

    @classmethod
    def _decode_field(cls, name: str, value: Any) -> Any:
        if name == "layer_mappings":
            return tuple(tuple(p) for p in value)
        return value
