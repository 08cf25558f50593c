"""Classification metrics in numpy: accuracy, macro-F1, per-class precision/recall, confusion matrix."""

from __future__ import annotations

import numpy as np


def classification_report(labels: np.ndarray, predictions: np.ndarray, names: list[str]) -> dict:
    """Metrics of predicted vs true class indices. `confusion[i][j]` counts true i predicted j.

    Example:
        >>> classification_report(np.array([0, 1, 2]), np.array([0, 1, 1]), ["neg", "neu", "pos"])["accuracy"]
        0.6666666666666666
    """
    k = len(names)
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    true_pos = np.diag(confusion).astype(float)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    precision = np.divide(true_pos, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(true_pos, actual, out=np.zeros(k), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    return {
        "accuracy": float(true_pos.sum() / max(1, len(labels))),
        "macro_f1": float(f1.mean()),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(actual[i])} for i, name in enumerate(names)},
        "confusion": confusion.tolist(),
        "labels": list(names),
    }
