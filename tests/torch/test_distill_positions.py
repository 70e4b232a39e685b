"""DistillationLoss on per-position outputs: a language model's or token tagger's (batch, tokens, classes) logits and
a segmentation map's (batch, classes, height, width), against hand computations.

Before, per-token labels (batch, tokens) reached F.cross_entropy against logits read as (batch, classes, ...), a raw
"Expected target size" RuntimeError; the KL soft loss was divided by the batch alone (growing with the sequence
length, unlike the "ce" one), and a class map's soft targets were taken over its width instead of its classes.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch import nn

import inc_core as inc
import inc_torch
from inc_core.errors import ConfigError, UnsupportedModelError


class Fixed(nn.Module):
    """A 'teacher' that returns given logits, so the expected loss can be computed by hand."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _hand_loss(s: np.ndarray, t: np.ndarray, labels: np.ndarray, temperature: float) -> tuple[float, float]:
    """(task, soft) over rows ``s``/``t`` of shape (positions, classes), rows labelled -100 left out of both."""
    keep = labels != -100
    s, t, labels = s[keep], t[keep], labels[keep]
    ce = -_log_softmax(s)[np.arange(len(labels)), labels].mean()
    log_ps, log_pt = _log_softmax(s / temperature), _log_softmax(t / temperature)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(axis=-1).mean()
    return float(ce), float(temperature**2 * kl)


def _kd(teacher_logits: np.ndarray, **config: object) -> inc_torch.DistillationLoss:
    return inc_torch.DistillationLoss(Fixed(torch.from_numpy(teacher_logits)), inc.DistillConfig(**config))  # type: ignore[arg-type]


def test_per_token_logits_are_distilled_per_token_and_padding_is_left_out() -> None:
    rng = np.random.default_rng(0)
    s = rng.normal(size=(3, 7, 11)).astype(np.float32)  # (batch, tokens, vocabulary), a causal LM's logits
    t = rng.normal(size=(3, 7, 11)).astype(np.float32) * 2
    labels = rng.integers(0, 11, size=(3, 7))
    labels[0, 5:] = -100  # padding, Hugging Face's label for it
    labels[2, 1] = -100
    kd = _kd(t, temperature=2.0, loss_weights=(0.4, 0.6))
    loss = kd(torch.from_numpy(s), torch.zeros(3), torch.from_numpy(labels))
    ce, soft = _hand_loss(s.reshape(-1, 11), t.reshape(-1, 11), labels.reshape(-1), 2.0)
    assert kd.last["hard"] == pytest.approx(ce, rel=1e-5)
    assert kd.last["soft"] == pytest.approx(soft, rel=1e-5)
    assert float(loss) == pytest.approx(0.4 * ce + 0.6 * soft, rel=1e-5)


def test_the_soft_loss_is_a_mean_over_tokens_for_kl_and_ce_alike() -> None:
    rng = np.random.default_rng(1)
    s = rng.normal(size=(2, 1, 6)).astype(np.float32)
    t = rng.normal(size=(2, 1, 6)).astype(np.float32)
    per_sequence = {}
    for tokens in (1, 16):  # the same token repeated: a per-token mean does not change with the length
        for soft_loss in ("kl", "ce"):
            kd = _kd(np.repeat(t, tokens, axis=1), loss_weights=(0.0, 1.0), soft_loss=soft_loss)
            kd(torch.from_numpy(np.repeat(s, tokens, axis=1)), torch.zeros(2))
            per_sequence[tokens, soft_loss] = kd.last["soft"]
    assert per_sequence[16, "kl"] == pytest.approx(per_sequence[1, "kl"], rel=1e-5)
    assert per_sequence[16, "ce"] == pytest.approx(per_sequence[1, "ce"], rel=1e-5)


def test_a_class_map_is_distilled_over_its_classes_per_pixel() -> None:
    rng = np.random.default_rng(2)
    s = rng.normal(size=(2, 4, 3, 5)).astype(np.float32)  # (batch, classes, height, width): segmentation logits
    t = rng.normal(size=(2, 4, 3, 5)).astype(np.float32)
    labels = rng.integers(0, 4, size=(2, 3, 5))
    kd = _kd(t, temperature=3.0, loss_weights=(0.5, 0.5))
    kd(torch.from_numpy(s), torch.zeros(2), torch.from_numpy(labels))
    rows = lambda x: np.moveaxis(x, 1, -1).reshape(-1, 4)  # noqa: E731
    ce, soft = _hand_loss(rows(s), rows(t), labels.reshape(-1), 3.0)
    assert kd.last["hard"] == pytest.approx(ce, rel=1e-5)
    assert kd.last["hard"] == pytest.approx(float(nn.functional.cross_entropy(torch.from_numpy(s), torch.from_numpy(labels))), rel=1e-5)
    assert kd.last["soft"] == pytest.approx(soft, rel=1e-5)


class SegmentationHead(nn.Module):
    """Returns what torchvision's segmentation models return: {"out": class map, "aux": auxiliary class map}."""

    def __init__(self, out: torch.Tensor, aux: torch.Tensor) -> None:
        super().__init__()
        self.out, self.aux = out, aux

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return collections.OrderedDict(out=self.out, aux=self.aux)


def test_segmentation_outputs_are_distilled_on_their_out_map() -> None:
    rng = np.random.default_rng(4)
    s, t, aux = (torch.from_numpy(rng.normal(size=(2, 4, 3, 5)).astype(np.float32)) for _ in range(3))
    labels = torch.from_numpy(rng.integers(0, 4, size=(2, 3, 5)))
    kd = inc_torch.DistillationLoss(SegmentationHead(t, aux), inc.DistillConfig(temperature=2.0))
    plain = inc_torch.DistillationLoss(Fixed(t), inc.DistillConfig(temperature=2.0))
    expected = float(plain(s, torch.zeros(2), labels))
    assert float(kd(SegmentationHead(s, aux)(None), torch.zeros(2), labels)) == pytest.approx(expected, rel=1e-6)
    assert float(kd(s, torch.zeros(2), labels)) == pytest.approx(expected, rel=1e-6)
    two = inc_torch.DistillationLoss(Fixed({"main": t, "extra": aux}), inc.DistillConfig())  # type: ignore[arg-type]
    with pytest.raises(UnsupportedModelError, match=r"keys \['main', 'extra'\]; expected the logits under one of"):
        two(s, torch.zeros(2), labels)


def test_integer_labels_of_any_width_are_class_indices() -> None:
    rng = np.random.default_rng(3)
    s, t = rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=(4, 5)).astype(np.float32)
    labels = np.array([0, 4, 2, 1])
    by_dtype = {}
    for dtype in (torch.int64, torch.int32, torch.uint8):  # F.cross_entropy alone takes int64 only
        kd = _kd(t, loss_weights=(1.0, 0.0))
        kd(torch.from_numpy(s), torch.zeros(4), torch.from_numpy(labels).to(dtype))
        by_dtype[dtype] = kd.last["hard"]
    assert by_dtype[torch.int32] == by_dtype[torch.uint8] == by_dtype[torch.int64]


def test_probability_labels_are_read_per_position() -> None:
    rng = np.random.default_rng(4)
    s = rng.normal(size=(2, 3, 5)).astype(np.float32)
    soft_labels = np.exp(_log_softmax(rng.normal(size=(2, 3, 5)))).astype(np.float32)
    kd = _kd(s, loss_weights=(1.0, 0.0))
    kd(torch.from_numpy(s), torch.zeros(2), torch.from_numpy(soft_labels))
    expected = -(soft_labels * _log_softmax(s)).sum(axis=-1).mean()
    assert kd.last["hard"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.zeros(3, 6, dtype=torch.long), "labels of shape (3, 6) do not fit logits of shape (3, 7, 11)"),
        (torch.zeros(3, 7, 2, dtype=torch.long), "class-index labels have the logits' shape without the class dimension"),
        (torch.zeros(3, 7, 4), "probability labels of shape (3, 7, 4) do not fit logits of shape (3, 7, 11)"),
        (torch.zeros(3, 7, dtype=torch.bool), "labels must be class indices (an integer tensor), got torch.bool"),
        (np.zeros((3, 7), dtype=np.int64), "labels must be a torch.Tensor of class indices, got ndarray"),
    ],
)
def test_labels_that_do_not_fit_the_logits_name_both_shapes(labels: object, message: str) -> None:
    kd = _kd(np.zeros((3, 7, 11), np.float32))
    with pytest.raises(ConfigError) as caught:
        kd(torch.zeros(3, 7, 11), torch.zeros(3), labels)
    assert message in str(caught.value)


def test_every_position_padded_gives_no_soft_loss() -> None:
    kd = _kd(np.random.default_rng(5).normal(size=(2, 4, 3)).astype(np.float32), loss_weights=(0.0, 1.0))
    student = torch.zeros(2, 4, 3, requires_grad=True)
    loss = kd(student, torch.zeros(2), torch.full((2, 4), -100))
    loss.backward()  # still part of the graph
    assert float(loss.detach()) == 0.0 and student.grad is not None


def test_a_token_tagger_student_learns_from_its_teacher_per_token() -> None:
    """A real loop on per-token outputs: the student reaches the teacher's tags, and its soft loss falls."""
    torch.manual_seed(0)
    vocabulary, tags = 40, 5

    def tagger(width: int) -> nn.Module:
        return nn.Sequential(nn.Embedding(vocabulary, width), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, tags))

    teacher, student = tagger(32), tagger(8)
    tokens = torch.randint(0, vocabulary, (64, 12))
    rule = (tokens * 7 + 3) % tags  # each token's tag, which the teacher learns first
    teacher_optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(100):
        teacher_optimizer.zero_grad()
        nn.functional.cross_entropy(teacher(tokens).reshape(-1, tags), rule.reshape(-1)).backward()
        teacher_optimizer.step()
    teacher.eval()
    with torch.no_grad():
        teacher_tags = teacher(tokens).argmax(-1)
    labels = teacher_tags.clone()
    labels[:, 9:] = -100  # padded tails
    kd = inc_torch.DistillationLoss(teacher, inc.DistillConfig(temperature=2.0, loss_weights=(0.5, 0.5)))
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    soft_losses = []
    for _ in range(150):
        optimizer.zero_grad()
        kd(student(tokens), tokens, labels).backward()
        optimizer.step()
        soft_losses.append(kd.last["soft"])
    with torch.no_grad():
        agreement = (student(tokens).argmax(-1)[:, :9] == teacher_tags[:, :9]).float().mean()
    assert soft_losses[-1] < 0.5 * soft_losses[0]
    assert float(agreement) > 0.9


def test_a_task_loss_of_the_users_own_reads_labels_of_any_shape() -> None:
    """Labels that fit no class dimension are the user's business when their own task_loss reads them."""
    rng = np.random.default_rng(6)
    s = torch.from_numpy(rng.normal(size=(3, 7, 11)).astype(np.float32))
    targets = torch.zeros(3, 2, dtype=torch.long)  # e.g. a span's start and end token

    def span_loss(logits: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
        return logits[:, :, 0].logsumexp(-1).mean() * 0 + spans.float().mean()

    kd = inc_torch.DistillationLoss(Fixed(s.clone()), inc.DistillConfig(loss_weights=(0.5, 0.5)), task_loss=span_loss)
    kd(s, torch.zeros(3), targets)
    assert kd.last["hard"] == 0.0 and kd.last["soft"] == pytest.approx(0.0, abs=1e-6)
