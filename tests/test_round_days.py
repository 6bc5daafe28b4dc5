"""Three days of the daily round on a small slice of the real corpus, under real DVC (local remote), MLflow
(SQLite) and ``mlflow models serve`` on 127.0.0.1: ``python -m domainlm.rounds round`` each day.

- Day 1: the first round trains, promotes (``champion`` alias, ``models/deployed``), pushes, commits, tags and serves.
- Day 2: new faq chapters land in the declared ``type: jsonl`` source. Only the stages that read them re-run
  (train_lora@faq, not the other domains' adapters); ``train_classifier`` scores the deployed model first, and the
  round keeps it (it passes the gate) or fine-tunes it and promotes; the test checks which happened.
- Day 3: nothing new: the round runs no stage, commits nothing, creates no tag and exits 0.
- Then ``git checkout round-<day 1> && dvc pull`` (empty cache) restores day 1's deployed model byte for byte.

The domain experts are nearly frozen (``train_lora.train.lr: 1e-20``): new faq documents re-run train_lora@faq, diff,
merge and the stages after them, but the merged LM comes out byte-identical (each weight's change is below float32's
spacing), so the deployed classifier stays compatible
(:func:`domainlm.classify.deployed.compatible`) and is evaluated first. With trained experts, new data changes the
merged LM and attempt 0 trains afresh (``start.case: fresh``), as in production after an LM change.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import free_port, make_pipeline_repo, run
from lm_fixtures import TINY, TRAIN_TEXTS
from mlflow import MlflowClient
from test_pipeline_classifier import FIRST_FAQ_DOCS, MODEL, faq_records, params  # noqa: F401 (fixture)

from domainlm.classify.deployed import read_manifest, tree_sha256
from domainlm.documents.jsonl import dumps

pytestmark = pytest.mark.slow


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


def tags(repo: Path) -> list[str]:
    return run(["git", "tag", "--list", "round-*"], repo).stdout.split()


def predict(url: str, texts: list[str]) -> list[dict]:
    body = json.dumps({"inputs": list(texts)}).encode()
    req = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["predictions"]


def alive(pid: int) -> bool:
    return subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def days(tmp_path_factory, faq_records):
    from domainlm.lm import pretrain

    root = tmp_path_factory.mktemp("round_days")
    model, tok, _ = pretrain.build(TRAIN_TEXTS, TINY)
    base_dir = pretrain.save_hf_folder(model, tok, root / "checkpoint")
    incoming = root / "incoming" / "faq"
    incoming.mkdir(parents=True)
    (incoming / "part-000.jsonl").write_text(
        "".join(dumps(r) + "\n" for r in faq_records[:FIRST_FAQ_DOCS]), encoding="utf-8"
    )
    cfg = params(base_dir, incoming)
    # near-frozen experts: LoRA B moves by ~1e-19 (diff needs non-zero task vectors), far below float32's spacing
    # of the base weights, so the merged LM comes out byte-identical when new data re-trains an expert
    cfg["train_lora"]["train"]["lr"] = 1.0e-20
    repo = make_pipeline_repo(root / "repo", cfg)
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))
    dvc_yaml["stages"]["corpus"]["deps"].append(str(incoming))
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
        "deployed": tree_sha256(repo / "models" / "deployed"),
        "copy": repo.parent / "deployed-day1",
    }
    shutil.copytree(repo / "models" / "deployed", days["day1"]["copy"])
    return days


def test_day1_trains_promotes_pushes_commits_tags_and_serves(day1):
    repo, summary = day1["repo"], day1["day1"]["summary"]
    assert summary["decision"]["action"] == "promote" and summary["exit_code"] == 0
    assert {"corpus", "split", "merge", "train_classifier", "report"} <= set(summary["ran"])
    (tag,) = tags(repo)
    assert tag == summary["tag"] and tag.startswith("round-") and tag.endswith("-1")
    assert run(["git", "rev-parse", f"{tag}^{{commit}}"], repo).stdout.strip() == summary["commit"]
    manifest = read_manifest(repo / "models" / "deployed")
    assert manifest["version"] == 1 and manifest["registry_name"] == MODEL
    assert manifest["merged_lm_sha256"] == tree_sha256(repo / "models" / "merged")
    assert int(client(repo).get_model_version_by_alias(MODEL, "champion").version) == 1
    # the commit names the deployed folder, and the remote has it: nothing left to commit, push or reproduce
    assert run(["git", "status", "--porcelain", "dvc.lock", "models", "metrics"], repo).stdout == ""
    assert "up to date" in run(["dvc", "status"], repo).stdout.lower()
    assert "in sync" in run(["dvc", "status", "--cloud", "models/deployed.dvc"], repo).stdout.lower()
    served = summary["served"]
    assert served["version"] == 1 and served["port"] in day1["ports"]
    (pred,) = predict(served["url"], ["데비안 패키지를 설치하려면 apt 명령을 사용합니다."])
    assert pred["label"] in manifest["classes"] and abs(sum(pred["probabilities"].values()) - 1) < 1e-4


def test_day2_new_faq_lines_rerun_only_their_stages_and_score_the_deployed_model_first(day1):
    repo, incoming, records = day1["repo"], day1["incoming"], day1["records"]
    old_served = day1["day1"]["summary"]["served"]
    (incoming / "part-001.jsonl").write_text(
        "".join(dumps(r) + "\n" for r in records[FIRST_FAQ_DOCS:]), encoding="utf-8"
    )
    code, summary, out = round_(repo, day1["ports"])
    assert code == 0, out[-6000:]
    ran = summary["ran"]
    assert [s for s in ran if s.startswith("train_lora")] == ["train_lora@faq"]
    assert {"corpus", "split", "train_classifier"} <= set(ran)
    assert tree_sha256(repo / "models" / "merged") == read_manifest(repo / "models" / "deployed")["merged_lm_sha256"]
    metrics = json.loads((repo / "metrics" / "classifier.json").read_text(encoding="utf-8"))
    case = metrics["start"]["case"]
    assert case in ("deployed_kept", "deployed_retrained"), metrics["start"]
    manifest = read_manifest(repo / "models" / "deployed")
    assert len(tags(repo)) == 2 and summary["tag"] in tags(repo)  # new data: a round to record
    if case == "deployed_kept":  # it passed the gate on the new test split: nothing trained, nothing promoted
        assert summary["decision"]["action"] == "keep" and summary["served"] is None
        assert tree_sha256(repo / "models" / "deployed") == day1["day1"]["deployed"]
        assert manifest["version"] == 1 and alive(old_served["pid"])
    else:  # fine-tuned from it: promoted only when at least as good, then served on the other port
        assert summary["decision"]["action"] in ("promote", "keep")
        if summary["decision"]["action"] == "promote":
            assert manifest["version"] == metrics["registry"]["version"] > 1
            assert summary["served"]["port"] != old_served["port"] and not alive(old_served["pid"])
            predict(summary["served"]["url"], ["대한민국은 민주공화국이다."])
    day1["day2"] = {"case": case, "summary": summary}


def test_day3_without_new_data_runs_nothing_and_creates_no_tag(day1):
    repo = day1["repo"]
    before = tags(repo), run(["git", "rev-parse", "HEAD"], repo).stdout
    code, summary, out = round_(repo, day1["ports"])
    assert code == 0, out[-6000:]
    assert summary["ran"] == [] and summary["decision"]["action"] == "nothing_new" and summary["tag"] is None
    assert (tags(repo), run(["git", "rev-parse", "HEAD"], repo).stdout) == before


def test_checking_out_day1s_tag_restores_its_deployed_model_byte_for_byte(day1):
    repo = day1["repo"]
    day1_tag = sorted(tags(repo))[0]
    run(["git", "checkout", "-q", day1_tag], repo)
    shutil.rmtree(repo / "models" / "deployed")
    shutil.rmtree(repo / ".dvc" / "cache")  # from the remote, not the local cache
    run(["dvc", "pull", "-q", "models/deployed.dvc"], repo)
    assert tree_sha256(repo / "models" / "deployed") == tree_sha256(day1["day1"]["copy"]) == day1["day1"]["deployed"]
    run(["git", "checkout", "-q", "main"], repo)
