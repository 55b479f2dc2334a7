"""Classification metrics computed with torch alone (no scikit-learn at run time).

Every rate follows scikit-learn's definitions so that results can be checked against it:

* ``precision``, ``recall``, ``specificity`` and ``f1`` are macro averages over the classes that
  occur in the labels or in the predictions (scikit-learn's default label set); a per-class value
  whose denominator is 0 counts as 0 (``zero_division=0``). A class that is neither present nor
  predicted has no defined value at all and is left out, as in scikit-learn.
* ``balanced_accuracy`` is the mean recall over the classes present in the labels.
* ``roc_auc`` is the Mann-Whitney statistic with average ranks for ties, which equals the
  trapezoidal area under the ROC curve. Binary: the score is the model's probability of class 1.
  Multi-class: the macro average of the one-vs-rest AUCs of the classes that have both positives
  and negatives in the labels (scikit-learn's ``multi_class="ovr", average="macro"`` when every
  class is present; scikit-learn refuses the other cases, here the absent classes are skipped).
  NaN when no class qualifies, e.g. when the labels hold one class only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

METRICS: tuple[str, ...] = (
    "loss",
    "accuracy",
    "balanced_accuracy",
    "precision",
    "recall",
    "specificity",
    "f1",
    "roc_auc",
)


def confusion_matrix(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Counts as an int64 ``(K, K)`` tensor: rows are true classes, columns predicted classes."""
    predictions = predictions.detach().reshape(-1).to("cpu", torch.int64)
    labels = labels.detach().reshape(-1).to("cpu", torch.int64)
    if predictions.numel() != labels.numel():
        raise ValueError(
            f"predictions and labels differ in length: {predictions.numel()} != {labels.numel()}"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for name, values in (("predictions", predictions), ("labels", labels)):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"{name} must lie in [0, {num_classes}), got values in "
                f"[{int(values.min())}, {int(values.max())}]"
            )
    flat = labels * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 where ``den == 0`` (scikit-learn's ``zero_division=0``)."""
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def _average_ranks(values: Tensor) -> Tensor:
    """1-based ranks; tied values share the mean of the ranks they span."""
    _, inverse, counts = torch.unique(values, sorted=True, return_inverse=True, return_counts=True)
    counts = counts.to(torch.float64)
    last = counts.cumsum(0)  # rank of the last member of each tie group
    return (last - (counts - 1) / 2)[inverse]


def _binary_auc(scores: Tensor, positive: Tensor) -> float:
    """AUC of ``scores`` for the boolean ``positive`` mask; NaN without both classes."""
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = float(_average_ranks(scores)[positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _log_odds(scores: Tensor) -> Tensor:
    """``log(p_k / (1 - p_k))`` of the softmax probabilities ``p``, for every class ``k``.

    AUC depends only on the ordering of the scores, and the log-odds order like ``p_k`` without
    the ties that saturated probabilities (exactly 1.0 once a margin passes ~37 in float64, or
    ``x - logsumexp(x) == 0``) would create for confident models.
    """
    shifted = scores - scores.max(dim=1, keepdim=True).values
    exp = shifted.exp()
    total = exp.sum(dim=1, keepdim=True)
    others = total - exp  # mass of the other classes, up to the max's own exp(0) = 1
    # For the arg-max class, total - 1 cancels catastrophically; sum the others directly instead.
    top = scores.argmax(dim=1, keepdim=True)
    others.scatter_(1, top, exp.scatter(1, top, 0.0).sum(dim=1, keepdim=True))
    return shifted - others.log()


def roc_auc(logits: Tensor, labels: Tensor) -> float:
    """Binary or macro one-vs-rest AUC of the softmax probabilities (see the module docstring)."""
    scores = logits.detach().to("cpu", torch.float64)
    labels = labels.detach().reshape(-1).to("cpu", torch.int64)
    if not torch.isfinite(scores).all():
        return math.nan
    num_classes = scores.shape[1]
    if num_classes == 2:
        # log(p1 / p0) is exactly the logit difference.
        return _binary_auc(scores[:, 1] - scores[:, 0], labels == 1)
    log_odds = _log_odds(scores)
    aucs = [_binary_auc(log_odds[:, k], labels == k) for k in range(num_classes)]
    aucs = [a for a in aucs if not math.isnan(a)]
    return sum(aucs) / len(aucs) if aucs else math.nan


def classification_metrics(
    logits: Tensor, labels: Tensor, *, loss: float | None = None
) -> dict[str, Any]:
    """Every metric of :data:`METRICS` plus ``confusion_matrix`` (lists) and ``num_samples``.

    Args:
        logits: ``(N, K)`` unnormalized scores, ``K >= 2``.
        labels: ``(N,)`` class indices.
        loss: reported as is when given (e.g. a loss averaged during evaluation); otherwise the
            mean cross-entropy of ``logits``.
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, K) with K >= 2, got {tuple(logits.shape)}")
    labels = labels.detach().reshape(-1).to("cpu", torch.int64)
    n, num_classes = logits.shape
    if n == 0:
        raise ValueError("cannot compute metrics of zero samples")
    if labels.numel() != n:
        raise ValueError(f"logits have {n} rows but labels have {labels.numel()} entries")
    # float64 is exact for every lower precision, so argmax and ranks see the model's own values.
    scores = logits.detach().to("cpu", torch.float64)
    if loss is None:
        loss = float(F.cross_entropy(scores, labels))
    predictions = scores.argmax(dim=1)
    cm = confusion_matrix(predictions, labels, num_classes)

    counts = cm.to(torch.float64)
    tp = counts.diagonal()
    support = counts.sum(dim=1)  # true members of each class
    predicted = counts.sum(dim=0)
    fp = predicted - tp
    fn = support - tp
    tn = n - tp - fp - fn
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    specificity = _safe_div(tn, tn + fp)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    used = (support > 0) | (predicted > 0)

    def macro(values: Tensor) -> float:
        return float(values[used].mean())

    return {
        "loss": float(loss),
        "accuracy": float(tp.sum() / n),
        "balanced_accuracy": float(recall[support > 0].mean()),
        "precision": macro(precision),
        "recall": macro(recall),
        "specificity": macro(specificity),
        "f1": macro(f1),
        "roc_auc": roc_auc(scores, labels),
        "confusion_matrix": cm.tolist(),
        "num_samples": n,
    }


def time_to_target(
    history: list[dict], target: float, key: str = "val_accuracy"
) -> tuple[int | None, float | None]:
    """First epoch whose ``history[key] >= target`` and the cumulative wall time at its end.

    ``epoch`` is the record's 1-based ``"epoch"`` field (its position when absent), the time its
    ``"wall_time_s"`` (the running sum of ``"epoch_time_s"`` when absent). ``(None, None)`` when
    the target is never reached; missing or NaN values never reach it.
    """
    elapsed = 0.0
    for position, record in enumerate(history, start=1):
        elapsed += float(record.get("epoch_time_s") or 0.0)
        value = record.get(key)
        if value is not None and float(value) >= target:
            wall = record.get("wall_time_s")
            return int(record.get("epoch", position)), float(elapsed if wall is None else wall)
    return None, None
