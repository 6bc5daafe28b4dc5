"""train_classifier under real DVC and MLflow, in a temporary git repo, on a small slice of the real corpus.

- ``dvc exp run -S classifier.gate.min_f1=0.99`` re-runs only train_classifier, spends every retry (one nested MLflow
  run per attempt), writes and records the alert, and leaves the registry's champion where it was.
- New data arrives (as in the daily round): documents appended to the faq domain's ``type: jsonl`` source make
  ``dvc repro`` re-run the stages that read that domain: train_lora@faq, not the other domains' adapters (the
  whole-corpus stages corpus … split, diff, merge, evaluate, refine_labels and train_classifier read every domain,
  so they re-run too), and the classifier gets a new registry version.

The base model is a fixed checkpoint (``base_model.source: path``). ``base_model`` depends on all of
``data/split``, so new faq documents re-run it; with a fixed checkpoint it writes byte-identical ``models/base``
and DVC skips the other domains' ``train_lora``. With ``source: build`` new data in one domain would retrain the
base and so, rightly, every expert. Tiny models keep the module to a few minutes on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from classifier_fixtures import classifier_params
from conftest import ROOT, make_pipeline_repo, run
from lm_fixtures import TINY, TRAIN_TEXTS
from mlflow import MlflowClient

from domainlm.documents.corpus import builtin_documents
from domainlm.documents.jsonl import dumps

pytestmark = pytest.mark.slow

DOMAINS = ["law", "bill", "office_help", "faq"]
MODEL = "domain-lm-classifier"
FIRST_FAQ_DOCS = 10  # the faq source starts with this many chapters; the rest arrive later


def params(base_dir: Path, incoming: Path) -> dict:
    cfg = classifier_params(
        gate={"min_f1": 0.0, "max_retries": 3, "retry_epochs": 2, "retry_lr": 1.0e-2}, train={"epochs": 3}, compile=True
    )  # as params.yaml: compiled decoder layers
    return {
        "compute": {"dtype": "auto", "threads": 1},
        "corpus": {"max_docs_per_domain": 36, "sources": {"faq": {"type": "jsonl", "uri": str(incoming / "*.jsonl")}}},
        "base_model": {
            "source": "path",
            "path": str(base_dir),
            "model": {"context_length": 32},
            "train": {"eval_batch_size": 16},
        },
        "train_lora": {"train": {"max_steps": 4, "eval_steps": 2, "logging_steps": 2, "batch_size": 4}},
        "evaluate": {
            "stride": 16,
            "max_tokens_per_domain": 256,
            "continuation": {"n_docs": 2, "prompt_tokens": 8, "new_tokens": 8, "show_per_domain": 1},
        },
        "refine": {"max_iterations": 2, "lstm": {"epochs": 2, "max_tokens": 32}, "transformer": {"max_tokens": 32}},
        "classifier": cfg,
    }


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def registry(repo: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}", registry_uri=f"sqlite:///{repo / 'mlflow.db'}")


def latest_version(client: MlflowClient) -> int:
    return max(int(v.version) for v in client.search_model_versions(f"name='{MODEL}'"))


@pytest.fixture(scope="module")
def faq_records() -> list[dict]:
    """The real Debian FAQ chapters (the bundled source, from the project's corpus cache) as JSONL records."""
    docs, _ = builtin_documents("faq", {"type": "debian_faq"}, ROOT / ".cache" / "corpus")
    assert len(docs) > FIRST_FAQ_DOCS + 2
    return [{"id": d.id, "text": d.text, "label": d.label} for d in docs]


@pytest.fixture(scope="module")
def classifier_repo(tmp_path_factory, faq_records):
    from domainlm.lm import pretrain

    root = tmp_path_factory.mktemp("classifier_pipeline")
    model, tok, _ = pretrain.build(TRAIN_TEXTS, TINY)
    base_dir = pretrain.save_hf_folder(model, tok, root / "checkpoint")
    incoming = root / "incoming" / "faq"
    incoming.mkdir(parents=True)
    (incoming / "part-000.jsonl").write_text(
        "".join(dumps(r) + "\n" for r in faq_records[:FIRST_FAQ_DOCS]), encoding="utf-8"
    )
    repo = make_pipeline_repo(root / "repo", params(base_dir, incoming))
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))
    dvc_yaml["stages"]["corpus"]["deps"].append(str(incoming))  # the user's own data is a dep (layout issue)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, allow_unicode=True, sort_keys=False), encoding="utf-8")
    run(["git", "commit", "-qam", "faq arrives as JSONL"], repo)

    ran = ran_stages(run(["dvc", "repro"], repo).stdout)
    assert {"corpus", "split", "base_model", "merge", "evaluate", "refine_labels", "train_classifier"} <= set(ran)
    assert {f"train_lora@{d}" for d in DOMAINS} <= set(ran)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "first classifier"], repo)
    return {"repo": repo, "incoming": incoming}


def test_first_run_registers_a_champion_with_metrics_plots_and_token_stats(classifier_repo, tmp_path):
    repo = classifier_repo["repo"]
    m = json.loads((repo / "metrics" / "classifier.json").read_text())
    assert m["gate"] == {**m["gate"], "passed": 1, "attempts": 1, "retries": 0}
    assert m["registry"]["champion"] == 1 and m["registry"]["version"] == 1
    assert 0.0 <= m["lora"]["macro_f1"] <= 1.0 and 0.0 <= m["baseline"]["macro_f1"] <= 1.0
    assert m["stage"]["wall_s"] > 0
    from domainlm.common.compute import resolve

    expected = resolve({"dtype": "auto", "threads": 1})  # the test repo's compute params
    assert m["compute"] == expected.metrics()  # the policy the stage used, in its metrics
    assert m["start"]["case"] == "fresh" and m["windows"] == {"max_length": 24, "train": 2, "predict": 3}
    assert m["compiled_layers"] == 2  # the base model's 2 decoder layers trained compiled (classifier.compile)
    stats = json.loads((repo / "metrics" / "token_stats.json").read_text())
    assert set(stats["domains"]) == set(DOMAINS) and stats["settings"]["lm_context"] == 32
    assert int(registry(repo).get_model_version_by_alias(MODEL, "champion").version) == 1
    assert (repo / "models" / "classifier" / "model" / "config.json").exists()
    shown = run(["dvc", "metrics", "show", "--json"], repo).stdout
    assert "metrics/classifier.json" in shown and "metrics/token_stats.json" in shown
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], repo)
    html = (tmp_path / "plots" / "index.html").read_text(encoding="utf-8")
    assert "plots_classifier_confusion_csv" in html and "plots_classifier_baseline_confusion_csv" in html
    assert "up to date" in run(["dvc", "status"], repo).stdout.lower()


def test_exp_run_with_an_unreachable_gate_retries_alerts_and_keeps_the_champion(classifier_repo):
    repo = classifier_repo["repo"]
    client = registry(repo)
    champion_before = int(client.get_model_version_by_alias(MODEL, "champion").version)
    versions_before = latest_version(client)

    ran = ran_stages(run(["dvc", "exp", "run", "-S", "classifier.gate.min_f1=0.99"], repo).stdout)
    assert ran == ["train_classifier", "report"]  # the report reads metrics/classifier.json
    m = json.loads((repo / "metrics" / "classifier.json").read_text())
    assert m["gate"]["passed"] == 0 and m["gate"]["min_f1"] == 0.99
    assert m["gate"]["retries"] == m["gate"]["max_retries"] == 3 and m["gate"]["attempts"] == 4
    assert m["alerts"] == 1 and m["registry"]["champion"] == 0

    alerts = json.loads((repo / "metrics" / "classifier_alerts.json").read_text())
    (alert,) = alerts["alerts"]
    assert alerts["gate"] == "failed" and alert["severity"] == "error" and alert["attempts"] == 4
    assert alert["metric"] == "macro_f1" and alert["threshold"] == 0.99 and alert["value"] < 0.99
    assert alert["git_commit"] == run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert alert["webhook"] == "not configured"

    assert int(client.get_model_version_by_alias(MODEL, "champion").version) == champion_before  # unchanged
    assert int(client.get_model_version_by_alias(MODEL, "challenger").version) == versions_before + 1
    parent = client.get_run(alert["mlflow_run_id"])
    assert parent.data.tags["gate"] == "failed"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(r.data.tags["mlflow.runName"] for r in children) == [f"attempt_{i}" for i in range(4)]
    assert all("test_macro_f1" in r.data.metrics for r in children)
    assert (
        m["gate"]["trained_epochs"] <= 3 + 3 * 2
    )  # retries continue for retry_epochs; they are not fresh, longer runs

    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], repo).stdout)["metrics/classifier.json"]
    assert diff["gate.attempts"]["old"] == 1 and diff["gate.attempts"]["new"] == 4


def test_new_faq_documents_rerun_only_that_domains_adapter_and_register_a_new_classifier(classifier_repo, faq_records):
    repo, incoming = classifier_repo["repo"], classifier_repo["incoming"]
    run(["git", "reset", "-q", "--hard", "HEAD"], repo)  # back from the experiment
    run(["dvc", "checkout", "-q", "--force"], repo)
    assert "up to date" in run(["dvc", "status"], repo).stdout.lower()
    client = registry(repo)
    versions_before = latest_version(client)
    data_before = client.get_model_version(MODEL, str(versions_before)).tags["data_sha256"]

    # the daily delivery: a new file of faq chapters in the source folder
    (incoming / "part-001.jsonl").write_text(
        "".join(dumps(r) + "\n" for r in faq_records[FIRST_FAQ_DOCS:]), encoding="utf-8"
    )
    status = run(["dvc", "status"], repo).stdout
    assert "corpus:" in status and str(incoming) in status
    ran = ran_stages(run(["dvc", "repro"], repo).stdout)
    assert [s for s in ran if s.startswith("train_lora")] == ["train_lora@faq"]
    assert {"corpus", "split", "train_lora@faq", "diff", "merge", "train_classifier"} <= set(ran)
    assert "base_model" in ran  # it reads all of data/split, and copies the same checkpoint: nothing below re-runs

    versions_after = latest_version(client)
    assert versions_after == versions_before + 1
    new = client.get_model_version(MODEL, str(versions_after))
    assert new.tags["data_sha256"] != data_before
    m = json.loads((repo / "metrics" / "classifier.json").read_text())
    assert m["registry"]["version"] == versions_after
    assert m["docs"]["train"] > 0
