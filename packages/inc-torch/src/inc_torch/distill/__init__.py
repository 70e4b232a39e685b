"""Knowledge distillation in the user's own loop."""

from inc_torch.distill._loss import DistillationLoss

__all__ = ["DistillationLoss"]
