"""SQuAD v1.1 answer F1 and exact match, with the official answer normalization."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping
from typing import Any

from inc_core.errors import DatasetError
from inc_core.metrics._base import Metric

__all__ = ["SquadF1", "normalize_answer"]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """The official SQuAD v1.1 normalization: lowercase, drop punctuation and articles, squeeze whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _token_f1(prediction: str, truth: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(truth).split()
    same = sum((Counter(pred_tokens) & Counter(truth_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(truth_tokens)
    return 2.0 * precision * recall / (precision + recall)


class SquadF1(Metric):
    """SQuAD v1.1 token F1 of predicted answers, as the official evaluation script computes it.

    Each answer is normalized (:func:`normalize_answer`), split on whitespace, and scored by
    the F1 of the tokens it shares with a ground truth; a sample scores its best F1 over its
    ground truths, and :meth:`result` is the mean over samples. :attr:`exact_match` is the
    fraction of samples whose normalized answer equals a normalized ground truth. Both are
    fractions in [0, 1] (the official script prints them times 100). As in v1.1, an answer
    that normalizes to nothing has F1 0.

    ``update(preds, labels)``: ``preds`` is a sequence of predicted answer strings;
    ``labels`` holds, per prediction, a sequence of acceptable ground-truth strings (a single
    string counts as one ground truth; a mapping with a ``"text"`` key, as in the SQuAD JSON
    and Hugging Face ``answers`` records, gives its texts).
    """

    higher_is_better = True

    def _reset(self) -> None:
        self._f1_total = 0.0
        self._exact_total = 0

    def _update(self, preds: Any, labels: Any) -> int:
        owner = self._name
        answers = _strings(owner, "preds", preds)
        entries = _items(owner, "labels", labels)
        if len(answers) != len(entries):
            raise DatasetError(
                f"{owner}: {len(answers)} predicted answers but {len(entries)} ground-truth entries; give one "
                "sequence of ground truths per prediction."
            )
        truths = [_truths(owner, i, entry) for i, entry in enumerate(entries)]
        f1_total = 0.0
        exact = 0
        for answer, options in zip(answers, truths):
            f1_total += max(_token_f1(answer, truth) for truth in options)
            normalized = normalize_answer(answer)
            exact += any(normalized == normalize_answer(truth) for truth in options)
        self._f1_total += f1_total
        self._exact_total += exact
        return len(answers)

    def _compute(self) -> float:
        return self._f1_total / self._num_samples

    @property
    def exact_match(self) -> float:
        """Fraction of the samples seen whose normalized answer equals a normalized ground truth."""
        self._require_samples()
        return self._exact_total / self._num_samples


def _items(owner: str, name: str, value: Any) -> list[Any]:
    if isinstance(value, (str, bytes)):
        raise DatasetError(
            f"{owner}: {name} must be a sequence, got a single {type(value).__name__} {value[:40]!r}; wrap it in a list."
        )
    try:
        return list(value)
    except TypeError as exc:
        raise DatasetError(f"{owner}: {name} must be a sequence, got {type(value).__name__}.") from exc


def _strings(owner: str, name: str, value: Any) -> list[str]:
    items = _items(owner, name, value)
    for item in items:
        if not isinstance(item, str):
            raise DatasetError(
                f"{owner}: {name} must hold strings, got {type(item).__name__} {item!r}; decode or convert it first."
            )
    return items


def _truths(owner: str, index: int, entry: Any) -> list[str]:
    """The ground-truth strings of one sample."""
    if isinstance(entry, str):
        return [entry]
    if isinstance(entry, Mapping):
        if "text" not in entry:
            raise DatasetError(
                f"{owner}: labels[{index}] is a mapping without a 'text' key (keys: {sorted(map(str, entry))}); "
                "give the ground-truth strings, or a mapping with their list under 'text'."
            )
        entry = entry["text"]
        if isinstance(entry, str):
            return [entry]
    truths = _strings(owner, f"labels[{index}]", entry)
    if not truths:
        raise DatasetError(f"{owner}: labels[{index}] holds no ground-truth answer; give at least one string.")
    return truths
