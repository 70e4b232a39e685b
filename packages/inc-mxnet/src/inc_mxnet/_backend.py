"""MxnetBackend: the inc backend SPI for MXNet Gluon blocks on the oneDNN (MKLDNN) CPU backend."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import mxnet as mx
from mxnet import gluon

from inc_core import Dataset, QuantConfig
from inc_core.backend import Backend, TuningSpace, array_digest
from inc_core.errors import CalibrationError, SaveError
from inc_mxnet._blocks import export_files, import_dir, symbol_block, to_ndarrays
from inc_mxnet._collect import MxnetCalibration, collect
from inc_mxnet._graph import Prepared, check_block, prepare, trace
from inc_mxnet._int8_ops import int8_op_counts
from inc_mxnet._op_errors import op_output_errors
from inc_mxnet._quantize import describe_prepared, quantize_prepared

__all__ = ["MODEL_SUFFIX", "MxnetBackend"]

#: the suffix of the directory ``inc.save`` writes (it is how ``inc.load`` finds this backend)
MODEL_SUFFIX = ".mxnet"
# The oneDNN subgraph property for FP32 inference (conv+bn+relu, fc+act fused, no quantization).
FP32_FUSION = "MKLDNN"


class MxnetBackend(Backend):
    """Quantizes Gluon ``HybridBlock`` models to INT8 ``gluon.SymbolBlock`` models run by oneDNN.

    One format, ``"mkldnn"``: MXNet's quantization pass on the graph fused by the oneDNN subgraph
    backend (conv+bn+act+sum, fc+eltwise), with the requantize steps folded into the INT8 kernels.
    ``approach="dynamic"`` leaves out calibration: the quantized kernels find activation ranges at
    run time (MXNet's ``calib_mode="none"``). Saved models are directories named ``*.mxnet`` holding
    MXNet's own export (``<name>-symbol.json``, ``<name>-0000.params``).
    """

    name: ClassVar[str] = "mxnet"
    package: ClassVar[str] = "inc-mxnet"
    formats: ClassVar[tuple[str, ...]] = ("mkldnn",)

    def accepts(self, model: Any) -> bool:
        if isinstance(model, (str, Path)):
            return Path(model).suffix == MODEL_SUFFIX
        # Plain Blocks are taken too, so that they get an UnsupportedModelError that says what to do.
        return isinstance(model, gluon.Block)

    def _prepare(self, model: Any) -> Prepared:
        return prepare(self._as_block(model))

    def _as_block(self, model: Any) -> Any:
        return self.load(Path(model)) if isinstance(model, (str, Path)) else model

    def describe(self, model: Any, config: QuantConfig) -> TuningSpace:
        self.check_format(config.format)
        return describe_prepared(self._prepare(model))

    def calibrate(self, model: Any, dataset: Dataset, config: QuantConfig) -> MxnetCalibration:
        return collect(self._prepare(model), dataset, samples=config.calib_samples)

    def quantize(self, model: Any, config: QuantConfig, *, calibration: Any | None, inplace: bool = False) -> Any:
        if calibration is not None and not isinstance(calibration, MxnetCalibration):
            raise CalibrationError(
                f"The mxnet backend got calibration of type {type(calibration).__name__}; pass the object "
                "MxnetBackend.calibrate returned."
            )
        self.check_format(config.format)
        # A Gluon block cannot become a SymbolBlock in place: inplace=True also returns a new block.
        return quantize_prepared(self._prepare(model), config, calibration)

    def check_quantized_runs(self, model: Any, quantized: Any, dataset: Dataset) -> None:
        """Run the dynamic INT8 block on the dataset's first batch (see :meth:`Backend.check_quantized_runs`)."""
        from inc_mxnet._quantize import check_runs

        batch = next(dataset.inputs(limit=1))  # Dataset.inputs raises DatasetError itself when it holds none
        check_runs(quantized, self._prepare(model), batch, "the first batch of the dataset")

    def op_errors(self, model: Any, config: QuantConfig, *, calibration: Any | None, dataset: Dataset) -> dict[str, float]:
        prepared = self._prepare(model)
        if config.approach == "static" and calibration is None:
            calibration = collect(prepared, dataset, samples=config.calib_samples)
        return op_output_errors(prepared, config, calibration, dataset)

    def weights_digest(self, model: Any) -> str | None:
        if not isinstance(model, gluon.Block):
            return super().weights_digest(model)  # a saved model's files
        params = sorted(model.collect_params().items())
        return array_digest([(name, param.data().asnumpy()) for name, param in params if param._data is not None])

    def int8_op_counts(self, model: Any) -> dict[str, int]:
        """Counted from the block's graph (see :mod:`inc_mxnet._int8_ops`)."""
        return int8_op_counts(model)

    def save(self, model: Any, path: Path) -> None:
        if path.suffix != MODEL_SUFFIX:
            raise SaveError(
                f"Cannot save an MXNet model to {str(path)!r}: inc-mxnet writes a directory named *{MODEL_SUFFIX} "
                f"(holding <name>-symbol.json and <name>-0000.params); give a path such as 'model{MODEL_SUFFIX}'."
            )
        block = check_block(model)
        symbol, inputs = _graph_of(block)
        params = {p.name: p.data(mx.cpu()) for p in block.collect_params().values()}
        try:
            export_files(symbol, {k: v for k, v in params.items() if k in set(symbol.list_inputs())}, inputs, path)
        except (OSError, mx.base.MXNetError) as exc:
            raise SaveError(
                f"Writing the MXNet model to {str(path)!r} failed: {exc}. Nothing was kept; check the free space "
                "and permissions of the target directory."
            ) from exc

    def load(self, path: Path) -> gluon.SymbolBlock:
        return import_dir(Path(path))

    def runner(self, model: Any, inputs: Any, *, threads: int | None = None) -> Callable[[], Any]:
        """One static-graph inference per call, finished before it returns.

        ``threads`` is not applied here: MXNet sizes its OpenMP pool from ``OMP_NUM_THREADS`` when it is
        imported, which is how the core's multi-instance benchmark sets it in each worker process.
        """
        # A graph-mode copy: the user's block is neither hybridized nor changed, and an FP32 block is
        # timed as MXNet serves it on CPU (oneDNN FP32 fusion, static CachedOp), not op by op, so an
        # INT8 speed-up is measured against the fastest FP32 MXNet has.
        block = check_block(self._as_block(model))
        symbol, names = _graph_of(block)
        if "_contrib_quantize" not in symbol.tojson():
            symbol = symbol.get_backend_symbol(FP32_FUSION)
        params = {p.name: p.data(mx.cpu()) for p in block.collect_params().values()}
        graph = symbol_block(symbol, names, {k: v for k, v in params.items() if k in set(symbol.list_inputs())})
        graph.hybridize(static_alloc=True, static_shape=True)
        arrays = to_ndarrays(inputs, names, where="benchmark inputs")

        def run() -> Any:
            out = graph(*arrays)
            mx.nd.waitall()  # MXNet runs asynchronously: time the work, not its enqueueing
            return out

        return run

    def version(self) -> str:
        from inc_mxnet import __version__

        return f"inc-mxnet {__version__} (mxnet {mx.__version__}, MKLDNN {'on' if _mkldnn() else 'off'})"


def _graph_of(block: gluon.HybridBlock) -> tuple[mx.sym.Symbol, tuple[str, ...]]:
    """The block's symbol and input names: a SymbolBlock's own graph, else a trace."""
    if isinstance(block, gluon.SymbolBlock):
        inputs, outputs = block._cached_graph
        return outputs, tuple(s.name for s in inputs)
    return trace(block)


def _mkldnn() -> bool:
    return bool(mx.runtime.Features().is_enabled("MKLDNN"))
