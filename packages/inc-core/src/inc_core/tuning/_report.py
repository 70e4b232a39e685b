"""The tuning report: markdown summary, JSON data and a score-per-trial plot, written atomically."""

from __future__ import annotations

import importlib
import io
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from inc_core._files import atomic_write, atomic_write_text, check_output_path
from inc_core.errors import ConfigError

if TYPE_CHECKING:
    from inc_core.tuning._result import TuningResult
    from inc_core.tuning._trial import Trial

__all__ = ["write_report", "render_markdown"]


def write_report(result: TuningResult, path: str | os.PathLike[str]) -> Path:
    """Write ``path`` (markdown), ``path.json`` and, with matplotlib, ``path.png``; return ``path``.

    Every output is rendered before the first one is written, and each is written atomically,
    so a failure leaves no partial file.
    """
    md_path = Path(path)
    if md_path.suffix.lower() in (".json", ".png"):
        raise ConfigError(
            f"TuningResult.report: {str(md_path)!r} names the markdown file; the .json and .png files are "
            "written beside it. Give a path such as 'tuning.md'."
        )
    json_path, png_path = md_path.with_suffix(".json"), md_path.with_suffix(".png")
    for target in (md_path, json_path, png_path):
        check_output_path(target, what="tuning report")
    png = _render_plot(result)
    data = json.dumps(result.to_dict(), indent=2)
    markdown = render_markdown(result, plot=png_path.name if png is not None else None)
    atomic_write_text(json_path, data, what="tuning report")
    if png is not None:
        atomic_write(png_path, _writer(png), what="tuning plot")
    atomic_write_text(md_path, markdown, what="tuning report")
    return md_path


def _writer(data: bytes) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    return write


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(result: TuningResult, *, plot: str | None = None) -> str:
    """The markdown summary: goal, baseline, result, one table row per trial, failed trials' causes, the chosen config."""
    tuning = result.tuning
    relative = tuning.loss_type == "relative"
    direction = ">=" if tuning.higher_is_better else "<="
    allowed = f"{tuning.tolerable_loss * 100:g}% of the baseline" if relative else f"{tuning.tolerable_loss:g}"
    verdict = "meets the goal" if result.met else "does NOT meet the goal (best trial returned)"
    lines = [
        "# Tuning report",
        "",
        "| | |",
        "|---|---|",
        f"| backend | {result.backend.name if result.backend is not None else '-'} |",
        f"| strategy | {tuning.strategy} |",
        f"| executor | {result.executor} |",
        f"| goal | score {direction} {result.threshold:.6g} ({tuning.loss_type} loss <= {allowed}) |",
        f"| baseline (FP32) | {result.baseline:.6g} |",
        f"| result | trial {result.trial_id}: score {result.score:.6g}, {verdict} |",
        f"| trials | {len(result.trials)} (stopped: {result.stop_reason}){_failed_count(result)} |",
        f"| tuning time | {result.elapsed_s:.2f} s |",
        "",
        "## Trials",
        "",
        "| # | change vs base | score | loss | time (s) | met | status |",
        "|---:|---|---:|---:|---:|:---:|---|",
    ]
    criterion = result.criterion
    for trial in result.trials:
        ident = f"**{trial.id}**" if trial.id == result.trial_id else str(trial.id)
        if trial.score is None:  # a failed trial: no model, no score; the cause is listed below the table
            lines.append(f"| {ident} | {_cell(trial.change)} | - | - | {trial.time_s:.3f} | no | {_status(trial)}{_on(trial)} |")
            continue
        worse = criterion.loss(trial.score)
        if not math.isfinite(worse):
            loss = "-"  # relative loss against a zero baseline
        else:
            loss = f"{100 * worse:.3g}%" if relative else f"{worse:.6g}"
        lines.append(
            f"| {ident} | {_cell(trial.change)} | {trial.score:.6g} | {loss} | {trial.time_s:.3f} | "
            f"{'yes' if trial.met else 'no'} | {trial.status}{_on(trial)} |"
        )
    lines += _failure_lines(result)
    lines += _precision_lines(result)
    lines += ["", f"## Chosen config (trial {result.trial_id})", "", "```json", json.dumps(result.config.to_dict(), indent=2), "```", ""]
    if plot is not None:
        lines += [f"![score per trial]({plot})", ""]
    return "\n".join(lines)


def _precision_lines(result: TuningResult) -> list[str]:
    """Which ops of the chosen config run in INT8, BF16 and FP32 (INT8 ops counted, the others named)."""
    if not result.precisions:
        return []
    lines = ["", f"## Precision per op (trial {result.trial_id})", "", "| precision | ops |", "|---|---|"]
    for precision in ("int8", "bf16", "fp32"):
        names = [name for name, p in result.precisions.items() if p == precision]
        if not names:
            continue
        listed = f"{len(names)} ops" if precision == "int8" else f"{len(names)}: " + ", ".join(names)
        lines.append(f"| {precision} | {_cell(listed)} |")
    return lines


def _on(trial: Trial) -> str:
    """Where a parallel executor ran the trial (nothing for trials run in this process)."""
    return f" on {_cell(trial.worker)}" if trial.worker is not None else ""


def _status(trial: Trial) -> str:
    return "FAILED" if trial.status == "failed" else f"{trial.status}, FAILED"


def _failed_count(result: TuningResult) -> str:
    failed = sum(1 for t in result.trials if t.failed)
    return f", {failed} failed" if failed else ""


def _failure_lines(result: TuningResult) -> list[str]:
    """One bullet per distinct cause of a failed trial, with the trials it ended."""
    causes: dict[str, list[int]] = {}
    for trial in result.trials:
        if trial.error is not None:
            causes.setdefault(trial.error, []).append(trial.id)
    if not causes:
        return []
    lines = ["", "## Failed trials", "", "The backend could not quantize these configs; the search went on without them.", ""]
    for cause, ids in causes.items():
        lines.append(f"- trial{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}: `{cause.replace('`', chr(39))}`")
    return lines


def _render_plot(result: TuningResult) -> bytes | None:
    """PNG bytes of score per trial with the baseline and the tolerance line; ``None`` without matplotlib."""
    try:
        # The object API with the Agg canvas: no pyplot, so the user's interactive backend is untouched.
        # Through importlib so that type checking does not need matplotlib installed.
        agg = importlib.import_module("matplotlib.backends.backend_agg")
        figure = importlib.import_module("matplotlib.figure")
        ticker = importlib.import_module("matplotlib.ticker")
    except ImportError:
        return None
    fig = figure.Figure(figsize=(7.0, 4.0), dpi=100)
    agg.FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    scored = [t for t in result.trials if t.score is not None]
    ax.plot([t.id for t in scored], [t.score for t in scored], color="0.6", linewidth=1, zorder=1)
    for met, color, label in ((True, "tab:green", "meets the goal"), (False, "tab:red", "below the goal")):
        points = [t for t in scored if t.met is met]
        if points:
            ax.scatter([t.id for t in points], [t.score for t in points], color=color, label=label, zorder=2)
    failed = [t.id for t in result.trials if t.failed]
    if failed:  # no score to plot: a cross on the lowest line of the plot
        floor = min([result.threshold, result.baseline, *(t.score for t in scored if t.score is not None)])
        ax.scatter(failed, [floor] * len(failed), marker="x", color="black", label="failed (no model)", zorder=2)
    ax.scatter([result.trial_id], [result.score], marker="*", s=220, color="gold", edgecolor="black", label="chosen", zorder=3)
    ax.axhline(result.baseline, linestyle="--", color="tab:blue", label="baseline (FP32)")
    ax.axhline(result.threshold, linestyle=":", color="tab:orange", label="tolerance")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_ylabel("score")
    ax.set_title(f"{result.tuning.strategy} strategy: score per trial")
    ax.legend(loc="best", fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
