"""The reproducibility promise's checks: identical dvc.lock hashes on one machine, metric tolerances across machines."""

from __future__ import annotations

import json

import yaml

from domainlm.common import reproducibility as rep


def _lock(path, md5s):
    path.write_text(
        yaml.safe_dump(
            {
                "schema": "2.0",
                "stages": {stage: {"cmd": "x", "outs": [{"path": p, "md5": m}]} for stage, (p, m) in md5s.items()},
            }
        )
    )
    return path


def test_compare_locks_names_the_outputs_whose_hashes_differ(tmp_path):
    a = _lock(tmp_path / "a.lock", {"base_model": ("models/base", "1"), "merge": ("models/merged", "2")})
    b = _lock(tmp_path / "b.lock", {"base_model": ("models/base", "1"), "merge": ("models/merged", "3")})
    assert rep.compare_locks(a, a) == []
    assert rep.compare_locks(a, b) == ["merge:models/merged"]
    assert rep.compare_locks(a, b, ignore=["merge:*"]) == []


def _metrics(root, evaluate, classifier):
    root.mkdir(parents=True)
    (root / "evaluate.json").write_text(json.dumps(evaluate))
    (root / "classifier.json").write_text(json.dumps(classifier))
    return root


def test_compare_metrics_applies_relative_and_absolute_tolerances(tmp_path):
    a = _metrics(
        tmp_path / "a",
        {"perplexity": {"base": {"law": 100.0}}, "mean_retained_gain": 0.70, "gate": {"passed": 1}},
        {"lora": {"macro_f1": 0.76, "accuracy": 0.8}, "baseline": {"macro_f1": 0.77}, "timing": {"run_s": 10}},
    )
    b = _metrics(
        tmp_path / "b",
        {"perplexity": {"base": {"law": 103.0}}, "mean_retained_gain": 0.64, "gate": {"passed": 1}},
        {"lora": {"macro_f1": 0.70, "accuracy": 0.79}, "baseline": {"macro_f1": 0.7736}, "timing": {"run_s": 99}},
    )
    rows = {r["key"]: r for r in rep.compare_metrics(a, b)}
    assert rows["perplexity.base.law"]["ok"] and abs(rows["perplexity.base.law"]["diff"] - 0.03) < 1e-9  # 3% < 5%
    assert rows["mean_retained_gain"]["ok"]
    assert not rows["lora.macro_f1"]["ok"]  # 0.06 > 0.05
    assert rows["lora.accuracy"]["ok"] and rows["baseline.macro_f1"]["ok"]  # another OpenBLAS kernel: one document
    assert "timing.run_s" not in rows  # timings are not promised


def test_the_command_exits_1_when_a_figure_is_off(tmp_path):
    for name, f1 in (("here", 0.76), ("other", 0.60)):
        root = tmp_path / name
        _metrics(root / "metrics", {"mean_retained_gain": 0.7}, {"lora": {"macro_f1": f1}})
        _lock(root / "dvc.lock", {"merge": ("models/merged", "1")})
    assert rep.main([str(tmp_path / "other"), "--here", str(tmp_path / "here")]) == 1
    assert rep.main([str(tmp_path / "here"), "--here", str(tmp_path / "here"), "--same-machine"]) == 0
