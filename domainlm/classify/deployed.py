"""The deployed classifier: ``models/deployed``, a ``dvc add``-tracked input (never a stage output, so the
pipeline stays acyclic), replaced only by the round's promote step.

Layout: ``model/`` and ``adapter/`` exactly as ``models/classifier`` (:func:`domainlm.classify.model.save_classifier`)
and ``deployed.json`` (:data:`MANIFEST_KEYS`). A folder whose manifest has ``version: null`` (a fresh clone's
bootstrap) means "nothing deployed yet".

``train_classifier`` scores the deployed model first (the champion/challenger baseline) when it is
:func:`compatible`: same class list, and built on the same merged LM (:func:`tree_sha256` of ``models/merged``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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


def compatible(
    manifest: Mapping[str, Any] | None, *, classes: Sequence[str], merged_lm_sha256: str
) -> tuple[bool, str]:
    """Whether the deployed model can be scored and fine-tuned in this run, and why (a short reason).

    It can when a model is deployed, its class list equals ``classes`` (same order: class ids index the head) and it
    was trained on the merged LM whose :func:`tree_sha256` is ``merged_lm_sha256``.
    """
    if manifest is None:
        return False, "no deployed model"
    if list(manifest["classes"]) != list(classes):
        return False, f"label space changed ({len(manifest['classes'])} deployed classes vs {len(classes)} now)"
    if manifest["merged_lm_sha256"] != merged_lm_sha256:
        return False, "the merged LM changed since it was deployed"
    return True, "deployed model compatible"
