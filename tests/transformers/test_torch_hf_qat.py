"""QAT of a transformers model in a Hugging Face style loop: ``model(**batch).loss`` with the labels in the batch,
then an INT8 model that takes the inputs alone."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers as tf

import inc_core as inc
import inc_torch
from inc_core.errors import UnsupportedModelError

MARK = 7  # a sequence is positive when it holds this token


def _task(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Batches of 32 padded sequences, with labels: does the sequence hold token MARK?"""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(10, 200, (32, 16), generator=g)
        mask = torch.ones_like(ids)
        lengths = torch.randint(8, 17, (32,), generator=g)
        labels = (torch.rand(32, generator=g) < 0.5).long()
        for row in range(32):
            if labels[row]:
                ids[row, torch.randint(1, int(lengths[row]), (1,), generator=g)] = MARK
            ids[row, lengths[row]:], mask[row, lengths[row]:] = 0, 0
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def _classifier() -> tf.BertForSequenceClassification:
    torch.manual_seed(0)
    return tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=32, num_labels=2,
    ))


def _train(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], lr: float) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr)
    model.train()
    for batch in batches:
        loss = model(**batch).loss  # the head's own loss, as in a Hugging Face loop
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def _accuracy(logits: torch.Tensor, batches: list[dict[str, torch.Tensor]]) -> float:
    labels = torch.cat([b["labels"] for b in batches])
    return float((logits.argmax(-1) == labels).float().mean())


def test_a_transformers_model_trains_on_its_own_loss_and_its_int8_model_takes_the_inputs_alone():
    """Before, labels in ``example_inputs`` were captured with the model: the QAT model trained on its loss, but the
    INT8 model computed it too and could only be called with labels ("forward() missing 1 required positional
    argument: 'labels'")."""
    train, test = _task(30, seed=0), _task(4, seed=1)
    model = _classifier()
    _train(model, train * 2, 1e-3)
    qat = inc_torch.prepare_qat(model, inc.QATConfig(freeze_observer_step=20), train[0])
    _train(qat, train, 1e-4)
    inputs = [{k: v for k, v in b.items() if k != "labels"} for b in test]
    with torch.no_grad():
        qat_logits = torch.cat([qat(**b, labels=b2["labels"]).logits for b, b2 in zip(inputs, test)])
    int8 = inc_torch.convert(qat)
    assert list(inspect.signature(int8.graph_module.forward).parameters) == ["input_ids", "attention_mask"]
    outputs = [int8(**b) for b in inputs]
    assert all(o.loss is None for o in outputs)
    int8_logits = torch.cat([o.logits for o in outputs])
    assert inc.resolve_backend(int8).int8_op_counts(int8) == {"linear": 14, "embedding": 3}
    assert torch.nn.functional.cosine_similarity(int8_logits.flatten(), qat_logits.flatten(), dim=0) > 0.99
    assert _accuracy(int8_logits, test) >= _accuracy(qat_logits, test) - 0.02 >= 0.9
    assert qat(**train[0]).loss is not None  # the user's QAT model still takes its labels


def test_the_hugging_face_trainer_trains_the_qat_model(tmp_path):
    """``transformers.Trainer`` calls ``model(**batch)`` with the labels and reads ``.loss``; it drops the dataset
    columns ``forward`` does not name, so the QAT model's signature must name them."""
    train, test = _task(30, seed=0), _task(4, seed=1)
    model = _classifier()
    _train(model, train * 2, 1e-3)
    qat = inc_torch.prepare_qat(model, inc.QATConfig(freeze_observer_step=20), train[0])
    rows = [{key: value[row] for key, value in batch.items()} for batch in train for row in range(32)]
    args = tf.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=32, num_train_epochs=1, learning_rate=1e-4,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    result = tf.Trainer(model=qat, args=args, train_dataset=rows).train()
    assert result.global_step == 30 and result.training_loss < 0.1
    assert qat._inc_qat_state.steps == 30 and qat._inc_qat_state.observers_frozen  # the freeze step counted
    int8 = inc_torch.convert(qat)
    logits = torch.cat([int8(**{k: v for k, v in b.items() if k != "labels"}).logits for b in test])
    assert _accuracy(logits, test) >= 0.9


def test_qat_and_int8_models_of_a_transformer_attend_without_dropout_at_inference():
    """The training-mode export writes a transformers model's attention dropout into each
    ``scaled_dot_product_attention`` as a constant (0.1); torchao's eval switch rewrites ``aten.dropout`` only, so
    the QAT model in eval mode and its INT8 model dropped attention weights at random: two calls on one batch
    differed by up to 1.26, and BERT's hidden states were at cosine 0.98 to FP32 (PTQ: 0.9998)."""
    from torch_hf_helpers import small_model, token_batches

    model = small_model("bert")
    batches = [{k: torch.from_numpy(v) for k, v in b.items()} for b in token_batches(8, seed=0)]
    with torch.no_grad():
        reference = [model(**b).last_hidden_state for b in batches]
    qat = inc_torch.prepare_qat(model, inc.QATConfig(freeze_observer_step=8), batches[0])
    for batch in batches + batches[:1]:  # training steps (observing; the ninth freezes the ranges)
        qat(**batch).last_hidden_state.sum().backward()
    attention = [n for n in qat.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert attention and all(n.args[4] == 0.1 for n in attention)  # trains with the model's dropout
    qat.eval()
    with torch.no_grad():
        first, again = (qat(**batches[0]).last_hidden_state for _ in range(2))
    assert torch.equal(first, again)
    int8 = inc_torch.convert(qat)
    outputs = [int8(**b).last_hidden_state for b in batches]
    assert torch.equal(outputs[0], int8(**batches[0]).last_hidden_state)
    cosine = min(torch.nn.functional.cosine_similarity(o.flatten(), r.flatten(), dim=0) for o, r in zip(outputs, reference))
    assert cosine > 0.999, cosine
    qat.train()
    assert all(n.args[4] == 0.1 for n in attention)


def test_a_transformers_drop_path_is_off_in_the_evaluated_and_the_int8_qat_model():
    """transformers writes stochastic depth (Swin, BEiT, ConvNeXt; Swin's default ``drop_path_rate`` is 0.1) as
    ``input.div(keep) * floor(keep + rand(shape))``, not as a Bernoulli draw: the PT2E QAT model in eval mode and its
    INT8 model dropped blocks at random. Evaluation multiplies by ``keep`` (the input itself); the INT8 graph keeps
    neither the draw nor the division."""
    torch.manual_seed(0)
    config = tf.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4, drop_path_rate=0.5,
    )
    model = tf.SwinModel(config).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        reference = model(pixel_values=x).last_hidden_state
    qat = inc_torch.prepare_qat(model, inc.QATConfig(freeze_observer_step=1), {"pixel_values": x})
    for _ in range(2):
        qat(pixel_values=x).last_hidden_state.sum().backward()
    with torch.no_grad():
        assert not torch.equal(*(qat(pixel_values=x).last_hidden_state for _ in range(2)))  # training: dropped
        qat.eval()
        evaluated = [qat(pixel_values=x).last_hidden_state for _ in range(3)]
    assert all(torch.equal(evaluated[0], other) for other in evaluated[1:])
    int8 = inc_torch.convert(qat)
    assert not [n for n in int8.graph_module.graph.nodes if str(n.target) in ("aten.rand.default", "aten.floor.default")]
    outputs = [int8(pixel_values=x).last_hidden_state for _ in range(3)]
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])
    assert torch.nn.functional.cosine_similarity(outputs[0].flatten(), reference.flatten(), dim=0) > 0.999
    qat.train()
    with torch.no_grad():
        assert not torch.equal(*(qat(pixel_values=x).last_hidden_state for _ in range(2)))  # the masks are back


def test_a_seq2seq_model_whose_decoder_reads_the_labels_is_refused_before_training():
    torch.manual_seed(0)
    model = tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0, use_cache=False,
    )).eval()
    ids = torch.randint(2, 128, (4, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(2, 128, (4, 6))}
    with pytest.raises(UnsupportedModelError, match=r"output\(s\) \['logits'\] from its labels.*decoder_input_ids"):
        inc_torch.prepare_qat(model, inc.QATConfig(), batch)
    # the way out the message names: the decoder's inputs in the batch, the labels for the loss alone
    batch["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    qat = inc_torch.prepare_qat(model, inc.QATConfig(), batch)
    qat(**batch).loss.backward()
    int8 = inc_torch.convert(qat.eval())
    output = int8(**{k: v for k, v in batch.items() if k != "labels"})
    assert output.loss is None and output.logits.shape == (4, 6, 128)
