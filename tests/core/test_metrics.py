"""inc_core.metrics against scikit-learn / scipy on the same data, streamed in uneven batches."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import numpy as np
import pytest
from scipy import special, stats
from sklearn import metrics as skm

from inc_core import metrics
from inc_core.errors import ConfigError, DatasetError, EvaluationError, IncError

# Uneven batch boundaries, including an empty batch, so streaming is exercised at odd offsets.
SPLITS = (0, 1, 17, 17, 64, 150)


def stream(metric: metrics.Metric, preds: Any, labels: Any, splits: tuple[int, ...] = SPLITS) -> float:
    """Feed preds/labels in the batches given by `splits` and return the result."""
    bounds = [*splits, len(preds)]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        metric.update(preds[start:stop], labels[start:stop])
    assert metric.num_samples == len(preds)
    return metric.result()


def one_shot(metric_type: type[metrics.Metric], preds: Any, labels: Any, **kwargs: Any) -> float:
    metric = metric_type(**kwargs)
    metric.update(preds, labels)
    return metric.result()


def sk_log_loss(y_true: np.ndarray, proba: np.ndarray, **kwargs: Any) -> float:
    # scikit-learn 1.9 renamed y_pred to y_proba; support both spellings.
    name = "y_proba" if "y_proba" in inspect.signature(skm.log_loss).parameters else "y_pred"
    return float(skm.log_loss(y_true, **{name: proba}, **kwargs))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# --------------------------------------------------------------------------- TopK


@pytest.mark.parametrize("k", [1, 2, 5])
def test_topk_matches_sklearn_streamed_and_one_shot(rng: np.random.Generator, k: int) -> None:
    scores = rng.normal(size=(300, 7))
    labels = rng.integers(0, 7, size=300)
    expected = skm.top_k_accuracy_score(labels, scores, k=k, labels=np.arange(7))
    assert stream(metrics.TopK(k=k), scores, labels) == pytest.approx(expected, abs=1e-12)
    assert one_shot(metrics.TopK, scores, labels, k=k) == pytest.approx(expected, abs=1e-12)
    one_hot = np.eye(7)[labels]
    assert stream(metrics.TopK(k=k), scores, one_hot) == pytest.approx(expected, abs=1e-12)


def test_topk_class_id_preds_match_accuracy(rng: np.random.Generator) -> None:
    preds = rng.integers(0, 4, size=300)
    labels = rng.integers(0, 4, size=300)
    expected = skm.accuracy_score(labels, preds)
    assert stream(metrics.TopK(), preds, labels) == pytest.approx(expected)
    assert stream(metrics.TopK(), preds.reshape(-1, 1).astype(float), labels.reshape(-1, 1)) == pytest.approx(expected)


def test_topk_ties_break_towards_lower_class_like_argmax(rng: np.random.Generator) -> None:
    # Quantized outputs tie often; k=1 must equal the accuracy of argmax (first max wins).
    scores = rng.integers(0, 3, size=(400, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=400)
    expected = skm.accuracy_score(labels, scores.argmax(axis=1))
    assert stream(metrics.TopK(k=1), scores, labels) == pytest.approx(expected)
    tied = np.array([[1.0, 1.0, 0.0]] * 3)
    for label, top1, top2 in [(0, 1.0, 1.0), (1, 0.0, 1.0), (2, 0.0, 0.0)]:
        assert one_shot(metrics.TopK, tied, [label] * 3, k=1) == top1
        assert one_shot(metrics.TopK, tied, [label] * 3, k=2) == top2


def test_topk_errors() -> None:
    with pytest.raises(ConfigError, match=r"TopK: k must be >= 1, got 0"):
        metrics.TopK(k=0)
    with pytest.raises(ConfigError, match=r"TopK: k must be an int, got 1.5"):
        metrics.TopK(k=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        metrics.TopK(2)  # type: ignore[call-arg]
    metric = metrics.TopK(k=5)
    with pytest.raises(DatasetError, match=r"only 3 classes .*choose k <= 3"):
        metric.update(np.zeros((2, 3)), [0, 1])
    with pytest.raises(DatasetError, match=r"class ids, which only support k=1.*scores of shape \(N, C\)"):
        metric.update(np.array([0, 1]), [0, 1])
    with pytest.raises(DatasetError, match=r"preds hold 2 samples .* labels hold 3"):
        metrics.TopK().update(np.zeros((2, 3)), [0, 1, 2])
    with pytest.raises(DatasetError, match=r"class id 3, outside \[0, 3\)"):
        metrics.TopK().update(np.zeros((2, 3)), [0, 3])
    with pytest.raises(DatasetError, match=r"one-hot labels of shape \(2, 4\) do not match preds with 3 classes"):
        metrics.TopK().update(np.zeros((2, 3)), np.eye(4)[:2])
    with pytest.raises(DatasetError, match=r"non-integer values such as 0.5"):
        metrics.TopK().update([0.5, 1.0], [0, 1])
    with pytest.raises(DatasetError, match=r"must hold real numbers, got dtype <U1"):
        metrics.TopK().update(["a", "b"], [0, 1])
    with pytest.raises(EvaluationError, match=r"preds hold 1 NaN or Inf values out of 6"):
        metrics.TopK().update(np.array([[0.0, np.nan, 1.0], [1.0, 2.0, 3.0]]), [0, 1])


# --------------------------------------------------------------------------- F1 and MCC


@pytest.mark.parametrize("average", ["macro", "micro"])
def test_f1_multiclass_matches_sklearn(rng: np.random.Generator, average: str) -> None:
    labels = rng.integers(0, 5, size=300)
    preds = np.where(rng.random(300) < 0.6, labels, rng.integers(0, 6, size=300))  # class 5 only predicted
    expected = skm.f1_score(labels, preds, average=average)
    assert stream(metrics.F1(average=average), preds, labels) == pytest.approx(expected, abs=1e-12)
    assert one_shot(metrics.F1, preds, labels, average=average) == pytest.approx(expected, abs=1e-12)


def test_f1_macro_takes_argmax_of_scores(rng: np.random.Generator) -> None:
    scores = rng.normal(size=(300, 4))
    labels = rng.integers(0, 4, size=300)
    expected = skm.f1_score(labels, scores.argmax(axis=1), average="macro")
    assert stream(metrics.F1(average="macro"), scores, np.eye(4)[labels]) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("pos_label", [0, 1])
def test_f1_binary_matches_sklearn(rng: np.random.Generator, pos_label: int) -> None:
    labels = rng.integers(0, 2, size=300)
    preds = np.where(rng.random(300) < 0.7, labels, 1 - labels)
    expected = skm.f1_score(labels, preds, pos_label=pos_label)
    assert stream(metrics.F1(pos_label=pos_label), preds, labels) == pytest.approx(expected, abs=1e-12)


def test_f1_binary_with_minus_one_labels_and_undefined_cases() -> None:
    labels = np.array([-1, 1, 1, -1, 1, -1])
    preds = np.array([-1, 1, -1, 1, 1, -1])
    expected = skm.f1_score(labels, preds, pos_label=1)
    assert one_shot(metrics.F1, preds, labels) == pytest.approx(expected)
    # No positive sample and no positive prediction: F1 is undefined and counts as 0, as in scikit-learn.
    assert one_shot(metrics.F1, [0, 0, 0], [0, 0, 0]) == 0.0


def test_f1_errors() -> None:
    with pytest.raises(
        ConfigError, match=r"average='weighted' is not supported; choose one of 'binary', 'macro', 'micro'"
    ):
        metrics.F1(average="weighted")
    with pytest.raises(ConfigError, match=r"pos_label must be an int class id, got '1'"):
        metrics.F1(pos_label="1")  # type: ignore[arg-type]
    metric = metrics.F1()
    metric.update([0, 1], [1, 1])
    with pytest.raises(DatasetError, match=r"average='binary' needs at most two classes.*\[0, 1, 2\].*'macro'"):
        metric.update([2], [1])
    assert metric.num_samples == 2  # the rejected batch left no trace
    assert metric.result() == pytest.approx(skm.f1_score([1, 1], [0, 1]))
    with pytest.raises(DatasetError, match=r"pos_label=1 is not one of the classes seen, \[0, 2\]"):
        metrics.F1().update([0, 2], [2, 0])


@pytest.mark.parametrize("num_classes", [2, 3, 6])
def test_mcc_matches_sklearn(rng: np.random.Generator, num_classes: int) -> None:
    labels = rng.integers(0, num_classes, size=300)
    preds = np.where(rng.random(300) < 0.5, labels, rng.integers(0, num_classes, size=300))
    expected = skm.matthews_corrcoef(labels, preds)
    assert stream(metrics.MCC(), preds, labels) == pytest.approx(expected, abs=1e-12)
    assert stream(metrics.MCC(), np.eye(num_classes)[preds], labels) == pytest.approx(expected, abs=1e-12)


def test_mcc_undefined_is_zero_like_sklearn() -> None:
    labels = np.array([0, 1, 1, 0, 1])
    constant = np.ones(5, dtype=int)
    assert skm.matthews_corrcoef(labels, constant) == 0.0
    assert one_shot(metrics.MCC, constant, labels) == 0.0
    assert one_shot(metrics.MCC, labels, labels) == pytest.approx(1.0)
    assert one_shot(metrics.MCC, 1 - labels, labels) == pytest.approx(-1.0)


# --------------------------------------------------------------------------- regression


@pytest.mark.parametrize(
    ("metric_type", "reference"),
    [
        (metrics.MAE, skm.mean_absolute_error),
        (metrics.MSE, skm.mean_squared_error),
        (metrics.RMSE, skm.root_mean_squared_error),
    ],
)
def test_regression_errors_match_sklearn(
    rng: np.random.Generator, metric_type: type[metrics.Metric], reference: Any
) -> None:
    labels = rng.normal(size=300)
    preds = labels + rng.normal(scale=0.3, size=300)
    expected = reference(labels, preds)
    assert stream(metric_type(), preds, labels) == pytest.approx(expected, rel=1e-12)
    assert stream(metric_type(), preds.reshape(-1, 1), labels) == pytest.approx(expected, rel=1e-12)
    multi_labels = rng.normal(size=(300, 3))
    multi_preds = multi_labels + rng.normal(size=(300, 3))
    # Every value counts once: scikit-learn's uniform average for MAE and MSE; for RMSE the root of the pooled MSE
    # (scikit-learn would average per-output roots instead).
    multi_result = stream(metric_type(), multi_preds, multi_labels)
    assert multi_result == pytest.approx(reference(multi_labels.ravel(), multi_preds.ravel()), rel=1e-12)
    if metric_type is not metrics.RMSE:
        assert multi_result == pytest.approx(reference(multi_labels, multi_preds), rel=1e-12)
    else:
        assert multi_result != pytest.approx(reference(multi_labels, multi_preds), rel=1e-6)
    assert metric_type.higher_is_better is False


def test_regression_shape_mismatch() -> None:
    with pytest.raises(DatasetError, match=r"preds of shape \(4, 2\) do not match labels of shape \(4,\)"):
        metrics.MSE().update(np.zeros((4, 2)), np.zeros(4))
    with pytest.raises(DatasetError, match=r"labels hold 1 NaN or Inf values out of 4; remove or fix"):
        metrics.MAE().update(np.zeros(4), [0.0, np.inf, 1.0, 2.0])


# --------------------------------------------------------------------------- Loss


def test_loss_of_logits_matches_log_loss(rng: np.random.Generator) -> None:
    logits = rng.normal(scale=3.0, size=(300, 5))
    labels = rng.integers(0, 5, size=300)
    expected = sk_log_loss(labels, special.softmax(logits, axis=1), labels=np.arange(5))
    assert stream(metrics.Loss(), logits, labels) == pytest.approx(expected, rel=1e-9)
    assert stream(metrics.Loss(), logits, np.eye(5)[labels]) == pytest.approx(expected, rel=1e-9)
    # Large logits must not overflow.
    assert one_shot(metrics.Loss, np.array([[1000.0, 0.0]]), [1]) == pytest.approx(1000.0)


def test_loss_of_probabilities_matches_log_loss(rng: np.random.Generator) -> None:
    proba = special.softmax(rng.normal(size=(300, 4)), axis=1)
    labels = rng.integers(0, 4, size=300)
    expected = sk_log_loss(labels, proba, labels=np.arange(4))
    assert stream(metrics.Loss(from_logits=False), proba, labels) == pytest.approx(expected, rel=1e-9)


def test_binary_loss_matches_log_loss(rng: np.random.Generator) -> None:
    logits = rng.normal(scale=2.0, size=300)
    labels = rng.integers(0, 2, size=300)
    proba = special.expit(logits)
    expected = sk_log_loss(labels, proba)
    assert stream(metrics.Loss(), logits, labels) == pytest.approx(expected, rel=1e-9)
    assert stream(metrics.Loss(from_logits=False), proba.reshape(-1, 1), labels) == pytest.approx(expected, rel=1e-9)


def test_loss_soft_targets_by_hand() -> None:
    proba = np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    targets = np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    expected = (-(0.5 * np.log(0.5) + 0.5 * np.log(0.25)) - np.log(0.8)) / 2
    assert one_shot(metrics.Loss, proba, targets, from_logits=False) == pytest.approx(expected)


def test_loss_errors_and_probability_warning(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError, match=r"from_logits must be a bool, got 'yes'"):
        metrics.Loss(from_logits="yes")  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match=r"summing to 1.*pass from_logits=True for raw logits"):
        metrics.Loss(from_logits=False).update(np.array([[2.0, -1.0]]), [0])
    with pytest.raises(DatasetError, match=r"probabilities in \[0, 1\], got values in \[-0.5, 0.5\]"):
        metrics.Loss(from_logits=False).update(np.array([-0.5, 0.5]), [0, 1])
    with pytest.raises(DatasetError, match=r"class id 2, outside \[0, 2\)"):
        metrics.Loss().update(np.zeros((2, 2)), [0, 2])
    with caplog.at_level(logging.WARNING, logger="inc"):
        metrics.Loss().update(np.array([[0.2, 0.8], [0.5, 0.5]]), [1, 0])
    assert "preds look like probabilities" in caplog.text


# --------------------------------------------------------------------------- ROC AUC


def test_rocauc_matches_sklearn(rng: np.random.Generator) -> None:
    labels = rng.integers(0, 2, size=300)
    scores = labels + rng.normal(size=300)
    expected = skm.roc_auc_score(labels, scores)
    assert stream(metrics.ROCAUC(), scores, labels) == pytest.approx(expected, abs=1e-12)
    two_class = np.stack([-scores, scores], axis=1)
    assert stream(metrics.ROCAUC(), two_class, labels.astype(bool)) == pytest.approx(expected, abs=1e-12)


def test_rocauc_ties_match_sklearn(rng: np.random.Generator) -> None:
    labels = rng.integers(0, 2, size=300)
    scores = np.round(labels * 0.5 + rng.random(300), 1)  # about 15 distinct values: many ties
    expected = skm.roc_auc_score(labels, scores)
    assert stream(metrics.ROCAUC(), scores, labels) == pytest.approx(expected, abs=1e-12)
    assert one_shot(metrics.ROCAUC, np.ones(4), [0, 1, 0, 1]) == 0.5


def test_rocauc_errors() -> None:
    metric = metrics.ROCAUC()
    metric.update([0.1, 0.7], [1, 1])
    with pytest.raises(DatasetError, match=r"all 2 labels seen are 1; ROC AUC is undefined with a single class"):
        metric.result()
    with pytest.raises(DatasetError, match=r"labels must be 0 or 1 .*got \[0, 2\]"):
        metrics.ROCAUC().update([0.1, 0.7], [0, 2])
    with pytest.raises(DatasetError, match=r"have 3 classes, but ROC AUC here is binary"):
        metrics.ROCAUC().update([0.1, 0.7], np.eye(3)[:2])
    with pytest.raises(DatasetError, match=r"preds of shape \(2, 3\) are not binary scores"):
        metrics.ROCAUC().update(np.zeros((2, 3)), [0, 1])


# --------------------------------------------------------------------------- Pearson / Spearman


def test_pearson_spearman_matches_scipy(rng: np.random.Generator) -> None:
    labels = np.round(rng.normal(size=300), 1)  # ties in labels
    preds = np.round(labels + rng.normal(scale=0.5, size=300), 1)  # and in preds
    pearson = stats.pearsonr(preds, labels).statistic
    spearman = stats.spearmanr(preds, labels).statistic
    metric = metrics.PearsonSpearman()
    assert stream(metric, preds, labels) == pytest.approx((pearson + spearman) / 2, abs=1e-12)
    assert metric.pearson == pytest.approx(pearson, abs=1e-12)
    assert metric.spearman == pytest.approx(spearman, abs=1e-12)
    assert stream(metrics.PearsonSpearman(), preds.reshape(-1, 1), labels) == pytest.approx(metric.result())


def test_average_ranks_match_scipy(rng: np.random.Generator) -> None:
    from inc_core.metrics._ranking import average_ranks

    values = rng.integers(0, 20, size=500).astype(float)
    np.testing.assert_allclose(average_ranks(values), stats.rankdata(values))


def test_pearson_spearman_errors() -> None:
    metric = metrics.PearsonSpearman()
    metric.update([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
    with pytest.raises(EvaluationError, match=r"all 3 predictions equal 1; correlation is undefined"):
        metric.result()
    metric.reset()
    metric.update([1.0, 2.0, 3.0], [4.0, 4.0, 4.0])
    with pytest.raises(DatasetError, match=r"all 3 labels seen equal 4;"):
        _ = metric.spearman
    with pytest.raises(DatasetError, match=r"one value per sample, got 2 per sample"):
        metrics.PearsonSpearman().update(np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(EvaluationError, match=r"no samples seen; call update\(\) first"):
        _ = metrics.PearsonSpearman().pearson


# --------------------------------------------------------------------------- SQuAD


def test_squad_normalization() -> None:
    assert metrics.normalize_answer("  The  Quick-Brown fox's TAIL. ") == "quickbrown foxs tail"
    assert metrics.normalize_answer("Theory of an Apple") == "theory of apple"  # whole words only


def test_squad_f1_and_exact_match_by_hand() -> None:
    preds = ["The Denver Broncos!", "an apple pie", "Santa Clara, California", "a", "1, 2, 2 3"]
    labels = [
        ["Denver Broncos", "broncos"],  # normalizes to an exact match: F1 1, EM 1
        "the apple",  # [apple, pie] vs [apple]: P 1/2, R 1 -> F1 2/3
        {"text": ["Levi's Stadium", "Santa Clara"], "answer_start": [0, 10]},  # best: P 2/3, R 1 -> 0.8
        ["A"],  # both normalize to "": EM 1, but v1.1 F1 is 0 (no shared token)
        ["2 2 1 1"],  # shared tokens {1: 1, 2: 2} = 3: P 3/4, R 3/4 -> 0.75
    ]
    expected_f1 = (1.0 + 2 / 3 + 0.8 + 0.0 + 0.75) / 5
    metric = metrics.SquadF1()
    metric.update(preds[:2], labels[:2])
    metric.update(preds[2:], labels[2:])
    assert metric.result() == pytest.approx(expected_f1)
    assert metric.exact_match == pytest.approx(2 / 5)
    assert metric.num_samples == 5


def test_squad_errors() -> None:
    metric = metrics.SquadF1()
    with pytest.raises(DatasetError, match=r"preds must be a sequence, got a single str 'Denver'; wrap it in a list"):
        metric.update("Denver", [["Denver"]])
    with pytest.raises(DatasetError, match=r"2 predicted answers but 1 ground-truth entries"):
        metric.update(["a", "b"], [["a"]])
    with pytest.raises(DatasetError, match=r"labels\[0\] holds no ground-truth answer"):
        metric.update(["a"], [[]])
    with pytest.raises(DatasetError, match=r"labels\[0\] must hold strings, got int 3"):
        metric.update(["a"], [[3]])
    with pytest.raises(DatasetError, match=r"labels\[0\] is a mapping without a 'text' key \(keys: \['answers'\]\)"):
        metric.update(["a"], [{"answers": ["a"]}])
    with pytest.raises(EvaluationError, match=r"SquadF1: no samples seen"):
        _ = metric.exact_match


# --------------------------------------------------------------------------- protocol


ALL_METRICS: list[metrics.Metric] = [
    metrics.TopK(),
    metrics.F1(),
    metrics.MAE(),
    metrics.MSE(),
    metrics.RMSE(),
    metrics.Loss(),
    metrics.ROCAUC(),
    metrics.PearsonSpearman(),
    metrics.MCC(),
    metrics.SquadF1(),
]


@pytest.mark.parametrize("metric", ALL_METRICS, ids=lambda m: type(m).__name__)
def test_result_before_update_raises(metric: metrics.Metric) -> None:
    name = type(metric).__name__
    with pytest.raises(EvaluationError, match=rf"^{name}: no samples seen; call update\(\) first"):
        metric.result()


def test_higher_is_better_flags() -> None:
    flags = {type(m).__name__: type(m).higher_is_better for m in ALL_METRICS}
    assert flags == {
        "TopK": True,
        "F1": True,
        "MAE": False,
        "MSE": False,
        "RMSE": False,
        "Loss": False,
        "ROCAUC": True,
        "PearsonSpearman": True,
        "MCC": True,
        "SquadF1": True,
    }


def test_reset_and_empty_batches(rng: np.random.Generator) -> None:
    metric = metrics.TopK()
    metric.update(np.zeros((0, 3)), np.zeros(0, dtype=int))
    with pytest.raises(EvaluationError, match="no samples seen"):
        metric.result()
    metric.update([[0.0, 1.0]], [0])
    assert metric.result() == 0.0
    metric.reset()
    assert metric.num_samples == 0
    metric.update([[0.0, 1.0]], [1])
    assert metric.result() == 1.0


def test_repr_and_errors_are_builtin_subclasses() -> None:
    assert repr(metrics.TopK(k=3)) == "TopK(k=3)"
    assert repr(metrics.F1(average="macro")) == "F1(average='macro', pos_label=1)"
    assert repr(metrics.MAE()) == "MAE()"
    with pytest.raises(ValueError) as info:
        metrics.MAE().update([1.0, 2.0], [1.0])
    assert isinstance(info.value, IncError)


class _FakeTensor:
    """Stands in for a framework tensor that numpy cannot read until detached and moved to the CPU."""

    def __init__(self, data: Any, *, on_device: bool = True, grad: bool = True) -> None:
        self.data = np.asarray(data)
        self.on_device = on_device
        self.grad = grad

    def detach(self) -> _FakeTensor:
        return _FakeTensor(self.data, on_device=self.on_device, grad=False)

    def cpu(self) -> _FakeTensor:
        return _FakeTensor(self.data, on_device=False, grad=self.grad)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if self.on_device or self.grad:
            raise RuntimeError("call .detach().cpu() first")
        return self.data


class _FakeNDArray:
    def __init__(self, data: Any) -> None:
        self.data = np.asarray(data)

    def asnumpy(self) -> np.ndarray:
        return self.data


def test_framework_tensors_are_read_without_importing_frameworks() -> None:
    metric = metrics.TopK()
    metric.update(_FakeTensor([[0.1, 0.9], [0.8, 0.2]]), _FakeNDArray([1, 1]))
    assert metric.result() == 0.5


def test_custom_metric_subclass() -> None:
    class Count(metrics.Metric):
        higher_is_better = False

        def _reset(self) -> None:
            self.total = 0

        def _update(self, preds: Any, labels: Any) -> int:
            self.total += len(preds)
            return len(preds)

        def _compute(self) -> float:
            return float("nan") if self.total > 2 else float(self.total)

    metric = Count()
    metric.update([1, 2], [1, 2])
    assert metric.result() == 2.0
    metric.update([3], [3])
    with pytest.raises(EvaluationError, match=r"Count: the result is nan, not a finite number"):
        metric.result()
