"""The deployed classifier: ``models/deployed``, a ``dvc add``-tracked input (never a stage output, so the
pipeline stays acyclic), replaced only by the round's promote step.

Layout: ``model/`` and ``adapter/`` exactly as ``models/classifier`` (:func:`domainlm.classify.model.save_classifier`)
and ``deployed.json`` (:data:`MANIFEST_KEYS`). A folder whose manifest has ``version: null`` (a fresh clone's
bootstrap) means "nothing deployed yet".

``train_classifier`` scores the deployed model first (the champion/challenger baseline, :func:`score_deployed`)
whenever its class list equals this run's (:func:`scorable`): its ``model/`` folder holds its own backbone (the LM its
adapter was trained on, merged with the adapter) and tokenizer, so it is scored whatever the current LM. Its retries
continue it only when it is :func:`compatible`: also built on the current merged LM (:func:`tree_sha256` of
``models/merged``). After an LM release the deployed model is scored beside a classifier trained on the new LM, the
challenger.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "deployed.json"
#: The manifest's keys: registry name and version, the MLflow run id, the test macro-F1 it was promoted with, the
#: test split's hash (:func:`domainlm.classify.data.split_sha256`), the merged LM's hash (:func:`tree_sha256`), the
#: class list, the UTC date of promotion.
MANIFEST_KEYS = (
    "registry_name",
    "version",
    "run_id",
    "test_macro_f1",
    "test_sha256",
    "merged_lm_sha256",
    "classes",
    "date",
)


def tree_sha256(root: str | os.PathLike) -> str:
    """SHA-256 over a folder's files: each relative POSIX path and its bytes, in sorted path order.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def read_manifest(deployed_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The deployed model's manifest, or ``None`` when nothing is deployed (no folder, no manifest, or
    ``version: null``).

    Raises:
        ValueError: the manifest is not a JSON object, or a deployed manifest lacks a key of
            :data:`MANIFEST_KEYS` or its ``model/``/``adapter/`` folders.
    """
    path = Path(deployed_dir) / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("version") is None:
        return None
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    for sub in ("model", "adapter"):
        if not (Path(deployed_dir) / sub).is_dir():
            raise ValueError(f"{path}: the deployed folder has no {sub}/")
    return manifest


def scorable(manifest: Mapping[str, Any] | None, *, classes: Sequence[str]) -> tuple[bool, str]:
    """Whether the deployed model can be scored in this run, and why (a short reason): a model is deployed and its
    class list equals ``classes`` (same order: class ids index the head). The LM does not matter: ``model/`` is
    self-contained."""
    if manifest is None:
        return False, "no deployed model"
    if list(manifest["classes"]) != list(classes):
        return False, f"label space changed ({len(manifest['classes'])} deployed classes vs {len(classes)} now)"
    return True, "deployed model scorable"


def compatible(
    manifest: Mapping[str, Any] | None, *, classes: Sequence[str], merged_lm_sha256: str
) -> tuple[bool, str]:
    """Whether the deployed model can be scored and fine-tuned in this run, and why (a short reason).

    It can when a model is deployed, its class list equals ``classes`` (same order: class ids index the head) and it
    was trained on the merged LM whose :func:`tree_sha256` is ``merged_lm_sha256``.
    """
    ok, reason = scorable(manifest, classes=classes)
    if not ok:
        return ok, reason
    if manifest["merged_lm_sha256"] != merged_lm_sha256:
        return False, "the merged LM changed since it was deployed (a new LM release)"
    return True, "deployed model compatible"


def score_deployed(
    deployed_dir: str | os.PathLike,
    manifest: Mapping[str, Any],
    val,
    test,
    classes: Sequence[str],
    predict: Callable,
    min_f1: float,
):
    """Score the deployed model as attempt 0 (nothing trained): validation macro-F1 on the labels it would be
    continued on (documents whose label is in ``classes``), test scores on the source labels, and the gate's
    verdict.

    Args:
        deployed_dir: ``models/deployed``; its ``model/`` is loaded (:func:`domainlm.classify.model.load_classifier`).
        manifest: its :func:`read_manifest`.
        val, test: :class:`domainlm.classify.data.LabelledSplit` with texts.
        classes: the class list (the deployed model's, :func:`scorable`).
        predict: ``(model, tokenizer, texts) -> float [n, len(classes)]`` probabilities (the run's windows and
            compute policy).
        min_f1: the gate's threshold.

    Returns:
        A :class:`domainlm.classify.gate.Attempt` with ``index`` 0, ``source`` ``"deployed"``, its ``test_proba``
        and ``info["score_s"]`` (seconds).
    """
    from domainlm.classify.gate import Attempt, passes
    from domainlm.classify.metrics import macro_f1, score
    from domainlm.classify.model import MODEL_SUBDIR, load_classifier

    t0 = time.perf_counter()
    model, tok = load_classifier(Path(deployed_dir) / MODEL_SUBDIR)
    known = [i for i, lab in enumerate(val.labels) if lab in set(classes)]
    val_proba = predict(model, tok, [val.texts[i] for i in known])
    val_f1 = macro_f1([val.labels[i] for i in known], [classes[j] for j in val_proba.argmax(axis=1)])
    proba = predict(model, tok, test.texts)
    scores = score(test.labels, proba, classes)
    passed = passes(scores["macro_f1"], min_f1)
    log.log(
        logging.INFO if passed else logging.WARNING,
        "attempt 0 (deployed v%s, not trained): val macro-F1 %.4f, test macro-F1 %.4f, accuracy %.4f: gate %s",
        manifest["version"],
        val_f1,
        scores["macro_f1"],
        scores["accuracy"],
        "PASSED" if passed else "failed",
    )
    return Attempt(
        index=0,
        settings={"epochs": 0},
        val_macro_f1=val_f1,
        test=scores,
        passed=passed,
        info={"train_s": 0.0, "epochs_run": 0.0, "steps": 0, "score_s": time.perf_counter() - t0},
        model_dir=Path(deployed_dir),
        test_proba=proba,
        source="deployed",
    )
