"""The candidates of a ``train_classifier`` run and the choice between them (MLflow's champion/challenger, TFX's
Evaluator blessing a candidate against the baseline on the same evaluation set).

A run has up to two *lines*, each a gate (:func:`domainlm.classify.gate.run_gate`) of its own:

- ``deployed``: the deployed model scored as it is (kept when it passes), or continued by the retries, or widened for
  new classes and continued; on the LM it was trained on (:func:`domainlm.classify.deployed.plan_start`);
- ``challenger``: a classifier trained from the current merged LM (the only line when nothing is deployed).

Both are scored on the same test split with the same windows and compute policy. :func:`choose_line` keeps the line
whose kept attempt passes the gate with the higher test macro-F1; a tie, or neither passing with equal validation
macro-F1, keeps the deployed line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domainlm.classify.gate import Attempt, GateOutcome, passes, run_gate

log = logging.getLogger(__name__)

DEPLOYED, CHALLENGER = "deployed", "challenger"
LINES = (DEPLOYED, CHALLENGER)


def choose_line(lines: Mapping[str, GateOutcome]) -> str:
    """The line whose kept model the run keeps.

    Passing lines first, by the kept attempt's test macro-F1 (the gated figure, every line scored on the same split);
    when no line passes, by the kept attempt's validation macro-F1 (choosing on the test split would overstate it).
    Ties keep the deployed line (:data:`LINES` order).

    Raises:
        ValueError: no line, or a name outside :data:`LINES`.
    """
    if not lines:
        raise ValueError("no candidate line: nothing deployed to score and nothing trained")
    unknown = sorted(set(lines) - set(LINES))
    if unknown:
        raise ValueError(f"unknown candidate lines {unknown}; expected {list(LINES)}")
    names = [n for n in LINES if n in lines]
    passing = [n for n in names if lines[n].passed]
    if passing:
        return max(passing, key=lambda n: (lines[n].kept.macro_f1, -names.index(n)))
    return max(names, key=lambda n: (lines[n].kept.val_macro_f1, -names.index(n)))


def best_trained(outcome: GateOutcome) -> Attempt | None:
    """The line's kept attempt among the ones it trained: the passing one, else the best on validation macro-F1
    (the earliest on a tie); None when it trained nothing."""
    trained = [a for a in outcome.attempts if a.source != "deployed"]
    if not trained:
        return None
    passed = [a for a in trained if a.passed]
    if passed:
        return passed[0]
    return max(trained, key=lambda a: (a.val_macro_f1, -a.index))


def candidate_scores(lines: Mapping[str, GateOutcome], deployed: Attempt | None) -> dict[str, dict[str, Any]]:
    """Every candidate's figures on this run's test split, for ``start.candidates`` and the round's decision.

    Returns:
        ``{name: {"test_macro_f1", "val_macro_f1", "passed" (0/1), "attempts" (trainings)}}`` for each candidate
        there was: ``deployed`` (scored as it is, 0 attempts), ``deployed_continued`` (the deployed line's best
        training: a retry of it or its widened head) and ``challenger`` (:func:`best_trained` of that line).
    """
    out: dict[str, dict[str, Any]] = {}

    def figures(attempt: Attempt, attempts: int) -> dict[str, Any]:
        return {
            "test_macro_f1": attempt.macro_f1,
            "val_macro_f1": attempt.val_macro_f1,
            "passed": int(attempt.passed),
            "attempts": attempts,
        }

    if deployed is not None:
        out["deployed"] = figures(deployed, 0)
    for name, key in ((DEPLOYED, "deployed_continued"), (CHALLENGER, "challenger")):
        outcome = lines.get(name)
        best = best_trained(outcome) if outcome is not None else None
        if best is not None:
            out[key] = figures(best, sum(a.source != "deployed" for a in outcome.attempts))
    return out


@dataclass
class LineTrainer:
    """Trains and scores the attempts of a line: the gate's ``train_and_score`` (:meth:`on`) for adapters on one
    backbone, each attempt a nested MLflow run of ``stage`` saved under ``work``.

    Attributes:
        train, val, test: :class:`domainlm.classify.data.LabelledSplit` (test with its rows in the window caches).
        classes: the class list.
        params: the ``classifier`` params.
        seed: attempt ``r`` is seeded ``seed + r``.
        min_f1: the gate's threshold.
        work: the scratch folder the attempts are saved in.
        stage: the MLflow run name of the stage (parent of the attempts' runs).
        compute: the compute policy (:mod:`domainlm.common.compute`), or None (fp32).
        batch_size: test prediction's batch size.
    """

    train: Any
    val: Any
    test: Any
    classes: Sequence[str]
    params: Mapping[str, Any]
    seed: int
    min_f1: float
    work: Path
    stage: str
    compute: Any = None
    batch_size: int = 16

    def on(self, backbone: str | os.PathLike, windows: Mapping[str, Any], prefix: str = "") -> Callable:
        """The ``(index, settings, previous) -> Attempt`` of a line whose adapters train on ``backbone`` (token
        windows ``windows``: ``train``, ``val``, ``test``); its runs and folders are named ``<prefix>attempt_<r>``."""
        from domainlm.classify.metrics import score
        from domainlm.classify.model import ADAPTER_SUBDIR, predict_windows, save_classifier
        from domainlm.classify.training import train_attempt
        from domainlm.common.tracking import mlflow_run

        backbone = Path(backbone)

        def train_and_score(index: int, settings: dict[str, Any], previous: Attempt | None) -> Attempt:
            init = Path(previous.model_dir) / ADAPTER_SUBDIR if previous is not None else None
            name = f"{prefix}attempt_{index}"
            with mlflow_run(self.stage, settings, nested=True, run_name=name) as child:
                run_id = child.active_run().info.run_id
                model, tok, info = train_attempt(
                    backbone,
                    self.train,
                    self.val,
                    self.classes,
                    self.params,
                    settings,
                    seed=self.seed + index,
                    on_log=lambda step, figures: child.log_metrics(figures, step=step),
                    init_adapter=init,
                    compute=self.compute,
                    windows=windows,
                )
                proba = predict_windows(  # the windows every candidate is scored on
                    model, tok, windows["test"], self.test.rows, batch_size=self.batch_size, compute=self.compute
                )
                scores = score(self.test.labels, proba, self.classes)
                passed = passes(scores["macro_f1"], self.min_f1)
                attempt_dir = save_classifier(model, tok, Path(self.work) / name)
                child.log_metrics(
                    {
                        "val_macro_f1": info["val_macro_f1"],
                        "test_macro_f1": scores["macro_f1"],
                        "test_accuracy": scores["accuracy"],
                        "train_s": info["train_s"],
                        "gate_passed": int(passed),
                    }
                )
                child.set_tag("gate", "passed" if passed else "failed")
            start = "from the merged LM"
            if previous is not None:
                start = "continued from " + {
                    "widened": "the widened deployed head",
                    "deployed": "the deployed model",
                }.get(previous.source, f"attempt {previous.index}")
            log.log(
                logging.INFO if passed else logging.WARNING,
                "%s (%s, %s epochs, lr %g%s): val macro-F1 %.4f, test macro-F1 %.4f, accuracy %.4f: gate %s",
                name,
                start,
                settings["epochs"],
                float(settings["lr"]),
                ", class-weighted" if settings["class_weighted"] else "",
                info["val_macro_f1"],
                scores["macro_f1"],
                scores["accuracy"],
                "PASSED" if passed else "failed",
            )
            return Attempt(
                index=index,
                settings=settings,
                val_macro_f1=info["val_macro_f1"],
                test=scores,
                passed=passed,
                info=info,
                model_dir=attempt_dir,
                run_id=run_id,
                test_proba=proba,
                source="continued" if previous is not None else "trained",
                backbone_dir=backbone,
            )

        return train_and_score


def run_lines(
    plan,
    trainer: LineTrainer,
    *,
    deployed: Attempt | None,
    manifest: Mapping[str, Any] | None,
    deployed_dir: str | os.PathLike | None,
    lm_dir: str | os.PathLike,
    windows: Mapping[str, Any],
    windows_on: Callable[[Path], Mapping[str, Any]],
    gate: Mapping[str, Any],
) -> dict[str, GateOutcome]:
    """Run each line of ``plan`` (:func:`domainlm.classify.deployed.plan_start`) through its gate.

    The deployed line: ``deployed`` (scored as attempt 0) kept or continued by the retries, or its head widened
    (:func:`domainlm.classify.model.widen_adapter`, new rows drawn with ``classifier.seed`` at the backbone's
    ``initializer_range``) and continued from attempt 0; on ``plan.continue_on`` (its runs ``deployed_attempt_<r>``
    when that is its own backbone, not ``lm_dir``). A scored deployed model with nothing to continue on is a line
    of that one attempt. The challenger: trained from ``lm_dir``.

    Args:
        plan: the :class:`domainlm.classify.deployed.StartPlan`.
        trainer: trains and scores attempts.
        deployed: the deployed model's scored attempt (``plan.score``), or None.
        manifest, deployed_dir: the deployed manifest and folder (the adapter to widen).
        lm_dir: the current merged LM; ``windows``: its split window caches.
        windows_on: the split window caches of another backbone (its tokenizer).
        gate: the ``classifier.gate`` params (``max_retries``) and the ``classifier.train`` params as ``train``.

    Returns:
        ``{line: GateOutcome}`` (:data:`LINES`).
    """
    from transformers import AutoConfig

    from domainlm.classify.model import ADAPTER_SUBDIR, widen_adapter

    gate_cfg, train_cfg = gate["gate"], gate["train"]
    args = {"min_f1": trainer.min_f1, "max_retries": int(gate_cfg.get("max_retries", 3))}
    lines: dict[str, GateOutcome] = {}
    if plan.continue_on is not None:
        backbone = Path(plan.continue_on)
        own = backbone.resolve() != Path(lm_dir).resolve()
        warm = None
        if plan.widen:
            folder = Path(trainer.work) / "widened"
            widened = widen_adapter(
                Path(deployed_dir) / ADAPTER_SUBDIR,
                manifest["classes"],
                trainer.classes,
                folder / ADAPTER_SUBDIR,
                seed=trainer.seed,
                std=float(AutoConfig.from_pretrained(backbone, local_files_only=True).initializer_range),
            )
            log.info(
                "widened the deployed v%s head: kept %s, added %s",
                manifest["version"],
                widened["kept"],
                widened["added"],
            )
            warm = Attempt(-1, {}, float("nan"), {}, False, model_dir=folder, source="widened", backbone_dir=backbone)
        lines[DEPLOYED] = run_gate(
            trainer.on(backbone, windows_on(backbone) if own else windows, "deployed_" if own else ""),
            train_cfg,
            gate_cfg,
            initial=deployed,
            warm_start=warm,
            **args,
        )
    elif deployed is not None:
        lines[DEPLOYED] = GateOutcome([deployed], deployed, deployed.passed, trainer.min_f1, 0)
    if plan.challenger:
        lines[CHALLENGER] = run_gate(trainer.on(lm_dir, windows), train_cfg, gate_cfg, **args)
    return lines
