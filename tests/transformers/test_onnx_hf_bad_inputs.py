"""Bad calibration data for an exported HF transformer: the error names the input and the limit the graph holds."""

from __future__ import annotations

import hf_models as hf
import pytest

import inc_core as inc
from inc_core.errors import DatasetError


def _quantize(path, batches):
    return inc.quantize(str(path), inc.QuantConfig(), dataset=inc.Dataset(batches))


@pytest.mark.parametrize("kind, limit", [("bert", hf.ONNX_POSITIONS), ("gpt2", hf.ONNX_POSITIONS), ("roberta", hf.ONNX_POSITIONS)])
def test_sequences_longer_than_the_position_table(onnx_small_export, kind, limit):
    path = onnx_small_export(kind)
    too_long = hf.onnx_token_batches(1, seq=limit + 16)
    with pytest.raises(DatasetError, match=rf"calibration batch 0: input 'input_ids' has sequences of {limit + 16} tokens, "
                       rf"but the model's position table '[^']+' \(\d+ rows\) allows at most {limit}\. "
                       rf"Truncate the data to {limit} tokens"):
        _quantize(path, too_long)
    # At the limit itself calibration goes through (RoBERTa's table has 2 more rows: positions start at 2).
    assert _quantize(path, hf.onnx_token_batches(1, seq=limit)) is not None


def test_token_ids_outside_the_vocabulary(onnx_small_export):
    batches = hf.onnx_token_batches(2)
    batches[1]["input_ids"][0, 3] = hf.ONNX_VOCAB + 7
    with pytest.raises(DatasetError, match=rf"calibration batch 1: input 'input_ids' holds id {hf.ONNX_VOCAB + 7}, outside "
                       rf"the model's table '.*word_embeddings.*' of {hf.ONNX_VOCAB} rows \(ids 0\.\.{hf.ONNX_VOCAB - 1}"):
        _quantize(onnx_small_export("bert"), batches)


def test_all_padding_samples(onnx_small_export):
    batches = hf.onnx_token_batches(1)
    batches[0]["attention_mask"][2] = 0
    with pytest.raises(DatasetError, match=r"calibration batch 0: sample\(s\) \[2\] of input 'attention_mask' are all padding"):
        _quantize(onnx_small_export("t5_encoder"), batches)


def test_mismatched_input_names(onnx_small_export):
    batch = hf.onnx_token_batches(1)[0]
    renamed = {"ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with pytest.raises(DatasetError, match=r"input names do not match the model\. Unknown: \['ids'\]; missing: \['input_ids'\]"):
        _quantize(onnx_small_export("gpt2"), [renamed])
