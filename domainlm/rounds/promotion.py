"""Promote a classifier into ``models/deployed`` (the ``dvc add``-tracked input of ``train_classifier``).

A fresh clone starts from the bootstrap folder (only ``deployed.json`` = ``{"version": null}``, byte for byte the
committed one, so ``dvc status`` stays clean). After ``dvc repro`` the round reads ``metrics/classifier.json`` and
:func:`decide`\\ s; :func:`promote` then points the registry's ``champion`` alias at the new version, replaces
``models/deployed`` atomically (copy beside it, then rename) and runs ``dvc add models/deployed``.

The rule ("the champion never regresses", as MLflow's champion/challenger aliases are used): promote when the gate
passed and the new model's test macro-F1 is higher than the deployed model's **on the current test split** (a tie
keeps the deployed model). The deployed model's score on that split comes from, in order: its manifest (same
``test_sha256``); this run, which scored it first; else re-scoring it (:func:`rescore_deployed`). A deployed head
widened by new classes and continued is promoted when it passes: the deployed model cannot predict those classes.
Every reason quotes each candidate of the run (:func:`candidates_text`).

The MLflow registry (``mlflow.db``) is per machine unless ``MLFLOW_TRACKING_URI`` points at a shared
``mlflow server``, so ``metrics/classifier.json`` (pulled with the pipeline's outputs) may name a version this store
lacks, or one that holds another model here. The promote then registers the model in this store
(:func:`ensure_version`, with :func:`domainlm.classify.registry.log_and_register`) and uses that local version for the
alias and the manifest; ``metrics/classifier.json`` (a DVC output) is left as it is. Keeping the deployed model
registers it the same way (:func:`keep_champion`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from domainlm.classify.deployed import BACKBONE_SUBDIR, MANIFEST, tree_sha256
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
        version: the registry version of this run's model: the one ``metrics/classifier.json`` names, or after a
            promote, the version in this machine's MLflow store (:func:`ensure_version`).
        champion_version: the version the ``champion`` alias points at in this machine's store after the round
            (``None``: not set by this round).
    """

    action: str
    reason: str
    new_macro_f1: float | None = None
    deployed_macro_f1: float | None = None
    version: int | None = None
    champion_version: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def finetuned_from(metrics: Mapping[str, Any]) -> int | None:
    """The deployed version this run's model continued (``start.case`` ``deployed_retrained`` or
    ``deployed_widened``), else ``None``."""
    start = metrics.get("start") or {}
    if start_case(metrics) in ("deployed_retrained", "deployed_widened") and start.get("deployed_version") is not None:
        return int(start["deployed_version"])
    return None


def start_case(metrics: Mapping[str, Any]) -> str:
    """``metrics["start"]["case"]`` of ``metrics/classifier.json`` (``deployed_kept`` | ``deployed_retrained`` |
    ``deployed_widened`` | ``challenger`` | ``fresh``); ``fresh`` when the stage wrote no ``start`` block (metrics
    written by a release that did not score the deployed model first)."""
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
    start = metrics.get("start") or {}
    others = candidates_text(metrics)
    if case == "deployed_kept":
        return Decision(
            KEEP,
            "the deployed model passed the gate on the current test split and "
            + (f"no candidate beat it ({others})" if others else "nothing was trained"),
            new_f1,
            new_f1,
            version,
        )
    if case == "deployed_widened" and int(metrics["gate"]["passed"]):
        return Decision(
            PROMOTE,
            f"the gate passed and the deployed v{start.get('deployed_version')}, its head widened by "
            f"{start.get('new_classes')} new class(es) and continued, scores test macro-F1 {new_f1:.4f}; the deployed "
            "model cannot predict the new classes" + (f" ({others})" if others else ""),
            new_f1,
            None,
            version,
        )
    if (
        not int(metrics["gate"]["passed"])
        and case == "challenger"
        and manifest is not None
        and start.get("deployed_test_macro_f1") is not None
        and float(start["deployed_test_macro_f1"]) >= float(metrics["gate"]["min_f1"])
    ):
        deployed_f1 = float(start["deployed_test_macro_f1"])
        return Decision(
            KEEP,
            f"the challenger (a new LM) failed the gate after {metrics['gate'].get('attempts')} attempt(s) (best test "
            f"macro-F1 {new_f1:.4f} < {metrics['gate']['min_f1']}); the deployed v{manifest['version']} passes on the "
            f"current test split ({deployed_f1:.4f}, scored in this run beside it){_versus_deployed(metrics)}; "
            "it stays" + (f" ({others})" if others else ""),
            new_f1,
            deployed_f1,
            version,
        )
    if not int(metrics["gate"]["passed"]):
        return Decision(
            GATE_FAILED,
            f"the gate failed after {metrics['gate'].get('attempts')} attempt(s) "
            f"(best test macro-F1 {new_f1:.4f} < {metrics['gate'].get('min_f1')})" + (f"; {others}" if others else ""),
            new_f1,
            None,
            version,
        )
    if manifest is None:
        return Decision(PROMOTE, "the gate passed and nothing is deployed yet", new_f1, None, version)
    if manifest.get("test_sha256") == test_sha256:
        deployed_f1, how = float(manifest["test_macro_f1"]), "its manifest, same test split"
    elif case == "challenger" and (metrics.get("start") or {}).get("deployed_test_macro_f1") is not None:
        deployed_f1, how = float(metrics["start"]["deployed_test_macro_f1"]), "scored in this run beside the challenger"
    elif case == "deployed_retrained" and (metrics.get("start") or {}).get("deployed_test_macro_f1") is not None:
        deployed_f1, how = float(metrics["start"]["deployed_test_macro_f1"]), "attempt 0 of this run"
    elif case == "deployed_retrained" and "attempt_0" in (metrics["gate"].get("test_macro_f1") or {}):
        deployed_f1, how = float(metrics["gate"]["test_macro_f1"]["attempt_0"]), "attempt 0 of this run"
    else:
        deployed_f1, how = float(rescore()), "re-scored on the current test split"
    interval = _versus_deployed(metrics)
    if new_f1 > deployed_f1:
        return Decision(
            PROMOTE,
            f"the gate passed and {_candidate(case)} test macro-F1 {new_f1:.4f} > the deployed v"
            f"{manifest['version']}'s {deployed_f1:.4f} ({how}){interval}" + (f"; {others}" if others else ""),
            new_f1,
            deployed_f1,
            version,
        )
    return Decision(
        KEEP,
        f"the gate passed but {_candidate(case)} test macro-F1 {new_f1:.4f} <= the deployed v{manifest['version']}'s "
        f"{deployed_f1:.4f} ({how}{interval}); the deployed model stays (a tie keeps it)"
        + (f"; {others}" if others else ""),
        new_f1,
        deployed_f1,
        version,
    )


def candidates_text(metrics: Mapping[str, Any]) -> str:
    """Every candidate's test macro-F1 from ``start.candidates`` (:func:`domainlm.classify.candidates.candidate_scores`)
    as one clause, e.g. ``"candidates: deployed 0.7012 (failed), deployed continued 0.7601 (passed, 2 attempts),
    challenger 0.7433 (passed, 1 attempt)"``; ``""`` when the run had a single candidate."""
    candidates = (metrics.get("start") or {}).get("candidates") or {}
    if len(candidates) < 2:
        return ""
    parts = []
    for name, c in candidates.items():
        n = int(c.get("attempts", 0))
        trained = f", {n} attempt{'s' if n != 1 else ''}" if n else ""
        parts.append(
            f"{name.replace('_', ' ')} {float(c['test_macro_f1']):.4f} ({'passed' if c.get('passed') else 'failed'}"
            f"{trained})"
        )
    return "candidates: " + ", ".join(parts)


def _candidate(case: str) -> str:
    return {
        "challenger": "the challenger's (a new LM)",
        "deployed_retrained": "the continued model's",
        "deployed_widened": "the widened model's",
    }.get(case, "this run's")


def _versus_deployed(metrics: Mapping[str, Any]) -> str:
    """``"; candidate - deployed +0.0123 [-0.0300, +0.0500]"`` (the paired bootstrap interval) when the metrics hold
    it, else ``""``."""
    start = metrics.get("start") or {}
    if start.get("lora_minus_deployed") is None:
        return ""
    conf = (metrics.get("bootstrap") or {}).get("confidence", 0.95)
    return (
        f"; candidate - deployed {start['lora_minus_deployed']:+.4f}, {100 * float(conf):.0f}% paired bootstrap "
        f"[{start['lora_minus_deployed_low']:+.4f}, {start['lora_minus_deployed_high']:+.4f}]"
    )


def rescore_deployed(
    deployed_dir: str | os.PathLike,
    texts,
    labels,
    *,
    max_length: int,
    max_windows: int,
    batch_size: int = 16,
    compute=None,
) -> float:
    """The deployed classifier's (``<deployed_dir>/model``) macro-F1 on ``texts`` against ``labels``, scored as
    ``train_classifier`` scores the new model: :func:`domainlm.classify.model.predict_proba` with the same
    ``max_length`` (tokens per window), ``max_windows`` (windows pooled per document, ``classifier.windows.predict``),
    ``batch_size`` and ``compute`` policy (:func:`domainlm.classify.training.scoring_kwargs` builds them from params).

    Raises:
        OSError: the model folder does not load.
    """
    from domainlm.classify.metrics import macro_f1
    from domainlm.classify.model import classes_of, load_classifier, predict_proba

    model, tokenizer = load_classifier(Path(deployed_dir) / "model")
    classes = classes_of(model)
    proba = predict_proba(
        model,
        tokenizer,
        list(texts),
        max_length=max_length,
        batch_size=batch_size,
        max_windows=max_windows,
        compute=compute,
    )
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
    finetuned_from: int | None = None,
) -> dict[str, Any]:
    """The ``deployed.json`` of a promoted model (keys :data:`domainlm.classify.deployed.MANIFEST_KEYS`, plus
    ``finetuned_from``: the deployed version it continued, null for a model trained from the LM).

    ``merged_dir``: the LM its adapter was trained on (the classifier's ``backbone/``; ``merged_lm_sha256`` is its
    :func:`domainlm.classify.deployed.tree_sha256`)."""
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
        "finetuned_from": None if finetuned_from is None else int(finetuned_from),
    }


def replace_deployed(
    classifier_dir: str | os.PathLike, deployed_dir: str | os.PathLike, manifest: Mapping[str, Any]
) -> Path:
    """Copy ``<classifier_dir>/{model,adapter}`` (and ``backbone/`` when it has one) and write ``manifest`` into a
    sibling of ``deployed_dir``, then rename it onto ``deployed_dir`` (the old folder is removed only after the
    rename).

    Raises:
        FileNotFoundError: ``classifier_dir`` lacks ``model/`` or ``adapter/``.
    """
    classifier_dir = Path(classifier_dir)
    for sub in ("model", "adapter"):
        if not (classifier_dir / sub).is_dir():
            raise FileNotFoundError(f"{classifier_dir / sub} is missing: nothing to promote")
    with atomic_path(deployed_dir, is_dir=True) as tmp:
        carried = [BACKBONE_SUBDIR] if (classifier_dir / BACKBONE_SUBDIR).is_dir() else []
        for sub in ("model", "adapter", *carried):
            shutil.copytree(classifier_dir / sub, tmp / sub)
        (tmp / MANIFEST).write_text(json.dumps(dict(manifest), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return Path(deployed_dir)


def set_champion(client, model_name: str, version: int) -> None:
    """Point the registry's ``champion`` alias at ``version`` (MLflow ``set_registered_model_alias``)."""
    from domainlm.classify.registry import CHAMPION

    client.set_registered_model_alias(model_name, CHAMPION, str(int(version)))


#: The environment variable naming the MLflow tracking (and registry) store; the log names it when a version is
#: missing here, so a team knows to share one ``mlflow server``.
TRACKING_ENV = "MLFLOW_TRACKING_URI"
#: Version tag on the versions the promote registers: :func:`tree_sha256` of the registered ``model/`` folder, so a
#: later round finds that version again instead of registering the same model twice.
MODEL_SHA_TAG = "model_sha256"
#: Tags of a version that must agree with ``metrics/classifier.json`` for it to be the model the metrics name (another
#: machine's v12 and this store's v12 are different models).
IDENTITY_TAGS = ("test_sha256", "macro_f1", "classes")
#: The MLflow run (``dvc.stage`` tag) under which the promote registers a model.
PROMOTE_RUN = "promote"


@dataclass(frozen=True)
class LocalVersion:
    """A model's version in this machine's MLflow store.

    Attributes:
        version: the registry version here.
        run_id: the MLflow run that logged it.
        how: ``named`` (the version asked for is this model), ``reused`` (an earlier promote registered this very
            ``model/`` folder here, found by :data:`MODEL_SHA_TAG`) or ``registered`` (registered now).
    """

    version: int
    run_id: str
    how: str


def registered_version(client, model_name: str, version: int):
    """The ``ModelVersion`` ``version`` of ``model_name`` in ``client``'s store, or ``None`` when the store lacks
    the version or the model.

    Raises:
        mlflow.exceptions.MlflowException: any other registry error.
    """
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(model_name, str(int(version)))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def tag_conflicts(found: Mapping[str, str], expected: Mapping[str, Any], keys: Sequence[str]) -> list[str]:
    """The ``keys`` that both ``found`` (a version's tags) and ``expected`` hold, with different values;
    ``macro_f1`` is compared at :data:`domainlm.classify.registry.COMPARE_DECIMALS` places (older tags are rounded)."""
    from domainlm.classify.registry import COMPARE_DECIMALS

    conflicts = []
    for key in keys:
        if key not in found or expected.get(key) is None:
            continue
        here, wanted = found[key], expected[key]
        if key == "macro_f1":
            try:
                same = round(float(here), COMPARE_DECIMALS) == round(float(wanted), COMPARE_DECIMALS)
            except ValueError:
                same = False
        else:
            same = str(here) == str(wanted)
        if not same:
            conflicts.append(key)
    return conflicts


def ensure_version(
    client,
    model_name: str,
    version: int,
    *,
    model_dir: str | os.PathLike,
    tags: Mapping[str, Any],
    serving_config: Mapping[str, Any],
    named_by: str,
    identity: Sequence[str] = (),
    run_id: str | None = None,
) -> LocalVersion:
    """The version of ``model_dir`` in ``client``'s store: ``version`` when the store holds it and it is this model,
    else the version an earlier promote registered for the same folder, else a new one.

    ``version`` is this model when the store has it, its run is ``run_id`` (when given) and none of its ``identity``
    tags contradicts ``tags``. Otherwise (the store is another machine's, :data:`TRACKING_ENV`) the folder is found by
    :data:`MODEL_SHA_TAG` or registered with :func:`domainlm.classify.registry.log_and_register` inside an MLflow
    run (:func:`domainlm.common.tracking.mlflow_run`, ``dvc.stage`` = :data:`PROMOTE_RUN`), tagged ``tags`` plus
    :data:`MODEL_SHA_TAG`, alias ``champion`` (callers move the alias where they need it afterwards). One WARNING line
    says so and names :data:`TRACKING_ENV`.

    Args:
        client: an ``MlflowClient`` on :func:`domainlm.common.tracking.tracking_uri`.
        version: the version ``named_by`` names (``metrics/classifier.json``, ``deployed.json``).
        model_dir: the saved classifier ``model/`` folder.
        tags: version tags for a new registration (values stringified).
        serving_config: the pyfunc's ``model_config`` (:func:`domainlm.rounds.daily.serving_config`).
        named_by: the file that names ``version``, for the log line.
        identity: keys of ``tags`` that ``version``'s tags must not contradict (:func:`tag_conflicts`).
        run_id: the MLflow run that ``version`` must come from (a manifest's ``run_id``), or None.

    Raises:
        FileNotFoundError: ``model_dir`` is not a folder (when registering).
        mlflow.exceptions.MlflowException: a registry error other than a missing version.
    """
    from domainlm.classify.registry import CHAMPION, log_and_register
    from domainlm.common.tracking import mlflow_run, tracking_uri

    found = registered_version(client, model_name, version)
    if found is None:
        why = "lacks"
    else:
        other = [] if run_id is None or found.run_id == run_id else ["run_id"]
        other += tag_conflicts(found.tags or {}, tags, identity)
        if not other:
            return LocalVersion(int(found.version), found.run_id, "named")
        why = f"holds another model ({', '.join(other)} differ) as"
    model_sha = tree_sha256(model_dir)
    same = client.search_model_versions(f"name = '{model_name}' and tags.{MODEL_SHA_TAG} = '{model_sha}'")
    if same:
        latest = max(same, key=lambda v: int(v.version))
        local = LocalVersion(int(latest.version), latest.run_id, "reused")
        done = f"{model_dir} is already registered here as v{local.version} ({MODEL_SHA_TAG})"
    else:
        with mlflow_run(PROMOTE_RUN, run_name=f"{PROMOTE_RUN} v{int(version)} absent here") as ml:
            registered = log_and_register(
                ml,
                model_dir,
                model_name=model_name,
                alias=CHAMPION,
                tags={**tags, MODEL_SHA_TAG: model_sha},
                serving_config=serving_config,
            )
            local = LocalVersion(int(registered["version"]), ml.active_run().info.run_id, "registered")
        done = f"registered {model_dir} here as v{local.version}"
    log.warning(
        "the MLflow store %s (%s) %s %s v%d named by %s: %s; point %s at a shared `mlflow server` so every "
        "machine's metrics and manifests name the same versions",
        tracking_uri(),
        TRACKING_ENV,
        why,
        model_name,
        int(version),
        named_by,
        done,
        TRACKING_ENV,
    )
    return local


def classifier_tags(
    metrics: Mapping[str, Any], *, test_sha256: str, classes: Sequence[str], data_sha256: str | None = None
) -> dict[str, str]:
    """The version tags ``train_classifier`` gives its model (:func:`domainlm.classify.registry.version_tags`),
    rebuilt from ``metrics/classifier.json`` and the current split for a promote that registers the model here:
    ``git_commit`` (HEAD now), ``data_sha256`` (when given), ``test_sha256``, ``label_overrides``, ``macro_f1``,
    ``accuracy``, ``gate``, ``classes``, ``started_from`` (``continued`` when a retry was kept, else ``trained``),
    ``finetuned_from`` (:func:`finetuned_from`), plus ``registered_by`` = ``promote`` and ``metrics_version`` (the
    version the metrics name in the store that trained it).

    Raises:
        KeyError: ``metrics`` lacks ``lora.macro_f1``, ``gate.passed`` or ``registry.version``.
    """
    from domainlm.classify.registry import version_tags
    from domainlm.common.stage import git_commit

    lora, gate = metrics["lora"], metrics["gate"]
    return {
        **version_tags(
            git_commit=git_commit(),
            data_sha256=data_sha256,
            test_sha256=test_sha256,
            label_overrides=metrics.get("label_overrides"),
            macro_f1=lora["macro_f1"],
            accuracy=lora.get("accuracy"),
            passed=bool(int(gate["passed"])),
            classes=classes,
            started_from="continued" if int(gate.get("kept_attempt") or 0) > 0 else "trained",
            finetuned_from=finetuned_from(metrics),
        ),
        "registered_by": PROMOTE_RUN,
        "metrics_version": str(int(metrics["registry"]["version"])),
    }


def deployed_tags(manifest: Mapping[str, Any]) -> dict[str, str]:
    """Version tags for the deployed model registered from its folder, from its manifest's figures: ``git_commit``
    (HEAD now), ``test_sha256``, ``macro_f1`` (``test_macro_f1``), ``gate`` = ``passed`` (a model is deployed only
    after passing), ``classes``, ``merged_lm_sha256``, ``started_from`` = ``deployed``, ``registered_by`` =
    ``promote``, ``manifest_version``, ``manifest_run_id`` and ``deployed_date``.

    Raises:
        KeyError: ``manifest`` lacks a key of :data:`domainlm.classify.deployed.MANIFEST_KEYS`.
    """
    from domainlm.classify.registry import score_tag
    from domainlm.common.stage import git_commit

    return {
        "git_commit": git_commit(),
        "test_sha256": str(manifest["test_sha256"]),
        "macro_f1": score_tag(manifest["test_macro_f1"]),
        "gate": "passed",
        "classes": ",".join(manifest["classes"]),
        "merged_lm_sha256": str(manifest["merged_lm_sha256"]),
        "started_from": "deployed",
        "registered_by": PROMOTE_RUN,
        "manifest_version": str(int(manifest["version"])),
        "manifest_run_id": str(manifest["run_id"]),
        "deployed_date": str(manifest["date"]),
    }


def keep_champion(
    client,
    model_name: str,
    manifest: Mapping[str, Any],
    deployed_dir: str | os.PathLike,
    *,
    serving_config: Mapping[str, Any],
) -> LocalVersion:
    """Point ``champion`` at the deployed model in this machine's store (the deployed model stays champion).

    When this store lacks the manifest's version (or holds another model under that number: its run is not the
    manifest's ``run_id``), the deployed folder's ``model/`` is registered here (:func:`ensure_version`, tags
    :func:`deployed_tags`) rather than the alias being skipped. A user expects ``models:/<name>@champion`` to be the
    model in ``models/deployed`` on every machine, and ``train_classifier`` compares each new version with the
    champion to choose its alias: a store without one would call any version that passes the gate ``champion``
    while the round keeps the deployed model. ``deployed.json`` is not rewritten (it is ``dvc add``-tracked and
    stays byte for byte the committed one); later rounds find the registered version by :data:`MODEL_SHA_TAG`.

    Returns:
        The champion's :class:`LocalVersion` here.

    Raises:
        mlflow.exceptions.MlflowException: a registry error other than a missing version.
    """
    local = ensure_version(
        client,
        model_name,
        int(manifest["version"]),
        model_dir=Path(deployed_dir) / "model",
        tags=deployed_tags(manifest),
        serving_config=serving_config,
        named_by=str(Path(deployed_dir) / MANIFEST),
        run_id=str(manifest["run_id"]) if manifest.get("run_id") else None,
    )
    set_champion(client, model_name, local.version)
    return local


def same_model(classifier_dir: str | os.PathLike, deployed_dir: str | os.PathLike) -> bool:
    """Whether ``<classifier_dir>/model`` and ``<deployed_dir>/model`` hold the same files (:func:`tree_sha256`):
    this run's model is already deployed, whatever version numbers the metrics and the manifest carry."""
    a, b = Path(classifier_dir) / "model", Path(deployed_dir) / "model"
    return a.is_dir() and b.is_dir() and tree_sha256(a) == tree_sha256(b)


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
    serving_config: Mapping[str, Any],
    data_sha256: str | None = None,
    repo: str | os.PathLike = ".",
    dvc: str = "dvc",
) -> dict[str, Any]:
    """Promote this run's classifier: ``champion`` alias → its registry version, ``models/deployed`` replaced,
    ``dvc add`` (updates ``models/deployed.dvc``), ``dvc commit train_classifier`` (records the new folder as that
    stage's dep in ``dvc.lock``). Returns the new manifest.

    The registry version is the one ``metrics/classifier.json`` names when this store holds that model; otherwise
    ``<classifier_dir>/model`` is registered here (:func:`ensure_version`, tags :func:`classifier_tags`) and the
    manifest and the alias name the local version. ``metrics/classifier.json`` is not rewritten.

    Args:
        serving_config: the pyfunc's ``model_config`` for a registration here.
        data_sha256: the ``data_sha256`` tag for a registration here (split files + label table), or None.

    Raises:
        subprocess.CalledProcessError: ``dvc add`` failed.
        mlflow.exceptions.MlflowException: a registry error other than a missing version.
    """
    local = ensure_version(
        client,
        model_name,
        int(metrics["registry"]["version"]),
        model_dir=Path(classifier_dir) / "model",
        tags=classifier_tags(metrics, test_sha256=test_sha256, classes=classes, data_sha256=data_sha256),
        serving_config=serving_config,
        named_by="metrics/classifier.json",
        identity=IDENTITY_TAGS,
    )
    version = local.version
    manifest = build_manifest(
        registry_name=model_name,
        version=version,
        run_id=local.run_id,
        test_macro_f1=float(metrics["lora"]["macro_f1"]),
        test_sha256=test_sha256,
        merged_dir=backbone if (backbone := Path(classifier_dir) / BACKBONE_SUBDIR).is_dir() else merged_dir,
        classes=classes,
        finetuned_from=finetuned_from(metrics),
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
