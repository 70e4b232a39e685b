"""Calibration batches from a Hugging Face data collator carry the labels next to the model inputs.

Captured with them, the INT8 graph computed the loss and could only be called with labels ("forward() missing 1
required positional argument: 'labels'", a raw TypeError at the first call without them). The label arguments
of a transformers model (``labels``, a QA head's ``start_positions``/``end_positions``) are left out of the capture.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import inc_core as inc
import inc_torch  # noqa: F401  (registers the backend)

SEQ = 16


def _rows(count: int, labels: dict[str, int]) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        {
            "input_ids": torch.randint(5, 100, (SEQ,), generator=generator),
            "attention_mask": torch.ones(SEQ, dtype=torch.long),
            **{name: torch.tensor(i % high) for name, high in labels.items()},
        }
        for i in range(count)
    ]


@pytest.mark.parametrize(
    ("head", "labels"),
    [
        (transformers.BertForSequenceClassification, {"labels": 3}),
        (transformers.BertForQuestionAnswering, {"start_positions": SEQ, "end_positions": SEQ}),
    ],
    ids=["classifier", "question-answering"],
)
def test_a_model_calibrated_on_collated_batches_with_labels_runs_without_them(head, labels) -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        num_labels=3 if "labels" in labels else 2,  # a QA head scores start and end
    )
    model = head(config).eval()
    loader = torch.utils.data.DataLoader(_rows(32, labels), batch_size=8)  # default collate: dicts of stacked tensors
    quantized = inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset(loader))
    inputs = {key: value for key, value in next(iter(loader)).items() if key not in labels}
    expected, got = model(**inputs), quantized(**inputs)
    for name in ("logits",) if "labels" in labels else ("start_logits", "end_logits"):
        reference, result = getattr(expected, name), got[name]
        assert torch.nn.functional.cosine_similarity(result.flatten(), reference.flatten(), 0) > 0.99


def test_a_seq2seq_model_from_batches_of_inputs_and_labels_only() -> None:
    # A collator made without the model gives T5 its labels and no decoder input; the model itself would start
    # its decoder from the labels shifted right. And T5's decoder holds a config of its own whose use_cache
    # stayed on: torch.export met its EncoderDecoderCache output ("unrecognized type ... at output 1").
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0, pad_token_id=0
    )
    model = transformers.T5ForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(1)
    rows = [
        {
            "input_ids": torch.randint(2, 100, (12,), generator=generator),
            "attention_mask": torch.ones(12, dtype=torch.long),
            "labels": torch.randint(2, 100, (6,), generator=generator),
        }
        for _ in range(16)
    ]
    batch = next(iter(torch.utils.data.DataLoader(rows, batch_size=8)))
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=batch["labels"]),
    }
    expected = model(**inputs).logits
    for calibration in (inc.Dataset([inputs]), inc.Dataset(torch.utils.data.DataLoader(rows, batch_size=8))):
        quantized = inc.quantize(model, inc.QuantConfig(), dataset=calibration)
        assert torch.nn.functional.cosine_similarity(quantized(**inputs)["logits"].flatten(), expected.flatten(), 0) > 0.99
