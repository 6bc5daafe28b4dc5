"""The classifier's quality gate: macro-F1 on the test split's source labels must reach
``classifier.gate.min_f1``; on failure, retrain up to ``classifier.gate.max_retries`` times. A retry continues
fine-tuning the previous attempt's kept model (its LoRA matrices and score head) for ``classifier.gate.retry_epochs``
epochs at ``classifier.gate.retry_lr``, with a class-weighted loss; it is not a fresh run.

Attempt 0 is either a training from the merged LM or, when a compatible deployed model exists
(:mod:`domainlm.classify.deployed`), that deployed model scored as it is (``initial``): kept when it passes, else the
retries continue from it.

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
        source: ``"trained"`` (from the merged LM), ``"continued"`` (a retry) or ``"deployed"`` (scored, not trained).
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

    Returns:
        A :class:`GateOutcome`: the first passing attempt is kept; when none passes, the one with the best
        validation macro-F1 (the earliest on a tie).

    Raises:
        ValueError: ``max_retries`` < 0 or ``min_f1`` outside [0, 1]; bad retry settings (:func:`attempt_settings`).
    """
    if int(max_retries) < 0:
        raise ValueError(f"classifier.gate.max_retries must be >= 0, got {max_retries}")
    if not 0.0 <= float(min_f1) <= 1.0:
        raise ValueError(f"classifier.gate.min_f1 must be in [0, 1], got {min_f1}")
    if int(max_retries) > 0:  # bad retry settings fail before any training, not after it
        attempt_settings(train, gate, 1)
    attempts: list[Attempt] = []
    previous = initial
    for index in range(int(max_retries) + 1):
        if index == 0 and initial is not None:
            attempt = initial
        else:
            attempt = train_and_score(index, attempt_settings(train, gate, index), previous)
        attempts.append(attempt)
        if attempt.passed:
            return GateOutcome(attempts, attempt, True, float(min_f1), int(max_retries))
        previous = attempt
    kept = max(attempts, key=lambda a: (a.val_macro_f1, -a.index))
    return GateOutcome(attempts, kept, False, float(min_f1), int(max_retries))
