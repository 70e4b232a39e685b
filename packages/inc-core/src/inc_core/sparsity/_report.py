"""Per-layer sparsity report: a markdown table and, with matplotlib, a bar chart, written atomically.

Framework plugins hand it the pruned weights (as numpy, output-first) after or during pruning; the
report is the same for every framework.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from inc_core._files import atomic_write, atomic_write_text, check_output_path
from inc_core.errors import ConfigError

__all__ = ["LayerSparsity", "SparsityReport"]


@dataclass(frozen=True, kw_only=True)
class LayerSparsity:
    """The zeros of one layer's weight."""

    name: str
    op_type: str
    shape: tuple[int, ...]
    zeros: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def sparsity(self) -> float:
        return self.zeros / self.size if self.size else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """Sparsity of each pruned layer and of all of them together."""

    layers: tuple[LayerSparsity, ...]

    @classmethod
    def from_weights(cls, weights: Iterable[tuple[str, str, ArrayLike]]) -> SparsityReport:
        """Build the report from ``(name, op_type, weight)`` triples (exact zeros are counted)."""
        layers = []
        for name, op_type, weight in weights:
            array = np.asarray(weight)
            layers.append(LayerSparsity(name=name, op_type=op_type, shape=tuple(array.shape), zeros=int(np.sum(array == 0))))
        return cls(tuple(layers))

    @property
    def overall(self) -> float:
        """Zeros over all weights of the reported layers."""
        size = sum(layer.size for layer in self.layers)
        return sum(layer.zeros for layer in self.layers) / size if size else 0.0

    def to_markdown(self) -> str:
        rows = ["| layer | type | shape | zeros | sparsity |", "| --- | --- | --- | ---: | ---: |"]
        for layer in self.layers:
            shape = "x".join(map(str, layer.shape))
            rows.append(f"| {layer.name} | {layer.op_type} | {shape} | {layer.zeros:,} / {layer.size:,} | {layer.sparsity:.2%} |")
        total = sum(layer.size for layer in self.layers)
        rows.append(f"| **all** | | | {sum(layer.zeros for layer in self.layers):,} / {total:,} | {self.overall:.2%} |")
        return "\n".join(rows) + "\n"

    def __str__(self) -> str:
        return self.to_markdown()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path`` (markdown) and, when matplotlib is installed, ``path`` with ``.png`` (a bar chart).

        Raises:
            ConfigError: ``path`` names the PNG instead of the markdown file.
            SaveError: the directory does not exist or is not writable (nothing is written).
        """
        md_path = Path(path)
        if md_path.suffix.lower() == ".png":
            raise ConfigError(f"SparsityReport.save: {str(md_path)!r} names the plot; give the markdown path, e.g. 'sparsity.md'.")
        png_path = md_path.with_suffix(".png")
        check_output_path(md_path, what="sparsity report")
        png = self._plot()
        markdown = self.to_markdown()
        if png is not None:
            data = png

            def write_png(tmp: Path) -> None:
                tmp.write_bytes(data)

            markdown += f"\n![per-layer sparsity]({png_path.name})\n"
            atomic_write(png_path, write_png, what="sparsity plot")
        atomic_write_text(md_path, markdown, what="sparsity report")
        return md_path

    def _plot(self) -> bytes | None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # the plot is optional: pip install inc-core[plot]
            return None
        fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(self.layers) + 2), 3.2))
        try:
            ax.bar([layer.name for layer in self.layers], [100 * layer.sparsity for layer in self.layers])
            ax.set_ylabel("sparsity (%)")
            ax.set_ylim(0, 100)
            ax.set_title(f"per-layer sparsity (all: {self.overall:.1%})")
            ax.tick_params(axis="x", labelrotation=60)
            fig.tight_layout()
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=100)
            return buffer.getvalue()
        finally:
            plt.close(fig)
