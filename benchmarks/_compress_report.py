"""What the PyTorch and Keras compression benchmarks report the same way: the distillation rows and verdict."""

from __future__ import annotations

from typing import Any

import numpy as np


def distill_rows(results: dict[str, list[float]]) -> list[dict[str, Any]]:
    """One row per variant ("alone", "distilled"): mean, spread and per-seed accuracy."""
    return [
        {"study": "distill", "variant": f"student MLP (64-24-10), {variant}", "accuracy": float(np.mean(accs)),
         "std": float(np.std(accs)), "per_seed": accs}
        for variant, accs in results.items()
    ]


def distill_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The distillation table and whether distillation helped beyond the spread over seeds, honestly either way."""
    lines = ["| variant | test accuracy (mean ± std over seeds) | per seed |", "| --- | ---: | --- |"]
    for r in (r for r in rows if r["study"] == "distill"):
        std = f" ± {r['std']:.4f}" if "std" in r else ""
        lines.append(f"| {r['variant']} | {r['accuracy']:.4f}{std} | {', '.join(f'{a:.4f}' for a in r.get('per_seed', []))} |")
    distill = {r["variant"].rsplit(", ", 1)[-1]: r for r in rows if r["study"] == "distill" and "std" in r}
    if distill:
        gain = distill["distilled"]["accuracy"] - distill["alone"]["accuracy"]
        spread = max(distill["distilled"]["std"], distill["alone"]["std"])
        verdict = "helped" if gain > spread else "did not help beyond the seed spread" if gain > -spread else "hurt"
        lines += ["", f"Distillation {verdict}: {gain:+.4f} mean accuracy (largest seed std {spread:.4f})."]
    return lines
