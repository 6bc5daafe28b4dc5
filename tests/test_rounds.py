"""The round's parts without training: the bootstrap folder, the promote decision, the lock, the tag numbering and the
atomic replacement of ``models/deployed`` (real git, DVC and flock; the end-to-end days are in test_round_days.py)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import pytest
from conftest import ROOT, run

from domainlm.classify.deployed import read_manifest
from domainlm.rounds import promotion
from domainlm.rounds.daily import RoundBusy, RoundLock, next_tag
from domainlm.rounds.promotion import GATE_FAILED, KEEP, PROMOTE, decide


def metrics(*, passed=1, f1=0.8, version=3, case="fresh", attempt0=None):
    gate = {"passed": passed, "min_f1": 0.75, "attempts": 1, "test_macro_f1": {}}
    if attempt0 is not None:
        gate["test_macro_f1"]["attempt_0"] = attempt0
    return {
        "lora": {"macro_f1": f1},
        "registry": {"version": version},
        "gate": gate,
        "start": {"case": case, "reason": "test"},
    }


MANIFEST = {"version": 2, "test_macro_f1": 0.78, "test_sha256": "old"}


def never():
    raise AssertionError("re-scoring was not needed")


def test_the_bootstrap_folder_is_byte_identical_to_the_committed_pointer(tmp_path):
    """A fresh clone without the remote writes models/deployed and `dvc status` stays clean."""
    run(["git", "init", "-q"], tmp_path)
    run(["dvc", "init", "-q"], tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "deployed.dvc").write_bytes((ROOT / "models" / "deployed.dvc").read_bytes())
    run([sys.executable, "-m", "domainlm.rounds", "bootstrap"], tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert (tmp_path / "models" / "deployed" / "deployed.json").read_bytes() == b'{"version": null}\n'
    assert read_manifest(tmp_path / "models" / "deployed") is None
    status = json.loads(run(["dvc", "status", "--json", "models/deployed.dvc"], tmp_path).stdout)
    assert status == {"models/deployed.dvc": [{"changed outs": {"models/deployed": "not in cache"}}]}  # not modified
    run(["dvc", "add", "-q", "models/deployed"], tmp_path)  # hashing it again gives the committed pointer
    assert (tmp_path / "models" / "deployed.dvc").read_bytes() == (ROOT / "models" / "deployed.dvc").read_bytes()
    assert json.loads(run(["dvc", "status", "--json"], tmp_path).stdout) == {}
    with pytest.raises(FileExistsError):
        promotion.write_bootstrap(tmp_path / "models" / "deployed")


def test_decide_keeps_promotes_and_fails_by_the_rules():
    assert decide(metrics(case="deployed_kept"), MANIFEST, test_sha256="new", rescore=never).action == KEEP
    assert decide(metrics(passed=0, f1=0.5), MANIFEST, test_sha256="new", rescore=never).action == GATE_FAILED
    assert decide(metrics(), None, test_sha256="new", rescore=never).action == PROMOTE
    # same test split: the manifest's figure decides; a tie keeps the deployed model
    assert decide(metrics(f1=0.79), MANIFEST, test_sha256="old", rescore=never).action == PROMOTE
    assert decide(metrics(f1=0.78), MANIFEST, test_sha256="old", rescore=never).action == KEEP
    # retrained from the deployed model: attempt 0 is the deployed model on this test split
    d = decide(metrics(f1=0.8, case="deployed_retrained", attempt0=0.6), MANIFEST, test_sha256="new", rescore=never)
    assert d.action == PROMOTE and d.deployed_macro_f1 == 0.6
    retrained = metrics(f1=0.7, case="deployed_retrained")
    retrained["start"]["deployed_test_macro_f1"] = 0.72
    d = decide(retrained, MANIFEST, test_sha256="new", rescore=never)
    assert d.action == KEEP and d.deployed_macro_f1 == 0.72
    # a challenger (a new LM): the deployed model's score from this run decides, with the paired interval quoted
    challenger = metrics(f1=0.8, case="challenger")
    challenger["start"].update(
        deployed_test_macro_f1=0.75,
        lora_minus_deployed=0.05,
        lora_minus_deployed_low=-0.01,
        lora_minus_deployed_high=0.11,
    )
    d = decide(challenger, MANIFEST, test_sha256="new", rescore=never)
    assert d.action == PROMOTE and d.deployed_macro_f1 == 0.75 and "[-0.0100, +0.1100]" in d.reason
    challenger["start"]["deployed_test_macro_f1"] = 0.8
    assert decide(challenger, MANIFEST, test_sha256="new", rescore=never).action == KEEP
    # a challenger that fails the gate while the deployed model passes on the same split: the deployed model stays
    failed = metrics(passed=0, f1=0.6, case="challenger")
    failed["start"]["deployed_test_macro_f1"] = 0.8
    d = decide(failed, MANIFEST, test_sha256="new", rescore=never)
    assert d.action == KEEP and d.deployed_macro_f1 == 0.8 and "failed the gate" in d.reason
    failed["start"]["deployed_test_macro_f1"] = 0.7  # neither passes: the gate failed
    assert decide(failed, MANIFEST, test_sha256="new", rescore=never).action == GATE_FAILED
    # metrics without the deployed model's score (a fresh model): it is re-scored on the new test split
    calls = []
    d = decide(metrics(f1=0.8), MANIFEST, test_sha256="new", rescore=lambda: calls.append(1) or 0.85)
    assert d.action == KEEP and d.deployed_macro_f1 == 0.85 and calls == [1]


def test_replace_deployed_swaps_the_whole_folder_and_refuses_an_incomplete_model(tmp_path):
    src = tmp_path / "classifier"
    for sub in ("model", "adapter"):
        (src / sub).mkdir(parents=True)
        (src / sub / "weights.bin").write_bytes(sub.encode())
    deployed = promotion.write_bootstrap(tmp_path / "deployed")
    manifest = {
        "registry_name": "m",
        "version": 4,
        "run_id": "r",
        "test_macro_f1": 0.9,
        "test_sha256": "t",
        "merged_lm_sha256": "h",
        "classes": ["a", "b"],
        "date": "2026-12-02T00:00:00Z",
    }
    promotion.replace_deployed(src, deployed, manifest)
    assert read_manifest(deployed) == manifest
    assert (deployed / "adapter" / "weights.bin").read_bytes() == b"adapter"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier", "deployed"]  # no temp or old folder left
    (src / "adapter" / "weights.bin").unlink()
    (src / "adapter").rmdir()
    with pytest.raises(FileNotFoundError, match="adapter"):
        promotion.replace_deployed(src, deployed, {**manifest, "version": 5})
    assert read_manifest(deployed)["version"] == 4  # untouched


def test_a_second_round_cannot_take_the_lock_while_one_runs(tmp_path):
    lock = tmp_path / "round.lock"
    code = (
        "import sys; from domainlm.rounds.daily import RoundLock, RoundBusy\n"
        f"try:\n  RoundLock({str(lock)!r}).__enter__()\nexcept RoundBusy as e:\n  print(e); sys.exit(3)\n"
    )
    with RoundLock(lock):
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        assert other.returncode == 3 and "another round" in other.stdout
        with pytest.raises(RoundBusy):  # flock locks per open file: a second open in this process is refused too
            RoundLock(lock).__enter__()
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0  # released


def test_round_tags_count_up_within_a_day(tmp_path):
    run(["git", "init", "-q"], tmp_path)
    run(["git", "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m", "x"], tmp_path)
    day = dt.date(2026, 12, 2)
    assert next_tag(day, tmp_path) == "round-20261202-1"
    for tag in ("round-20261202-1", "round-20261202-2", "round-20261201-7"):
        run(["git", "tag", tag], tmp_path)
    assert next_tag(day, tmp_path) == "round-20261202-3"
    assert next_tag(dt.date(2026, 12, 3), tmp_path) == "round-20261203-1"
