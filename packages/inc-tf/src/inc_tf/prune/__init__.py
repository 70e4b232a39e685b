"""Pruning in ``model.fit``: masks follow inc-core's schedules through a Keras callback."""

from inc_tf.prune._callback import PruningCallback
from inc_tf.prune._layers import PRUNABLE_TYPES
from inc_tf.prune._strip import sparsity_report, strip

__all__ = ["PRUNABLE_TYPES", "PruningCallback", "sparsity_report", "strip"]
