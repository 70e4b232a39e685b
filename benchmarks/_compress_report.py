"""What the PyTorch and Keras compression benchmarks report the same way: the distillation rows and verdict."""

from __future__ import annotations

from typing import Any

import numpy as np

import inc_core as inc

# The narrow-student study both benches run: the teacher's layout at a quarter of its widths, trained on FEW of the
# training samples (where a teacher trained on all of them has most to give): alone, with the teacher's logits, and
# with its hidden layers too through learned projections (16 -> 64 channels, 32 -> 128 units), cosine layer loss.
FEW = 150
NARROW = (8, 16, 32)  # conv1, conv2 channels, fc1 units
NARROW_STUDENT = f"student CNN ({'-'.join(map(str, NARROW))}) on {FEW} samples"


def narrow_study_configs() -> dict[str, inc.DistillConfig | None]:
    """Variant -> its distillation recipe (``None``: the student trained alone)."""
    return {
        "alone": None,
        "distilled": inc.DistillConfig(temperature=4.0, loss_weights=(0.5, 0.5)),
        "distilled + hidden layers (projected)": inc.DistillConfig(
            temperature=4.0, loss_weights=(0.5, 0.5, 1.0), layer_mappings=(("conv2", "conv2"), ("fc1", "fc1")),
            layer_projection="linear", layer_loss="cosine",
        ),
    }


def distill_rows(results: dict[str, list[float]], student: str = "student MLP (64-24-10)") -> list[dict[str, Any]]:
    """One row per variant ("alone", "distilled", ...): mean, spread and per-seed accuracy of ``student``."""
    return [
        {"study": "distill", "student": student, "variant": f"{student}, {variant}", "accuracy": float(np.mean(accs)),
         "std": float(np.std(accs)), "per_seed": accs}
        for variant, accs in results.items()
    ]


def distill_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The distillation table and, per student, whether each distilled variant beat the student trained alone
    beyond the spread over seeds, honestly either way."""
    lines = ["| variant | test accuracy (mean ± std over seeds) | per seed |", "| --- | ---: | --- |"]
    for r in (r for r in rows if r["study"] == "distill"):
        std = f" ± {r['std']:.4f}" if "std" in r else ""
        lines.append(f"| {r['variant']} | {r['accuracy']:.4f}{std} | {', '.join(f'{a:.4f}' for a in r.get('per_seed', []))} |")
    students = dict.fromkeys(r["student"] for r in rows if r["study"] == "distill" and "student" in r)
    verdicts = []
    for student in students:
        runs = {r["variant"][len(student) + 2 :]: r for r in rows if r.get("student") == student}
        alone = runs.pop("alone", None)
        for variant, run in runs.items() if alone is not None else ():
            gain = run["accuracy"] - alone["accuracy"]
            spread = max(run["std"], alone["std"])
            verdict = "helped" if gain > spread else "did not help beyond the seed spread" if gain > -spread else "hurt"
            verdicts.append(f"- {student}, {variant}: {verdict}, {gain:+.4f} mean accuracy against the student alone "
                            f"(largest seed std {spread:.4f}).")
    return lines + (["", *verdicts] if verdicts else [])
