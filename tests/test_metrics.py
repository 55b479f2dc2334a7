"""``gcsam.toolkit.metrics`` against scikit-learn, which serves as the ground truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from sklearn import metrics as skm

from gcsam.toolkit.metrics import (
    METRICS,
    classification_metrics,
    confusion_matrix,
    time_to_target,
)


def random_case(n: int, k: int, seed: int, ties: bool = False):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=gen)
    if ties:
        # Rows drawn from a few distinct rows: many exactly equal probabilities. Equal logits
        # inside some rows test that argmax picks the first maximum, as numpy's does.
        pool = torch.randn(8, k, generator=gen, dtype=torch.float64)
        pool[::2, 1] = pool[::2, 0]
        logits = pool[torch.randint(0, 8, (n,), generator=gen)]
    else:
        # Correlated with the labels so that the AUCs are not all near 0.5.
        logits = torch.randn(n, k, generator=gen, dtype=torch.float64)
        logits[torch.arange(n), labels] += 1.0
    return logits, labels


def sklearn_metrics(
    logits: torch.Tensor, labels: torch.Tensor, *, auc: bool = True
) -> dict[str, float]:
    y = labels.numpy()
    pred = logits.argmax(1).numpy()
    probs = torch.softmax(logits.double(), dim=1).numpy()
    cm = skm.confusion_matrix(y, pred)
    tp = np.diag(cm)
    fp = cm.sum(0) - tp
    tn = cm.sum() - cm.sum(0) - cm.sum(1) + tp
    prf = {"zero_division": 0, "average": "macro"}
    expected = {
        "accuracy": skm.accuracy_score(y, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
        "precision": skm.precision_score(y, pred, **prf),
        "recall": skm.recall_score(y, pred, **prf),
        "f1": skm.f1_score(y, pred, **prf),
        "specificity": float(np.mean(tn / (tn + fp))),
        # Not log_loss: it clips probabilities at machine epsilon.
        "loss": float(F.cross_entropy(logits.double(), labels)),
    }
    if auc and logits.shape[1] == 2:
        expected["roc_auc"] = skm.roc_auc_score(y, probs[:, 1])
    elif auc:
        expected["roc_auc"] = skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")
    return expected


def assert_matches_sklearn(logits, labels):
    ours = classification_metrics(logits, labels)
    expected = sklearn_metrics(logits, labels)
    for name in METRICS:
        assert ours[name] == pytest.approx(expected[name], abs=1e-12), name
        assert isinstance(ours[name], float), name
        if name != "loss":
            assert 0.0 <= ours[name] <= 1.0, name
    assert ours["num_samples"] == len(labels)
    return ours


@pytest.mark.parametrize("k", [2, 3, 10])
@pytest.mark.parametrize("ties", [False, True])
def test_every_metric_matches_sklearn(k, ties):
    logits, labels = random_case(300, k, seed=k, ties=ties)
    ours = assert_matches_sklearn(logits, labels)
    expected_cm = skm.confusion_matrix(
        labels.numpy(), logits.argmax(1).numpy(), labels=list(range(k))
    )
    assert ours["confusion_matrix"] == expected_cm.tolist()
    if ties:
        probs = torch.softmax(logits, dim=1)
        assert len(torch.unique(probs[:, 0])) < len(labels) // 10  # the ties really are there


@pytest.mark.parametrize("k", [2, 3, 10])
def test_class_never_predicted(k):
    logits, labels = random_case(200, k, seed=10 + k)
    logits[:, 1] = -50.0  # class 1 is present in the labels but never predicted
    assert (labels == 1).any() and not (logits.argmax(1) == 1).any()
    ours = assert_matches_sklearn(logits, labels)
    assert ours["confusion_matrix"][1][1] == 0


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("k", [3, 10])
def test_class_absent_from_labels(k):
    """Predicted but absent: it counts in the macro averages with recall 0 (as scikit-learn's
    default label set does) and is skipped by the one-vs-rest AUC, which scikit-learn refuses;
    the AUC then equals the mean of the per-class binary AUCs of the present classes."""
    logits, labels = random_case(200, k, seed=20 + k)
    labels[labels == 2] = 0
    logits[:5, 2] = 10.0  # class 2 is predicted for a few samples
    assert not (labels == 2).any() and (logits.argmax(1) == 2).any()
    ours = classification_metrics(logits, labels)
    expected = sklearn_metrics(logits, labels, auc=False)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-12), name
    probs = torch.softmax(logits, dim=1).numpy()
    y = labels.numpy()
    per_class = [skm.roc_auc_score(y == c, probs[:, c]) for c in range(k) if c != 2]
    assert ours["roc_auc"] == pytest.approx(np.mean(per_class), abs=1e-12)
    with pytest.raises(ValueError):  # what scikit-learn does instead
        skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")


def test_auc_ties_use_average_ranks():
    # Scores 0.2 (neg), 0.5 (neg), 0.5 (pos), 0.9 (pos): of the 4 pairs, 3 are ordered and one
    # is a tie worth half, so the AUC is 3.5 / 4.
    probs1 = torch.tensor([0.2, 0.5, 0.5, 0.9], dtype=torch.float64)
    logits = torch.stack([torch.zeros(4, dtype=torch.float64), torch.logit(probs1)], dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    assert classification_metrics(logits, labels)["roc_auc"] == pytest.approx(3.5 / 4)


@pytest.mark.parametrize("k", [2, 3])
def test_auc_of_saturated_probabilities_keeps_the_order(k):
    # Probabilities that round to exactly 1.0 in float64 are still ranked by the logits.
    logits = torch.zeros(4, k)
    logits[:, 1] = torch.tensor([40.0, 50.0, 60.0, 70.0])
    labels = torch.tensor([0, 0, 1, 1])
    assert torch.softmax(logits.double(), 1)[:, 1].unique().numel() == 1
    assert classification_metrics(logits, labels)["roc_auc"] == 1.0


def test_auc_is_nan_with_one_class():
    logits, _ = random_case(20, 3, seed=0)
    result = classification_metrics(logits, torch.zeros(20, dtype=torch.int64))
    assert math.isnan(result["roc_auc"])
    binary = classification_metrics(logits[:, :2], torch.ones(20, dtype=torch.int64))
    assert math.isnan(binary["roc_auc"])


def test_loss_is_cross_entropy_or_the_given_value():
    logits, labels = random_case(64, 5, seed=3)
    logits32 = logits.float()
    ours = classification_metrics(logits32, labels)["loss"]
    # Computed in float64 from the float32 logits: equal to torch's float32 value to its precision.
    assert ours == pytest.approx(float(F.cross_entropy(logits32, labels)), rel=1e-6)
    assert ours == pytest.approx(float(F.cross_entropy(logits32.double(), labels)), rel=1e-15)
    assert ours == pytest.approx(skm.log_loss(labels.numpy(), torch.softmax(logits32.double(), 1)))
    assert classification_metrics(logits, labels, loss=0.125)["loss"] == 0.125


def test_perfect_and_float32_bfloat16_inputs():
    labels = torch.arange(12) % 4
    logits = F.one_hot(labels, 4).float() * 5
    for dtype in (torch.float32, torch.bfloat16):
        result = classification_metrics(logits.to(dtype), labels)
        for name in METRICS[1:]:
            assert result[name] == 1.0, name
        assert result["confusion_matrix"] == (torch.eye(4, dtype=torch.int64) * 3).tolist()


def test_confusion_matrix_rows_true_columns_predicted():
    cm = confusion_matrix(torch.tensor([1, 1, 2, 0]), torch.tensor([0, 1, 2, 2]), 3)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[0, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert confusion_matrix(torch.tensor([], dtype=torch.int64), torch.tensor([]), 2).sum() == 0


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="length"):
        confusion_matrix(torch.tensor([0]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(torch.zeros(4), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels"):
        classification_metrics(torch.zeros(4, 3), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="zero samples"):
        classification_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64))


def test_non_finite_logits_do_not_crash():
    logits, labels = random_case(10, 3, seed=1)
    logits[0, 0] = math.nan
    result = classification_metrics(logits, labels)
    assert math.isnan(result["roc_auc"]) and math.isnan(result["loss"])


HISTORY = [
    {"epoch": 1, "val_accuracy": 0.50, "epoch_time_s": 2.0, "wall_time_s": 2.0},
    {"epoch": 2, "val_accuracy": 0.80, "epoch_time_s": 2.5, "wall_time_s": 4.5},
    {"epoch": 3, "val_accuracy": 0.75, "epoch_time_s": 2.0, "wall_time_s": 6.5},
    {"epoch": 4, "val_accuracy": 0.90, "epoch_time_s": 3.0, "wall_time_s": 9.5},
]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (0.40, (1, 2.0)),  # reached at the first epoch
        (0.50, (1, 2.0)),  # exactly equal counts as reached
        (0.78, (2, 4.5)),  # later; the dip at epoch 3 does not matter
        (0.85, (4, 9.5)),
        (0.90, (4, 9.5)),
        (0.95, (None, None)),  # never
    ],
)
def test_time_to_target(target, expected):
    assert time_to_target(HISTORY, target) == expected


def test_time_to_target_other_key_missing_values_and_fallback_time():
    history = [
        {"epoch": 1, "val_f1": None, "epoch_time_s": 1.5},
        {"epoch": 2, "val_f1": math.nan, "epoch_time_s": 1.5},
        {"epoch": 3, "val_f1": 0.7, "epoch_time_s": 1.0},
    ]
    assert time_to_target(history, 0.6, key="val_f1") == (3, 4.0)
    assert time_to_target(history, 0.6) == (None, None)
    assert time_to_target([], 0.5) == (None, None)
