"""TuningResult.report (markdown + JSON + PNG) and TuningResult.save."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import _synthetic_backend as sb
import pytest

import inc_core as inc
from inc_core.errors import ConfigError, SaveError
from inc_core.tuning import TuningResult, autotune

sb.register()


@pytest.fixture(scope="module")
def result() -> TuningResult:
    return autotune(sb.SyntheticModel(), inc.TuningConfig(), eval_fn=sb.score, dataset=sb.calib_data(), backend="synthetic")


def test_report_writes_markdown_json_and_plot(result: TuningResult, tmp_path: Path) -> None:
    path = result.report(tmp_path / "tuning.md")
    assert path == tmp_path / "tuning.md"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tuning.json", "tuning.md", "tuning.png"]
    md = path.read_text(encoding="utf-8")
    assert "| baseline (FP32) | 1 |" in md
    assert "| goal | score >= 0.99 (relative loss <= 1% of the baseline) |" in md
    assert "| result | trial 11: score 0.998, meets the goal |" in md
    assert "| # | change vs base | score | loss | time (s) | met | status |" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and line.split("|")[1].strip().strip("*").isdigit()]
    assert len(rows) == 11
    assert rows[0].startswith("| 1 | base | 0.906 | 9.4% |")
    assert rows[4].startswith("| 5 | MatMul.calibration=kl | 0.946 | 5.4% |")
    assert rows[10].startswith("| **11** | MatMul.calibration=kl; fp32: conv2, fc2 | 0.998 | 0.2% |") and "| yes |" in rows[10]
    chosen = md.split("```json\n", 1)[1].split("```", 1)[0]
    assert inc.QuantConfig.from_json(chosen) == result.config
    assert "![score per trial](tuning.png)" in md

    data = json.loads((tmp_path / "tuning.json").read_text(encoding="utf-8"))
    assert data["baseline"] == 1.0 and data["chosen_trial"] == 11 and data["met"] is True
    assert data["criterion"]["threshold"] == pytest.approx(0.99)
    assert inc.QuantConfig.from_dict(data["config"]) == result.config
    assert [t["score"] for t in data["trials"]] == [t.score for t in result.trials]

    assert (tmp_path / "tuning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_matplotlib_skips_the_plot(result: TuningResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    result.report(tmp_path / "tuning.md")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tuning.json", "tuning.md"]
    assert ".png" not in (tmp_path / "tuning.md").read_text(encoding="utf-8")


def test_report_into_a_missing_directory_writes_nothing(result: TuningResult, tmp_path: Path) -> None:
    with pytest.raises(SaveError, match=r"directory .*missing.* does not exist"):
        result.report(tmp_path / "missing" / "tuning.md")
    assert list(tmp_path.iterdir()) == []


def test_report_path_must_name_the_markdown_file(result: TuningResult, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"names the markdown file.*'tuning.md'"):
        result.report(tmp_path / "tuning.json")
    assert list(tmp_path.iterdir()) == []


def test_report_of_an_unmet_goal_says_so(tmp_path: Path) -> None:
    unmet = autotune(
        sb.SyntheticModel(global_penalty=0.02),
        inc.TuningConfig(max_trials=5),
        eval_fn=sb.score,
        dataset=sb.calib_data(),
        backend="synthetic",
    )
    md = unmet.report(tmp_path / "r.md").read_text(encoding="utf-8")
    assert "| result | trial 5: score 0.926, does NOT meet the goal (best trial returned) |" in md
    assert "| trials | 5 (stopped: max_trials) |" in md


def test_save_writes_the_chosen_model(result: TuningResult, tmp_path: Path) -> None:
    path = result.save(tmp_path / "model.synthetic")
    assert inc.QuantConfig.from_json(path.read_text(encoding="utf-8")) == result.config
