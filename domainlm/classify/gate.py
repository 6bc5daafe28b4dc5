"""The classifier's quality gate: macro-F1 on the test split's source labels must reach
``classifier.gate.min_f1``; on failure, retrain up to ``classifier.gate.max_retries`` times. A retry continues
fine-tuning the previous attempt's kept model (its LoRA matrices and score head) for ``classifier.gate.retry_epochs``
epochs at ``classifier.gate.retry_lr``, with a class-weighted loss; it is not a fresh run.

Attempt 0 is a training from the merged LM, or the deployed model scored as it is (``initial``,
:mod:`domainlm.classify.deployed`): kept when it passes, else the retries continue from it; or, when the deployed
head was widened for new classes (``warm_start``), a continuation of it with the retry settings.

The loop stops at the first passing attempt, which is kept. When every attempt fails, the attempt with the best
*validation* macro-F1 is kept (choosing on the test split would overstate its test score) and the stage raises
an alert (:mod:`domainlm.classify.alerts`); it still completes.

Under DeepSpeed the gate runs on rank 0 alone, scoring and saving included; every rank trains each attempt, a retry
from the adapter rank 0 saved (:func:`domainlm.classify.training.leading_attempts`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Attempt:
    """One training attempt and its scores.

    Attributes:
        index: 0 for the first training (or the deployed model), ``r`` for retry ``r``.
        settings: the training settings used (:func:`attempt_settings`).
        val_macro_f1: macro-F1 on val (the training labels), of the kept epoch.
        test: :func:`domainlm.classify.metrics.score` on the test split's source labels.
        passed: ``test["macro_f1"] >= min_f1``.
        info: the training figures (:func:`domainlm.classify.training.train_attempt`).
        model_dir: where the attempt's classifier was saved (:func:`domainlm.classify.model.save_classifier`).
        run_id: the attempt's nested MLflow run, or None.
        test_proba: the attempt's test probabilities (float ``[n_test, n_classes]``), or None.
        source: ``"trained"`` (from the merged LM), ``"continued"`` (a retry, or the widened deployed model
            continued) or ``"deployed"`` (scored, not trained); ``"widened"`` marks a ``warm_start`` (never an
            attempt of its own).
        backbone_dir: the LM folder the attempt's adapter was trained on (``models/merged``, or the deployed
            model's ``backbone/``), or None when unknown (a deployed folder without one).
    """

    index: int
    settings: dict[str, Any]
    val_macro_f1: float
    test: dict[str, Any]
    passed: bool
    info: dict[str, Any] = field(default_factory=dict)
    model_dir: Path | None = None
    run_id: str | None = None
    test_proba: Any = None
    source: str = "trained"
    backbone_dir: Path | None = None

    @property
    def macro_f1(self) -> float:
        """Test macro-F1 (source labels): the gated figure."""
        return float(self.test["macro_f1"])


@dataclass
class GateOutcome:
    """The gate's result: every attempt in order, the kept one, and whether it passed."""

    attempts: list[Attempt]
    kept: Attempt
    passed: bool
    min_f1: float
    max_retries: int

    @property
    def retries(self) -> int:
        """Attempts after the first."""
        return len(self.attempts) - 1


def attempt_settings(train: Mapping[str, Any], gate: Mapping[str, Any], attempt: int) -> dict[str, Any]:
    """The training settings of gate attempt ``attempt`` (0 = the first training, ``r`` ≥ 1 = retry ``r``).

    Attempt 0 uses the ``classifier.train`` params as they are, unweighted. A retry continues the previous model:
    ``epochs`` = ``gate.retry_epochs`` (default 3), ``lr`` = ``gate.retry_lr`` (default ``train.lr``), no warmup,
    ``class_weighted: true``; the rest as ``classifier.train``.

    Raises:
        ValueError: ``attempt`` < 0, or ``retry_epochs`` / ``retry_lr`` not positive.
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    settings = {**dict(train), "class_weighted": bool(train.get("class_weighted", False))}
    if attempt == 0:
        return settings
    epochs = float(gate.get("retry_epochs", 3))
    lr = float(gate.get("retry_lr") or train["lr"])
    if epochs <= 0 or lr <= 0:
        raise ValueError(f"classifier.gate.retry_epochs and retry_lr must be > 0, got {epochs} and {lr}")
    settings.update({"epochs": epochs, "lr": lr, "warmup_steps": 0.0, "class_weighted": True})
    return settings


def passes(macro_f1: float, min_f1: float) -> bool:
    """The gate's rule: ``macro_f1 >= min_f1``."""
    return float(macro_f1) >= float(min_f1)


def run_gate(
    train_and_score: Callable[[int, dict[str, Any], Attempt | None], Attempt],
    train: Mapping[str, Any],
    gate: Mapping[str, Any],
    *,
    min_f1: float,
    max_retries: int,
    initial: Attempt | None = None,
    warm_start: Attempt | None = None,
) -> GateOutcome:
    """Train, score and retry until an attempt passes or ``max_retries`` retries are spent.

    Args:
        train_and_score: ``(attempt index, settings, previous) -> Attempt``; trains one classifier (from the merged
            LM when ``previous`` is None, else continuing ``previous``'s saved model) and scores it (its ``passed``
            must follow :func:`passes`).
        train: the ``classifier.train`` params.
        gate: the ``classifier.gate`` params (``retry_epochs``, ``retry_lr``; :func:`attempt_settings`).
        min_f1: the macro-F1 threshold in [0, 1].
        max_retries: at most this many retries (≥ 0).
        initial: an already scored attempt 0 (the deployed model); when given, nothing is trained for attempt 0.
        warm_start: a saved model to continue from that is not scored (the deployed model with a widened head):
            attempt 0 continues it with the retry settings (:func:`attempt_settings` of attempt 1).

    Returns:
        A :class:`GateOutcome`: the first passing attempt is kept; when none passes, the one with the best
        validation macro-F1 (the earliest on a tie).

    Raises:
        ValueError: ``max_retries`` < 0 or ``min_f1`` outside [0, 1]; bad retry settings (:func:`attempt_settings`);
            both ``initial`` and ``warm_start``.
    """
    if int(max_retries) < 0:
        raise ValueError(f"classifier.gate.max_retries must be >= 0, got {max_retries}")
    if not 0.0 <= float(min_f1) <= 1.0:
        raise ValueError(f"classifier.gate.min_f1 must be in [0, 1], got {min_f1}")
    if initial is not None and warm_start is not None:
        raise ValueError("the gate starts from a scored attempt 0 or from a warm start, not both")
    if int(max_retries) > 0 or warm_start is not None:  # bad retry settings fail before any training, not after it
        attempt_settings(train, gate, 1)
    attempts: list[Attempt] = []
    previous = initial if initial is not None else warm_start
    for index in range(int(max_retries) + 1):
        if index == 0 and initial is not None:
            attempt = initial
        else:
            settings = attempt_settings(train, gate, max(index, 1) if warm_start is not None else index)
            attempt = train_and_score(index, settings, previous)
        attempts.append(attempt)
        if attempt.passed:
            return GateOutcome(attempts, attempt, True, float(min_f1), int(max_retries))
        previous = attempt
    kept = max(attempts, key=lambda a: (a.val_macro_f1, -a.index))
    return GateOutcome(attempts, kept, False, float(min_f1), int(max_retries))
