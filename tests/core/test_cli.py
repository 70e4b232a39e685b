"""The `inc` command line, run in-process through main(): version, backends, quantize, bench, errors."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import textwrap
import types

import _numpy_backend as nb
import numpy as np
import pytest

import inc_core as inc
from inc_core import _registry
from inc_core._benchmark import available_cpus
from inc_core.cli import main


@pytest.fixture
def backend():
    nb.register()
    yield inc.get_backend(nb.KEY)
    nb.unregister()


@pytest.fixture
def model_file(backend, tmp_path):
    path = tmp_path / f"model{nb.SUFFIX}"
    inc.save(nb.make_model(), path)
    return path


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.npz"
    x = np.random.default_rng(2).normal(size=(32, 8)).astype(np.float32)
    np.savez(path, x=x)
    return path


def _raw(path):
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _error(capsys, code, rc):
    captured = capsys.readouterr()
    assert rc == code
    assert "Traceback" not in captured.err
    return captured.err


# --- version, backends --------------------------------------------------------------------------


def test_version_prints_the_inc_core_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"inc-core {inc.__version__}"


def test_a_subcommand_is_required(capsys):
    err = _error(capsys, 2, main([]))
    assert "inc: error:" in err and "COMMAND" in err


def test_backends_lists_entry_points_with_distribution_versions_without_importing(backend, tmp_path, monkeypatch, capsys):
    dist = tmp_path / "inc_fakecli-9.8.7.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: inc-fakecli\nVersion: 9.8.7\n")
    (dist / "entry_points.txt").write_text("[inc_core.backends]\nfakecli = inc_fakecli_plugin:FakeBackend\n")
    (tmp_path / "inc_fakecli_plugin.py").write_text("raise RuntimeError('inc backends must not import plugins')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["backends"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["BACKEND", "DISTRIBUTION", "VERSION", "OBJECT"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["fakecli"] == ["fakecli", "inc-fakecli", "9.8.7", "inc_fakecli_plugin:FakeBackend"]
    assert rows[nb.KEY] == [nb.KEY, "(this", "process)", "-", "_numpy_backend:NumpyBackend"]
    assert "inc_fakecli_plugin" not in sys.modules


def test_backends_import_shows_what_each_plugin_reports(backend, tmp_path, monkeypatch, capsys):
    dist = tmp_path / "inc_fakecli-9.8.7.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: inc-fakecli\nVersion: 9.8.7\n")
    (dist / "entry_points.txt").write_text("[inc_core.backends]\nfakecli = inc_fakecli_missing:FakeBackend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _registry._instance.cache_clear()
    assert main(["backends", "--import"]) == 0
    out = capsys.readouterr().out
    assert f"numpy {np.__version__}" in out
    assert "import failed: The 'fakecli' backend is registered" in out


# --- quantize -----------------------------------------------------------------------------------


def test_quantize_static_writes_int8_weights_and_keeps_excluded_layers_fp32(model_file, calib_file, tmp_path, capsys):
    out = tmp_path / f"q{nb.SUFFIX}"
    rc = main(["quantize", str(model_file), "-o", str(out), "--calib", str(calib_file), "--exclude", "fc1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "1 of 2 quantizable ops quantized, 1 kept in FP32: fc1" in captured.out
    assert "static, minmax calibration, per_channel weights" in captured.out

    fp32 = _raw(model_file)
    saved = _raw(out)
    assert saved["weight_q0"].dtype == np.int8 and "weight0" not in saved
    assert "weight_q1" not in saved and np.array_equal(saved["weight1"], fp32["weight1"])
    scale = np.abs(fp32["weight0"]).max(axis=0) / 127.0  # symmetric int8, one scale per output channel
    np.testing.assert_allclose(saved["weight_scale0"], scale, rtol=1e-6)
    np.testing.assert_array_equal(saved["weight_q0"], np.clip(np.rint(fp32["weight0"] / scale), -127, 127))
    x = _raw(calib_file)["x"]
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    assert saved["act0"][0] == pytest.approx((hi - lo) / 255.0)
    assert saved["act0"][1] == np.rint(-lo / ((hi - lo) / 255.0))

    reference = inc.load(model_file)(x)
    quantized = inc.load(out)(x)
    assert np.abs(quantized - reference).max() < 0.05 * np.abs(reference).max()


def test_quantize_dynamic_per_tensor_needs_no_calibration_data(model_file, tmp_path, capsys):
    out = tmp_path / f"q{nb.SUFFIX}"
    rc = main(["quantize", str(model_file), "-o", str(out), "--approach", "dynamic", "--granularity", "per_tensor"])
    assert rc == 0, capsys.readouterr().err
    saved = _raw(out)
    assert saved["weight_scale0"].shape == (1,) and saved["weight_scale1"].shape == (1,)
    assert not any(key.startswith("act") for key in saved)


def test_quantize_static_without_calibration_data_is_a_usage_error(model_file, tmp_path, capsys):
    out = tmp_path / f"q{nb.SUFFIX}"
    err = _error(capsys, 2, main(["quantize", str(model_file), "-o", str(out)]))
    assert err.startswith("inc: error: inc quantize: static quantization needs calibration data; pass --calib")
    assert not out.exists()


def test_missing_model_file_exits_2_with_the_message_on_stderr(backend, tmp_path, capsys):
    out = tmp_path / "q.npmat"
    err = _error(capsys, 2, main(["quantize", str(tmp_path / "nope.npmat"), "-o", str(out), "--approach", "dynamic"]))
    assert err.startswith("inc: error: load: no file or directory at") and "nope.npmat" in err
    assert not out.exists()


def test_unknown_excluded_op_fails_before_writing(model_file, calib_file, tmp_path, capsys):
    out = tmp_path / f"q{nb.SUFFIX}"
    args = ["quantize", str(model_file), "-o", str(out), "--calib", str(calib_file), "--exclude", "fc_1"]
    err = _error(capsys, 2, main(args))
    assert "LayerFilter: name(s) ['fc_1'] match no op" in err and "'fc1'" in err
    assert not out.exists()


def test_an_excluded_name_like_no_op_shows_some_op_names_and_where_to_list_them(model_file, calib_file, tmp_path, capsys):
    out = tmp_path / f"q{nb.SUFFIX}"
    args = ["quantize", str(model_file), "-o", str(out), "--calib", str(calib_file), "--exclude", "attention"]
    err = _error(capsys, 2, main(args))
    assert "Its op names look like ['fc0', 'fc1']" in err and "`inc describe MODEL`) lists all 2" in err
    assert not out.exists()


def test_describe_lists_the_names_and_types_exclude_takes(model_file, tmp_path, capsys):
    listing = tmp_path / "ops.json"
    assert main(["describe", str(model_file), "--json", str(listing)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{model_file}: 2 quantizable ops (static): 2 MatMul"
    assert re.search(r"^fc0\s+MatMul$", out, re.M) and re.search(r"^fc1\s+MatMul$", out, re.M)
    written = json.loads(listing.read_text())
    assert written["ops"] == [{"name": "fc0", "type": "MatMul"}, {"name": "fc1", "type": "MatMul"}]
    assert written["options"] == {"MatMul": {"granularity": ["per_channel", "per_tensor"]}}
    assert main(["describe", str(model_file), "--approach", "dynamic"]) == 0
    assert "(dynamic)" in capsys.readouterr().out


def test_import_module_runs_before_the_model_is_loaded(backend, tmp_path, monkeypatch, capsys):
    """A module that registers what the model file needs (here: the backend itself, as a custom Keras layer's
    module registers its class) is imported from the current directory first; the environment is restored."""
    path = tmp_path / f"model{nb.SUFFIX}"
    inc.save(nb.make_model(), path)
    nb.unregister()
    (tmp_path / "registers_npmat.py").write_text("import _numpy_backend\n_numpy_backend.register()\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "registers_npmat", raising=False)
    monkeypatch.delenv("INC_IMPORT_MODULES", raising=False)
    before = dict(os.environ)
    assert main(["describe", str(path)]) == 2  # nothing reads .npmat files yet
    assert "inc: error:" in capsys.readouterr().err
    assert main(["describe", str(path), "--import-module", "registers_npmat"]) == 0
    assert "2 quantizable ops" in capsys.readouterr().out
    assert dict(os.environ) == before


def test_a_module_that_cannot_be_imported_is_a_usage_error(model_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = _error(capsys, 2, main(["describe", str(model_file), "--import-module", "no_such_module_here"]))
    assert "--import-module no_such_module_here: ModuleNotFoundError" in err and "not a file path" in err


def test_describe_of_a_missing_file_is_a_usage_error(backend, tmp_path, capsys):
    err = _error(capsys, 2, main(["describe", str(tmp_path / f"nope{nb.SUFFIX}")]))
    assert err.startswith("inc: error: load: no file or directory at")


def test_bf16_ops_on_a_backend_without_bf16_fail_before_writing(model_file, calib_file, tmp_path, capsys):
    out = tmp_path / f"q{nb.SUFFIX}"
    args = ["quantize", str(model_file), "-o", str(out), "--calib", str(calib_file), "--bf16", "fc1"]
    err = _error(capsys, 2, main(args))
    assert "asks for BF16 ops, but the" in err and "does not implement BF16 ops" in err and "exclude=" in err
    assert not out.exists()


def test_fallback_precision_without_eval_is_rejected(model_file, calib_file, tmp_path, capsys):
    args = ["quantize", str(model_file), "-o", str(tmp_path / "q.npmat"), "--calib", str(calib_file)]
    err = _error(capsys, 2, main([*args, "--fallback-precision", "bf16"]))
    assert "--fallback-precision only apply to accuracy-driven tuning" in err


def test_tuning_flags_without_eval_are_rejected(model_file, calib_file, tmp_path, capsys):
    args = ["quantize", str(model_file), "-o", str(tmp_path / "q.npmat"), "--calib", str(calib_file)]
    err = _error(capsys, 2, main([*args, "--strategy", "basic", "--max-trials", "3"]))
    assert "--strategy, --max-trials only apply to accuracy-driven tuning" in err


def test_invalid_choice_is_an_argparse_usage_error(model_file, tmp_path, capsys):
    err = _error(capsys, 2, main(["quantize", str(model_file), "-o", str(tmp_path / "q"), "--approach", "fast"]))
    assert "invalid choice: 'fast'" in err


@pytest.mark.parametrize(
    ("script", "spec", "message"),
    [
        (None, "{dir}/eval.py", "--eval expects FILE.py:FUNCTION"),
        (None, "{dir}/absent.py:evaluate", "--eval: no file at"),
        ("x = 1\n\ndef helper(m):\n    return 1.0\n", "{dir}/eval.py:evaluate", r"defines no 'evaluate'. Functions it defines: \['helper'\]"),
        ("evaluate = 3\n", "{dir}/eval.py:evaluate", "'evaluate' in .* is a int, not a function"),
        ("import math\n\nraise KeyError('no data')\n", "{dir}/eval.py:evaluate", "failed at line 3: KeyError: 'no data'"),
    ],
)
def test_bad_eval_scripts_are_config_errors(model_file, calib_file, tmp_path, capsys, script, spec, message):
    if script is not None:
        (tmp_path / "eval.py").write_text(script)
    args = ["quantize", str(model_file), "-o", str(tmp_path / "q.npmat"), "--calib", str(calib_file)]
    err = _error(capsys, 2, main([*args, "--eval", spec.format(dir=tmp_path)]))
    assert err.startswith("inc: error: --eval")
    assert re.search(message, err), err


EVAL_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from eval_data import INPUTS, REFERENCE   # a module next to the script

    def evaluate(model):
        return 1.0 - float(np.abs(model(INPUTS) - REFERENCE).mean())
    """
)


@pytest.fixture
def eval_script(model_file, calib_file, tmp_path):
    x = _raw(calib_file)["x"]
    np.save(tmp_path / "ref.npy", inc.load(model_file)(x))
    (tmp_path / "eval_data.py").write_text(
        "import pathlib\nimport numpy as np\n_here = pathlib.Path(__file__).parent\n"
        "INPUTS = np.load(_here / 'calib.npz')['x']\nREFERENCE = np.load(_here / 'ref.npy')\n"
    )
    (tmp_path / "eval.py").write_text(EVAL_SCRIPT)
    yield f"{tmp_path / 'eval.py'}:evaluate"
    sys.modules.pop("eval_data", None)


def _fake_tuning(monkeypatch, met):
    """Stand-in for inc_core.tuning.autotune that records its arguments and does one real trial."""
    seen = {}

    def autotune(model, config, *, eval_fn, dataset, backend=None):
        seen.update(config=config, dataset=dataset, backend=backend)
        baseline = eval_fn(model)
        quantized = inc.quantize(model, config.base, dataset=dataset, backend=backend)
        score = eval_fn(quantized)

        def report(path):
            with open(path, "w") as handle:
                json.dump({"baseline": baseline, "score": score}, handle)

        return types.SimpleNamespace(
            model=quantized, config=config.base, baseline=baseline, score=score, met=met,
            trials=[inc.Trial(id=1, config=config.base.to_dict(), delta={}, score=score, met=met, time_s=0.0)],
            report=report,
        )

    module = types.ModuleType("inc_core.tuning")
    module.autotune = autotune  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "inc_core.tuning", module)
    return seen


def test_quantize_with_eval_tunes_with_the_flags_and_writes_model_and_report(
    model_file, calib_file, eval_script, tmp_path, monkeypatch, capsys
):
    seen = _fake_tuning(monkeypatch, met=True)
    out, report = tmp_path / f"q{nb.SUFFIX}", tmp_path / "report.md"
    rc = main([
        "quantize", str(model_file), "-o", str(out), "--calib", str(calib_file), "--eval", eval_script,
        "--tolerable-loss", "0.05", "--loss-type", "absolute", "--strategy", "random", "--max-trials", "4",
        "--history", str(tmp_path / "tuning.json"), "--report", str(report), "--calibration", "kl",
    ])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    config = seen["config"]
    assert (config.tolerable_loss, config.loss_type, config.strategy, config.max_trials) == (0.05, "absolute", "random", 4)
    assert config.history == str(tmp_path / "tuning.json") and config.higher_is_better is True
    assert config.base.calibration == "kl" and seen["dataset"].num_samples == 32
    assert _raw(out)["weight_q0"].dtype == np.int8
    scores = json.loads(report.read_text())
    assert scores["baseline"] == 1.0 and 0.95 < scores["score"] < 1.0  # the script really ran on both models
    assert "FP32 baseline 1, INT8 0.9" in captured.out and "absolute loss 0.05: met), 1 trial(s)" in captured.out
    assert str(tmp_path) not in sys.path  # the script's directory is only on the path while the command runs


def test_lower_is_better_flag_reaches_the_tuning_config(model_file, calib_file, eval_script, tmp_path, monkeypatch, capsys):
    seen = _fake_tuning(monkeypatch, met=True)
    args = ["quantize", str(model_file), "-o", str(tmp_path / "q.npmat"), "--calib", str(calib_file)]
    assert main([*args, "--eval", eval_script, "--lower-is-better"]) == 0
    assert seen["config"].higher_is_better is False


def test_report_path_that_clashes_with_its_companions_fails_before_tuning(model_file, calib_file, eval_script, tmp_path, capsys):
    args = ["quantize", str(model_file), "-o", str(tmp_path / "q.npmat"), "--calib", str(calib_file)]
    err = _error(capsys, 2, main([*args, "--eval", eval_script, "--report", str(tmp_path / "r.json")]))
    assert "names the markdown report" in err and not (tmp_path / "q.npmat").exists()


def test_autotune_end_to_end_writes_model_history_and_report(model_file, calib_file, eval_script, tmp_path, capsys):
    out, history, report = tmp_path / f"q{nb.SUFFIX}", tmp_path / "tuning.json", tmp_path / "tuning.md"
    rc = main([
        "quantize", str(model_file), "-o", str(out), "--calib", str(calib_file), "--eval", eval_script,
        "--tolerable-loss", "0.05", "--history", str(history), "--report", str(report),
    ])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "FP32 baseline 1, INT8 0.9" in captured.out and "relative loss 0.05: met)" in captured.out
    assert _raw(out)["weight_q0"].dtype == np.int8
    assert report.is_file() and history.is_file() and json.loads(history.read_text())


def test_autotune_that_misses_the_criterion_saves_the_best_trial_and_exits_1(model_file, calib_file, eval_script, tmp_path, capsys):
    out = tmp_path / f"q{nb.SUFFIX}"
    rc = main([
        "quantize", str(model_file), "-o", str(out), "--calib", str(calib_file), "--eval", eval_script,
        "--tolerable-loss", "0", "--max-trials", "1",
    ])
    captured = capsys.readouterr()
    assert rc == 1, captured.err
    assert "NOT met" in captured.out and "without a config that meets the accuracy criterion" in captured.err
    assert out.is_file()


# --- bench --------------------------------------------------------------------------------------


def test_bench_prints_the_table_and_writes_json(model_file, tmp_path, capsys):
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=np.ones((5, 8), dtype=np.float32))
    out = tmp_path / "bench.json"
    rc = main(["bench", str(model_file), "--inputs", str(inputs), "--warmup", "1", "--iterations", "4", "--json", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = captured.out.splitlines()
    assert "batch size 5, 1 instance(s) x default cores, 1 warmup + 4 timed calls per instance" in lines[0]
    assert lines[1].split() == ["instance", "pid", "cpus", "samples/s", "p50", "ms", "p90", "ms", "p99", "ms", "mean", "ms"]
    assert lines[2].split()[0] == "0" and "total" not in captured.out
    data = json.loads(out.read_text())
    assert (data["iterations"], data["warmup"], data["batch_size"], data["instances"]) == (4, 1, 5, 1)
    assert "benchmark: npmat backend, batch 5" in captured.err  # INFO logs are shown by default


@pytest.mark.skipif(len(available_cpus()) < 2, reason="two instances need at least 2 available cores")
def test_bench_two_instances_from_positional_npz(model_file, tmp_path, capsys):
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, np.ones((3, 8), dtype=np.float32))  # saved positionally as arr_0
    rc = main(["bench", str(model_file), "--inputs", str(inputs), "--iterations", "3", "--warmup", "0",
               "--instances", "2", "--cores-per-instance", "1", "-q"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rows = [line.split() for line in captured.out.splitlines()[2:]]
    assert [row[0] for row in rows] == ["0", "1", "total"]
    assert float(rows[2][1]) == pytest.approx(float(rows[0][3]) + float(rows[1][3]), rel=1e-3)
    assert captured.err == ""  # -q hides INFO logs


def test_bench_usage_errors(model_file, tmp_path, capsys):
    err = _error(capsys, 2, main(["bench", str(model_file)]))
    assert "the following arguments are required: --inputs" in err
    err = _error(capsys, 2, main(["bench", str(model_file), "--inputs", str(tmp_path / "none.npz")]))
    assert err.startswith("inc: error: --inputs: no file at")
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=np.ones((2, 8), dtype=np.float32))
    err = _error(capsys, 2, main(["bench", str(model_file), "--inputs", str(inputs), "--iterations", "0"]))
    assert err.startswith("inc: error: benchmark: iterations must be >= 1, got 0.")
    err = _error(capsys, 2, main(["bench", str(model_file), "--inputs", str(inputs), "--runtime", "openvino"]))
    assert err.startswith("inc: error: --runtime: the npmat backend runs models on one runtime only")


# --- logging ------------------------------------------------------------------------------------


def test_verbosity_flags_and_no_handler_left_behind(model_file, calib_file, tmp_path, capsys):
    logger = logging.getLogger("inc")
    handlers, level = list(logger.handlers), logger.level
    args = ["quantize", str(model_file), "-o", str(tmp_path / "q.npmat"), "--calib", str(calib_file)]
    assert main([*args, "-v"]) == 0
    err = capsys.readouterr().err
    assert " INFO inc: calibrating npmat on up to 100 samples" in err
    assert main([*args, "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert logger.handlers == handlers and logger.level == level


@pytest.mark.parametrize("verbose", [False, True])
def test_an_unexpected_exception_is_one_line_and_exit_3_with_the_traceback_under_v(backend, monkeypatch, capsys, verbose):
    from inc_core import _cli_commands

    def broken() -> dict[str, str]:
        raise KeyError("entry point table")

    monkeypatch.setattr(_cli_commands, "installed_backends", broken)
    assert main(["backends", *(["-v"] if verbose else [])]) == 3
    err = capsys.readouterr().err
    assert "inc: error: unexpected KeyError: 'entry point table'" in err and "bug in inc or in the backend plugin" in err
    assert ("Traceback (most recent call last)" in err) is verbose


@pytest.fixture
def flaky_backends():
    inc.register_backend("npmat_flaky", nb.PerChannelFailsBackend)
    inc.register_backend("npmat_broken", nb.AlwaysFailsBackend)
    yield
    _registry.unregister_backend("npmat_flaky")
    _registry.unregister_backend("npmat_broken")


def test_failed_trials_are_reported_and_tuning_goes_on(model_file, calib_file, eval_script, flaky_backends, tmp_path, capsys):
    out, report = tmp_path / f"q{nb.SUFFIX}", tmp_path / "tuning.md"
    rc = main([
        "quantize", str(model_file), "-o", str(out), "--calib", str(calib_file), "--eval", eval_script,
        "--tolerable-loss", "0.05", "--backend", "npmat_flaky", "--report", str(report),
    ])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "failed: 1 trial(s) the backend could not quantize: ValueError: The truth value of an array" in captured.out
    assert "trial 1/100: FAILED in the npmat backend, going on with the search (base): ValueError" in captured.err
    assert "| 1 | base | - | - |" in report.read_text(encoding="utf-8")
    assert _raw(out)["weight_q0"].dtype == np.int8


def test_a_run_where_every_trial_fails_exits_2_with_the_causes(model_file, calib_file, eval_script, flaky_backends, tmp_path, capsys):
    out = tmp_path / f"q{nb.SUFFIX}"
    rc = main([
        "quantize", str(model_file), "-o", str(out), "--calib", str(calib_file), "--eval", eval_script,
        "--backend", "npmat_broken", "--max-trials", "3",
    ])
    err = capsys.readouterr().err
    assert rc == 2
    assert "none of the 3 trials produced a model" in err and "RuntimeError: Failed to find proper ai.onnx domain (trials 1, 2, 3)" in err
    assert not out.exists()
