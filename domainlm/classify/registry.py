"""The classifier's MLflow Model Registry entry (``classifier.registry.model_name``, default
``domain-lm-classifier``): every run registers a new version; the champion never regresses (MLflow's
champion/challenger aliases).

A version becomes ``champion`` only when it passed the gate *and* its test macro-F1 is at least the current
champion's on the same test set; otherwise it becomes ``challenger`` (and the champion alias stays where it
was). "The same test set": when the champion's ``test_sha256`` tag equals this run's (same ids, source labels
and texts) its ``macro_f1`` tag is compared; when the test split changed (new data arrived) the champion is
loaded and re-scored on this run's test split. A champion that cannot be loaded blocks promotion (no proof of
non-regression), with a warning.

Versions carry the tags ``git_commit``, ``data_sha256`` (split files + label table), ``test_sha256``,
``label_overrides``, ``macro_f1``, ``accuracy``, ``gate`` (passed | failed), ``classes``, ``started_from`` and
``finetuned_from`` (:func:`version_tags`). A run that keeps the deployed model registers nothing
(:func:`register_kept`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from domainlm.classify.data import LabelledSplit, split_files_sha256, split_sha256
from domainlm.classify.gate import GateOutcome
from domainlm.classify.metrics import macro_f1
from domainlm.common.tracking import ensure_registered_model

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
#: Packages the served model needs, pinned to the versions installed here (no requirement inference).
SERVING_PACKAGES = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas")


def pip_requirements() -> list[str]:
    """``name==version`` of :data:`SERVING_PACKAGES` as installed (torch without a local ``+cpu`` tag)."""
    return [f"{p}=={importlib.metadata.version(p).split('+')[0]}" for p in SERVING_PACKAGES]


def champion_version(client, model_name: str):
    """The ``ModelVersion`` the ``champion`` alias points at, or ``None`` (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def champion_macro_f1(
    client, model_name: str, *, test_sha256: str, texts: Sequence[str], labels: Sequence[str], batch_rows: int = 16
) -> dict[str, Any]:
    """The current champion's test macro-F1 on this run's test set.

    Args:
        test_sha256: this run's :func:`domainlm.classify.data.split_sha256` of the test split.
        texts, labels: the test split's texts and source labels.
        batch_rows: rows per ``predict`` call when re-scoring.

    Returns:
        ``{"version": int | None, "macro_f1": float | None, "how": "none" | "tag" | "rescored" | "unavailable"}``:
        ``none`` when there is no champion; ``tag`` when its ``test_sha256`` tag matches; ``rescored`` after
        loading it (``models:/<name>@champion``) and predicting the test texts; ``unavailable`` when that fails
        (logged at WARNING).
    """
    import mlflow.pyfunc
    import pandas as pd

    current = champion_version(client, model_name)
    if current is None:
        return {"version": None, "macro_f1": None, "how": "none"}
    version = int(current.version)
    tags = current.tags or {}
    if tags.get("test_sha256") == test_sha256 and "macro_f1" in tags:
        return {"version": version, "macro_f1": float(tags["macro_f1"]), "how": "tag"}
    try:
        model = mlflow.pyfunc.load_model(f"models:/{model_name}@{CHAMPION}")
        predicted: list[str] = []
        for start in range(0, len(texts), batch_rows):
            out = model.predict(pd.DataFrame({"text": list(texts[start : start + batch_rows])}))
            predicted.extend(out["label"].tolist())
        return {"version": version, "macro_f1": macro_f1(labels, predicted), "how": "rescored"}
    except Exception as exc:  # a champion whose artifacts are gone or whose code no longer loads
        log.warning(
            "cannot re-score the champion %s v%d on this test set (%s): no promotion this run", model_name, version, exc
        )
        return {"version": version, "macro_f1": None, "how": "unavailable"}


#: Decimal places at which :func:`choose_alias` compares macro-F1 (older registries hold ``macro_f1`` tags rounded
#: to 6 decimals; :func:`score_tag` writes the score in full).
COMPARE_DECIMALS = 6


def score_tag(value: float) -> str:
    """A score as a version tag: ``repr`` of the float, which ``float()`` reads back exactly (a rounded tag made
    an identical re-run look worse than the champion it equals, and left it ``challenger``)."""
    return repr(float(value))


def choose_alias(passed: bool, new_macro_f1: float, champion: Mapping[str, Any]) -> str:
    """``champion`` when the gate passed and the new macro-F1 ≥ the champion's on the same test set (or there is
    no champion); ``challenger`` otherwise, including when the champion could not be scored.

    Both scores are compared rounded to :data:`COMPARE_DECIMALS` places, so a re-run that reproduces the champion's
    predictions ties with it (and is promoted) whether the champion's tag is full precision or 6 decimals."""
    if not passed:
        return CHALLENGER
    if champion.get("how") == "none":
        return CHAMPION
    if champion.get("macro_f1") is None:
        return CHALLENGER
    new, old = (round(float(x), COMPARE_DECIMALS) for x in (new_macro_f1, champion["macro_f1"]))
    return CHAMPION if new >= old else CHALLENGER


def log_and_register(
    mlflow,
    model_dir: str | Path,
    *,
    model_name: str,
    alias: str,
    tags: Mapping[str, Any],
    serving_config: Mapping[str, Any],
    code_root: str | Path | None = None,
) -> dict[str, Any]:
    """Log ``model_dir`` (a saved classifier ``model/`` folder) as the active run's pyfunc model ``classifier``,
    register it as a new version of ``model_name``, tag the version and point ``alias`` at it.

    The model is logged from code (:data:`domainlm.classify.serving.SERVED_MODEL_FILE`) with the ``domainlm``
    package as ``code_paths``, so ``mlflow models serve --env-manager local`` loads it from any folder.

    Args:
        mlflow: the ``mlflow`` module inside an active run.
        alias: ``champion`` or ``challenger`` (:func:`choose_alias`).
        tags: version tags (values stringified).
        serving_config: the pyfunc's ``model_config`` (``max_batch_rows``, ``max_length``, ``batch_size``, …).
        code_root: the ``domainlm`` package folder to bundle (default: this installation's).

    Returns:
        ``{"name", "version", "alias", "model_uri"}``.
    """
    from mlflow import MlflowClient

    from domainlm.classify.serving import ARTIFACT_KEY, INPUT_EXAMPLE_TEXT, SERVED_MODEL_FILE

    client = MlflowClient()
    ensure_registered_model(
        client,
        model_name,
        "Document classifier: LoRA sequence classification on the merged domain LM (stage train_classifier).",
    )
    code_root = Path(code_root) if code_root else Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="classifier_code_") as tmp:
        package = Path(tmp) / "domainlm"
        shutil.copytree(code_root, package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        info = mlflow.pyfunc.log_model(
            name="classifier",
            python_model=str(SERVED_MODEL_FILE),
            artifacts={ARTIFACT_KEY: str(model_dir)},
            # no signature argument: MLflow infers it from predict's type hint (list[str], see serving.py)
            code_paths=[str(package)],
            model_config=dict(serving_config),
            input_example=[INPUT_EXAMPLE_TEXT],
            pip_requirements=pip_requirements(),
        )
    # Register only once every artifact is logged, with the tags in the same registry transaction (the SQL store
    # writes the version and its tags in one commit), then point the alias: a kill at any moment leaves either no
    # new version, or a complete, tagged one, and an alias only ever on a scored version.
    registered = mlflow.register_model(info.model_uri, model_name, tags={k: str(v) for k, v in tags.items()})
    version = int(registered.version)
    client.set_registered_model_alias(model_name, alias, str(version))
    return {"name": model_name, "version": version, "alias": alias, "model_uri": f"models:/{model_name}/{version}"}


def version_tags(
    *,
    git_commit: str,
    data_sha256: str | None,
    test_sha256: str,
    label_overrides: int | None,
    macro_f1: float,
    accuracy: float | None,
    passed: bool,
    classes: Sequence[str],
    started_from: str,
    finetuned_from: int | str | None,
) -> dict[str, str]:
    """The version tags of a classifier, as strings, in the order the module docstring lists them.

    Args:
        git_commit: the commit the model was trained at.
        data_sha256: :func:`domainlm.classify.data.split_files_sha256` of the data it saw, or None (no tag).
        test_sha256: :func:`domainlm.classify.data.split_sha256` of the test split it was scored on.
        label_overrides: documents whose label differs from their source label, or None (no tag).
        macro_f1, accuracy: its test figures in [0, 1] (:func:`score_tag`); ``accuracy`` None: no tag.
        passed: whether it passed the gate (``gate`` = ``passed`` | ``failed``).
        classes: the classes in head order (joined with commas).
        started_from: ``trained``, ``continued`` or ``deployed`` (:class:`domainlm.classify.gate.Attempt`'s
            ``source``).
        finetuned_from: the deployed version its training continued, or None (an empty tag).

    Returns:
        ``{tag: str}`` without the None-valued tags.
    """
    tags = {
        "git_commit": git_commit,
        "data_sha256": data_sha256,
        "test_sha256": test_sha256,
        "label_overrides": label_overrides,
        "macro_f1": score_tag(macro_f1),
        "accuracy": score_tag(accuracy) if accuracy is not None else None,
        "gate": "passed" if passed else "failed",
        "classes": ",".join(classes),
        "started_from": started_from,
        "finetuned_from": finetuned_from if finetuned_from is not None else "",
    }
    return {k: str(v) for k, v in tags.items() if v is not None}


def register_kept(
    mlflow,
    model_dir: str | Path,
    outcome: GateOutcome,
    *,
    model_name: str,
    classes: Sequence[str],
    test: LabelledSplit,
    split_dir: str | os.PathLike,
    labels_path: str | os.PathLike,
    domains: Sequence[str],
    label_overrides: int,
    git_commit: str,
    deployed_version: int | None,
    serving_config: Mapping[str, Any],
    logger: logging.Logger | None = None,
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Register the gate's kept model as a new version of ``model_name`` (champion or challenger), or, when the
    kept model is the deployed one, register nothing: the deployed version stays champion.

    The champion's macro-F1 on this test set comes first (:func:`champion_macro_f1`), then the alias
    (:func:`choose_alias`) and :func:`log_and_register` with :func:`version_tags`.

    Args:
        mlflow: the ``mlflow`` module inside the stage's active run.
        model_dir: the kept classifier's ``model/`` folder.
        outcome: the gate's :class:`domainlm.classify.gate.GateOutcome` (``kept.source`` ``deployed`` registers
            nothing).
        model_name: the registered model's name (``classifier.registry.model_name``).
        classes: the classes in head order.
        test: the test split (texts and source labels), scored by a champion whose ``test_sha256`` differs.
        split_dir, labels_path, domains: the data the model saw (the ``data_sha256`` tag).
        label_overrides: :func:`domainlm.classify.data.count_label_overrides` of ``labels_path``.
        git_commit: the commit the model was trained at.
        deployed_version: the deployed version the gate started from (its attempt 0), or None.
        serving_config: the pyfunc's ``model_config``; ``max_batch_rows`` (default 64) also sets the champion's
            re-scoring batch.
        logger: where the outcome is logged at INFO (default: this module's logger).

    Returns:
        ``(alias, registered, champion)``: ``champion`` or ``challenger``; :func:`log_and_register`'s dict, or
        ``{"version": deployed_version}`` when the deployed model was kept; :func:`champion_macro_f1` before this run.

    Raises:
        mlflow.exceptions.MlflowException: the tracking server or registry refused a call.
    """
    from mlflow import MlflowClient

    logger = logger or log
    kept = outcome.kept
    test_sha = split_sha256(test)
    champion = champion_macro_f1(
        MlflowClient(),
        model_name,
        test_sha256=test_sha,
        texts=test.texts,
        labels=test.labels,
        batch_rows=int(serving_config.get("max_batch_rows", 64)),
    )
    if kept.source == "deployed":  # kept as deployed: nothing new to register, the deployed version stays champion
        alias, registered = CHAMPION, {"version": int(deployed_version)}
        logger.info(
            "kept the deployed %s v%d (test macro-F1 %.4f); nothing registered",
            model_name,
            registered["version"],
            kept.macro_f1,
        )
        return alias, registered, champion
    alias = choose_alias(outcome.passed, kept.macro_f1, champion)
    registered = log_and_register(
        mlflow,
        model_dir,
        model_name=model_name,
        alias=alias,
        serving_config=serving_config,
        tags=version_tags(
            git_commit=git_commit,
            data_sha256=split_files_sha256(split_dir, labels_path, domains),
            test_sha256=test_sha,
            label_overrides=label_overrides,
            macro_f1=kept.macro_f1,
            accuracy=kept.test["accuracy"],
            passed=outcome.passed,
            classes=classes,
            started_from=kept.source,
            finetuned_from=deployed_version,
        ),
    )
    logger.info(
        "registered %s v%d as %r (champion before: v%s, macro-F1 %s, %s)",
        model_name,
        registered["version"],
        alias,
        champion["version"],
        champion["macro_f1"],
        champion["how"],
    )
    return alias, registered, champion
