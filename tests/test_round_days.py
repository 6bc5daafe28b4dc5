"""Days of the production loop on a small slice of the real corpus, under real DVC (local remote), MLflow (SQLite)
and ``mlflow models serve`` on 127.0.0.1: ``python -m domainlm.rounds round`` each day, ``release-lm`` once.

The base model is built here (``base_model.source: build``, tiny sizes) and every learning rate and gate is the
fixtures' training setting; nothing is frozen so that a path is reached.

- Day 1: the first round cuts LM release 1 (tag ``lm-release-1``), builds the LM from it, trains the classifier,
  promotes it (``champion``, ``models/deployed``), pushes, commits, tags and serves it.
- Day 2: new faq chapters land in the declared ``type: jsonl`` source. No LM stage runs (the LM reads release 1);
  every day-1 document keeps its split; ``train_classifier`` scores the deployed model first and keeps or continues
  it; ``metrics/classifier.json`` gives its scores on the new test documents.
- Day 2b: the gate raised to 0.99: attempt 0 (the deployed model) and three retries that each continue the previous
  one on the deployed backbone, exit 2, the alert written, the deployed model unchanged.
- Day 3: ``release-lm`` (tag ``lm-release-2``), then a round: the LM stages run, a classifier trained on the new LM
  is the challenger, the deployed model is scored (and continued on its own backbone when it fails the gate), the
  better passing line is kept, and the decision names every candidate's score on one test split.
- Day 4: nothing new: no stage, no commit, no tag.
- Then ``git checkout round-<day 1> && dvc pull`` (empty cache) restores day 1's deployed model byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ROOT, free_port, make_pipeline_repo, run
from lm_fixtures import TINY
from mlflow import MlflowClient
from test_pipeline_classifier import FIRST_FAQ_DOCS, MODEL, faq_records, params  # noqa: F401 (fixture)

from domainlm.classify.deployed import read_manifest, tree_sha256
from domainlm.documents.corpus import builtin_documents, evenly_spaced
from domainlm.documents.jsonl import dumps

#: The stages a day of new documents may run: the data half, the LM's (unchanged) documents, the classifier.
DAILY_STAGES = {
    "corpus",
    "validate",
    "dedup",
    "parquet",
    "split",
    "lm_data",
    "refine_labels",
    "train_classifier",
    "report",
}
LM_STAGES = (
    "base_model",
    "train_lora@law",
    "train_lora@office_help",
    "train_lora@faq",
    "diff",
    "merge",
    "evaluate_experts",
    "evaluate",
)

pytestmark = pytest.mark.slow
#: The classifier gate of these days: params.yaml's own threshold (test macro-F1 on the source labels).
GATE = 0.75
DOMAINS = ["law", "office_help", "faq"]
OFFICE_DOCS = 36


def round_(repo: Path, ports: tuple[int, int]) -> tuple[int, dict, str]:
    """Run one round; return its exit code, its JSON summary (last stdout line) and its whole output."""
    proc = subprocess.run(
        [sys.executable, "-m", "domainlm.rounds", "round", "--ports", f"{ports[0]},{ports[1]}"],
        cwd=repo,
        capture_output=True,
        text=True,
        # the repository's own MLflow store, whatever an earlier test left in the environment
        env={
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}",
        },
    )
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1]) if lines and lines[-1].startswith('{"decision"') else {}
    return proc.returncode, summary, proc.stdout + proc.stderr


def tags(repo: Path, pattern: str = "round-*") -> list[str]:
    return run(["git", "tag", "--list", pattern], repo).stdout.split()


def release_lm(repo: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "domainlm.rounds", "release-lm"],
        cwd=repo,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def split_of(repo: Path) -> dict[str, str]:
    table = pq.read_table(repo / "data" / "labels" / "split_labels.parquet", columns=["id", "split"])
    return dict(zip(table["id"].to_pylist(), table["split"].to_pylist(), strict=True))


def classifier_metrics(repo: Path) -> dict:
    return json.loads((repo / "metrics" / "classifier.json").read_text(encoding="utf-8"))


def set_gate(repo: Path, min_f1: float) -> None:
    params_path = repo / "params.yaml"
    cfg = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    cfg["classifier"]["gate"]["min_f1"] = min_f1
    params_path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    run(["git", "commit", "-qam", f"classifier gate {min_f1}"], repo)


def predict(url: str, texts: list[str]) -> list[dict]:
    body = json.dumps({"inputs": list(texts)}).encode()
    req = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["predictions"]


def alive(pid: int) -> bool:
    return subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def days(tmp_path_factory, faq_records):
    root = tmp_path_factory.mktemp("round_days")
    base_dir = root / "unused-checkpoint"  # base_model.source: build
    incoming = root / "incoming" / "faq"
    incoming.mkdir(parents=True)
    (incoming / "part-000.jsonl").write_text(
        "".join(dumps(r) + "\n" for r in faq_records[:FIRST_FAQ_DOCS]), encoding="utf-8"
    )
    cfg = params(base_dir, incoming)
    # built here, from the release: a small LM (64 hidden, 64-token context) whose classifier can learn three domains
    cfg["base_model"] = {
        **TINY,
        "tokenizer": {"vocab_size": 500, "min_frequency": 2},
        "model": {**TINY["model"], "context_length": 64, "hidden_size": 64, "intermediate_size": 128},
        "train": {**TINY["train"], "steps": 60},
    }
    cfg["classifier"].update(max_length=64, windows={"train": 2, "predict": 2})
    cfg["classifier"]["gate"]["min_f1"] = GATE
    cfg["split"] = {"test_size": 0.2}  # two faq test documents on day 1, not one
    repo = make_pipeline_repo(root / "repo", cfg)
    # three domains, labelled by domain (office_help's pages as a JSONL source with their domain as the label): a
    # label space a tiny LM can learn from a few dozen documents, so the project's own gate decides each day
    office = root / "incoming" / "office_help"
    office.mkdir(parents=True)
    pages, _ = builtin_documents("office_help", {"type": "libreoffice_help"}, ROOT / ".cache" / "corpus")
    picked = evenly_spaced(pages, OFFICE_DOCS)
    (office / "part-000.jsonl").write_text(
        "".join(dumps({"id": d.id, "text": d.text, "label": "office_help"}) + "\n" for d in picked), encoding="utf-8"
    )
    params_path = repo / "params.yaml"
    p = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    p["domains"] = DOMAINS
    p["corpus"]["sources"] = {
        "law": p["corpus"]["sources"]["law"],
        "office_help": {"type": "jsonl", "uri": str(office / "*.jsonl")},
        "faq": p["corpus"]["sources"]["faq"],
    }
    params_path.write_text(yaml.safe_dump(p, allow_unicode=True, sort_keys=False), encoding="utf-8")
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))
    dvc_yaml["stages"]["corpus"]["deps"] += [str(incoming), str(office)]
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, allow_unicode=True, sort_keys=False), encoding="utf-8")
    run(["git", "commit", "-qam", "faq arrives as JSONL"], repo)
    ports = (free_port(), free_port())
    state = {"repo": repo, "incoming": incoming, "ports": ports, "records": faq_records}
    yield state
    subprocess.run([sys.executable, "-m", "domainlm.rounds", "stop"], cwd=repo, capture_output=True)


def client(repo: Path) -> MlflowClient:
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def day1(days):
    repo = days["repo"]
    code, summary, out = round_(repo, days["ports"])
    assert code == 0, out[-6000:]
    days["day1"] = {
        "summary": summary,
        "out": out,
        "deployed": tree_sha256(repo / "models" / "deployed"),
        "copy": repo.parent / "deployed-day1",
        "split": split_of(repo),
        "base": tree_sha256(repo / "models" / "base"),
        "merged": tree_sha256(repo / "models" / "merged"),
    }
    shutil.copytree(repo / "models" / "deployed", days["day1"]["copy"])
    return days


def test_day1_cuts_release_1_builds_promotes_pushes_commits_tags_and_serves(day1):
    repo, summary = day1["repo"], day1["day1"]["summary"]
    assert summary["lm_release"]["number"] == 1 and summary["lm_release"]["tag"] == "lm-release-1"
    assert tags(repo, "lm-release-*") == ["lm-release-1"]
    assert summary["decision"]["action"] == "promote" and summary["exit_code"] == 0, day1["day1"]["out"][-4000:]
    assert {"corpus", "split", "lm_data", "base_model", "merge", "train_classifier", "report"} <= set(summary["ran"])
    (tag,) = tags(repo)
    assert tag == summary["tag"] and tag.startswith("round-") and tag.endswith("-1")
    assert run(["git", "rev-parse", f"{tag}^{{commit}}"], repo).stdout.strip() == summary["commit"]
    manifest = read_manifest(repo / "models" / "deployed")
    assert manifest["version"] == 1 and manifest["registry_name"] == MODEL and manifest["finetuned_from"] is None
    assert manifest["merged_lm_sha256"] == tree_sha256(repo / "models" / "merged")
    # the deployed model carries the LM its adapter was trained on
    assert tree_sha256(repo / "models" / "deployed" / "backbone") == manifest["merged_lm_sha256"]
    assert int(client(repo).get_model_version_by_alias(MODEL, "champion").version) == 1
    # the commit names the deployed folder and the release, and the remote has both
    assert run(["git", "status", "--porcelain", "dvc.lock", "models", "metrics", "data"], repo).stdout == ""
    assert "up to date" in run(["dvc", "status"], repo).stdout.lower()
    cloud = run(["dvc", "status", "--cloud", "models/deployed.dvc", "data/release.dvc"], repo).stdout.lower()
    assert "in sync" in cloud
    served = summary["served"]
    assert served["version"] == 1 and served["port"] in day1["ports"]
    (pred,) = predict(served["url"], ["데비안 패키지를 설치하려면 apt 명령을 사용합니다."])
    assert pred["label"] in manifest["classes"] and abs(sum(pred["probabilities"].values()) - 1) < 1e-4


def test_a_second_machine_that_pulls_from_s3_with_its_own_mlflow_store_runs_the_round(day1, s3_env, tmp_path):
    """A clone on another machine: the outputs come from the team's remote (moto S3 on 127.0.0.1), the MLflow store
    is its own and empty. Its round scores the deployed model first and registers what it keeps or promotes in its
    own store instead of naming a version that only the first machine's store holds."""
    import boto3

    repo = day1["repo"]
    boto3.client("s3").create_bucket(Bucket="team-dvc")
    run(["dvc", "remote", "add", "team", "s3://team-dvc/domain-lm"], repo)
    run(["dvc", "remote", "modify", "team", "endpointurl", s3_env], repo)  # credentials: s3_env's AWS_* variables
    run(["dvc", "push", "-q", "-r", "team"], repo)
    run(["git", "commit", "-q", "-m", "the team's S3 remote", "--", ".dvc/config"], repo)
    clone = tmp_path / "machine-2"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    run(["dvc", "remote", "default", "--local", "team"], clone)
    run(["dvc", "pull", "-q"], clone)
    assert "up to date" in run(["dvc", "status"], clone).stdout.lower()
    # the next day's documents reach this machine too (the same declared source)
    incoming, records = day1["incoming"], day1["records"]
    (incoming / "part-001.jsonl").write_text(
        "".join(dumps(r) + "\n" for r in records[FIRST_FAQ_DOCS:]), encoding="utf-8"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "domainlm.rounds", "round", "--no-deploy"],
        cwd=clone,
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{clone / 'mlflow.db'}",
        },
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode in (0, 2), out[-6000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = classifier_metrics(clone)
    assert metrics["start"]["case"] in ("deployed_kept", "deployed_retrained") and set(summary["ran"]) <= DAILY_STAGES
    if summary["decision"]["action"] in ("promote", "keep"):  # registered in this machine's own store
        champion = client(clone).get_model_version_by_alias(MODEL, "champion")
        assert int(champion.version) == read_manifest(clone / "models" / "deployed")["version"]
    (incoming / "part-001.jsonl").unlink()  # day 2 brings it to the first machine


@pytest.fixture(scope="module")
def day2(day1):
    repo, incoming, records = day1["repo"], day1["incoming"], day1["records"]
    (incoming / "part-001.jsonl").write_text(
        "".join(dumps(r) + "\n" for r in records[FIRST_FAQ_DOCS:]), encoding="utf-8"
    )
    code, summary, out = round_(repo, day1["ports"])
    assert code == 0, out[-6000:]
    day1["day2"] = {"summary": summary, "out": out, "metrics": classifier_metrics(repo)}
    return day1


def test_day2_runs_no_lm_stage_keeps_every_split_and_scores_the_deployed_model_first(day2):
    repo, summary, metrics = day2["repo"], day2["day2"]["summary"], day2["day2"]["metrics"]
    ran = summary["ran"]
    assert set(ran) <= DAILY_STAGES and {"corpus", "split", "train_classifier"} <= set(ran), ran
    assert summary["lm_release"] is None
    assert tree_sha256(repo / "models" / "base") == day2["day1"]["base"]
    assert tree_sha256(repo / "models" / "merged") == day2["day1"]["merged"]
    before, after = day2["day1"]["split"], split_of(repo)
    assert len(after) > len(before) and all(after[i] == s for i, s in before.items())
    case = metrics["start"]["case"]
    assert case in ("deployed_kept", "deployed_retrained"), metrics["start"]
    assert metrics["start"]["deployed_version"] == 1 and metrics["start"]["deployed_test_macro_f1"] is not None
    new_test = [i for i, s in after.items() if s == "test" and i not in before]
    assert metrics["new_data"]["test_docs"] == len(new_test)
    assert (metrics["new_data"]["deployed"] is None) == (not new_test)
    assert len(tags(day2["repo"])) == 2 and summary["tag"] in tags(repo)
    manifest = read_manifest(repo / "models" / "deployed")
    if case == "deployed_kept":  # it passed the gate on the new test split: nothing trained, nothing promoted
        assert summary["decision"]["action"] == "keep" and summary["served"] is None
        assert tree_sha256(repo / "models" / "deployed") == day2["day1"]["deployed"]
        assert manifest["version"] == 1 and alive(day2["day1"]["summary"]["served"]["pid"])
    elif summary["decision"]["action"] == "promote":  # continued from v1 and better on this split
        assert manifest["version"] == metrics["registry"]["version"] > 1 and manifest["finetuned_from"] == 1
        predict(summary["served"]["url"], ["대한민국은 민주공화국이다."])


@pytest.fixture(scope="module")
def day2b(day2):
    repo = day2["repo"]
    deployed = tree_sha256(repo / "models" / "deployed")
    set_gate(repo, 0.99)
    code, summary, out = round_(repo, day2["ports"])
    day2["day2b"] = {"code": code, "summary": summary, "out": out, "deployed": deployed}
    day2["day2b"]["metrics"] = classifier_metrics(repo)
    set_gate(repo, GATE)
    return day2


def test_day2b_a_gate_nothing_reaches_spends_every_retry_on_the_deployed_model_and_alerts(day2b):
    repo, d = day2b["repo"], day2b["day2b"]
    assert d["code"] == 2, d["out"][-6000:]
    metrics = d["metrics"]
    assert metrics["start"]["from_deployed"] == 1 and metrics["gate"]["passed"] == 0
    assert metrics["gate"]["attempts"] == 4 and metrics["gate"]["retries"] == 3
    # attempt 0 is the deployed model, unchanged; each retry continues the one before (a warm start, not a fresh run)
    assert metrics["gate"]["test_macro_f1"]["attempt_0"] == metrics["start"]["deployed_test_macro_f1"]
    assert d["out"].count("continued from the deployed model") == 1 and d["out"].count("continued from attempt") == 2
    alerts = json.loads((repo / "metrics" / "classifier_alerts.json").read_text(encoding="utf-8"))
    (alert,) = alerts["alerts"]
    assert alert["severity"] == "error" and alert["attempts"] == 4 and alert["threshold"] == 0.99
    assert d["summary"]["decision"]["action"] == "gate_failed"
    assert tree_sha256(repo / "models" / "deployed") == d["deployed"]


@pytest.fixture(scope="module")
def day3(day2b):
    repo = day2b["repo"]
    before = read_manifest(repo / "models" / "deployed")
    cut = release_lm(repo)
    code, summary, out = round_(repo, day2b["ports"])
    assert code in (0, 2), out[-6000:]
    metrics = classifier_metrics(repo)
    day2b["day3"] = {"cut": cut, "summary": summary, "metrics": metrics, "before": before, "code": code}
    return day2b


def test_day3_a_release_rebuilds_the_lm_and_its_classifier_enters_as_the_challenger(day3):
    repo, d = day3["repo"], day3["day3"]
    assert d["cut"]["number"] == 2 and d["cut"]["tag"] == "lm-release-2" and "lm-release-2" in tags(repo, "lm-*")
    assert set(LM_STAGES) <= set(d["summary"]["ran"])
    assert tree_sha256(repo / "models" / "merged") != day3["day1"]["merged"]
    start = d["metrics"]["start"]
    candidates = start["candidates"]
    assert start["deployed_scored"] == 1 and {"deployed", "challenger"} <= set(candidates)
    deployed_f1 = start["deployed_test_macro_f1"]
    assert candidates["deployed"]["test_macro_f1"] == deployed_f1
    # the deployed model is continued on its own backbone (release 1's LM) only when it fails the gate
    assert ("deployed_continued" in candidates) == (deployed_f1 < GATE)
    decision = d["summary"]["decision"]
    for c in candidates.values():  # the decision quotes every candidate's score on the one test split
        assert f"{c['test_macro_f1']:.4f}" in decision["reason"]
    passing = {k: c["test_macro_f1"] for k, c in candidates.items() if c["passed"]}
    if not passing:  # the gate failed, the alert is out, the deployed model stays
        assert d["code"] == 2 and decision["action"] == "gate_failed"
        assert read_manifest(repo / "models" / "deployed") == d["before"]
        return
    # the better passing line is kept; a tie keeps the deployed line
    best = max(passing, key=lambda k: (passing[k], k != "challenger"))
    assert d["code"] == 0
    if best == "challenger":
        assert start["case"] == "challenger" and decision["action"] == "promote"
        assert "paired bootstrap" in decision["reason"]
        assert tree_sha256(repo / "models" / "deployed" / "backbone") == tree_sha256(repo / "models" / "merged")
    elif best == "deployed":
        assert start["case"] == "deployed_kept" and decision["action"] == "keep"
        assert read_manifest(repo / "models" / "deployed") == d["before"]
    else:  # the deployed model continued on release 1's LM, promoted with that backbone
        assert start["case"] == "deployed_retrained" and decision["action"] == "promote"
        assert tree_sha256(repo / "models" / "deployed" / "backbone") == day3["day1"]["merged"]
        assert read_manifest(repo / "models" / "deployed")["finetuned_from"] == d["before"]["version"]


def test_day4_without_new_data_runs_nothing_and_creates_no_tag(day3):
    repo = day3["repo"]
    before = tags(repo, "*"), run(["git", "rev-parse", "HEAD"], repo).stdout
    code, summary, out = round_(repo, day3["ports"])
    assert code == 0, out[-6000:]
    assert summary["ran"] == [] and summary["decision"]["action"] == "nothing_new" and summary["tag"] is None
    assert (tags(repo, "*"), run(["git", "rev-parse", "HEAD"], repo).stdout) == before


def test_checking_out_day1s_tag_restores_its_deployed_model_byte_for_byte(day3):
    repo = day3["repo"]
    day1_tag = sorted(tags(repo))[0]
    run(["git", "checkout", "-q", day1_tag], repo)
    shutil.rmtree(repo / "models" / "deployed")
    shutil.rmtree(repo / ".dvc" / "cache")  # from the remote, not the local cache
    run(["dvc", "pull", "-q", "models/deployed.dvc"], repo)
    assert tree_sha256(repo / "models" / "deployed") == tree_sha256(day3["day1"]["copy"]) == day3["day1"]["deployed"]
    run(["git", "checkout", "-q", "main"], repo)
