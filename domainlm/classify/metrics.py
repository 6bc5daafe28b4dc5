"""Scores of a classifier on labelled documents, with scikit-learn: accuracy, macro/weighted F1, per-class
precision/recall/F1, one-vs-rest ROC-AUC and the confusion matrix; and, with SciPy, bootstrap confidence
intervals of test macro-F1 and of the difference between two models (:func:`macro_f1_intervals`).

Every figure is a fraction in [0, 1] except ``support`` and the confusion counts (documents). Both the LoRA
classifier and the TF-IDF baseline are scored by :func:`score`, so their figures compare one to one.
:func:`classifier_metrics` assembles them into ``train_classifier``'s metrics (``metrics/classifier.json``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from domainlm.classify.data import LabelledSplit
    from domainlm.classify.gate import Attempt, GateOutcome

#: The training figures of the kept attempt copied into ``lora`` (0 when the attempt has none: a deployed model).
KEPT_TRAINING_FIGURES = (
    "train_s",
    "best_epoch",
    "epochs_run",
    "steps",
    "trainable_params",
    "total_params",
    "class_weighted",
    "docs_per_epoch",
    "docs_seen",
    "deepspeed",
    "world_size",
)


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


def macro_f1_intervals(
    y_true: Sequence[str],
    predicted: Mapping[str, Sequence[str]],
    *,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Bootstrap confidence intervals of each model's test macro-F1, and of the first model's lead over each other
    one, from one set of resampled documents: a paired bootstrap, so every model is scored on the same resample
    and a difference's interval accounts for the models erring on the same documents.

    ``scipy.stats.bootstrap`` resamples the documents with replacement ``n_resamples`` times and recomputes
    :func:`macro_f1` on each resample (Efron & Tibshirani 1993). The interval is BCa (bias-corrected and
    accelerated, DiCiccio & Efron 1996), or the percentile interval where BCa is undefined (a bootstrap
    distribution with no spread, e.g. every prediction right). On a test split with few documents in some classes
    the intervals are wide: they say how far apart two test figures must be before they differ.

    Args:
        y_true: true labels (str, ``n`` documents).
        predicted: model name -> its predicted labels (str, ``n`` each). The first model is compared with each
            of the others.
        confidence: the intervals' confidence level, in (0, 1).
        n_resamples: bootstrap resamples (each costs one :func:`macro_f1` per model: about 1 ms at 265 documents).
        seed: the resampling seed; the intervals are a deterministic function of the inputs and the seed.

    Returns:
        ``{"confidence", "n_resamples", "method": "BCa" | "percentile", "macro_f1": {name: {"value", "low",
        "high"}}, "difference": {"<first>-<other>": {"value", "low", "high"}}}``: macro-F1 points in [0, 1],
        differences in [-1, 1].

    Raises:
        ValueError: no model, fewer than two documents, a model with another number of predictions, or
            ``confidence`` outside (0, 1) or ``n_resamples`` < 1.
    """
    import warnings

    from scipy import stats

    names = list(predicted)
    n = len(y_true)
    if not names:
        raise ValueError("macro_f1_intervals needs at least one model's predictions")
    if n < 2:
        raise ValueError(f"macro_f1_intervals needs at least 2 documents, got {n}")
    for name in names:
        if len(predicted[name]) != n:
            raise ValueError(f"{name}: {len(predicted[name])} predictions for {n} documents")
    if not 0.0 < float(confidence) < 1.0 or int(n_resamples) < 1:
        raise ValueError(f"confidence must be in (0, 1) and n_resamples >= 1, got {confidence} and {n_resamples}")
    columns = [np.asarray(y_true, dtype=object)] + [np.asarray(predicted[k], dtype=object) for k in names]

    def statistic(truth, *preds) -> np.ndarray:
        f1s = [macro_f1(truth, p) for p in preds]
        return np.array(f1s + [f1s[0] - f for f in f1s[1:]])

    point = statistic(*columns)
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", stats.DegenerateDataWarning)  # BCa undefined: the percentile pass
            warnings.simplefilter("ignore", RuntimeWarning)  # BCa's acceleration of a constant jackknife: 0 / 0
            result = stats.bootstrap(
                columns,
                statistic,
                paired=True,
                vectorized=False,
                n_resamples=int(n_resamples),
                confidence_level=float(confidence),
                method=method,
                rng=np.random.default_rng(seed),
            )
        low, high = np.atleast_1d(result.confidence_interval.low), np.atleast_1d(result.confidence_interval.high)
        if np.isfinite(low).all() and np.isfinite(high).all():
            break

    def entry(j: int) -> dict[str, float]:
        return {"value": float(point[j]), "low": float(low[j]), "high": float(high[j])}

    return {
        "confidence": float(confidence),
        "n_resamples": int(n_resamples),
        "method": method,
        "macro_f1": {name: entry(j) for j, name in enumerate(names)},
        "difference": {f"{names[0]}-{other}": entry(len(names) + j) for j, other in enumerate(names[1:])},
    }


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
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    proba = np.asarray(proba, dtype=float)
    if proba.shape != (len(y_true), len(classes)) or not len(y_true):
        raise ValueError(f"proba has shape {proba.shape}; expected ({len(y_true)}, {len(classes)}) with rows > 0")
    y_true = list(y_true)
    y_pred = predicted_labels(proba, classes)
    labels = sorted(set(classes) | set(y_true))
    prec, rec, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_class: dict[str, dict[str, float]] = {
        lab: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for lab, p, r, f, s in zip(labels, prec, rec, f1, support)
    }
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


def prediction_rows(
    ids: Sequence[str], y_true: Sequence[str], proba: np.ndarray, classes: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per document for ``dvc plots``' confusion template: ``id``, ``actual``, ``predicted``,
    ``confidence`` (the predicted class's probability)."""
    proba = np.asarray(proba, dtype=float)
    pred = predicted_labels(proba, classes)
    return [
        {"id": i, "actual": a, "predicted": p, "confidence": round(float(row.max()), 6)}
        for i, a, p, row in zip(ids, y_true, pred, proba)
    ]


def new_data_scores(test, release_labels_path, classes: Sequence[str], *, kept, deployed) -> dict[str, Any]:
    """Scores on the test documents the LM release lacks (the documents that arrived since it), beside the whole
    test split's: ``test_docs``, ``deployed`` and ``kept`` (:func:`domainlm.classify.metrics.score` figures, null when
    not scored or no new test document). Macro-F1 over a day's handful of documents is noisy: the gate reads the whole
    split.

    Args:
        test: the test :class:`domainlm.classify.data.LabelledSplit` (``ids``, ``labels``).
        release_labels_path: the release's label table, or None / a missing file (no release: nothing is new).
        classes: the probability columns' classes.
        kept, deployed: :class:`domainlm.classify.gate.Attempt` (``test_proba`` float ``[len(test), len(classes)]``);
            ``deployed`` may be None.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if release_labels_path is None or not Path(release_labels_path).is_file():
        return {"test_docs": 0, "release_docs": 0, "deployed": None, "kept": None}
    released = pq.read_table(release_labels_path, columns=["id"])["id"]
    new = pc.invert(pc.is_in(pa.array(list(test.ids), pa.string()), value_set=released)).to_numpy(zero_copy_only=False)
    rows = [i for i, is_new in enumerate(new) if is_new]

    def figures(attempt) -> dict[str, Any] | None:
        if attempt is None or not rows:
            return None
        s = score([test.labels[i] for i in rows], attempt.test_proba[rows], classes)
        return {k: s[k] for k in ("accuracy", "macro_f1", "weighted_f1", "roc_auc_ovr_macro")}

    return {"test_docs": len(rows), "release_docs": len(released), "deployed": figures(deployed), "kept": figures(kept)}


def start_case(deployed: Attempt | None, *, from_deployed: bool, kept: Attempt, widened: bool = False) -> str:
    """How the round started and ended: ``fresh`` (nothing deployed was scored or continued), ``challenger`` (a
    classifier trained from the merged LM kept over the deployed line), ``deployed_kept`` (the deployed model
    passed and no candidate beat it: nothing of its line trained), ``deployed_retrained`` (retries continued it,
    whether one passed or not: a failed gate that keeps attempt 0 is still a failed gate, never a keep) or
    ``deployed_widened`` (its head widened for new classes and continued).

    Args:
        deployed: the deployed model's scored attempt, or None when it was not scored.
        from_deployed: whether the kept model is of the deployed line (:mod:`domainlm.classify.candidates`).
        kept: the kept attempt (``source`` ``deployed`` when the deployed model was kept).
        widened: whether the deployed line started from a widened head.
    """
    if from_deployed:
        if widened:
            return "deployed_widened"
        return "deployed_kept" if kept.source == "deployed" and kept.passed else "deployed_retrained"
    if deployed is None and not widened:
        return "fresh"
    return "challenger"


def classifier_metrics(
    *,
    classes: Sequence[str],
    train: LabelledSplit,
    val: LabelledSplit,
    test: LabelledSplit,
    label_overrides: int,
    outcome: GateOutcome,
    baseline: Mapping[str, Any],
    baseline_docs: int,
    intervals: Mapping[str, Any],
    deployed: Attempt | None,
    from_deployed: bool,
    start_reason: str,
    deployed_version: int | None,
    new_classes: Sequence[str] = (),
    candidates: Mapping[str, Any] | None = None,
    line: str | None = None,
    new_data: Mapping[str, Any],
    windows: Mapping[str, Any],
    registered_version: int,
    promoted: bool,
    champion: Mapping[str, Any],
    alerts: int,
    timing: Mapping[str, float],
) -> dict[str, Any]:
    """``train_classifier``'s metrics (``metrics/classifier.json``): nested dicts of numbers with stable keys.

    Args:
        classes: the classes in head order.
        train, val, test: the labelled splits (document counts, unlabelled documents).
        label_overrides: :func:`domainlm.classify.data.count_label_overrides` of the label table.
        outcome: the gate's :class:`domainlm.classify.gate.GateOutcome`; its ``kept`` attempt gives ``lora``.
        baseline: the TF-IDF baseline's :func:`score` on the test split plus ``train_s`` (seconds).
        baseline_docs: the training documents the baseline was fitted on.
        intervals: :func:`macro_f1_intervals` with models ``lora``, ``baseline`` and, when the deployed model was
            scored beside a trained one, ``deployed``.
        deployed: the deployed model's scored attempt, or None.
        from_deployed: whether the kept model is of the deployed line.
        start_reason: why the deployed model was or was not scored and continued
            (:attr:`domainlm.classify.deployed.StartPlan.reason`).
        deployed_version: the deployed manifest's version, or None when nothing is deployed.
        new_classes: the classes the deployed head was widened by (empty: not widened).
        candidates: :func:`domainlm.classify.candidates.candidate_scores` (None: the kept attempt's only).
        line: the kept line (``deployed`` | ``challenger``; None: from ``from_deployed``).
        new_data: :func:`new_data_scores`.
        windows: ``max_length`` (tokens), ``train`` and ``predict`` (windows per document).
        registered_version: the version registered (or kept) this run.
        promoted: whether that version holds the ``champion`` alias.
        champion: :func:`domainlm.classify.registry.champion_macro_f1` before this run.
        alerts: the number of alerts raised.
        timing: seconds per step.

    Returns:
        ``classes``, ``docs``, ``label_overrides``, ``lora``, ``baseline``, ``lora_to_baseline``, ``bootstrap``,
        ``start``, ``new_data``, ``windows``, ``attn_implementation``, ``compiled_layers``, ``gate``, ``registry``,
        ``alerts`` and ``timing`` (the stage's ``run`` documents each); fractions in [0, 1], durations in seconds.

    Raises:
        KeyError: ``intervals`` lacks the ``lora`` or ``baseline`` interval or the ``lora-baseline`` difference.
    """
    kept = outcome.kept
    lo, ba = intervals["macro_f1"]["lora"], intervals["macro_f1"]["baseline"]
    diff = intervals["difference"]["lora-baseline"]
    lora_scores = {
        **kept.test,
        "macro_f1_low": lo["low"],
        "macro_f1_high": lo["high"],
        "val_macro_f1": kept.val_macro_f1,
        **{k: kept.info.get(k, 0) for k in KEPT_TRAINING_FIGURES},
    }
    case = start_case(deployed, from_deployed=from_deployed, kept=kept, widened=bool(new_classes))
    versus_deployed = intervals["difference"].get("lora-deployed")
    return {
        "classes": len(classes),
        "docs": {
            "train": len(train),
            "val": len(val),
            "test": len(test),
            "unlabelled": train.unlabelled + val.unlabelled + test.unlabelled,
        },
        "label_overrides": label_overrides,
        "lora": lora_scores,
        "baseline": {
            **baseline,
            "macro_f1_low": ba["low"],
            "macro_f1_high": ba["high"],
            "train_docs": baseline_docs,
        },
        "lora_to_baseline": {
            "macro_f1": _ratio(kept.macro_f1, baseline["macro_f1"]),
            "accuracy": _ratio(kept.test["accuracy"], baseline["accuracy"]),
            "macro_f1_difference": diff["value"],
            "macro_f1_difference_low": diff["low"],
            "macro_f1_difference_high": diff["high"],
        },
        "bootstrap": {
            "confidence": intervals["confidence"],
            "resamples": intervals["n_resamples"],
            "method": intervals["method"],
        },
        "start": {
            "case": case,
            "reason": start_reason,
            "line": line or ("deployed" if from_deployed else "challenger"),
            "widened": int(bool(new_classes)),
            "new_classes": len(new_classes),
            "candidates": dict(candidates or {}),
            "from_deployed": int(from_deployed),
            "deployed_kept": int(case == "deployed_kept"),
            "deployed_version": deployed_version,
            "deployed_scored": int(deployed is not None),
            "deployed_test_macro_f1": deployed.macro_f1 if deployed is not None else None,
            "deployed_test_accuracy": deployed.test["accuracy"] if deployed is not None else None,
            "lora_minus_deployed": versus_deployed["value"] if versus_deployed else None,
            "lora_minus_deployed_low": versus_deployed["low"] if versus_deployed else None,
            "lora_minus_deployed_high": versus_deployed["high"] if versus_deployed else None,
        },
        "new_data": dict(new_data),
        "windows": dict(windows),
        "attn_implementation": kept.info.get("attn_implementation", "deployed model as saved"),
        "compiled_layers": int(kept.info.get("compiled_layers", 0)),
        "gate": {
            "passed": int(outcome.passed),
            "min_f1": outcome.min_f1,
            "attempts": len(outcome.attempts),
            "retries": outcome.retries,
            "max_retries": outcome.max_retries,
            "kept_attempt": kept.index,
            "trained_epochs": sum(float(a.info.get("epochs_run", 0)) for a in outcome.attempts),
            "test_macro_f1": {f"attempt_{a.index}": a.macro_f1 for a in outcome.attempts},
            "val_macro_f1": {f"attempt_{a.index}": a.val_macro_f1 for a in outcome.attempts},
        },
        "registry": {
            "version": registered_version,
            "champion": int(promoted),
            "previous_champion_version": champion["version"],
            "previous_champion_macro_f1": champion["macro_f1"],
        },
        "alerts": alerts,
        "timing": dict(timing),
    }


def _ratio(a: float, b: float) -> float | None:
    return float(a) / float(b) if b else None
