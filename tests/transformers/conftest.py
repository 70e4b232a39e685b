"""Shared fixtures for the transformers tests: small-config Hugging Face models and the real all-MiniLM-L6-v2."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

# --- ONNX exports for tests/transformers/test_onnx_hf_*.py ---------------------------------------------------------

@pytest.fixture(scope="session")
def onnx_small_export(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``export(kind)``: the ONNX file of a small-config HF model (exported once per session and kind)."""
    import hf_models

    folder = tmp_path_factory.mktemp("onnx_hf")
    cache: dict[str, Path] = {}

    def export(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = hf_models.export_onnx(hf_models.onnx_small_model(kind), folder / f"{kind}.onnx")
        return cache[kind]

    return export


@pytest.fixture(scope="session")
def onnx_minilm_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """The real all-MiniLM-L6-v2 as an ONNX file, and its tokenizer."""
    import hf_models

    model, tokenizer = hf_models.onnx_minilm()
    path = hf_models.export_onnx(model, tmp_path_factory.mktemp("onnx_minilm") / "minilm.onnx")
    return path, tokenizer
