"""Scores of a classifier on labelled documents, with scikit-learn: accuracy, macro/weighted F1, per-class
precision/recall/F1, one-vs-rest ROC-AUC and the confusion matrix.

Every figure is a fraction in [0, 1] except ``support`` and the confusion counts (documents). Both the LoRA
classifier and the TF-IDF baseline are scored by :func:`score`, so their figures compare one to one.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def predicted_labels(proba: np.ndarray, classes: Sequence[str]) -> list[str]:
    """``classes[argmax]`` of each row of ``proba`` (float ``[n, len(classes)]``)."""
    return [classes[i] for i in np.asarray(proba).argmax(axis=1)] if len(proba) else []


def macro_f1(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    """Unweighted mean of the per-class F1 over the labels that occur in ``y_true`` or ``y_pred``
    (scikit-learn's default label set; a class with no prediction and no support does not count),
    with 0 for an undefined precision or recall.

    Raises:
        ValueError: empty or unequal-length inputs.
    """
    from sklearn.metrics import f1_score

    if not len(y_true) or len(y_true) != len(y_pred):
        raise ValueError(f"macro_f1 needs equal, non-zero lengths, got {len(y_true)} and {len(y_pred)}")
    return float(f1_score(list(y_true), list(y_pred), average="macro", zero_division=0))


def score(y_true: Sequence[str], proba: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Score class probabilities against true labels.

    Args:
        y_true: the true label of each document (str, ``n`` of them); labels the model does not know are
            allowed (they count as errors and appear in ``per_class`` and ``confusion``).
        proba: float ``[n, len(classes)]``, the model's probabilities.
        classes: the model's classes in column order.

    Returns:
        ``accuracy``, ``macro_f1`` (:func:`macro_f1`), ``weighted_f1``, ``roc_auc_ovr_macro`` (mean of the
        per-class one-vs-rest ROC-AUC over the model's classes whose test documents hold both positives and
        negatives; null when none does), ``docs``, ``unknown_label_docs`` (true labels not in ``classes``),
        ``per_class`` ``{label: {precision, recall, f1, support[, roc_auc]}}`` and ``confusion``
        ``{actual: {predicted: documents}}``, both over ``classes`` plus any unknown true label, sorted.

    Raises:
        ValueError: ``proba`` does not have ``len(y_true)`` rows and ``len(classes)`` columns, or no document.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score

    proba = np.asarray(proba, dtype=float)
    if proba.shape != (len(y_true), len(classes)) or not len(y_true):
        raise ValueError(f"proba has shape {proba.shape}; expected ({len(y_true)}, {len(classes)}) with rows > 0")
    y_true = list(y_true)
    y_pred = predicted_labels(proba, classes)
    labels = sorted(set(classes) | set(y_true))
    prec, rec, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_class: dict[str, dict[str, float]] = {
        lab: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for lab, p, r, f, s in zip(labels, prec, rec, f1, support)}
    aucs = []
    truth = np.array(y_true)
    for j, lab in enumerate(classes):
        positives = truth == lab
        if positives.any() and not positives.all():
            auc = float(roc_auc_score(positives, proba[:, j]))
            per_class[lab]["roc_auc"] = auc
            aucs.append(auc)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": macro_f1(y_true, y_pred),
        "weighted_f1": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
        "roc_auc_ovr_macro": float(np.mean(aucs)) if aucs else None,
        "docs": len(y_true),
        "unknown_label_docs": int(sum(lab not in set(classes) for lab in y_true)),
        "per_class": per_class,
        "confusion": {a: {p: int(cm[i, j]) for j, p in enumerate(labels)} for i, a in enumerate(labels)},
    }


def prediction_rows(ids: Sequence[str], y_true: Sequence[str], proba: np.ndarray,
                    classes: Sequence[str]) -> list[dict[str, Any]]:
    """One row per document for ``dvc plots``' confusion template: ``id``, ``actual``, ``predicted``,
    ``confidence`` (the predicted class's probability)."""
    proba = np.asarray(proba, dtype=float)
    pred = predicted_labels(proba, classes)
    return [{"id": i, "actual": a, "predicted": p, "confidence": round(float(row.max()), 6)}
            for i, a, p, row in zip(ids, y_true, pred, proba)]
