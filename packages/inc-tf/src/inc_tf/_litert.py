"""LiteRTModel: an INT8 (or float) ``.tflite`` flatbuffer, run by the ``ai-edge-litert`` interpreter."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inc_core.errors import DatasetError, ModelLoadError, UnsupportedModelError

__all__ = ["METADATA_KEY", "Invoker", "LiteRTModel", "interpreter"]

#: flatbuffer metadata entry holding the Keras layer names (JSON), so ops map back to layers after a reload
METADATA_KEY = "inc_tf.layers"
_TOKEN = re.compile(r"incL(\d+)x(?:_\d+)?")


def interpreter(content: bytes, *, threads: int | None = None, preserve_all_tensors: bool = False) -> Any:
    """An allocated LiteRT interpreter for ``content``.

    ``preserve_all_tensors`` keeps every intermediate tensor readable after ``invoke`` and turns the
    XNNPACK delegate off (a delegate would fuse the tensors away), which is what calibration needs.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kwargs: dict[str, Any] = {"model_content": bytes(content), "num_threads": threads or os.cpu_count() or 1}
    if preserve_all_tensors:
        kwargs["experimental_preserve_all_tensors"] = True
        kwargs["experimental_op_resolver_type"] = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    try:
        interp = Interpreter(**kwargs)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelLoadError(
            f"The LiteRT interpreter could not load the model ({len(content)} bytes): {_line(exc)}. "
            "Expected a .tflite flatbuffer written by inc.save or the TF converter."
        ) from exc
    return interp


class Invoker:
    """Runs an interpreter by input name: its signature runner, or its raw input tensors when it has no signature.

    (A model converted from a concrete function, as subclassed Keras models are, carries no signature.)
    """

    def __init__(self, interp: Any) -> None:
        self.interp = interp
        self._signature = interp.get_signature_runner() if interp.get_signature_list() else None
        if self._signature is not None:
            details = self._signature.get_input_details()
            self.input_names = tuple(details)
            self.input_dtypes = tuple(np.dtype(details[name]["dtype"]) for name in self.input_names)
        else:
            raw = interp.get_input_details()
            self._inputs = {d["name"]: d["index"] for d in raw}
            self.input_names = tuple(self._inputs)
            self.input_dtypes = tuple(np.dtype(d["dtype"]) for d in raw)

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        if self._signature is not None:
            return dict(self._signature(**feeds))
        interp = self.interp
        if any(tuple(interp.get_tensor(i).shape) != feeds[n].shape for n, i in self._inputs.items()):
            for name, index in self._inputs.items():
                interp.resize_tensor_input(index, list(feeds[name].shape))
            interp.allocate_tensors()
        for name, index in self._inputs.items():
            interp.set_tensor(index, feeds[name])
        interp.invoke()
        return {d["name"]: interp.get_tensor(d["index"]) for d in interp.get_output_details()}


@dataclass(eq=False)
class LiteRTModel:
    """A quantized model as LiteRT runs it: the ``.tflite`` bytes plus what inc knows about them.

    ``inc.save`` writes :attr:`content` to a ``.tflite`` file and ``inc.load`` reads one back. Call the
    model on a numpy batch (or a mapping ``input name -> batch``) to run it through the interpreter.

    Attributes:
        content: the flatbuffer.
        input_names: the signature's input names, in the Keras model's input order (a positional tuple of
            inputs follows it; a .tflite file written elsewhere lists them sorted by name, as its signature does).
    """

    content: bytes = field(repr=False)
    input_names: tuple[str, ...] = field(default=(), init=False)
    input_dtypes: tuple[np.dtype, ...] = field(default=(), init=False, repr=False)
    layer_names: tuple[str, ...] = field(default=(), init=False)
    renamed: bool = field(default=True, init=False)
    _interp: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        from inc_tf._flatbuffer import read_metadata

        invoker = Invoker(interpreter(self.content, threads=1))
        self.input_names, self.input_dtypes = invoker.input_names, invoker.input_dtypes
        raw = read_metadata(self.content, METADATA_KEY)
        if raw:
            meta = json.loads(raw.decode())
            self.layer_names = tuple(meta["layers"])
            self.renamed = bool(meta.get("renamed", True))
            order = tuple(meta.get("inputs", ()))
            if order and sorted(order) == sorted(self.input_names):
                # the signature lists inputs sorted by name; positional inputs follow the Keras model's order
                dtypes = dict(zip(self.input_names, self.input_dtypes))
                self.input_names, self.input_dtypes = order, tuple(dtypes[name] for name in order)

    @classmethod
    def with_layers(
        cls, content: bytes, layer_names: tuple[str, ...], *, renamed: bool = True, input_names: tuple[str, ...] = ()
    ) -> LiteRTModel:
        """A model whose flatbuffer records the Keras layer names (so a loaded file still maps ops to layers) and
        the Keras model's input order (so positional inputs feed the inputs they would feed in Keras)."""
        from inc_tf._flatbuffer import with_metadata

        payload = json.dumps({"layers": list(layer_names), "renamed": renamed, "inputs": list(input_names)}).encode()
        return cls(content=with_metadata(content, METADATA_KEY, payload))

    def int8_layers(self) -> list[str]:
        """The Keras layers (by the user's names) whose LiteRT ops read or write int8 tensors."""
        from inc_tf._flatbuffer import op_records

        found: dict[str, None] = {}
        for record in op_records(self.content):
            if record.op in ("QUANTIZE", "DEQUANTIZE"):
                continue
            if "int8" in record.input_dtypes or "int8" in record.output_dtypes:
                for name in self._layers_named_in((*record.output_names, *record.constant_inputs)):
                    found[name] = None
        return list(found)

    def _layers_named_in(self, names: tuple[str, ...]) -> list[str]:
        from inc_tf._keras_model import _traced_scopes

        scopes = {} if self.renamed else _traced_scopes(self.layer_names)
        out = []
        for name in names:
            for part in re.split(r"[;/:]", name):
                match = _TOKEN.fullmatch(part) if self.renamed else None
                if match and int(match.group(1)) < len(self.layer_names):
                    out.append(self.layer_names[int(match.group(1))])
                elif part in scopes:
                    out.append(self.layer_names[scopes[part]])
        return out

    def interpreter(self, *, threads: int | None = None) -> Any:
        """A fresh interpreter for this model (``threads`` defaults to every core)."""
        return interpreter(self.content, threads=threads)

    def signature_runner(self, *, threads: int | None = None) -> Invoker:
        """A callable taking the inputs by name (``runner(**model.feeds(batch))``) and returning the outputs by name."""
        return Invoker(self.interpreter(threads=threads))

    def __call__(self, inputs: Any) -> Any:
        """Run one batch: its output as numpy, or several as the Keras model returns them (a list, or a dict by
        name; :func:`inc_tf._outputs.as_keras_outputs`)."""
        from inc_tf._outputs import as_keras_outputs

        if self._interp is None:
            self._interp = self.signature_runner()
        return as_keras_outputs(self._interp(**self.feeds(inputs)))

    def predict(self, inputs: Any) -> Any:
        """Same as calling the model (named like Keras' ``predict``)."""
        return self(inputs)

    def feeds(self, inputs: Any) -> dict[str, np.ndarray]:
        """``inputs`` (array, tuple/list in input order, or mapping) as the signature runner's keyword arguments."""
        if isinstance(inputs, Mapping):
            missing = [n for n in self.input_names if n not in inputs]
            if missing:
                raise DatasetError(
                    f"Inputs are missing {missing}; the model takes {list(self.input_names)}. "
                    "Pass a mapping with every input name."
                )
            values = [inputs[n] for n in self.input_names]
        else:
            values = list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
        if len(values) != len(self.input_names):
            raise DatasetError(f"Got {len(values)} input array(s); the model takes {list(self.input_names)}.")
        from inc_tf._keras_model import cast_input

        # each input in the interpreter's own dtype: an integer input (an Embedding's codes) stays integer
        return {
            name: cast_input(np.asarray(value), dtype, where=f"input {name!r}")
            for name, value, dtype in zip(self.input_names, values, self.input_dtypes)
        }

    def tensor_dtypes(self) -> dict[str, str]:
        """Every tensor's name and dtype (``"int8"`` for quantized tensors) as the interpreter reports them."""
        details = self.interpreter(threads=1).get_tensor_details()
        return {d["name"]: np.dtype(d["dtype"]).name for d in details}

    def op_names(self) -> list[str]:
        """The builtin op of every node, in execution order (``CONV_2D``, ``FULLY_CONNECTED``, ``QUANTIZE``...)."""
        from inc_tf._flatbuffer import op_records

        return [record.op for record in op_records(self.content)]


def check_runs(model: LiteRTModel, batch: list[np.ndarray], what: str) -> None:
    """Run ``model`` once on ``batch`` (inputs in model order), as the user will, before it is returned.

    Raises:
        UnsupportedModelError: LiteRT refuses to prepare or run the INT8 model (a delegate rejecting a kernel).
    """
    try:
        model(batch)
    except DatasetError:
        raise
    except (RuntimeError, ValueError) as exc:
        raise UnsupportedModelError(
            f"The LiteRT INT8 model does not run on {what}: {_line(exc)}. Keep the layers around the failing "
            "op in float with QuantConfig(exclude=inc.LayerFilter(names=(...))), or use "
            "QuantConfig(format='savedmodel')."
        ) from exc


def _line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:400]
