"""The promote step against this machine's MLflow store (real SQLite store, real git and DVC, tiny classifiers):
a version named by ``metrics/classifier.json`` or ``deployed.json`` that the store lacks is registered
here instead of crashing, the normal path registers nothing, and the deployed model is re-scored with the new model's
window settings."""

from __future__ import annotations

import itertools
import json
import logging
import shutil

import pytest
import yaml
from classifier_fixtures import CLASSES, DOMAINS, build_tiny_lm, classifier_params, labelled_docs, write_labelled_splits
from conftest import run
from mlflow import MlflowClient
from tiny_lm import one_torch_thread  # noqa: F401 (fixture)

from domainlm.classify.data import read_split, split_sha256
from domainlm.classify.deployed import read_manifest, tree_sha256
from domainlm.classify.registry import CHAMPION, log_and_register, score_tag
from domainlm.classify.training import scoring_kwargs
from domainlm.common.tracking import mlflow_run
from domainlm.rounds import promotion
from domainlm.rounds.daily import decide_and_promote, serving_config
from domainlm.rounds.promotion import KEEP, MODEL_SHA_TAG, PROMOTE

MODEL = "domain-lm-classifier"
DVC_YAML = {"stages": {"train_classifier": {"cmd": "true", "deps": ["models/deployed"], "outs": ["models/classifier"]}}}


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """A tiny merged LM and two LoRA classifiers on it, saved as ``train_classifier`` saves them (``model/``,
    ``adapter/``): ``new``, one attempt trained with the tiny params (seconds), and ``old``, untrained (seed 1)."""
    from domainlm.classify import data, gate, training
    from domainlm.classify.model import attach_lora, load_sequence_classifier, save_classifier

    root = tmp_path_factory.mktemp("registry_models")
    lm = build_tiny_lm(root / "lm")
    splits = data.read_splits(*write_labelled_splits(root), DOMAINS)
    cfg = classifier_params()
    settings = gate.attempt_settings(cfg["train"], cfg["gate"], 0)
    model, tok, _ = training.train_attempt(lm, splits["train"], splits["val"], CLASSES, cfg, settings, seed=0)
    new = save_classifier(model, tok, root / "new")
    base, tok = load_sequence_classifier(lm, CLASSES)
    old = save_classifier(attach_lora(base, cfg["lora"], seed=1), tok, root / "old")
    return {"lm": lm, "new": new, "old": old}


def write_metrics(repo, *, version: int, f1: float) -> dict:
    metrics = {
        "label_overrides": 0,
        "lora": {"macro_f1": f1, "accuracy": f1},
        "gate": {"passed": 1, "min_f1": 0.0, "attempts": 1, "kept_attempt": 0, "test_macro_f1": {}},
        "start": {"case": "fresh", "reason": "test"},
        "registry": {"version": version, "champion": 1},
    }
    (repo / "metrics").mkdir(exist_ok=True)
    (repo / "metrics" / "classifier.json").write_text(json.dumps(metrics), encoding="utf-8")
    return metrics


@pytest.fixture
def repo(tmp_path, monkeypatch, classifiers):
    """A repository after ``dvc repro``: params, splits and label table, ``models/{merged,classifier}`` (the ``new``
    classifier), the bootstrap ``models/deployed``, an empty MLflow store in ``mlflow.db``; the working directory."""
    repo = tmp_path / "repo"
    repo.mkdir()
    cfg = {"domains": DOMAINS, "compute": {"dtype": "fp32", "threads": 1}, "classifier": classifier_params()}
    (repo / "params.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML), encoding="utf-8")
    (repo / "data" / "labels").mkdir(parents=True)
    write_labelled_splits(repo / "data", labels_path=repo / "data" / "labels" / "split_labels.parquet")
    shutil.copytree(classifiers["lm"], repo / "models" / "merged")
    shutil.copytree(classifiers["new"], repo / "models" / "classifier")
    promotion.write_bootstrap(repo / "models" / "deployed")
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    return repo


def store(repo) -> MlflowClient:
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def versions(repo) -> list:
    return sorted(store(repo).search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))


def test_scoring_kwargs_are_the_stages_window_length_and_batch_settings():
    cfg = classifier_params()
    assert scoring_kwargs(cfg) == {"max_length": 24, "batch_size": 32, "max_windows": 3, "compute": None}
    assert scoring_kwargs(classifier_params(windows={"predict": 5}))["max_windows"] == 5


def test_the_deployed_model_is_rescored_with_the_new_models_windows(classifiers):
    """Documents whose first window reads like one class and the rest like another, labelled with the classifier's
    own predictions over the stage's 3 windows: the re-score is perfect only when it pools 3 windows too."""
    from domainlm.classify.model import classes_of, load_classifier, predict_proba

    texts = [
        " ".join(labelled_docs(a, 1, f"head-{b}") + labelled_docs(b, 6, f"tail-{a}"))
        for a, b in itertools.permutations(CLASSES, 2)
    ]
    scoring = scoring_kwargs(classifier_params())
    model, tok = load_classifier(classifiers["new"] / "model")
    classes = classes_of(model)
    predicted = {
        n: [classes[j] for j in predict_proba(model, tok, texts, **{**scoring, "max_windows": n}).argmax(axis=1)]
        for n in (1, scoring["max_windows"])
    }
    assert predicted[1] != predicted[3]  # the window count changes predictions on these documents
    assert promotion.rescore_deployed(classifiers["new"], texts, predicted[3], **scoring) == 1.0
    assert promotion.rescore_deployed(classifiers["new"], texts, predicted[3], **{**scoring, "max_windows": 1}) < 1.0


def test_promote_registers_the_model_here_when_the_store_lacks_the_metrics_version(repo, caplog):
    metrics = write_metrics(repo, version=12, f1=0.8)
    with caplog.at_level(logging.WARNING, logger="domainlm.rounds"):
        decision = decide_and_promote()

    (local,) = versions(repo)  # exactly one version: the one registered here
    test_sha = split_sha256(read_split("data/split", "data/labels/split_labels.parquet", DOMAINS, "test"))
    assert decision.action == PROMOTE and decision.version == decision.champion_version == int(local.version) == 1
    assert "does not hold the v12 that metrics/classifier.json names" in decision.reason
    assert local.tags["macro_f1"] == score_tag(0.8) and local.tags["accuracy"] == score_tag(0.8)
    assert local.tags["test_sha256"] == test_sha and local.tags["classes"] == ",".join(CLASSES)
    assert local.tags["gate"] == "passed" and local.tags["label_overrides"] == "0"
    assert local.tags["started_from"] == "trained" and local.tags["metrics_version"] == "12"
    assert local.tags[MODEL_SHA_TAG] == tree_sha256(repo / "models" / "classifier" / "model")
    assert len(local.tags["data_sha256"]) == 64 and len(local.tags["git_commit"]) > 0
    assert store(repo).get_model_version_by_alias(MODEL, CHAMPION).version == local.version
    manifest = read_manifest(repo / "models" / "deployed")
    assert manifest["version"] == 1 and manifest["run_id"] == local.run_id and manifest["test_sha256"] == test_sha
    assert (repo / "models" / "deployed.dvc").is_file()
    assert json.loads((repo / "metrics" / "classifier.json").read_text(encoding="utf-8")) == metrics  # untouched
    (line,) = [r.getMessage() for r in caplog.records if "MLFLOW_TRACKING_URI" in r.getMessage()]
    assert "v12" in line and str(repo / "mlflow.db") in line

    # the next round, nothing retrained: the deployed folder is this model, so nothing is promoted or registered
    again = decide_and_promote()
    assert again.action == KEEP and "already deployed" in again.reason
    assert len(versions(repo)) == 1 and read_manifest(repo / "models" / "deployed") == manifest


def test_promote_uses_the_metrics_version_when_the_store_holds_it(repo, caplog):
    test_sha = split_sha256(read_split("data/split", "data/labels/split_labels.parquet", DOMAINS, "test"))
    tags = {"test_sha256": test_sha, "macro_f1": score_tag(0.8), "classes": ",".join(CLASSES), "gate": "passed"}
    with mlflow_run("train_classifier") as ml:  # as train_classifier registers it, as challenger
        registered = log_and_register(
            ml,
            repo / "models" / "classifier" / "model",
            model_name=MODEL,
            alias="challenger",
            tags=tags,
            serving_config=serving_config(),
        )
        run_id = ml.active_run().info.run_id
    write_metrics(repo, version=registered["version"], f1=0.8)
    with caplog.at_level(logging.WARNING, logger="domainlm.rounds"):
        decision = decide_and_promote()

    assert decision.action == PROMOTE and decision.version == decision.champion_version == 1
    assert [int(v.version) for v in versions(repo)] == [1]  # nothing registered
    assert MODEL_SHA_TAG not in versions(repo)[0].tags
    assert int(store(repo).get_model_version_by_alias(MODEL, CHAMPION).version) == 1
    assert read_manifest(repo / "models" / "deployed")["run_id"] == run_id
    assert not [r for r in caplog.records if "MLFLOW_TRACKING_URI" in r.getMessage()]

    # a version 1 here that is another model (its scores differ from the metrics'): registered anew, not aliased
    write_metrics(repo, version=1, f1=0.5)
    shutil.rmtree(repo / "models" / "deployed")
    promotion.write_bootstrap(repo / "models" / "deployed")
    decision = decide_and_promote()
    assert [int(v.version) for v in versions(repo)] == [1, 2] and decision.version == 2
    assert int(store(repo).get_model_version_by_alias(MODEL, CHAMPION).version) == 2


def test_keep_registers_the_deployed_model_here_when_the_store_lacks_the_manifests_version(repo, classifiers, caplog):
    deployed = repo / "models" / "deployed"
    shutil.rmtree(deployed)
    manifest = {
        "registry_name": MODEL,
        "version": 7,
        "run_id": "another-machines-run",
        "test_macro_f1": 0.9,
        "test_sha256": "an-older-test-split",
        "merged_lm_sha256": tree_sha256(repo / "models" / "merged"),
        "classes": CLASSES,
        "date": "2026-12-01T00:00:00Z",
    }
    promotion.replace_deployed(classifiers["old"], deployed, manifest)
    manifest_bytes = (deployed / "deployed.json").read_bytes()
    write_metrics(repo, version=12, f1=0.0)  # worse than anything: the deployed model stays
    with caplog.at_level(logging.WARNING, logger="domainlm.rounds"):
        decision = decide_and_promote()

    # the test split changed since it was deployed: re-scored with the new model's scoring settings
    test = read_split("data/split", "data/labels/split_labels.parquet", DOMAINS, "test")
    rescored = promotion.rescore_deployed(deployed, test.texts, test.labels, **scoring_kwargs(classifier_params()))
    assert decision.action == KEEP and decision.deployed_macro_f1 == rescored > 0.0
    (local,) = versions(repo)
    assert decision.champion_version == int(local.version) == 1
    assert store(repo).get_model_version_by_alias(MODEL, CHAMPION).version == local.version
    assert local.tags["manifest_version"] == "7" and local.tags["manifest_run_id"] == "another-machines-run"
    assert local.tags["macro_f1"] == score_tag(0.9) and local.tags["test_sha256"] == "an-older-test-split"
    assert local.tags["classes"] == ",".join(CLASSES) and local.tags["started_from"] == "deployed"
    assert local.tags[MODEL_SHA_TAG] == tree_sha256(deployed / "model")
    assert (deployed / "deployed.json").read_bytes() == manifest_bytes  # the dvc-tracked manifest is not rewritten
    (line,) = [r.getMessage() for r in caplog.records if "MLFLOW_TRACKING_URI" in r.getMessage()]
    assert "v7" in line and "deployed.json" in line

    again = decide_and_promote()  # a later round finds the version registered for this folder
    assert again.action == KEEP and again.champion_version == 1 and len(versions(repo)) == 1
