"""The history file: written after every trial, resumed without re-evaluating, refused when unusable."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import _synthetic_backend as sb
import pytest

import inc_core as inc
from inc_core.errors import TuningError
from inc_core.tuning import TuningResult, autotune

sb.register()

CHILD = Path(__file__).resolve().parent / "_tuning_child.py"


class CountingEval:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model: Any) -> float:
        self.calls += 1
        return sb.score(model)


def run(history: Path | None, model: sb.SyntheticModel | None = None, **overrides: Any) -> tuple[TuningResult, CountingEval]:
    eval_fn = CountingEval()
    config = sb.resume_config(str(history) if history else None)
    if overrides:
        config = inc.TuningConfig.from_dict({**config.to_dict(), **overrides})
    result = autotune(model or sb.SyntheticModel(), config, eval_fn=eval_fn, dataset=sb.calib_data(), backend="synthetic")
    return result, eval_fn


def summary(result: TuningResult) -> tuple[Any, ...]:
    return (result.config, result.score, result.met, result.trial_id, [(t.id, t.key, t.score, t.met) for t in result.trials])


def test_a_killed_run_resumes_without_re_evaluating_finished_trials(tmp_path: Path) -> None:
    history = tmp_path / "tuning.json"
    # eval call 1 is the baseline, calls 2..5 are trials 1..4: the child dies while evaluating trial 5.
    child = subprocess.run([sys.executable, str(CHILD), str(history), "6"], capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    saved = json.loads(history.read_text(encoding="utf-8"))
    assert saved["baseline"] == 1.0 and len(saved["trials"]) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tuning.json"]  # no temp file left behind

    model = sb.SyntheticModel()
    resumed, eval_fn = run(history, model)
    assert eval_fn.calls == 11 - 4  # no baseline, trials 5..11 only
    assert [t.status for t in resumed.trials] == ["resumed"] * 4 + ["evaluated"] * 7
    assert model.calls == {"calibrate": 1, "quantize": 7}

    uninterrupted, fresh_eval = run(None)
    assert fresh_eval.calls == 12
    assert summary(resumed) == summary(uninterrupted)
    assert len(sb.history_trials(history)) == 11


def test_a_finished_history_replays_without_evaluating(tmp_path: Path) -> None:
    history = tmp_path / "tuning.json"
    first, _ = run(history)
    model = sb.SyntheticModel()
    again, eval_fn = run(history, model)
    assert eval_fn.calls == 0
    assert summary(again) == summary(first)
    # the chosen trial came from the file, so its model is built again (with the one calibration)
    assert model.calls == {"calibrate": 1, "quantize": 1}
    assert again.model.config == again.config


def test_resumed_trials_count_toward_max_trials(tmp_path: Path) -> None:
    history = tmp_path / "tuning.json"
    run(history, max_trials=4)
    result, eval_fn = run(history, max_trials=6)
    assert len(result.trials) == 6 and eval_fn.calls == 2
    assert result.stop_reason == "max_trials"


def test_the_file_is_rewritten_after_every_trial(tmp_path: Path) -> None:
    history = tmp_path / "tuning.json"
    seen: list[tuple[Any, int]] = []

    def eval_fn(model: Any) -> float:
        if history.exists():
            data = json.loads(history.read_text(encoding="utf-8"))
            seen.append((data["baseline"], len(data["trials"])))
        return sb.score(model)

    autotune(sb.SyntheticModel(), sb.resume_config(str(history)), eval_fn=eval_fn, dataset=sb.calib_data(), backend="synthetic")
    # before the baseline: no file; while trial k runs: the baseline and k - 1 trials
    assert seen == [(1.0, k) for k in range(11)]
    data = json.loads(history.read_text(encoding="utf-8"))
    assert data["version"] == 1 and data["backend"] == "synthetic" and isinstance(data["model_fingerprint"], str)
    first = data["trials"][0]
    assert first == {
        "id": 1,
        "config": inc.QuantConfig().to_dict(),
        "delta": {},
        "score": first["score"],
        "met": False,
        "time_s": first["time_s"],
        "status": "evaluated",
        "error": None,
    }
    assert data["trials"][-1]["delta"] == {"fallback": ["conv2", "fc2"], "overrides": {"MatMul": {"calibration": "kl"}}}


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "not readable JSON"),
        ("[]", "expected a JSON object with a 'trials' list"),
        ('{"version": 99, "trials": []}', "version is 99"),
        ('{"version": 1, "baseline": "high", "trials": []}', "baseline is 'high'"),
        ('{"version": 1, "trials": [{"id": 1}]}', r"trial #1 is malformed .*lacks \['config', 'score'\]"),
        ('{"version": 1, "trials": [{"id": 1, "config": {"approach": "fast"}, "score": 0.9}]}', "approach='fast'"),
        ('{"version": 1, "trials": [{"id": 1, "config": {}, "score": "NaN"}]}', "score 'NaN'"),
    ],
)
def test_an_unusable_history_file_is_refused(tmp_path: Path, content: str, reason: str) -> None:
    history = tmp_path / "tuning.json"
    history.write_text(content, encoding="utf-8")
    with pytest.raises(TuningError, match=f"Cannot resume from the tuning history .*{reason}.*Delete or move the file"):
        run(history)
    assert history.read_text(encoding="utf-8") == content  # left for the user to inspect


def test_a_history_of_another_model_is_refused(tmp_path: Path) -> None:
    history = tmp_path / "tuning.json"
    run(history)
    other = sb.SyntheticModel(ops=(("conv1", "Conv"), ("fc9", "MatMul")))
    with pytest.raises(TuningError, match="written for a different model"):
        run(history, other)


def test_a_history_of_the_same_ops_with_other_weights_is_refused(tmp_path: Path) -> None:
    from inc_core.tuning._history import History

    path = tmp_path / "tuning.json"
    History(path, fingerprint="ops", backend="b", strategy="basic", weights="w1")._write()
    assert json.loads(path.read_text(encoding="utf-8"))["weights_digest"] == "w1"
    History(path, fingerprint="ops", backend="b", strategy="basic", weights="w1")  # the same weights resume
    History(path, fingerprint="ops", backend="b", strategy="basic", weights=None)  # a backend that cannot tell
    with pytest.raises(TuningError, match="this architecture with other weights"):
        History(path, fingerprint="ops", backend="b", strategy="basic", weights="w2")
    data = json.loads(path.read_text(encoding="utf-8"))
    del data["weights_digest"]  # a file written before weights were recorded is read as before
    path.write_text(json.dumps(data), encoding="utf-8")
    History(path, fingerprint="ops", backend="b", strategy="basic", weights="w2")


def test_content_digests_follow_bytes_not_names(tmp_path: Path) -> None:
    from inc_core.backend import array_digest, content_digest

    (tmp_path / "a.bin").write_bytes(b"weights")
    (tmp_path / "b.bin").write_bytes(b"weights")
    assert content_digest(tmp_path / "a.bin") == content_digest(tmp_path / "b.bin")
    (tmp_path / "b.bin").write_bytes(b"weightz")
    assert content_digest(tmp_path / "a.bin") != content_digest(tmp_path / "b.bin")
    assert content_digest(tmp_path / "missing") is None
    assert array_digest([("w", [1.0, 2.0])]) != array_digest([("w", [1.0, 2.5])]) != array_digest([("v", [1.0, 2.5])])
