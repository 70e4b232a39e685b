"""The ``inc`` command line: ``inc backends``, ``inc describe``, ``inc quantize``, ``inc bench``.

Every subcommand is generic over backends: the model file's suffix (or ``--backend``) picks the
installed plugin, so a plugin needs no CLI code of its own.

Exit codes: 0 success; 1 tuning finished without meeting the accuracy criterion; 2 a usage or
input error (bad option, missing file, unsupported model), reported as ``inc: error: <message>``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from inc_core._quant_config import APPROACHES, CALIBRATIONS, DTYPES, GRANULARITIES, SCHEMES
from inc_core._tuning_config import FALLBACK_PRECISIONS, LOSS_TYPES, STRATEGIES
from inc_core._user_modules import ENV, import_user_modules
from inc_core.errors import IncError

__all__ = ["build_parser", "main"]

_DEFAULT_FORMAT = "%(message)s"
_DETAILED_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _version() -> str:
    from inc_core import __version__

    return __version__


def _add_common_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # Verbosity and --import-module, on the main parser and every subcommand; SUPPRESS keeps the subcommands' defaults
    # from overwriting the main parser's.
    default_v: object = argparse.SUPPRESS if suppress else 0
    default_q: object = argparse.SUPPRESS if suppress else False
    parser.add_argument(
        "-v", "--verbose", action="count", default=default_v,
        help="more log output: -v adds timestamps and logger names, -vv adds debug messages",
    )
    parser.add_argument("-q", "--quiet", action="store_true", default=default_q, help="only log warnings and errors")
    parser.add_argument(
        "--import-module", dest="imports", nargs="+", action="extend", default=argparse.SUPPRESS if suppress else [],
        metavar="MODULE",
        help="Python modules to import first, from the current directory or PYTHONPATH (custom layers and classes "
        "the model file names)",
    )


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL and --backend, which every subcommand reading a model file takes."""
    parser.add_argument("model", metavar="MODEL", help="model file; its suffix picks the backend unless --backend is given")
    parser.add_argument("--backend", metavar="NAME", help="backend to use instead of the one found from the suffix")


def _add_quantize(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    from inc_core._cli_quantize import cmd_quantize

    p = sub.add_parser(
        "quantize",
        parents=[common],
        help="post-training INT8 quantization of a model file (accuracy-driven with --eval)",
        description=(
            "Quantize MODEL to INT8 and write it to OUT. With --eval, tune the config until the quantized "
            "model's score is within --tolerable-loss of the FP32 baseline. Unset options keep the "
            "QuantConfig/TuningConfig defaults."
        ),
    )
    _add_model_arguments(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="where to write the quantized model")
    p.add_argument("--calib", metavar="DATA.npz", help="calibration samples: .npz of input name -> array (axis 0 = samples)")
    p.add_argument("--calib-batch-size", type=int, default=1, metavar="N", help="samples per calibration batch (default 1)")
    p.add_argument("--calib-samples", type=int, metavar="N", help="how many calibration samples to use")
    p.add_argument("--approach", choices=APPROACHES, help="static (calibrated activations) or dynamic")
    p.add_argument("--calibration", choices=CALIBRATIONS, help="activation range method")
    p.add_argument("--granularity", choices=GRANULARITIES, help="weight quantization granularity")
    p.add_argument("--scheme", choices=SCHEMES, help="activation quantization scheme")
    p.add_argument("--activation-dtype", choices=DTYPES, help="activation integer type")
    p.add_argument("--format", metavar="FORMAT", help="backend output format (e.g. qdq, qoperator for ONNX)")
    p.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="NAME", help="op names kept in FP32")
    p.add_argument(
        "--exclude-pattern", nargs="+", action="extend", default=[], metavar="REGEX",
        help="regular expressions (full match) of op names kept in FP32",
    )
    p.add_argument("--exclude-type", nargs="+", action="extend", default=[], metavar="TYPE", help="op types kept in FP32")
    p.add_argument(
        "--bf16", nargs="+", action="extend", default=[], metavar="NAME",
        help="op names run in BF16 instead of INT8 (CPUs with AVX512-BF16/AMX-BF16; torch PT2E, ONNX on OpenVINO)",
    )
    p.add_argument("--bf16-type", nargs="+", action="extend", default=[], metavar="TYPE", help="op types run in BF16")
    tune = p.add_argument_group("accuracy-driven tuning (needs --eval)")
    tune.add_argument(
        "--eval", metavar="FILE.py:FUNCTION",
        help="evaluation function: receives the model as the backend loads it and returns a float score",
    )
    tune.add_argument("--tolerable-loss", type=float, metavar="X", help="allowed loss vs the FP32 baseline")
    tune.add_argument("--loss-type", choices=LOSS_TYPES, help="tolerable loss as a fraction of the baseline or in score units")
    tune.add_argument("--lower-is-better", action="store_true", default=None, help="a smaller score is better (a loss)")
    tune.add_argument("--strategy", choices=STRATEGIES, help="tuning strategy")
    tune.add_argument("--max-trials", type=int, metavar="N", help="stop after N trials")
    tune.add_argument("--timeout", type=float, metavar="SECONDS", help="stop tuning after this many seconds")
    tune.add_argument("--seed", type=int, metavar="N", help="seed of the randomized strategies")
    tune.add_argument(
        "--fallback-precision", choices=FALLBACK_PRECISIONS,
        help="what ops the search takes out of INT8 run in (default fp32)",
    )
    tune.add_argument("--history", metavar="TUNING.json", help="trial history; given again, tuning resumes from it")
    tune.add_argument("--report", metavar="PATH", help="write the tuning report here")
    p.set_defaults(handler=cmd_quantize)


def _add_describe(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    from inc_core._cli_commands import cmd_describe

    p = sub.add_parser(
        "describe",
        parents=[common],
        help="list the quantizable ops of a model file (the names --exclude takes)",
        description=(
            "List the ops inc would quantize in MODEL, in execution order, with their types: the names and types "
            "that inc quantize's --exclude, --exclude-pattern and --exclude-type take."
        ),
    )
    _add_model_arguments(p)
    p.add_argument("--approach", choices=APPROACHES, help="static (default) or dynamic: the ops each quantizes differ")
    p.add_argument("--format", metavar="FORMAT", help="backend output format (e.g. qdq, qoperator for ONNX)")
    p.add_argument("--json", metavar="PATH", help="also write the ops and their tunable settings as JSON")
    p.set_defaults(handler=cmd_describe)


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    from inc_core._cli_commands import cmd_bench

    p = sub.add_parser(
        "bench",
        parents=[common],
        help="latency and throughput of a model file",
        description=(
            "Time MODEL on one batch of inputs. Several --instances each run in their own process pinned "
            "to --cores-per-instance cores; the reported throughput is their sum."
        ),
    )
    _add_model_arguments(p)
    p.add_argument(
        "--inputs", required=True, metavar="INPUTS.npz",
        help="one batch of inputs: .npz of input name -> array (arrays saved positionally are passed in order)",
    )
    p.add_argument(
        "--runtime", metavar="NAME",
        help="runtime the backend runs the model on, for backends that offer a choice (onnx: auto, ort, openvino)",
    )
    p.add_argument("--warmup", type=int, default=10, metavar="N", help="untimed calls per instance (default 10)")
    p.add_argument("--iterations", type=int, default=100, metavar="N", help="timed calls per instance (default 100)")
    p.add_argument("--instances", type=int, default=1, metavar="N", help="concurrent instances (default 1)")
    p.add_argument("--cores-per-instance", type=int, metavar="N", help="cores and threads per instance")
    p.add_argument("--batch-size", type=int, metavar="N", help="samples per call (default: first axis of the first input)")
    p.add_argument("--json", metavar="PATH", help="also write the full result as JSON")
    p.set_defaults(handler=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    """The ``inc`` argument parser (exposed for documentation tools and tests)."""
    from inc_core._cli_commands import cmd_backends

    parser = argparse.ArgumentParser(
        prog="inc",
        description="Model compression: INT8 quantization, accuracy-driven tuning and benchmarks for every framework.",
        epilog="Exit codes: 0 ok; 1 tuning did not meet the accuracy criterion; 2 usage or input error.",
    )
    parser.add_argument("--version", action="version", version=f"inc-core {_version()}")
    _add_common_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _add_common_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser(
        "backends",
        parents=[common],
        help="list installed backends and the distributions that provide them",
        description="List the installed backends. Plugins are not imported unless --import is given.",
    )
    p.add_argument(
        "--import", dest="import_plugins", action="store_true",
        help="also import each plugin and show the versions it reports (its framework's, for instance)",
    )
    p.set_defaults(handler=cmd_backends)
    _add_describe(sub, common)
    _add_quantize(sub, common)
    _add_bench(sub, common)
    return parser


def _attach_logging(verbose: int, quiet: bool) -> logging.Handler:
    """Show the "inc" logger's messages on stderr (library use stays quiet: only the CLI does this)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_DETAILED_FORMAT if verbose else _DEFAULT_FORMAT))
    if quiet:
        level = logging.WARNING
    elif verbose >= 2:
        level = logging.DEBUG
    else:
        level = logging.INFO
    handler.setLevel(level)
    logger = logging.getLogger("inc")
    logger.addHandler(handler)
    logger.setLevel(min(level, logger.level) if logger.level else level)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``inc`` command line; returns the process exit code.

    Errors inc raises on purpose (:class:`~inc_core.errors.IncError`) are printed as
    ``inc: error: <message>`` with exit code 2; anything else is a bug, printed as one line naming the
    exception (with its traceback under ``-v``) and exit code 3.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: return argparse's code instead of exiting
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    logger = logging.getLogger("inc")
    previous_level, previous_propagate = logger.level, logger.propagate
    handler = _attach_logging(args.verbose, args.quiet)
    # The CLI's handler is the one output: a root handler that a dependency installs (onnxruntime's
    # quantizer calls logging.info, which runs basicConfig) would print every line twice.
    logger.propagate = False
    previous_env = {key: os.environ.get(key) for key in (ENV, "PYTHONPATH")}
    try:
        if args.imports:
            import_user_modules(args.imports)
            # benchmark instances load the model in processes of their own
            os.environ[ENV] = ",".join(args.imports)
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), previous_env["PYTHONPATH"]) if p)
        return int(args.handler(args))
    except IncError as exc:
        print(f"inc: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug in inc or a plugin: still one readable line, the traceback on request
        if args.verbose:
            traceback.print_exc()
        print(
            f"inc: error: unexpected {type(exc).__name__}: {exc}\n"
            "This is a bug in inc or in the backend plugin, not in your input; please report it with the output of "
            "the same command run with -v (which prints the traceback).",
            file=sys.stderr,
        )
        return 3
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        logger.propagate = previous_propagate
        for key, value in previous_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


if __name__ == "__main__":
    sys.exit(main())
