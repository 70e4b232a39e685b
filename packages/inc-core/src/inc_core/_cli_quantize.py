"""``inc quantize``: one-shot PTQ, or accuracy-driven tuning with a user evaluation script."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import inspect
import logging
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from inc_core._dataset import Dataset
from inc_core._files import check_output_path
from inc_core._layer_filter import LayerFilter
from inc_core._quant_config import QuantConfig
from inc_core._tuning_config import TuningConfig
from inc_core.errors import ConfigError

__all__ = ["cmd_quantize", "load_eval_fn"]

log = logging.getLogger("inc")

# CLI flag -> TuningConfig field, for the flags that only mean something with --eval.
_TUNING_FLAGS = {
    "tolerable_loss": "--tolerable-loss",
    "loss_type": "--loss-type",
    "lower_is_better": "--lower-is-better",
    "strategy": "--strategy",
    "max_trials": "--max-trials",
    "timeout": "--timeout",
    "seed": "--seed",
    "history": "--history",
    "report": "--report",
    "fallback_precision": "--fallback-precision",
}
# CLI flag -> QuantConfig field; flags left unset keep QuantConfig's defaults.
_QUANT_FLAGS = ("approach", "calibration", "granularity", "scheme", "activation_dtype", "calib_samples", "format")


@contextlib.contextmanager
def _on_sys_path(directory: Path) -> Iterator[None]:
    """Let an evaluation script import modules next to it, as ``python script.py`` would."""
    entry = str(directory)
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def load_eval_fn(spec: str) -> Callable[[Any], float]:
    """Import ``FILE.py:FUNCTION`` and return the function.

    Raises:
        ConfigError: malformed spec, missing file, the script fails to import, or no such callable.
    """
    path_text, sep, name = spec.rpartition(":")
    if not sep or not path_text or not name:
        raise ConfigError(
            f"--eval expects FILE.py:FUNCTION, got {spec!r}; e.g. --eval eval.py:evaluate, where evaluate(model) "
            "returns a float."
        )
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError(f"--eval: no file at {path_text!r}; give the path of a Python file, e.g. eval.py:{name}.")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    module_name = f"inc_eval_{path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"--eval: {path_text!r} cannot be imported as a Python module; give a .py file.")
    module = importlib.util.module_from_spec(module_spec)
    # Registered before running so dataclasses and pickling in the script find their module.
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's script may raise anything; report where it failed
        del sys.modules[module_name]
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(path)]
        where = f" at line {frames[-1].lineno}" if frames else ""
        raise ConfigError(
            f"--eval: importing {path_text!r} failed{where}: {type(exc).__name__}: {exc}. Fix the script, or run "
            f"`python {path_text}` to see the full traceback."
        ) from exc
    fn = getattr(module, name, None)
    if fn is None:
        defined = sorted(
            n for n, v in vars(module).items()
            if inspect.isfunction(v) and v.__module__ == module_name and not n.startswith("_")
        )
        raise ConfigError(
            f"--eval: {path_text!r} defines no {name!r}. Functions it defines: {defined or 'none'}."
        )
    if not callable(fn):
        raise ConfigError(f"--eval: {name!r} in {path_text!r} is a {type(fn).__name__}, not a function.")
    return fn


def _check_flags(args: argparse.Namespace) -> None:
    if not args.eval:
        given = [flag for field, flag in _TUNING_FLAGS.items() if getattr(args, field) is not None]
        if given:
            raise ConfigError(
                f"inc quantize: {', '.join(given)} only apply to accuracy-driven tuning; add --eval FILE.py:FUNCTION "
                "or drop them."
            )
    approach = args.approach or QuantConfig().approach
    if approach == "static" and not args.calib:
        raise ConfigError(
            "inc quantize: static quantization needs calibration data; pass --calib DATA.npz "
            "(input name -> array, samples along axis 0) or use --approach dynamic."
        )


def _quant_config(args: argparse.Namespace) -> QuantConfig:
    given = {name: getattr(args, name) for name in _QUANT_FLAGS if getattr(args, name) is not None}
    exclude = LayerFilter(
        names=tuple(args.exclude), patterns=tuple(args.exclude_pattern), types=tuple(args.exclude_type)
    )
    bf16 = LayerFilter(names=tuple(args.bf16), types=tuple(args.bf16_type))
    return QuantConfig(**given, exclude=exclude, bf16=bf16)


def _tuning_config(args: argparse.Namespace, base: QuantConfig) -> TuningConfig:
    given: dict[str, Any] = {
        "tolerable_loss": args.tolerable_loss,
        "loss_type": args.loss_type,
        "strategy": args.strategy,
        "max_trials": args.max_trials,
        "timeout_s": args.timeout,
        "seed": args.seed,
        "history": args.history,
        "fallback_precision": args.fallback_precision,
    }
    if args.lower_is_better:
        given["higher_is_better"] = False
    return TuningConfig(base=base, **{k: v for k, v in given.items() if v is not None})


def _op_summary(model: Any, quantized: Any, config: QuantConfig, backend: str | None) -> str:
    from inc_core._registry import resolve_backend

    impl = resolve_backend(model, backend)
    space = impl.describe(model, config)
    excluded = config.exclude.select(space.ops)
    in_bf16 = [op.name for op in space.ops if config.precision(op.name, op.op_type) == "bf16"]
    total = len(space.ops)
    # What the output model holds, counted from it; what was selected is only what was asked for.
    counts = impl.int8_op_counts(quantized)
    selected = total - len(excluded) - len(in_bf16)
    if counts is None:
        text = f"{selected} of {total} quantizable ops quantized"
    else:
        by_type = ", ".join(f"{n} {op_type}" for op_type, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        text = f"{sum(counts.values())} INT8 ops in the output model ({by_type or 'none'}); "
        text += f"{selected} of {total} quantizable ops selected"
    if excluded:
        text += f", {len(excluded)} kept in FP32: {', '.join(excluded)}"
    if in_bf16:
        text += f", {len(in_bf16)} in BF16: {', '.join(in_bf16)}"
    return text


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize (or tune) a model file and write the INT8 model; 1 when tuning misses the criterion."""
    import inc_core

    _check_flags(args)
    check_output_path(args.output, what="quantized model")
    if args.report:
        # TuningResult.report writes REPORT plus .json and .png beside it; catch a clash before tuning runs.
        if Path(args.report).suffix.lower() in (".json", ".png"):
            raise ConfigError(
                f"--report {args.report!r} names the markdown report; its .json and .png companions are written "
                "beside it. Give a path such as tuning.md."
            )
        check_output_path(args.report, what="tuning report")
    config = _quant_config(args)
    tuning = _tuning_config(args, config) if args.eval else None
    eval_file = args.eval.rpartition(":")[0] if args.eval else ""
    with _on_sys_path(Path(eval_file).resolve().parent) if eval_file else contextlib.nullcontext():
        eval_fn = load_eval_fn(args.eval) if args.eval else None
        dataset = Dataset(args.calib, batch_size=args.calib_batch_size) if args.calib else None
        model = inc_core.load(args.model, backend=args.backend)
        log.info("loaded %s", args.model)
        start = time.perf_counter()
        if tuning is None or eval_fn is None:
            result = None
            final_config = config
            quantized = inc_core.quantize(model, config, dataset=dataset, backend=args.backend)
        else:
            from inc_core.tuning import autotune

            result = autotune(model, tuning, eval_fn=eval_fn, dataset=dataset, backend=args.backend)
            final_config = result.config
            quantized = result.model
        elapsed = time.perf_counter() - start
        ops = _op_summary(model, quantized, final_config, args.backend)
    # With tuning that misses the goal this is the best trial's model; the exit code says it missed.
    inc_core.save(quantized, args.output, backend=args.backend)
    if result is not None and args.report:
        result.report(args.report)

    print(f"{args.model} -> {args.output}")
    print(f"  config: {final_config.approach}, {final_config.calibration} calibration, {final_config.granularity} weights")
    if final_config.overrides:
        changed = "; ".join(
            f"{key}: " + ", ".join(f"{k}={v}" for k, v in settings.items()) for key, settings in final_config.overrides.items()
        )
        print(f"  overrides: {changed}")
    print(f"  ops:    {ops}")
    print(f"  time:   {elapsed:.2f} s")
    if result is None or tuning is None:
        return 0
    status = "met" if result.met else "NOT met"
    print(
        f"  score:  FP32 baseline {result.baseline:.6g}, INT8 {result.score:.6g} "
        f"(tolerable {tuning.loss_type} loss {tuning.tolerable_loss:g}: {status}), {len(result.trials)} trial(s)"
    )
    failed = [t for t in result.trials if t.failed]
    if failed:  # the backend could not quantize these configs; the search went on without them
        causes = list(dict.fromkeys(t.error for t in failed))
        print(f"  failed: {len(failed)} trial(s) the backend could not quantize: {'; '.join(map(str, causes))}")
    if args.report:
        print(f"  report: {args.report}")
    if not result.met:
        print(
            "inc: tuning ended without a config that meets the accuracy criterion; raise --max-trials or "
            "--tolerable-loss, or exclude sensitive ops with --exclude.",
            file=sys.stderr,
        )
        return 1
    return 0
