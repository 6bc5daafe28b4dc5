"""The whole pipeline under real DVC and MLflow, in a temporary git repo, on a small slice of the real corpus.

Tiny model params keep it to a few minutes on 2 cores. It checks what a user relies on:
`dvc repro` runs end to end; `dvc exp run -S merge.method=ties` re-runs only merge and what depends
on it; `dvc metrics diff` shows the perplexity change; changing one domain's data re-trains only
that domain's adapter (with a fixed base checkpoint, `base_model.source: path`).
"""

from __future__ import annotations

import json
import shutil

import mlflow
import pytest
import yaml
from conftest import make_pipeline_repo, run, set_params

pytestmark = pytest.mark.slow

DOMAINS = ["law", "bill", "office_help", "faq"]
TINY = {
    "corpus": {"max_docs_per_domain": 36},
    "base_model": {
        "tokenizer": {"vocab_size": 512},
        "model": {
            "context_length": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        },
        "train": {"steps": 12, "batch_size": 4, "warmup_steps": 2, "log_every": 4},
    },
    "train_lora": {"train": {"max_steps": 6, "eval_steps": 3, "logging_steps": 2, "batch_size": 4}},
    "evaluate": {
        "stride": 32,
        "max_tokens_per_domain": 512,
        "continuation": {"n_docs": 2, "prompt_tokens": 8, "new_tokens": 8, "show_per_domain": 1},
    },
}


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory):
    repo = make_pipeline_repo(tmp_path_factory.mktemp("model") / "repo", TINY)
    proc = run(["dvc", "repro"], repo)
    ran = ran_stages(proc.stdout)
    assert {"corpus", "split", "base_model", "diff", "merge", "evaluate", "refine_labels", "report"} <= set(ran)
    assert {f"train_lora@{d}" for d in DOMAINS} <= set(ran)
    report = (repo / "reports" / "report.md").read_text(encoding="utf-8")
    assert "figures/" in report and len(list((repo / "reports" / "figures").glob("*.png"))) >= 7
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "first full run"], repo)
    return repo


def _runs_frame(client, experiment_id):
    """The experiment's runs as a dict of columns ``tags.<name>`` (what the assertions below read)."""
    runs = client.search_runs([experiment_id], max_results=1000)
    names = {k for r in runs for k in r.data.tags}
    return {f"tags.{k}": [r.data.tags.get(k) for r in runs] for k in names}


def test_repro_end_to_end_writes_models_metrics_and_mlflow_runs(model_repo, tmp_path):
    assert (model_repo / "models" / "merged" / "config.json").exists()
    ev = json.loads((model_repo / "metrics" / "evaluate.json").read_text())
    for d in DOMAINS:
        assert ev["perplexity"]["base"][d] > 1.0 and ev["perplexity"]["merged"][d] > 1.0
    assert "up to date" in run(["dvc", "status"], model_repo).stdout.lower()
    # an MlflowClient on the repo's store: mlflow.set_tracking_uri would also export MLFLOW_TRACKING_URI to every later
    # test's subprocesses
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{model_repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("domain-lm")
    runs = _runs_frame(client, experiment.experiment_id)
    stages = set(runs["tags.dvc.stage"])
    assert {"base_model", "train_lora@law", "merge", "evaluate"} <= stages
    assert set(runs["tags.git.commit"]) - {"unknown"}
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], model_repo)
    html = (tmp_path / "plots" / "index.html").read_text(encoding="utf-8")
    for plot in ("task_vector_cosine", "perplexity", "train_loss", "refine_history"):
        assert f"plots_{plot}_csv" in html  # dvc names each rendered plot after its file


def test_exp_run_ties_reruns_only_merge_and_dependents_and_metrics_diff_shows_it(model_repo):
    proc = run(["dvc", "exp", "run", "-S", "merge.method=ties"], model_repo)
    ran = ran_stages(proc.stdout)
    assert ran[0] == "merge" and "evaluate" in ran
    assert not [s for s in ran if s.startswith("train_lora") or s in ("base_model", "diff", "split")]
    diff = run(["dvc", "metrics", "diff", "--json"], model_repo).stdout
    changes = json.loads(diff)["metrics/evaluate.json"]
    ppl_changes = [k for k in changes if k.startswith("perplexity.merged.")]
    assert ppl_changes, changes.keys()
    assert all(changes[k]["old"] != changes[k]["new"] for k in ppl_changes)
    assert "perplexity.merged" in run(["dvc", "metrics", "diff"], model_repo).stdout
    run(["dvc", "exp", "show", "--no-pager"], model_repo)


def test_changing_one_domains_data_retrains_only_that_adapter(model_repo, tmp_path):
    run(["git", "checkout", "-q", "--", "."], model_repo)
    run(["dvc", "checkout", "-q"], model_repo)
    fixed_base = tmp_path / "checkpoint"
    shutil.copytree(model_repo / "models" / "base", fixed_base)
    set_params(model_repo, {"base_model": {"source": "path", "path": str(fixed_base)}})
    first = ran_stages(run(["dvc", "repro"], model_repo).stdout)
    assert "base_model" in first and not [s for s in first if s.startswith("train_lora")]  # same weights, no retrain
    set_params(model_repo, {"corpus": {"sources": {"faq": {"max_docs": 12}}}})
    ran = ran_stages(run(["dvc", "repro"], model_repo).stdout)
    assert [s for s in ran if s.startswith("train_lora")] == ["train_lora@faq"]
    assert "merge" in ran and "evaluate" in ran


def test_promote_then_repro_relabels_without_retraining_the_models(model_repo):
    """The label round trip: a label fixed in ``sentences`` (by the loop or by a reviewer working
    through review_queue.jsonl) is promoted to the dvc-tracked overrides file, and the next
    ``dvc repro`` re-runs split (whose label table applies it) and refine_labels, and nothing else:
    the document files are unchanged, so the base model, the adapters and the evaluation stay up
    to date. ``dvc metrics diff HEAD~1`` then compares the two rounds."""
    import sqlite3

    import pyarrow.parquet as pq

    run(["git", "reset", "-q", "--hard", "HEAD"], model_repo)  # dvc repro above auto-staged its dvc.lock
    run(["dvc", "checkout", "-q", "--force"], model_repo)
    assert "up to date" in run(["dvc", "status"], model_repo).stdout.lower()

    db_path = model_repo / "data" / "refined" / "sentences.db"
    with sqlite3.connect(db_path) as con:
        row_id, label = con.execute(
            "SELECT id, current_label FROM sentences WHERE domain = 'office_help' "
            "AND current_label = original_label ORDER BY id LIMIT 1"
        ).fetchone()
        other = con.execute(
            "SELECT DISTINCT original_label FROM sentences WHERE domain = 'office_help' "
            "AND original_label != ? ORDER BY original_label LIMIT 1",
            [label],
        ).fetchone()[0]
        con.execute("UPDATE sentences SET current_label = ? WHERE id = ?", [other, row_id])  # the reviewer's fix
    run(["python", "-m", "stages.refine_labels", "promote"], model_repo)

    overrides = pq.read_table(model_repo / "data" / "labels" / "overrides.parquet").to_pydict()
    promoted = dict(zip(overrides["id"], overrides["label"]))
    assert promoted[row_id] == other
    assert "overrides.parquet" in run(["dvc", "status"], model_repo).stdout
    run(["dvc", "add", "data/labels/overrides.parquet"], model_repo)
    lock_before = yaml.safe_load((model_repo / "dvc.lock").read_text())["stages"]
    ran = ran_stages(run(["dvc", "repro"], model_repo).stdout)
    # the label readers re-run (refine_labels, and train_classifier, which trains on the labels), then the report
    assert ran[0] == "split" and set(ran) == {"split", "refine_labels", "train_classifier", "report"}
    lock_after = yaml.safe_load((model_repo / "dvc.lock").read_text())["stages"]
    outs = {o["path"]: o["md5"] for o in lock_after["split"]["outs"]}
    assert outs["data/split"] == {o["path"]: o["md5"] for o in lock_before["split"]["outs"]}["data/split"]
    assert lock_after["base_model"] == lock_before["base_model"]

    table = pq.read_table(model_repo / "data" / "labels" / "split_labels.parquet").to_pydict()
    split_labels = dict(zip(table["id"], table["label"]))
    assert all(split_labels[i] == lab for i, lab in promoted.items())
    assert split_labels[row_id] == other and dict(zip(table["id"], table["source_label"]))[row_id] == label
    with sqlite3.connect(db_path) as con:  # round 2 starts from the promoted label
        assert con.execute("SELECT original_label FROM sentences WHERE id = ?", [row_id]).fetchone()[0] == other

    run(["git", "add", "-A"], model_repo)
    run(["git", "commit", "-q", "-m", "round 2: refined labels"], model_repo)
    diff = json.loads(run(["dvc", "metrics", "diff", "HEAD~1", "--json"], model_repo).stdout)
    split_diff = diff["metrics/split.json"]
    assert split_diff["overrides.rows"]["old"] == 0 and split_diff["overrides.rows"]["new"] == len(promoted)
