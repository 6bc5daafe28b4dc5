"""The deployed line and the challenger (domainlm.classify.candidates, deployed.plan_start, model.widen_adapter): a
new label widens the deployed head with its known rows kept, the deployed model carries its backbone and is
continued on it after an LM release, every candidate is scored on one test split, and the round's decision quotes
them. Real tiny LMs, real peft adapters, a real MLflow store (SQLite in tmp)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from classifier_fixtures import CLASSES, COUNTS, DOMAINS, build_tiny_lm, classifier_params, write_labelled_splits
from safetensors.torch import load_file
from tiny_lm import one_torch_thread  # noqa: F401  (autouse: tiny models run faster on one thread)

from domainlm.classify import candidates, data, deployed, gate, training
from domainlm.classify import model as cls_model
from domainlm.classify.gate import Attempt, GateOutcome
from domainlm.common.tracking import mlflow_run
from domainlm.rounds import promotion
from stages import train_classifier

#: writer documents labelled calc: the label table of a round before writer became a label of its own.
THREE = {f"writer-{s}-{i}": "calc" for s, n in COUNTS.items() for i in range(n)}
OLD_CLASSES = sorted(set(CLASSES) - {"writer"})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two label tables over one split (three classes, then four), the tiny LM, and a second LM (its weights
    moved by seeded noise: a new LM release) with the same tokenizer."""
    root = tmp_path_factory.mktemp("lines")
    split_dir, labels4 = write_labelled_splits(root)
    _, labels3 = write_labelled_splits(root, overrides=THREE, labels_path=root / "labels3.parquet")
    lm = build_tiny_lm(root / "lm")
    from transformers import AutoModelForCausalLM

    moved = AutoModelForCausalLM.from_pretrained(lm, local_files_only=True)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    lm2 = root / "lm2"
    moved.save_pretrained(lm2)
    for f in Path(lm).iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
            shutil.copy2(f, lm2 / f.name)
    return {"root": root, "split_dir": split_dir, "labels3": labels3, "labels4": labels4, "lm": lm, "lm2": lm2}


@pytest.fixture(scope="module")
def three_class(world):
    """A classifier trained on the three-class labels, saved as train_classifier saves one (with its backbone)."""
    splits = data.read_splits(world["split_dir"], world["labels3"], DOMAINS)
    cfg = classifier_params()
    settings = gate.attempt_settings(cfg["train"], cfg["gate"], 0)
    model, tok, _ = training.train_attempt(
        world["lm"], splits["train"], splits["val"], OLD_CLASSES, cfg, settings, seed=0
    )
    out = cls_model.save_classifier(model, tok, world["root"] / "three")
    shutil.copytree(world["lm"], out / cls_model.BACKBONE_SUBDIR)
    return out


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def deploy(classifier_dir: Path, deployed_dir: Path, *, version: int, classes, lm) -> dict:
    """Promote ``classifier_dir`` into ``deployed_dir`` with the round's own manifest and copy."""
    manifest = promotion.build_manifest(
        registry_name="domain-lm-classifier",
        version=version,
        run_id="run",
        test_macro_f1=0.8,
        test_sha256="split",
        merged_dir=lm,
        classes=classes,
    )
    promotion.replace_deployed(classifier_dir, deployed_dir, manifest)
    return manifest


# ------------------------------------------------------------------------------------------------ the head


def test_a_widened_head_keeps_the_known_rows_and_their_logits(world, three_class, tmp_path):
    out = tmp_path / "widened"
    moved = cls_model.widen_adapter(three_class / "adapter", OLD_CLASSES, CLASSES, out, seed=3, std=0.02)
    assert moved == {"kept": OLD_CLASSES, "added": ["writer"]}
    old = load_file(str(three_class / "adapter" / cls_model.ADAPTER_WEIGHTS))
    new = load_file(str(out / cls_model.ADAPTER_WEIGHTS))
    head = "base_model.model.score.weight"
    assert old[head].shape[0] == 3 and new[head].shape[0] == 4
    for c in OLD_CLASSES:  # each known class keeps its row, at its index in the new class list
        assert torch.equal(new[head][CLASSES.index(c)], old[head][OLD_CLASSES.index(c)])
    assert 0 < float(new[head][CLASSES.index("writer")].std()) < 0.1
    assert all(torch.equal(new[k], old[k]) for k in old if k != head)  # LoRA matrices unchanged

    # On the same backbone, the known classes' logits are exactly the deployed model's.
    texts = ["셀 수식 차트 합계", "헌법 국민 권리", "데비안 패키지 설치"]
    before, tok = cls_model.load_adapter(world["lm"], OLD_CLASSES, three_class / "adapter", trainable=False)
    after, _ = cls_model.load_adapter(world["lm"], CLASSES, out, trainable=False)
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = before.eval()(**enc).logits, after.eval()(**enc).logits
    assert b.shape == (3, 4)
    np.testing.assert_allclose(b[:, [CLASSES.index(c) for c in OLD_CLASSES]].numpy(), a.numpy(), atol=1e-5)


def test_widening_refuses_a_class_list_that_drops_a_known_class(three_class, tmp_path):
    with pytest.raises(ValueError, match="lacks"):
        cls_model.widen_adapter(three_class / "adapter", OLD_CLASSES, ["faq", "law", "writer"], tmp_path, seed=0)
    with pytest.raises(FileNotFoundError):
        cls_model.widen_adapter(tmp_path, OLD_CLASSES, CLASSES, tmp_path / "o", seed=0)


# ------------------------------------------------------------------------------------------------ the plan


def test_the_start_plan_covers_every_case(world, three_class, tmp_path):
    dep_dir = tmp_path / "deployed"
    manifest = deploy(three_class, dep_dir, version=3, classes=OLD_CLASSES, lm=world["lm"])
    assert (dep_dir / "backbone").is_dir() and manifest["merged_lm_sha256"] == deployed.tree_sha256(world["lm"])
    here, other = deployed.tree_sha256(world["lm"]), deployed.tree_sha256(world["lm2"])

    def plan(classes, sha, lm):
        return deployed.plan_start(manifest, dep_dir, classes=classes, lm_dir=lm, merged_lm_sha256=sha)

    p = deployed.plan_start(None, dep_dir, classes=CLASSES, lm_dir=world["lm"], merged_lm_sha256=here)
    assert (p.score, p.continue_on, p.challenger) == (False, None, True)
    p = plan(OLD_CLASSES, here, world["lm"])  # same LM, same classes: scored, continued on this LM, no challenger
    assert (p.score, p.continue_on, p.new_classes, p.challenger) == (True, Path(world["lm"]), (), False)
    p = plan(OLD_CLASSES, other, world["lm2"])  # a new LM: scored, continued on its own backbone, a challenger too
    assert (p.score, p.continue_on, p.challenger) == (True, dep_dir / "backbone", True)
    p = plan(CLASSES, here, world["lm"])  # a new class: widened and continued, not scored
    assert (p.score, p.continue_on, p.new_classes, p.challenger) == (False, Path(world["lm"]), ("writer",), False)
    assert "widened" in p.reason
    p = plan(CLASSES, other, world["lm2"])
    assert (p.score, p.continue_on, p.widen, p.challenger) == (False, dep_dir / "backbone", True, True)
    p = plan(["faq", "law"], here, world["lm"])  # a deployed class without training documents: fresh
    assert (p.score, p.continue_on, p.challenger) == (False, None, True) and "calc" in p.reason

    shutil.rmtree(dep_dir / "backbone")  # a deployed folder without a backbone: scored only after a release
    p = plan(OLD_CLASSES, other, world["lm2"])
    assert (p.score, p.continue_on, p.challenger) == (True, None, True) and "no backbone" in p.reason
    p = plan(CLASSES, other, world["lm2"])
    assert (p.score, p.continue_on, p.widen, p.challenger) == (False, None, False, True)

    shutil.copytree(world["lm2"], dep_dir / "backbone")  # a backbone that is not the manifest's LM
    with pytest.raises(ValueError, match="not the LM"):
        plan(OLD_CLASSES, other, world["lm2"])


def _attempt(index, f1, val, *, source="trained", min_f1=0.75):
    return Attempt(index, {}, val, {"macro_f1": f1}, f1 >= min_f1, source=source)


def _outcome(*attempts, min_f1=0.75):
    passed = [a for a in attempts if a.passed]
    kept = passed[0] if passed else max(attempts, key=lambda a: (a.val_macro_f1, -a.index))
    return GateOutcome(list(attempts), kept, bool(passed), min_f1, len(attempts) - 1)


def test_the_better_passing_line_is_kept_and_a_tie_keeps_the_deployed_line():
    dep_kept = _outcome(_attempt(0, 0.80, 0.8, source="deployed"))
    assert candidates.choose_line({"deployed": dep_kept, "challenger": _outcome(_attempt(0, 0.82, 0.7))}) == (
        "challenger"
    )
    assert candidates.choose_line({"deployed": dep_kept, "challenger": _outcome(_attempt(0, 0.80, 0.9))}) == "deployed"
    failing = _outcome(_attempt(0, 0.70, 0.9))  # a failing line never beats a passing one, whatever its val score
    assert candidates.choose_line({"deployed": dep_kept, "challenger": failing}) == "deployed"
    continued = _outcome(_attempt(0, 0.6, 0.6, source="deployed"), _attempt(1, 0.78, 0.7, source="continued"))
    both = {"deployed": continued, "challenger": _outcome(_attempt(0, 0.77, 0.9))}
    assert candidates.choose_line(both) == "deployed"
    scores = candidates.candidate_scores(both, continued.attempts[0])
    assert scores["deployed"] == {"test_macro_f1": 0.6, "val_macro_f1": 0.6, "passed": 0, "attempts": 0}
    assert scores["deployed_continued"]["test_macro_f1"] == 0.78 and scores["deployed_continued"]["attempts"] == 1
    assert scores["challenger"]["passed"] == 1
    neither = {"deployed": _outcome(_attempt(0, 0.5, 0.6)), "challenger": _outcome(_attempt(0, 0.6, 0.6))}
    assert candidates.choose_line(neither) == "deployed"  # neither passes: validation decides, a tie keeps deployed
    with pytest.raises(ValueError, match="no candidate"):
        candidates.choose_line({})


# ------------------------------------------------------------------------------------------------ the stage


def _run(world, out: Path, *, labels, lm, deployed_dir=None, **cfg_updates) -> dict:
    cfg = classifier_params(**cfg_updates)
    with mlflow_run("train_classifier", cfg) as ml:
        return train_classifier.run(
            DOMAINS,
            cfg,
            ml,
            split_dir=world["split_dir"],
            labels_path=labels,
            lm_dir=lm,
            out_dir=out / "models" / "classifier",
            token_stats_json=out / "metrics" / "token_stats.json",
            confusion_csv=out / "plots" / "confusion.csv",
            baseline_confusion_csv=out / "plots" / "baseline.csv",
            alerts_json=out / "metrics" / "alerts.json",
            deployed_dir=deployed_dir,
            window_cache_dir=out / "cache",
        )


def _child_runs(version: int) -> list[str]:
    parent = mlflow.search_runs(experiment_names=["domain-lm"], filter_string=f"tags.`registry.version` = '{version}'")
    children = mlflow.search_runs(
        experiment_names=["domain-lm"], filter_string=f"tags.mlflow.parentRunId = '{parent['run_id'][0]}'"
    )
    return sorted(children["tags.mlflow.runName"])


def test_a_new_label_widens_the_deployed_head_and_training_continues(world, three_class, tracking, tmp_path):
    dep_dir = tmp_path / "models" / "deployed"
    deploy(three_class, dep_dir, version=1, classes=OLD_CLASSES, lm=world["lm"])
    m = _run(world, tmp_path, labels=world["labels4"], lm=world["lm"], deployed_dir=dep_dir)
    start = m["start"]
    assert start["case"] == "deployed_widened" and start["widened"] == 1 and start["new_classes"] == 1
    assert start["line"] == "deployed" and start["deployed_scored"] == 0 and "writer" in start["reason"]
    assert set(start["candidates"]) == {"deployed_continued"}  # the same LM: no challenger
    assert m["classes"] == 4 and set(m["lora"]["per_class"]) == set(CLASSES)
    out = tmp_path / "models" / "classifier"
    model, _ = cls_model.load_classifier(out / "model")
    assert cls_model.classes_of(model) == CLASSES
    assert deployed.tree_sha256(out / "backbone") == deployed.tree_sha256(world["lm"])
    assert _child_runs(m["registry"]["version"])[0] == "attempt_0"
    # attempt 0 continued the widened head with the retry settings (class-weighted, retry epochs)
    cfg = classifier_params()
    assert m["gate"]["trained_epochs"] <= cfg["gate"]["retry_epochs"] * m["gate"]["attempts"]
    d = promotion.decide(m, deployed.read_manifest(dep_dir), test_sha256="other", rescore=lambda: 1 / 0)
    if m["gate"]["passed"]:
        assert d.action == promotion.PROMOTE and "widened" in d.reason
        assert promotion.finetuned_from(m) == 1
    else:
        assert d.action == promotion.GATE_FAILED


def test_after_a_release_the_deployed_model_is_continued_on_its_backbone_beside_the_challenger(
    world, three_class, tracking, tmp_path
):
    dep_dir = tmp_path / "models" / "deployed"
    deploy(three_class, dep_dir, version=1, classes=OLD_CLASSES, lm=world["lm"])
    # A gate the deployed model fails: its retries continue it on its own backbone; the challenger trains on lm2.
    m = _run(world, tmp_path, labels=world["labels3"], lm=world["lm2"], deployed_dir=dep_dir, gate={"min_f1": 0.99})
    start = m["start"]
    assert set(start["candidates"]) == {"deployed", "deployed_continued", "challenger"}
    assert start["candidates"]["deployed"]["attempts"] == 0
    assert start["candidates"]["deployed_continued"]["attempts"] == 2  # two retries of the deployed model
    assert start["candidates"]["challenger"]["attempts"] == 3
    assert start["deployed_scored"] == 1
    runs = _child_runs(m["registry"]["version"])
    assert runs == ["attempt_0", "attempt_1", "attempt_2", "deployed_attempt_1", "deployed_attempt_2"]
    out = tmp_path / "models" / "classifier"
    lm_of_line = world["lm"] if start["line"] == "deployed" else world["lm2"]
    assert deployed.tree_sha256(out / "backbone") == deployed.tree_sha256(lm_of_line)
    assert start["case"] == ("deployed_retrained" if start["line"] == "deployed" else "challenger")
    d = promotion.decide(m, deployed.read_manifest(dep_dir), test_sha256="other", rescore=lambda: 1 / 0)
    assert d.action == promotion.GATE_FAILED
    for name in ("deployed ", "deployed continued ", "challenger "):
        assert name in d.reason
    # The kept line's adapter loads back onto the backbone it carries.
    _, _ = cls_model.load_adapter(out / "backbone", OLD_CLASSES, out / "adapter", trainable=False)
    doc = json.loads((tmp_path / "metrics" / "alerts.json").read_text())
    assert doc["gate"] == "failed"
