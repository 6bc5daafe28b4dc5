"""Promote a classifier into ``models/deployed`` (the ``dvc add``-tracked input of ``train_classifier``).

A fresh clone starts from the bootstrap folder (only ``deployed.json`` = ``{"version": null}``, byte for byte the
committed one, so ``dvc status`` stays clean). After ``dvc repro`` the round reads ``metrics/classifier.json`` and
:func:`decide`\\ s; :func:`promote` then points the registry's ``champion`` alias at the new version, replaces
``models/deployed`` atomically (copy beside it, then rename) and runs ``dvc add models/deployed``.

The rule (seed 003 step 4, and "the champion never regresses", seed 004): promote when the gate passed and the new
model's test macro-F1 is at least the deployed model's **on the current test split**. The deployed model's score on
that split comes from, in order: its manifest (same ``test_sha256``); attempt 0 of this run when ``train_classifier``
started from it; else re-scoring it (:func:`rescore_deployed`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from domainlm.classify.deployed import MANIFEST, tree_sha256
from domainlm.common.atomic import atomic_path

log = logging.getLogger(__name__)

#: The bootstrap manifest's exact bytes: "nothing deployed yet".
BOOTSTRAP_BYTES = b'{"version": null}\n'
PROMOTE, KEEP, NOTHING, GATE_FAILED = "promote", "keep", "nothing_new", "gate_failed"
#: The stage that reads ``models/deployed`` (a dep in dvc.yaml).
CLASSIFIER_STAGE = "train_classifier"


def write_bootstrap(deployed_dir: str | os.PathLike) -> Path:
    """Create ``deployed_dir`` holding only ``deployed.json`` = :data:`BOOTSTRAP_BYTES`, atomically.

    Raises:
        FileExistsError: ``deployed_dir`` already exists (never overwrite a deployed model).
    """
    deployed_dir = Path(deployed_dir)
    if deployed_dir.exists():
        raise FileExistsError(f"{deployed_dir} exists; the bootstrap only creates a missing folder")
    with atomic_path(deployed_dir, is_dir=True) as tmp:
        (tmp / MANIFEST).write_bytes(BOOTSTRAP_BYTES)
    return deployed_dir


@dataclass(frozen=True)
class Decision:
    """What the round does with this run's classifier.

    Attributes:
        action: ``promote`` | ``keep`` (the deployed model stays) | ``gate_failed`` (no model passed; alert sent).
        reason: one sentence for the log and the commit message.
        new_macro_f1: this run's kept model's test macro-F1 (``None`` when no metrics).
        deployed_macro_f1: the deployed model's test macro-F1 on the current test split (``None``: nothing
            deployed, or not needed).
        version: the registry version of this run's model.
    """

    action: str
    reason: str
    new_macro_f1: float | None = None
    deployed_macro_f1: float | None = None
    version: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def start_case(metrics: Mapping[str, Any]) -> str:
    """``metrics["start"]["case"]`` of ``metrics/classifier.json`` (``deployed_kept`` | ``deployed_retrained`` |
    ``fresh``); ``fresh`` when the stage wrote no ``start`` block (a run before the deployed-first change)."""
    start = metrics.get("start") or {}
    return str(start.get("case", "fresh"))


def decide(
    metrics: Mapping[str, Any], manifest: Mapping[str, Any] | None, *, test_sha256: str, rescore: Callable[[], float]
) -> Decision:
    """Decide from ``metrics/classifier.json`` and the deployed manifest.

    Args:
        metrics: ``train_classifier``'s metrics (``gate.passed``, ``lora.macro_f1``, ``registry.version``,
            ``start.case``, ``start.deployed_test_macro_f1`` or ``gate.test_macro_f1.attempt_0``).
        manifest: :func:`domainlm.classify.deployed.read_manifest` of ``models/deployed`` (``None``: nothing
            deployed).
        test_sha256: :func:`domainlm.classify.data.split_sha256` of the current test split.
        rescore: returns the deployed model's test macro-F1 on the current test split; called only when neither
            the manifest nor this run's attempt 0 gives it.

    Raises:
        KeyError: ``metrics`` lacks ``gate.passed``, ``lora.macro_f1`` or ``registry.version``.
    """
    new_f1 = float(metrics["lora"]["macro_f1"])
    version = int(metrics["registry"]["version"])
    case = start_case(metrics)
    if case == "deployed_kept":
        return Decision(
            KEEP,
            "the deployed model passed the gate on the current test split; nothing trained",
            new_f1,
            new_f1,
            version,
        )
    if not int(metrics["gate"]["passed"]):
        return Decision(
            GATE_FAILED,
            f"the gate failed after {metrics['gate'].get('attempts')} attempt(s) "
            f"(best test macro-F1 {new_f1:.4f} < {metrics['gate'].get('min_f1')})",
            new_f1,
            None,
            version,
        )
    if manifest is None:
        return Decision(PROMOTE, "the gate passed and nothing is deployed yet", new_f1, None, version)
    if manifest.get("test_sha256") == test_sha256:
        deployed_f1, how = float(manifest["test_macro_f1"]), "its manifest, same test split"
    elif case == "deployed_retrained" and (metrics.get("start") or {}).get("deployed_test_macro_f1") is not None:
        deployed_f1, how = float(metrics["start"]["deployed_test_macro_f1"]), "attempt 0 of this run"
    elif case == "deployed_retrained" and "attempt_0" in (metrics["gate"].get("test_macro_f1") or {}):
        deployed_f1, how = float(metrics["gate"]["test_macro_f1"]["attempt_0"]), "attempt 0 of this run"
    else:
        deployed_f1, how = float(rescore()), "re-scored on the current test split"
    if new_f1 >= deployed_f1:
        return Decision(
            PROMOTE,
            f"the gate passed and test macro-F1 {new_f1:.4f} >= the deployed v"
            f"{manifest['version']}'s {deployed_f1:.4f} ({how})",
            new_f1,
            deployed_f1,
            version,
        )
    return Decision(
        KEEP,
        f"the gate passed but test macro-F1 {new_f1:.4f} < the deployed v{manifest['version']}'s "
        f"{deployed_f1:.4f} ({how}); the deployed model stays",
        new_f1,
        deployed_f1,
        version,
    )


def rescore_deployed(deployed_dir: str | os.PathLike, texts, labels, *, max_length: int, batch_size: int = 16) -> float:
    """The deployed classifier's (``<deployed_dir>/model``) macro-F1 on ``texts`` against ``labels``.

    Raises:
        OSError: the model folder does not load.
    """
    from domainlm.classify.metrics import macro_f1
    from domainlm.classify.model import classes_of, load_classifier, predict_proba

    model, tokenizer = load_classifier(Path(deployed_dir) / "model")
    classes = classes_of(model)
    proba = predict_proba(model, tokenizer, list(texts), max_length=max_length, batch_size=batch_size)
    return macro_f1(list(labels), [classes[j] for j in proba.argmax(axis=1)])


def build_manifest(
    *,
    registry_name: str,
    version: int,
    run_id: str,
    test_macro_f1: float,
    test_sha256: str,
    merged_dir: str | os.PathLike,
    classes,
    date: dt.datetime | None = None,
) -> dict[str, Any]:
    """The ``deployed.json`` of a promoted model (keys :data:`domainlm.classify.deployed.MANIFEST_KEYS`)."""
    date = date or dt.datetime.now(dt.UTC)
    return {
        "registry_name": registry_name,
        "version": int(version),
        "run_id": run_id,
        "test_macro_f1": round(float(test_macro_f1), 6),
        "test_sha256": test_sha256,
        "merged_lm_sha256": tree_sha256(merged_dir),
        "classes": list(classes),
        "date": date.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def replace_deployed(
    classifier_dir: str | os.PathLike, deployed_dir: str | os.PathLike, manifest: Mapping[str, Any]
) -> Path:
    """Copy ``<classifier_dir>/{model,adapter}`` and write ``manifest`` into a sibling of ``deployed_dir``, then
    rename it onto ``deployed_dir`` (the old folder is removed only after the rename).

    Raises:
        FileNotFoundError: ``classifier_dir`` lacks ``model/`` or ``adapter/``.
    """
    classifier_dir = Path(classifier_dir)
    for sub in ("model", "adapter"):
        if not (classifier_dir / sub).is_dir():
            raise FileNotFoundError(f"{classifier_dir / sub} is missing: nothing to promote")
    with atomic_path(deployed_dir, is_dir=True) as tmp:
        for sub in ("model", "adapter"):
            shutil.copytree(classifier_dir / sub, tmp / sub)
        (tmp / MANIFEST).write_text(json.dumps(dict(manifest), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return Path(deployed_dir)


def set_champion(client, model_name: str, version: int) -> None:
    """Point the registry's ``champion`` alias at ``version`` (MLflow ``set_registered_model_alias``)."""
    from domainlm.classify.registry import CHAMPION

    client.set_registered_model_alias(model_name, CHAMPION, str(int(version)))


def promote(
    *,
    metrics: Mapping[str, Any],
    client,
    model_name: str,
    test_sha256: str,
    classifier_dir: str | os.PathLike,
    deployed_dir: str | os.PathLike,
    merged_dir: str | os.PathLike,
    classes,
    repo: str | os.PathLike = ".",
    dvc: str = "dvc",
) -> dict[str, Any]:
    """Promote this run's classifier: ``champion`` alias → its registry version, ``models/deployed`` replaced,
    ``dvc add`` (updates ``models/deployed.dvc``), ``dvc commit train_classifier`` (records the new folder as that
    stage's dep in ``dvc.lock``). Returns the new manifest.

    Raises:
        subprocess.CalledProcessError: ``dvc add`` failed.
        mlflow.exceptions.MlflowException: the registry version does not exist.
    """
    version = int(metrics["registry"]["version"])
    run_id = client.get_model_version(model_name, str(version)).run_id
    manifest = build_manifest(
        registry_name=model_name,
        version=version,
        run_id=run_id,
        test_macro_f1=float(metrics["lora"]["macro_f1"]),
        test_sha256=test_sha256,
        merged_dir=merged_dir,
        classes=classes,
    )
    replace_deployed(classifier_dir, deployed_dir, manifest)
    set_champion(client, model_name, version)
    subprocess.run([dvc, "add", "-q", str(deployed_dir)], cwd=repo, check=True)
    # train_classifier reads models/deployed: record the promoted folder as its dep in dvc.lock (`dvc commit`), or
    # the next `dvc repro` would re-run it only because the promote replaced its input (and re-score the model it
    # just produced). Its outputs stand: models/classifier holds the very model now deployed.
    subprocess.run([dvc, "commit", "-f", "-q", CLASSIFIER_STAGE], cwd=repo, check=True)
    log.info(
        "promoted %s v%d (test macro-F1 %.4f) into %s; champion -> v%d",
        model_name,
        version,
        manifest["test_macro_f1"],
        deployed_dir,
        version,
    )
    return manifest
