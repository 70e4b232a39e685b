"""Distilling a Hugging Face causal language model with inc_torch.DistillationLoss in a plain loop.

The student's output is HF's ``CausalLMOutputWithPast`` with per-token logits (batch, tokens, vocabulary); labels
are the next tokens with -100 where there is none (HF's convention). Before, those labels reached F.cross_entropy
as (batch, classes) targets and the loss raised a raw "Expected target size" RuntimeError.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import inc_core as inc
import inc_torch


def _llama(layers: int, seed: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
    )
    return transformers.LlamaForCausalLM(config)


def _next_token_labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The token each position predicts; -100 after the last one and on padding."""
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
    return labels


def test_the_task_loss_is_the_models_own_language_modelling_loss() -> None:
    teacher, student = _llama(2, seed=0).eval(), _llama(1, seed=1)
    ids = torch.randint(0, 96, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded sequence
    labels = _next_token_labels(ids, mask)
    kd = inc_torch.DistillationLoss(teacher, inc.DistillConfig(temperature=2.0, loss_weights=(0.5, 0.5)))
    batch = {"input_ids": ids, "attention_mask": mask}
    kd(student(**batch), batch, labels)
    hf_labels = torch.where(mask.bool(), ids, -100)  # HF shifts these itself
    assert kd.last["hard"] == pytest.approx(float(student(**batch, labels=hf_labels).loss), rel=1e-5)
    assert kd.last["soft"] > 0


def test_a_one_layer_student_distils_from_a_trained_two_layer_teacher() -> None:
    teacher, student = _llama(2, seed=0), _llama(1, seed=1)
    # Sequences that follow a fixed rule (each token is the previous one plus 7): learnable in a few steps.
    starts = torch.randint(0, 96, (32, 1))
    ids = (starts + 7 * torch.arange(12)) % 96
    mask = torch.ones_like(ids)
    labels = _next_token_labels(ids, mask)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for _ in range(60):
        optimizer.zero_grad()
        teacher(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    teacher.eval()
    kd = inc_torch.DistillationLoss(teacher, inc.DistillConfig(temperature=2.0, loss_weights=(0.5, 0.5)))
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    soft = []
    for _ in range(60):
        optimizer.zero_grad()
        kd(student(input_ids=ids), {"input_ids": ids}, labels).backward()
        optimizer.step()
        soft.append(kd.last["soft"])
    with torch.no_grad():
        predicted = student(input_ids=ids).logits.argmax(-1)[:, :-1]
    assert soft[-1] < 0.5 * soft[0]
    assert float((predicted == ids[:, 1:]).float().mean()) > 0.9


def test_a_collated_batch_reaches_the_teacher_without_its_labels() -> None:
    # kd(student(**batch), batch, batch["labels"]) with the collator's batch: the teacher would compute a loss of
    # its own from the labels (wasted, and failing where its head reads labels differently)
    teacher, student = _llama(2, seed=0).eval(), _llama(1, seed=1)
    seen: list[set[str]] = []
    teacher.register_forward_pre_hook(lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    ids = torch.randint(0, 96, (2, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    kd = inc_torch.DistillationLoss(teacher, inc.DistillConfig(loss_weights=(0.0, 1.0)))
    kd(student(**batch).logits, batch)
    assert seen == [{"input_ids", "attention_mask"}]
    assert kd.last["soft"] > 0
