"""A converted model's outputs handed back the way the Keras model returns them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["as_keras_outputs"]

# The names TF's converter and export give the outputs of a model returning a list (or one tensor).
_NUMBERED = re.compile(r"output_(\d+)")


def as_keras_outputs(named: Mapping[str, Any]) -> Any:
    """One output as an array; several as the Keras model returned them: a list in order when the signature
    numbers them (``output_0``, ``output_1``... ``output_10`` after ``output_9``), else a dict by output name."""
    if len(named) == 1:
        return np.asarray(next(iter(named.values())))
    numbered = {}
    for name, value in named.items():
        match = _NUMBERED.fullmatch(name)
        if match is None:
            return {key: np.asarray(array) for key, array in named.items()}
        numbered[int(match.group(1))] = np.asarray(value)
    return [numbered[index] for index in sorted(numbered)]
