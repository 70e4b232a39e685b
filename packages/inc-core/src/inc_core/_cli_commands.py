"""``inc backends``, ``inc describe`` and ``inc bench``, plus the table printing the subcommands share."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from inc_core._registry import ENTRY_POINT_GROUP, get_backend, installed_backends, resolve_backend
from inc_core.backend import Backend
from inc_core.errors import ConfigError, DatasetError, IncError

__all__ = ["cmd_backends", "cmd_bench", "cmd_describe", "format_table", "read_inputs"]

_POSITIONAL_KEY = re.compile(r"arr_(\d+)")


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[bool] | None = None) -> str:
    """Plain-text columns; ``right[i]`` right-aligns column ``i`` (numbers)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    align = right or [False] * len(header)

    def line(cells: Sequence[str]) -> str:
        parts = [str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(cells, widths, align)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(header), *(line(row) for row in rows)])


# --- inc describe ----------------------------------------------------------------------------------


def cmd_describe(args: argparse.Namespace) -> int:
    """Print the quantizable ops of a model file: the names and types ``--exclude`` and ``--exclude-type`` take."""
    import inc_core
    from inc_core._quant_config import QuantConfig

    given = {"approach": args.approach, "format": args.format}
    config = QuantConfig(**{k: v for k, v in given.items() if v is not None})
    model = inc_core.load(args.model, backend=args.backend)
    space = inc_core.describe(model, config, backend=args.backend)
    if args.json:
        from inc_core._files import atomic_write_text

        ops = [{"name": op.name, "type": op.op_type} for op in space.ops]
        options = {op_type: {k: list(v) for k, v in settings.items()} for op_type, settings in space.options.items()}
        atomic_write_text(args.json, json.dumps({"model": args.model, "ops": ops, "options": options}, indent=2) + "\n", what="op list")
    counts: dict[str, int] = {}
    for op in space.ops:
        counts[op.op_type] = counts.get(op.op_type, 0) + 1
    kinds = ", ".join(f"{n} {op_type}" for op_type, n in counts.items())
    print(f"{args.model}: {len(space.ops)} quantizable ops ({config.approach}): {kinds or 'none'}")
    if space.ops:
        print(format_table(["NAME", "TYPE"], [[op.name, op.op_type] for op in space.ops]))
        print("Keep ops in FP32 with inc quantize --exclude NAME, --exclude-pattern REGEX or --exclude-type TYPE.")
    return 0


# --- inc backends -----------------------------------------------------------------------------------


def _distribution(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", "?"
    return str(dist.metadata["Name"]), str(dist.version)


def _imported_version(key: str) -> str:
    try:
        return get_backend(key).version()
    except IncError as exc:
        return f"import failed: {exc}"


def cmd_backends(args: argparse.Namespace) -> int:
    """Print every installed backend key, the distribution providing it and its version."""
    entry_points = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    registered = installed_backends()
    if not registered:
        print(
            "No inc backends are installed. Install the plugin for your framework: "
            "pip install inc-torch | inc-tf | inc-onnx | inc-mxnet"
        )
        return 0
    header = ["BACKEND", "DISTRIBUTION", "VERSION", "OBJECT"]
    rows = []
    for key, target in registered.items():
        ep = entry_points.get(key)
        if ep is not None and ep.value == target:
            dist_name, dist_version = _distribution(ep)
        else:  # registered with inc.register_backend in this process: no distribution metadata
            dist_name, dist_version = "(this process)", "-"
        row = [key, dist_name, dist_version, target]
        if args.import_plugins:
            row.append(_imported_version(key))
        rows.append(row)
    if args.import_plugins:
        header.append("REPORTS")
    print(format_table(header, rows))
    return 0


# --- inc bench --------------------------------------------------------------------------------------


def read_inputs(path_text: str) -> Any:
    """One batch of inputs from an ``.npz``: a mapping name -> array, or, for arrays saved positionally
    (``np.savez(f, a, b)``), a single array or a tuple in their order.

    Raises:
        DatasetError: missing or unreadable file, or an empty archive.
    """
    path = Path(path_text)
    if not path.is_file():
        raise DatasetError(f"--inputs: no file at {path_text!r}; give an .npz of input name -> array.")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as exc:  # numpy raises several types for a bad archive
        raise DatasetError(f"--inputs: {path_text!r} is not a readable .npz archive ({exc}).") from exc
    if not arrays:
        raise DatasetError(f"--inputs: {path_text!r} holds no arrays; save at least one input with numpy.savez.")
    positions = [_POSITIONAL_KEY.fullmatch(key) for key in arrays]
    if all(positions):
        ordered = [arrays[f"arr_{i}"] for i in sorted(int(m.group(1)) for m in positions if m)]
        return ordered[0] if len(ordered) == 1 else tuple(ordered)
    return arrays


def _bench_rows(result: Any) -> list[list[str]]:
    def cells(label: str, r: Any, pid: str, cpus: str) -> list[str]:
        lat = r.latency_ms
        return [label, pid, cpus, f"{r.throughput:.2f}", f"{lat.p50:.3f}", f"{lat.p90:.3f}", f"{lat.p99:.3f}", f"{lat.mean:.3f}"]

    rows = []
    for index, inst in enumerate(result.per_instance):
        cpus = ",".join(map(str, inst.cpus)) if inst.cpus is not None else "-"
        rows.append(cells(str(index), inst, str(inst.pid) if inst.pid is not None else "-", cpus))
    if result.instances > 1:
        rows.append(cells("total", result, "", ""))
    return rows


def _with_runtime(impl: Backend, runtime: str) -> Backend:
    """The same backend rebuilt with ``runtime=`` (validated by the backend), or a ConfigError if it has no choice."""
    options = impl.options()
    if "runtime" not in options:
        raise ConfigError(
            f"--runtime: the {impl.name} backend runs models on one runtime only (it takes no runtime option); "
            "drop --runtime."
        )
    return type(impl)(**{**options, "runtime": runtime})


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark a model file and print a throughput/latency table."""
    import inc_core
    from inc_core._benchmark import benchmark
    from inc_core._files import atomic_write_text, check_output_path

    if args.json:
        check_output_path(args.json, what="benchmark JSON")
    inputs = read_inputs(args.inputs)
    model = inc_core.load(args.model, backend=args.backend)
    backend: Any = args.backend
    if getattr(args, "runtime", None):
        backend = _with_runtime(resolve_backend(model, args.backend), args.runtime)
    result = benchmark(
        model,
        inputs,
        warmup=args.warmup,
        iterations=args.iterations,
        instances=args.instances,
        cores_per_instance=args.cores_per_instance,
        batch_size=args.batch_size,
        backend=backend,
    )
    cores = result.cores_per_instance if result.cores_per_instance is not None else "default"
    print(
        f"{args.model} ({result.backend} backend): batch size {result.batch_size}, {result.instances} instance(s) x "
        f"{cores} cores, {result.warmup} warmup + {result.iterations} timed calls per instance"
    )
    header = ["instance", "pid", "cpus", "samples/s", "p50 ms", "p90 ms", "p99 ms", "mean ms"]
    print(format_table(header, _bench_rows(result), right=[False, True, False, True, True, True, True, True]))
    if args.json:
        atomic_write_text(args.json, json.dumps(result.to_dict(), indent=2) + "\n", what="benchmark JSON")
        print(f"result written to {args.json}")
    return 0
