"""What the PyTorch and Keras compression benchmarks report the same way: the distillation rows and verdict."""

from __future__ import annotations

from typing import Any

import numpy as np


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
