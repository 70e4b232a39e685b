"""The backend SPI: what a framework plugin implements so the core can quantize, tune and benchmark its models.

A plugin subclasses :class:`Backend` and registers it under the ``inc_core.backends`` entry-point
group. The entry-point *name* is the key the core looks the backend up by:

- the top-level package of the model's type (``torch`` for an ``nn.Module``, ``onnx`` for a
  ``ModelProto``, ``keras``/``tensorflow`` ...),
- a model file's suffix without the dot (``onnx`` for ``model.onnx``),
- or the name a user passes as ``backend=`` (``ipex``).

One backend may be registered under several names. The core loads only the entry point whose
name matches, so installing every plugin never imports every framework.
"""

from __future__ import annotations

import abc
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from inc_core._dataset import Dataset
from inc_core._quant_config import OVERRIDABLE, QuantConfig
from inc_core.errors import ConfigError

__all__ = ["Backend", "Op", "TuningSpace", "array_digest", "content_digest"]


@dataclass(frozen=True)
class Op:
    """One quantizable op (or layer) of a model, as the backend names it."""

    name: str
    op_type: str


@dataclass(frozen=True)
class TuningSpace:
    """The framework-neutral view of a model that the tuning strategies search over.

    Attributes:
        ops: the quantizable ops, in execution order.
        options: per op type, per overridable setting (``calibration``, ``granularity``, ``scheme``,
            ``activation_dtype``), the choices the backend supports for that op type. A setting missing
            for an op type is not tunable there.
    """

    ops: tuple[Op, ...]
    options: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for op_type, settings in self.options.items():
            for key in settings:
                if key not in OVERRIDABLE:
                    raise ConfigError(f"TuningSpace: op type {op_type!r} lists unknown setting {key!r}.")

    @property
    def op_types(self) -> tuple[str, ...]:
        """Distinct op types in first-seen order."""
        return tuple(dict.fromkeys(op.op_type for op in self.ops))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(op.name for op in self.ops)

    def restricted(self, search_space: Mapping[str, Sequence[str]] | None) -> TuningSpace:
        """The same space with each setting's choices cut down to those in ``search_space``."""
        if search_space is None:
            return self
        options = {
            op_type: {k: tuple(c for c in v if k not in search_space or c in search_space[k]) for k, v in settings.items()}
            for op_type, settings in self.options.items()
        }
        return TuningSpace(self.ops, {t: {k: v for k, v in s.items() if v} for t, s in options.items()})


class Backend(abc.ABC):
    """Base class of framework backends.

    Class attributes:
        name: the backend's canonical name (``"onnx"``).
        package: the pip distribution that provides it (``"inc-onnx"``).
        formats: output formats ``QuantConfig.format`` may name; the first is what ``"default"`` means.
        supports_smooth_quant: whether :meth:`calibrate` and :meth:`quantize` honour
            ``QuantConfig.smooth_quant``; the core refuses a SmoothQuant config for a backend without it.
        supports_bf16: whether :meth:`quantize` can run the ops ``QuantConfig.bf16`` selects in BF16; a
            backend that can only on some CPUs, formats or runtimes says so in :meth:`check_bf16`.
    """

    name: ClassVar[str]
    package: ClassVar[str]
    formats: ClassVar[tuple[str, ...]] = ("default",)
    supports_smooth_quant: ClassVar[bool] = False
    supports_bf16: ClassVar[bool] = False

    # --- model handling -------------------------------------------------------------------------
    @abc.abstractmethod
    def accepts(self, model: Any) -> bool:
        """True when this backend can quantize ``model`` (checked before any other call)."""

    @abc.abstractmethod
    def describe(self, model: Any, config: QuantConfig) -> TuningSpace:
        """The quantizable ops of ``model`` under ``config.approach`` and the options per op type."""

    # --- quantization ---------------------------------------------------------------------------
    @abc.abstractmethod
    def calibrate(self, model: Any, dataset: Dataset, config: QuantConfig) -> Any:
        """Collect activation statistics once (streaming, bounded memory).

        The returned object is opaque to the core and is reused across tuning trials: it must be able to
        answer ranges for every calibration method in :data:`inc_core.CALIBRATIONS`, so a trial that changes
        only the method or the fallback set never re-runs the model over the data. At most
        ``config.calib_samples`` samples are read. Called only for ``approach="static"``.

        With ``config.smooth_quant`` set (backends with :attr:`supports_smooth_quant`), the result is the
        calibration of the SmoothQuant-rescaled model for that alpha, and :meth:`quantize` accepts it only
        for configs with the same ``smooth_quant``; the core calibrates once per distinct ``smooth_quant``.
        """

    @abc.abstractmethod
    def quantize(self, model: Any, config: QuantConfig, *, calibration: Any | None, inplace: bool = False) -> Any:
        """Return the INT8 model for ``config``; ``model`` is left unchanged unless ``inplace``."""

    def check_quantized_runs(self, model: Any, quantized: Any, dataset: Dataset) -> None:
        """Run ``quantized`` (made from ``model``) on the first batch of ``dataset`` as the user will.

        :func:`inc_core.quantize` calls it after a dynamic quantization given a dataset: no calibration ran
        the model there, and a returned model that fails when called is a broken artifact. The default does
        nothing, for backends whose :meth:`quantize` already loads or runs what it returns.

        Raises:
            UnsupportedModelError: the quantized model does not run where ``model`` does; names the op where
                that can be told.
            DatasetError: ``model`` itself does not run on the batch.
        """
        return None

    def op_errors(self, model: Any, config: QuantConfig, *, calibration: Any | None, dataset: Dataset) -> dict[str, float]:
        """Per-op output error (e.g. MSE of each op's output, quantized vs FP32) for the ``mse`` strategy.

        Backends that cannot measure it leave this unimplemented; the ``mse`` strategy then raises
        :class:`~inc_core.errors.TuningError`.
        """
        raise NotImplementedError(f"backend {self.name!r} does not report per-op errors")

    def weights_digest(self, model: Any) -> str | None:
        """A hash of ``model``'s weights, or ``None`` where the backend cannot tell them.

        A tuning history records it next to the model's ops, so a run resumed for the same architecture
        with other weights (retrained, fine-tuned) is refused instead of reusing scores measured on the
        old ones. The default hashes a model given as a file or directory (its bytes) and returns ``None``
        for in-memory objects; backends hash those themselves.
        """
        if isinstance(model, (str, os.PathLike)):
            return content_digest(Path(model))
        return None

    def int8_op_counts(self, model: Any) -> dict[str, int] | None:
        """Per op type, how many ops of a quantized ``model`` run INT8 kernels, counted from the model itself.

        This reports what the output holds, not what was asked for (a framework's quantizer may leave a
        selected op in float). ``None``, the default, means the backend cannot count them.
        """
        return None

    # --- files ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def save(self, model: Any, path: Path) -> None:
        """Write ``model`` to ``path`` in the framework's native format (the core makes it atomic)."""

    @abc.abstractmethod
    def load(self, path: Path) -> Any:
        """Read a model written by :meth:`save`."""

    def file_suffix(self, model: Any) -> str:
        """The file suffix (with its dot) that :meth:`save` writes ``model`` under, e.g. ``".onnx"``.

        The core names the files it writes on the user's behalf with it (the model each benchmark
        instance loads). The default, ``"." + name``, suits a backend registered under its own suffix;
        a backend whose formats have other suffixes, or one suffix per kind of model, overrides it.
        """
        return f".{self.name}"

    # --- running --------------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this backend as configured (JSON values).

        Benchmark instance processes construct the backend class with them, so a backend given as
        ``backend=SomeBackend(option=...)`` runs with the same options in every instance. The default,
        ``{}``, suits a backend whose constructor takes no options.
        """
        return {}

    @abc.abstractmethod
    def runner(self, model: Any, inputs: Any, *, threads: int | None = None) -> Callable[[], Any]:
        """A zero-argument callable that runs one inference of ``model`` on ``inputs`` (for benchmarks)."""

    def version(self) -> str:
        """Version string shown by ``inc backends`` (the plugin and its framework)."""
        return "unknown"

    def check_smooth_quant(self, config: QuantConfig) -> None:
        """Raise ConfigError when ``config`` asks for SmoothQuant and this backend does not implement it."""
        if config.smooth_quant is not None and not self.supports_smooth_quant:
            raise ConfigError(
                f"QuantConfig: smooth_quant={config.smooth_quant!r} is not implemented by the {self.name} backend "
                "(SmoothQuant is available on the onnx and torch backends); set smooth_quant=None."
            )

    def bf16_unavailable(self, config: QuantConfig) -> str | None:
        """Why ops of ``config`` cannot run in BF16 here (a sentence that says what to change), or ``None``.

        Backends with :attr:`supports_bf16` override this with what else BF16 needs: the CPU's BF16
        instructions, an output format or runtime that has BF16 kernels.
        """
        if self.supports_bf16:
            return None
        return (
            f"the {self.name} backend does not implement BF16 ops (BF16 mixed precision is available on the torch "
            "(PT2E) and onnx (OpenVINO) backends)"
        )

    def bf16_candidates(self, model: Any, config: QuantConfig) -> frozenset[str] | None:
        """The ops of :meth:`describe` that run faster in BF16 than in FP32 (``None``: every op).

        ``TuningConfig(fallback_precision="bf16")`` moves a fallback op into BF16 only when it is one of
        these, and into FP32 otherwise: BF16 pays off where a compute-bound kernel (a convolution or a
        matrix product by a weight) runs on BF16 instructions; on a lookup, an elementwise op or a product
        of two activations it only adds conversions and rounding. A user's explicit ``QuantConfig.bf16``
        is not filtered.
        """
        return None

    def check_bf16(self, config: QuantConfig) -> None:
        """Raise ConfigError when ``config.bf16`` selects ops that cannot run in BF16 (see :meth:`bf16_unavailable`)."""
        if not config.bf16:
            return
        reason = self.bf16_unavailable(config)
        if reason is not None:
            raise ConfigError(
                f"QuantConfig: bf16={config.bf16!r} asks for BF16 ops, but {reason}. "
                "Keep those ops in FP32 with exclude= instead."
            )

    def check_format(self, config_format: str) -> str:
        """Resolve ``QuantConfig.format`` to a concrete format of this backend, or raise ConfigError."""
        if config_format == "default":
            return self.formats[0]
        if config_format not in self.formats:
            raise ConfigError(
                f"QuantConfig: format={config_format!r} is not supported by the {self.name} backend; "
                f"choose one of {', '.join(map(repr, ('default', *self.formats)))}."
            )
        return config_format


def content_digest(path: Path) -> str | None:
    """A hash of a file's bytes, or of every file under a directory with its relative path (``None`` if absent)."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        return None
    digest = hashlib.blake2b(digest_size=16)
    for file in files:
        if file != path:  # a directory's layout counts; a single file's name does not
            digest.update(str(file.relative_to(path)).encode("utf-8"))
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def array_digest(named_arrays: Sequence[tuple[str, Any]]) -> str:
    """A hash of named numpy arrays (names, dtypes, shapes and bytes), for :meth:`Backend.weights_digest`."""
    import numpy as np

    digest = hashlib.blake2b(digest_size=16)
    for name, value in named_arrays:
        array = np.ascontiguousarray(value)
        digest.update(f"{name}|{array.dtype.str}|{array.shape}".encode())
        digest.update(array.data)  # the buffer itself: tobytes() would copy an LLM's weights once more
    return digest.hexdigest()
