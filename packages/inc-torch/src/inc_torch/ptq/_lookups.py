"""Embedding tables quantized 8 bits per row: torch.ao's quantized lookups, made to take the indices models pass.

torch.ao's quantized ``Embedding``/``EmbeddingBag`` call FBGEMM's row-wise kernels, which refuse index tensors
that are not contiguous ("Expect weight, indices, and offsets to be contiguous") where ``nn.Embedding`` takes any:
BERT looks its token types up through an expanded (stride 0) buffer, T5 its relative position buckets through a
computed view. The float lookups never met the problem, so it surfaced only when the quantized model first ran.
:func:`contiguous_lookups` gives each quantized lookup of a model a forward that makes its indices contiguous
first; it stays a subclass of torch.ao's (``isinstance``, ``state_dict``, TorchScript saving all as before).
"""

from __future__ import annotations

import torch
import torch.ao.nn.quantized as nnq
from torch import Tensor, nn

__all__ = ["QUANTIZED_LOOKUPS", "QuantizedEmbedding", "QuantizedEmbeddingBag", "contiguous_lookups"]

# torch.ao's quantized lookups; inc's own (below) subclass them, so isinstance finds both.
QUANTIZED_LOOKUPS = (nnq.Embedding, nnq.EmbeddingBag)


class QuantizedEmbedding(nnq.Embedding):
    """torch.ao's 8-bit Embedding, taking non-contiguous indices (inc quantizes tables to quint8 only)."""

    def forward(self, indices: Tensor) -> Tensor:
        return torch.ops.quantized.embedding_byte(self._packed_params._packed_weight, indices.contiguous())


class QuantizedEmbeddingBag(nnq.EmbeddingBag):
    """torch.ao's 8-bit EmbeddingBag (mode ``"sum"``), taking non-contiguous indices and offsets."""

    def forward(
        self,
        indices: Tensor,
        offsets: Tensor | None = None,
        per_sample_weights: Tensor | None = None,
        compressed_indices_mapping: Tensor | None = None,
    ) -> Tensor:
        if offsets is not None:
            offsets = offsets.contiguous()
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.contiguous()
        return torch.ops.quantized.embedding_bag_byte(
            self._packed_params._packed_weight,
            indices.contiguous(),
            offsets,
            False,
            0,
            self.pruned_weights,
            per_sample_weights,
            compressed_indices_mapping,
            self.include_last_offset,
        )


_OURS = {nnq.Embedding: QuantizedEmbedding, nnq.EmbeddingBag: QuantizedEmbeddingBag}


def contiguous_lookups(model: nn.Module) -> int:
    """Give every torch.ao quantized lookup of ``model`` the forward of :class:`QuantizedEmbedding` (or ``Bag``).

    Changes the modules in place (their class only: weights and attributes stay); returns how many.
    """
    changed = 0
    for module in model.modules():
        ours = _OURS.get(type(module))
        if ours is not None:
            module.__class__ = ours
            changed += 1
    return changed
