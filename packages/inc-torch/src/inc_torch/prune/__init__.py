"""Pruning with sparsity schedules in the user's own training loop (hooks on their optimizer)."""

from inc_torch.prune._hooks import finish_pruning, is_pruning, prepare, sparsity_report

__all__ = ["finish_pruning", "is_pruning", "prepare", "sparsity_report"]
