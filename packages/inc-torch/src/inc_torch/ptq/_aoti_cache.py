"""A disk cache of the AOTInductor packages ``runtime="aoti"`` compiles, keyed by what the package depends on.

Compiling an INT8 graph with AOTInductor takes tens of seconds (export, inductor's freezing passes, a C++
build); loading the finished package takes a fraction of a second. The same model is often run again in
a new process (a service restarting, ``inc.load`` of the same file, a benchmark's second run), so each
package is kept under a key made of everything the compiled library depends on: the graph's code, the
bytes of every tensor it reads (the int8 weights are folded into the library), the input signature,
torch's version and inductor's configuration, the thread count, and the CPU's instruction-set flags
(the kernels are compiled for this CPU's vector ISA). Any change to one of them is a new key, so a stale entry is never
used; a damaged entry is deleted and compiled again.

Where: ``$INC_AOTI_CACHE_DIR`` if set, else ``inc_aoti/`` under inductor's cache directory
(``$TORCHINDUCTOR_CACHE_DIR``, by default ``/tmp/torchinductor_<user>``). Deleting the folder is safe.
Inductor's own switch ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` turns this cache off as well.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from inc_torch.ptq import _inplace_sums
from inc_torch.ptq._dynamic import cpu_flags

__all__ = ["CACHE_DIR_ENV", "INT8_INDUCTOR_SETTINGS", "cache_directory", "int8_inductor", "int8_inductor_backend", "load_or_compile", "package_key"]

log = logging.getLogger("inc")

CACHE_DIR_ENV = "INC_AOTI_CACHE_DIR"
# Bump when what is stored, or how the key is made, changes.
# 2: compiled under INT8_INDUCTOR_SETTINGS (a package built under the CPP GEMM template is wrong); 3: compiled
# with the in-place sum correction when this torch allows it (the key adds _inplace_sums.CACHE_MARK then)
_FORMAT = "3"


def cache_directory() -> Path | None:
    """Where packages are kept, or None when caching is turned off."""
    import torch._inductor.config as inductor_config

    if inductor_config.force_disable_caches:
        return None
    chosen = os.environ.get(CACHE_DIR_ENV)
    if chosen:
        return Path(chosen)
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "inc_aoti"


def _tensors(graph_module: torch.fx.GraphModule) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor the graph can read: parameters, buffers and plain tensor attributes (get_attr)."""
    seen: set[str] = set()
    for name, tensor in (*graph_module.named_parameters(remove_duplicate=False), *graph_module.named_buffers(remove_duplicate=False)):
        seen.add(name)
        yield name, tensor
    for module_name, module in graph_module.named_modules():
        graph = getattr(module, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            name = f"{module_name}.{node.target}" if module_name else str(node.target)
            if node.op != "get_attr" or name in seen:
                continue
            value: Any = module
            for part in str(node.target).split("."):
                value = getattr(value, part, None)
            if isinstance(value, torch.Tensor):
                seen.add(name)
                yield name, value


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    value = tensor.detach()
    if value.is_quantized:  # its int representation; scales and zero points go in the header
        value = value.int_repr()
    flat = value.cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _tensor_header(name: str, tensor: torch.Tensor) -> str:
    header = f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|{tensor.stride()}|{tensor.device}"
    if tensor.is_quantized and tensor.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        header += f"|{tensor.q_scale()}|{tensor.q_zero_point()}"
    elif tensor.is_quantized:
        header += f"|{tensor.q_per_channel_scales().tolist()}|{tensor.q_per_channel_zero_points().tolist()}|{tensor.q_per_channel_axis()}"
    return header


# Inductor settings for every INT8 compile, over whatever the user set globally. Freezing folds the int8
# weights into constants, so oneDNN's weight prepacking happens once, at compile time. GEMMs stay on ATen's
# oneDNN kernels even under a user's max_autotune: torch 2.13's CPP GEMM template for INT8 linears returns
# outputs unrelated to the model's on BERT-shaped graphs (all-MiniLM-L6-v2: cosine 0.07 against the same graph
# uncompiled, torchao's own recipe alike).
INT8_INDUCTOR_SETTINGS: dict[str, Any] = {"freezing": True, "max_autotune_gemm_backends": "ATEN"}


@contextlib.contextmanager
def int8_inductor() -> Iterator[None]:
    """What every INT8 compile of inc runs under: :data:`INT8_INDUCTOR_SETTINGS` and the correction of inductor's
    in-place INT8 sums (``_inplace_sums``)."""
    with (
        torch._inductor.config.patch({**INT8_INDUCTOR_SETTINGS, **_inplace_sums.cache_mark_settings()}),
        _inplace_sums.sums_kept_out_of_place(),
    ):
        yield


def int8_inductor_backend(graph_module: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
    """The ``torch.compile`` backend of inc's INT8 models: inductor, compiling under :func:`int8_inductor`."""
    from torch._inductor.compile_fx import compile_fx

    with int8_inductor():
        return compile_fx(graph_module, example_inputs)


def _inductor_config() -> str:
    import torch._inductor.config as inductor_config

    # the settings the package is compiled under: a global setting that INT8_INDUCTOR_SETTINGS overrides
    # changes nothing in the package, so it must not change its key either. Every torch inc supports (>= 2.8)
    # has save_config_portable; a failure here is a real error, reported by the caller, never an empty key
    # that would let a package built under other settings be served.
    with inductor_config.patch(INT8_INDUCTOR_SETTINGS):
        portable = inductor_config.save_config_portable()
    # aoti_compile_and_package writes the built package's platform record into aot_inductor.metadata
    # (a global dict): a record of the last build, not a setting of the next one.
    return repr(sorted((str(k), repr(v)) for k, v in portable.items() if k != "aot_inductor.metadata"))


def package_key(graph_module: torch.fx.GraphModule, signature: Any) -> str:
    """The cache key of the package compiled from ``graph_module`` for inputs of ``signature``."""
    digest = hashlib.sha256()

    def add(text: str) -> None:
        digest.update(text.encode())
        digest.update(b"\0")

    add(_FORMAT)
    add(_inplace_sums.CACHE_MARK if _inplace_sums.corrects_inplace_sums() else "")
    add(torch.__version__)
    add(platform.machine())
    add(torch.backends.cpu.get_cpu_capability())
    add(" ".join(sorted(cpu_flags())))
    add(_inductor_config())
    add(str(torch.get_num_threads()))  # inductor's C++ code generation plans its loops' parallelism for it
    add(repr(signature))
    for name, module in graph_module.named_modules():
        if isinstance(module, torch.fx.GraphModule):
            add(name)
            add(module.code)
    for name, tensor in sorted(_tensors(graph_module), key=lambda item: item[0]):
        add(_tensor_header(name, tensor))
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _compile(graph_module: torch.fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any], package_path: Path) -> None:
    program = torch.export.export(graph_module, args, kwargs)
    with int8_inductor():
        torch._inductor.aoti_compile_and_package(program, package_path=str(package_path))


def load_or_compile(graph_module: torch.fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any], signature: Any) -> tuple[Any, bool]:
    """The loaded AOTInductor package for these inputs, and whether it came from the cache.

    The cache never makes a call fail: an unreadable entry is compiled again, a folder that cannot be
    written is skipped (with a log line) and the package is compiled in a temporary folder as without it.
    """
    directory = cache_directory()
    entry = None if directory is None else directory / f"{package_key(graph_module, signature)}.pt2"
    if entry is not None and entry.is_file():
        try:
            return torch._inductor.aoti_load_package(str(entry)), True
        except Exception as exc:  # damaged or written by an incompatible build: replace it
            log.warning("Cached AOTInductor package %s could not be loaded (%s); compiling it again.", entry, type(exc).__name__)
            with contextlib.suppress(OSError):
                entry.unlink(missing_ok=True)
    work: str | None = None
    if entry is not None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            # Compiled next to its final name and renamed into place: a reader never sees half a file,
            # and two processes compiling the same model at once leave one whole package.
            work = tempfile.mkdtemp(prefix="compiling_", dir=entry.parent)
        except OSError as exc:
            log.info("AOTInductor cache folder %s is not usable (%s); compiling without the cache.", entry.parent, exc)
            entry = None
    if work is None:
        work = tempfile.mkdtemp(prefix="inc_aoti_")
    try:
        built = Path(work) / "model.pt2"
        _compile(graph_module, args, kwargs, built)
        if entry is not None:
            try:
                os.replace(built, entry)
                built = entry
            except OSError as exc:
                log.info("Could not keep the AOTInductor package in the cache (%s).", exc)
        return torch._inductor.aoti_load_package(str(built)), False  # extracts what it needs; work can go
    finally:
        shutil.rmtree(work, ignore_errors=True)
