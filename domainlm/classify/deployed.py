"""The deployed classifier: ``models/deployed``, a ``dvc add``-tracked input (never a stage output, so the
pipeline stays acyclic), replaced only by the round's promote step.

Layout: ``model/``, ``adapter/`` and ``backbone/`` exactly as ``models/classifier``
(:func:`domainlm.classify.model.save_classifier`; ``backbone/`` is the LM the adapter was trained on, weights and
tokenizer) and ``deployed.json`` (:data:`MANIFEST_KEYS`). A folder whose manifest has ``version: null`` (a fresh
clone's bootstrap) means "nothing deployed yet".

``train_classifier`` plans its start from the deployed model (:func:`plan_start`), following the warm start of TFX's
Trainer and MLflow's champion/challenger:

- its class list equals this run's: it is scored first (:func:`score_deployed`; ``model/`` is self-contained, so
  whatever the current LM), kept when it passes, else continued by the gate's retries;
- this run has classes its head lacks (and lacks none of its classes): its head is widened
  (:func:`domainlm.classify.model.widen_adapter`) and training continues from it;
- it continues on the current merged LM when it was trained on it (same :func:`tree_sha256` of ``models/merged``),
  else on its own ``backbone/``: after an LM release the deployed line (kept or continued) meets a classifier
  trained on the new LM, the challenger, and the better passing one is kept (a tie keeps the deployed line).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "deployed.json"
BACKBONE_SUBDIR = "backbone"
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


@dataclass(frozen=True)
class StartPlan:
    """How ``train_classifier`` starts from the deployed model (:func:`plan_start`).

    Attributes:
        score: score the deployed model as it is (its class list equals this run's).
        continue_on: the LM folder its adapter continues on (the current merged LM when it was trained on it, else
            its own ``backbone/``), or None: it is not continued.
        new_classes: this run's classes its head lacks (the head is widened before training continues), in head
            order; empty when the class lists are equal.
        challenger: also train a classifier from the current merged LM (a new LM, or nothing to continue).
        reason: one sentence for the log and ``start.reason``.
    """

    score: bool
    continue_on: Path | None
    new_classes: tuple[str, ...]
    challenger: bool
    reason: str

    @property
    def widen(self) -> bool:
        return bool(self.new_classes)


def plan_start(
    manifest: Mapping[str, Any] | None,
    deployed_dir: str | os.PathLike | None,
    *,
    classes: Sequence[str],
    lm_dir: str | os.PathLike,
    merged_lm_sha256: str,
) -> StartPlan:
    """Plan the start from the deployed model.

    - Nothing deployed: train from the merged LM (``challenger`` only).
    - The deployed model has a class this run has no training document for: train from the merged LM; its head
      cannot be mapped onto this label space (it is not scored either).
    - Same class list: score it; continue it on ``lm_dir`` when it was trained on that LM (``merged_lm_sha256``),
      else on its ``backbone/`` (and train a challenger on the new LM); a deployed folder without ``backbone/``
      and on another LM is only scored beside the challenger.
    - New classes: widen and continue it as above (not scored: it cannot predict the new classes); without a
      backbone to continue on, train from the merged LM.

    Args:
        manifest: :func:`read_manifest` of ``deployed_dir`` (None: nothing deployed).
        deployed_dir: ``models/deployed``.
        classes: this run's class list (sorted train labels).
        lm_dir: the current merged LM.
        merged_lm_sha256: :func:`tree_sha256` of ``lm_dir``.

    Raises:
        ValueError: the deployed ``backbone/`` is not the LM its manifest names (``merged_lm_sha256`` differs).
    """
    if manifest is None:
        return StartPlan(False, None, (), True, "no deployed model")
    deployed_classes = list(manifest["classes"])
    dropped = [c for c in deployed_classes if c not in classes]
    if dropped:
        return StartPlan(
            False,
            None,
            (),
            True,
            f"label space changed: the deployed classes {dropped} have no training document now; trained fresh",
        )
    new = tuple(c for c in classes if c not in deployed_classes)
    same_lm = manifest["merged_lm_sha256"] == merged_lm_sha256
    backbone = Path(deployed_dir) / BACKBONE_SUBDIR if deployed_dir is not None else None
    if backbone is not None and not backbone.is_dir():
        backbone = None
    if not same_lm and backbone is not None and tree_sha256(backbone) != manifest["merged_lm_sha256"]:
        raise ValueError(
            f"{backbone} is not the LM the deployed manifest names (merged_lm_sha256 {manifest['merged_lm_sha256']})"
        )
    continue_on = Path(lm_dir) if same_lm else backbone
    where = "on this merged LM" if same_lm else "on its own backbone (a new LM release; a challenger is trained too)"
    if new:
        if continue_on is None:
            return StartPlan(
                False,
                None,
                (),
                True,
                f"new classes {list(new)} and the deployed model carries no backbone to continue on; trained fresh",
            )
        return StartPlan(
            False,
            continue_on,
            new,
            not same_lm,
            f"new classes {list(new)}: the deployed head is widened (known rows kept) and continued {where}",
        )
    if continue_on is None:
        return StartPlan(
            True,
            None,
            (),
            True,
            "the merged LM changed since it was deployed (a new LM release) and the deployed model carries no "
            "backbone: scored beside the challenger, not continued",
        )
    return StartPlan(True, continue_on, (), not same_lm, f"deployed model scored first, continued {where}")


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
        classes: the class list (the deployed model's: :attr:`StartPlan.score`).
        predict: ``(model, tokenizer, texts) -> float [n, len(classes)]`` probabilities (the run's windows and
            compute policy).
        min_f1: the gate's threshold.

    Returns:
        A :class:`domainlm.classify.gate.Attempt` with ``index`` 0, ``source`` ``"deployed"``, its ``test_proba``,
        ``backbone_dir`` (its ``backbone/``, None when the folder has none) and ``info["score_s"]`` (seconds).
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
        backbone_dir=backbone if (backbone := Path(deployed_dir) / BACKBONE_SUBDIR).is_dir() else None,
    )
