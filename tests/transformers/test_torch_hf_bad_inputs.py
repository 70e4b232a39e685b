"""Bad calibration data for transformers models on the torch backend: an inc DatasetError naming the input and
the limit, raised before any export, instead of an IndexError from inside an embedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_hf_helpers import POSITIONS, VOCAB, small_model, token_batches

import inc_core as inc
from inc_core.errors import DatasetError


def _quantize(model: torch.nn.Module, batches: list[dict[str, np.ndarray]]) -> None:
    inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset(batches))


@pytest.mark.parametrize("kind", ["bert", "roberta", "gpt2"])
def test_sequences_longer_than_the_position_table(kind: str) -> None:
    model = small_model(kind)
    long = token_batches(1, seed=0, batch=2, seq=POSITIONS + 8)
    with pytest.raises(DatasetError) as info:
        _quantize(model, long)
    message = str(info.value)
    assert "input_ids" in message
    assert f"{POSITIONS + 8} tokens" in message
    assert f"{POSITIONS} positions" in message  # RoBERTa's table has 2 more rows, offset by padding_idx + 1


def test_token_ids_outside_the_vocabulary_in_a_later_batch() -> None:
    batches = token_batches(2, seed=0, batch=2)
    batches[1]["input_ids"][0, 0] = VOCAB + 5
    with pytest.raises(DatasetError) as info:
        _quantize(small_model("bert"), batches)
    message = str(info.value)
    assert "Calibration batch 1" in message
    assert f"'input_ids' holds id {VOCAB + 5}" in message and f"vocab_size={VOCAB}" in message


def test_negative_token_ids() -> None:
    batches = token_batches(1, seed=0, batch=2)
    batches[0]["input_ids"][1, 3] = -1
    with pytest.raises(DatasetError, match=r"'input_ids' holds id -1"):
        _quantize(small_model("t5_encoder"), batches)


def test_a_sample_of_padding_only() -> None:
    batches = token_batches(1, seed=0, batch=4)
    batches[0]["attention_mask"][2] = 0
    with pytest.raises(DatasetError) as info:
        _quantize(small_model("bert"), batches)
    message = str(info.value)
    assert "sample(s) [2] of input 'attention_mask' are all padding" in message


def test_input_names_the_model_does_not_take() -> None:
    batch = token_batches(1, seed=0, batch=2)[0]
    renamed = {"input_ids": batch["input_ids"], "attn_mask": batch["attention_mask"]}
    with pytest.raises(DatasetError) as info:
        _quantize(small_model("gpt2"), [renamed])
    message = str(info.value)
    assert "['attn_mask']" in message and "attention_mask" in message


def test_the_users_model_is_left_as_it_was() -> None:
    model = small_model("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m).__name__ for m in model.modules()]
    with pytest.raises(DatasetError):
        _quantize(model, token_batches(1, seed=0, batch=2, seq=POSITIONS + 1))
    assert [type(m).__name__ for m in model.modules()] == types  # Conv1D not swapped in the user's model
    assert model.config.use_cache is True
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
