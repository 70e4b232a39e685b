"""A static PT2E INT8 transformer calibrated at one sequence length runs at others, as the FP32 model does.

The token-sequence dimension of integer inputs is captured dynamic, so a BERT-shaped model calibrated
on 16- and 12-token batches serves 24- and 9-token batches with mean-pooled cosine >= 0.99 against FP32, also
after a save/load round trip. A model whose forward fixes the length says so, with that length, in an
inc error instead of torch's guard assertion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch_hf_helpers import cosine_metric, small_model, token_batches

import inc_core as inc
import inc_torch
from inc_core.errors import DatasetError

GOAL = 0.99


def test_static_bert_runs_at_other_sequence_lengths(tmp_path: Path) -> None:
    model = small_model("bert")
    # Calibration batches of two lengths go through one captured graph and its observers.
    calibration = token_batches(3, seed=0, seq=16) + token_batches(1, seed=3, seq=12)
    quantized = inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset(calibration))
    assert isinstance(quantized, inc_torch.CompiledQuantizedModule)
    longer, shorter = token_batches(2, seed=1, seq=24), token_batches(2, seed=2, seq=9)
    for batches in (longer, shorter):
        assert cosine_metric(model, batches)(quantized) >= GOAL

    path = tmp_path / "bert.pt2"
    inc.save(quantized, path)
    loaded = inc.load(path)
    assert cosine_metric(model, longer)(loaded) >= GOAL
    targets = {str(n.target) for n in quantized.graph_module.graph.nodes if n.op == "call_function"}
    assert any("quantize_per_tensor" in t for t in targets)
    assert torch.is_tensor(loaded(**{k: torch.from_numpy(v) for k, v in longer[0].items()}).last_hidden_state)


class _FlattenedTokens(torch.nn.Module):
    """Embeds 16 tokens and flattens them into one Linear: its forward needs exactly 16 tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(16 * 8, 4)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids).flatten(1))


@pytest.mark.parametrize("runtime", ["compile", "aoti"])
def test_fixed_length_model_names_the_captured_length(runtime: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    batches = [{"input_ids": rng.integers(0, 50, size=(4, 16)).astype(np.int64)} for _ in range(2)]
    quantized = inc.quantize(_FlattenedTokens().eval(), inc.QuantConfig(), dataset=inc.Dataset(batches))
    quantized.runtime = runtime
    assert quantized(input_ids=torch.randint(0, 50, (3, 16))).shape == (3, 4)
    models = [quantized]
    if runtime == "compile":  # a loaded model runs through torch.compile until its runtime is set
        inc.save(quantized, tmp_path / "fixed.pt2")
        models.append(inc.load(tmp_path / "fixed.pt2"))
    for model in models:
        with pytest.raises(DatasetError, match=r"'input_ids' dimension 1 of size 16 \(got 12\).*Calibrate with batches"):
            model(input_ids=torch.randint(0, 50, (3, 12)))
