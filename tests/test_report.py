"""report: the notebook runs headless on the pipeline's metrics/plots/eval files and exports a markdown
report whose figures are real PNGs and whose numbers are the metrics files' numbers."""

from __future__ import annotations

import copy
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

from domainlm.report import SOURCE_NOTEBOOK, figures, inputs, narrative, notebook, sections, tables
from stages import report as report_stage

ROOT = Path(__file__).resolve().parents[1]
INPUT_DIRS = ("metrics", "plots", "eval")

# A made-up metrics/classifier.json in the documented minimal shape (domainlm.report.inputs): no gate, no registry.
CLASSIFIER = {
    "lora": {
        "macro_f1": 0.8731,
        "confusion_matrix": {
            "labels": ["law", "bill", "office_help", "faq"],
            "matrix": [[12, 1, 0, 0], [0, 1, 0, 0], [3, 0, 240, 6], [0, 0, 1, 1]],
        },
    },
    "baseline": {"macro_f1": 0.7412, "name": "TF-IDF + logistic regression"},
}


def _copy_inputs(dest: Path, *, io_speed: bool, classifier: bool) -> Path:
    """The repository's metrics/, plots/, eval/ (from the last full pipeline run) under ``dest``."""
    for name in INPUT_DIRS:
        shutil.copytree(ROOT / name, dest / name)
    (dest / "metrics" / "report.json").unlink(missing_ok=True)
    if io_speed:
        (dest / inputs.IO_SPEED_CSV).parent.mkdir(parents=True)
        shutil.copy2(ROOT / inputs.IO_SPEED_CSV, dest / inputs.IO_SPEED_CSV)
    if classifier:
        (dest / inputs.CLASSIFIER_JSON).write_text(json.dumps(CLASSIFIER), encoding="utf-8")
    else:
        (dest / inputs.CLASSIFIER_JSON).unlink(missing_ok=True)
    return dest


def _metrics_diff(root: Path) -> dict:
    """A ``dvc metrics diff --json`` answer: the mean retained gain moved, and two timings."""
    ev = json.loads((root / "metrics/evaluate.json").read_text(encoding="utf-8"))
    new = ev["mean_retained_gain"]
    return {
        "metrics/evaluate.json": {
            "mean_retained_gain": {"old": new - 0.05, "new": new, "diff": 0.05},
            "wall_s": {"old": 190.0, "new": 195.0, "diff": 5.0},
        },
        "metrics/dedup.json": {"time.lsh_s": {"old": 0.2, "new": 0.1, "diff": -0.1}},
    }


def _run(root: Path, metrics_diff=None, diff_base=None) -> dict:
    out = root / "reports"
    metrics = report_stage.run(
        ROOT / SOURCE_NOTEBOOK,
        root,
        out / "report.md",
        out / "figures",
        out / "summary.executed.ipynb",
        metrics_diff=metrics_diff,
        diff_base=diff_base,
        timeout_s=120,
    )
    return {"metrics": metrics, "md": (out / "report.md").read_text(encoding="utf-8"), "out": out, "root": root}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """Every input present (io_speed.csv, a classifier.json) and a metrics diff."""
    root = _copy_inputs(tmp_path_factory.mktemp("full"), io_speed=True, classifier=True)
    return _run(root, metrics_diff=_metrics_diff(root), diff_base="abc1234")


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """No optional input: no io_speed.csv, no classifier.json, no metrics diff."""
    root = _copy_inputs(tmp_path_factory.mktemp("bare"), io_speed=False, classifier=False)
    return _run(root)


def _load(root: Path, rel: str) -> dict:
    return json.loads((root / rel).read_text(encoding="utf-8"))


def _table_rows(md: str, after_heading: str) -> list[list[str]]:
    """The cells of the first markdown table after ``## <after_heading>``."""
    part = md.split(f"## {after_heading}\n", 1)[1]
    rows = []
    for line in part.splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip()[1:-1].split(" | ")])
        elif rows:
            break
    return rows[2:]  # header and rule left out


# ------------------------------------------------------------------------------------------ figures
@pytest.mark.parametrize("case", ["full", "bare"])
def test_every_figure_is_a_png_that_is_not_blank(case, request):
    result = request.getfixturevalue(case)
    md, out = result["md"], result["out"]
    linked = re.findall(r"!\[([^\]]+)\]\((figures/[^)]+)\)", md)
    assert len(linked) == result["metrics"]["figures"] == (8 if case == "full" else 7)
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(Path(p).name for _, p in linked)
    for alt, rel in linked:
        assert alt not in ("png", "figure") and len(alt) > 20  # real alt text
        path = out / rel
        with Image.open(path) as im:
            assert im.format == "PNG"
            assert im.width >= 400 and im.height >= 300
            pixels = np.asarray(im.convert("RGB"), dtype=float)
        assert pixels.var() > 0
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 8, f"{rel} is nearly one colour"
        assert (pixels < 128).mean() > 0.005, f"{rel} has almost no dark pixels (no text or lines)"
    assert result["metrics"]["figure_bytes"] < 400_000  # small enough to commit


def test_figures_are_what_the_sections_say(full):
    names = sorted(p.stem for p in (full["out"] / "figures").iterdir())
    assert names == sorted(sections.FIGURE_NAMES)


# ------------------------------------------------------------------------------------------ numbers
def test_headline_numbers_equal_the_metrics_files(full):
    root, md = full["root"], full["md"]
    headline = {r[0]: r[1] for r in _table_rows(md, "Headline")}
    validate = _load(root, "metrics/validate.json")
    dedup = _load(root, "metrics/dedup.json")
    split = _load(root, "metrics/split.json")
    evaluate = _load(root, "metrics/evaluate.json")
    refine = _load(root, "metrics/refine.json")
    assert headline["raw lines read"] == str(validate["totals"]["lines_read"])
    assert headline["documents kept by validation"].startswith(f"{validate['totals']['kept']} (")
    assert headline["near-duplicates removed"].startswith(f"{dedup['totals']['near_removed']} (")
    assert headline["documents after dedup"] == str(dedup["totals"]["after"])
    assert headline["train / val / test documents"] == " / ".join(
        str(split["total"][s]) for s in ("train", "val", "test")
    )
    assert headline["mean retained gain"].startswith(f"{evaluate['mean_retained_gain']:.3f}")
    assert headline["ensemble validation accuracy"] == f"{refine['final_iteration']['val_accuracy_ensemble']:.3f}"
    assert headline["classifier macro-F1, LoRA vs baseline"] == "0.873 vs 0.741"


def test_perplexity_table_equals_evaluate_json(full):
    evaluate = _load(full["root"], "metrics/evaluate.json")
    rows = {r[0]: r for r in _table_rows(full["md"], "Perplexity and retained gain")}
    assert set(rows) == set(evaluate["retained_gain"])
    for d, r in rows.items():
        ppl = evaluate["perplexity"]
        assert r[1:5] == [
            f"{ppl['base'][d]:.1f}",
            f"{ppl[f'expert_{d}'][d]:.1f}",
            f"{ppl['merged'][d]:.1f}",
            f"{evaluate['retained_gain'][d]:.3f}",
        ]
        assert r[5] == str(evaluate["tokens"]["perplexity_stream"][d])
    assert f"Mean retained gain: **{evaluate['mean_retained_gain']:.3f}**" in full["md"]


def test_funnel_and_dedup_numbers_equal_the_metrics_files(full):
    root, md = full["root"], full["md"]
    validate, dedup, split = (_load(root, f"metrics/{n}.json") for n in ("validate", "dedup", "split"))
    rows = {r[0]: r for r in _table_rows(md, "Data funnel")}
    for d, r in rows.items():
        assert r[3] == str(validate["by_domain"][d]["kept"])
        assert r[4] == str(dedup["per_domain"][d]["near_removed"] + dedup["per_domain"][d]["exact_removed"])
        assert r[5] == str(dedup["per_domain"][d]["after"])
        assert r[6:9] == [str(split["domains"][d][s]["docs"]) for s in ("train", "val", "test")]
    assert f"{dedup['totals']['near_removed']} near-duplicates were removed" in md
    assert f"probability {dedup['lsh']['p_candidate_at_threshold']:.3f}" in md
    assert f"gives {dedup['lsh']['datasketch_default']['p_candidate_at_threshold']:.3f}" in md


def test_small_domains_are_derived_from_the_split(full):
    split = _load(full["root"], "metrics/split.json")
    small = sorted(d for d, v in split["domains"].items() if v["train"]["docs"] < tables.MIN_TRAIN_DOCS)
    rows = _table_rows(full["md"], "Domains too small to train on")
    assert sorted(r[0] for r in rows) == small
    for r in rows:
        assert r[1] == str(split["domains"][r[0]]["train"]["docs"])
    if "bill" in small:  # the bundled corpus: 7 training documents
        assert f"`bill` ({split['domains']['bill']['train']['docs']} training documents)" in full["md"]


def test_gate_section_reports_alerts_json(full):
    alerts = _load(full["root"], "metrics/alerts.json")
    assert f"**Quality gate: {alerts['gate']}**" in full["md"]
    outcomes = {r[0]: r[3] for r in _table_rows(full["md"], "Quality gate and alerts")}
    if alerts["gate"] == "passed":
        assert "FAIL" not in outcomes.values()
        assert "Alerts raised: none." in full["md"]


def test_changes_come_from_the_metrics_diff(full):
    md = full["md"]
    rows = _table_rows(md, "What changed since the previous commit")
    assert [r[:2] for r in rows] == [["metrics/evaluate.json", "mean_retained_gain"]]  # timings not listed
    assert "and 2 timing or memory values" in md
    assert full["metrics"]["metrics_diff"] == {"available": 1, "result_changes": 1, "run_cost_changes": 2}


def test_metrics_count_sections_and_figures(full):
    m = full["metrics"]
    assert m["present"] == {k: 1 for k in sections.TITLES}
    assert m["sections"] == {"present": len(sections.TITLES), "left_out": 0}
    assert m["figures"] == 8 and m["code_cells"] >= len(sections.TITLES)
    assert all(isinstance(v, (int, float)) for v in (m["figure_bytes"], m["markdown_bytes"], m["execute_s"]))


# ------------------------------------------------------------------------------------------ missing inputs
def test_missing_optional_inputs_leave_their_sections_out_with_a_note(bare):
    md, m = bare["md"], bare["metrics"]
    for key in ("classifier", "load_speed", "changes"):
        title = sections.TITLES[key]
        assert f"> **Left out: {title}.**" in md
        assert f"## {title}\n" not in md
        assert m["present"][key] == 0
    assert "metrics/classifier.json` does not exist" in md
    assert "benchmarks/results/io_speed.csv` does not exist" in md
    assert m["sections"] == {"present": len(sections.TITLES) - 3, "left_out": 3}
    assert m["metrics_diff"]["available"] == 0
    assert not (bare["out"] / "figures" / "fig8_classifier.png").exists()
    assert "## Parquet vs JSONL\n" in md  # the sizes still show; only the speed panel is gone
    assert "**No classifier yet.**" in md and "**No load-speed measurement.**" in md


def test_a_missing_required_input_is_named(tmp_path):
    root = _copy_inputs(tmp_path, io_speed=False, classifier=False)
    (root / "metrics" / "refine.json").unlink()
    with pytest.raises(FileNotFoundError, match="metrics/refine.json"):
        inputs.load_inputs(root)


def test_a_malformed_classifier_file_fails_loudly():
    bad = copy.deepcopy(CLASSIFIER)
    bad["lora"]["confusion_matrix"]["matrix"] = [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="4 x 4"):
        inputs.check_classifier(bad)
    with pytest.raises(ValueError, match="macro_f1"):
        inputs.check_classifier({"lora": {}})


def test_the_classifier_file_may_give_the_confusion_as_nested_counts():
    """``domainlm.classify.metrics.score`` writes ``confusion`` as {actual: {predicted: documents}}."""
    nested = {
        "lora": {"macro_f1": 0.9, "confusion": {"bill": {"bill": 1, "law": 0}, "law": {"bill": 2, "law": 11}}},
        "baseline": {"macro_f1": 0.8},
    }
    cm = inputs.check_classifier(nested)["lora"]["confusion_matrix"]
    assert cm == {"labels": ["bill", "law"], "matrix": [[1, 0], [2, 11]]}


# ------------------------------------------------------------------------------------------ notebook
def test_the_executed_notebook_keeps_its_outputs_and_parameters(full):
    nb = nbformat.read(str(full["out"] / "summary.executed.ipynb"), as_version=4)
    pngs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 8
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "diff_base = 'abc1234'" in injected[0].source
    assert all(c.execution_count is not None for c in nb.cells if c.cell_type == "code")
    # the source notebook stays without outputs
    src = nbformat.read(str(ROOT / SOURCE_NOTEBOOK), as_version=4)
    assert all(not c.get("outputs") for c in src.cells if c.cell_type == "code")


def test_the_kernel_is_this_interpreter(tmp_path):
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("import os, sys\nprint(sys.executable)\nprint(os.getcwd())")]
    )
    out = notebook.execute(nb, cwd=tmp_path, timeout_s=60)
    printed = out.cells[0].outputs[0]["text"].split()
    assert Path(printed[0]).resolve() == Path(sys.executable).resolve()
    assert Path(printed[1]).resolve() == tmp_path.resolve()


def test_inject_parameters_goes_after_the_parameters_cell():
    src = notebook.read(ROOT / SOURCE_NOTEBOOK)
    nb = notebook.inject_parameters(
        src, {"metrics_diff": {"a.json": {"x": {"old": 1, "new": 2.5, "diff": 1.5}}}, "diff_base": None}
    )
    i = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    cell = nb.cells[i + 1]
    assert cell.metadata["tags"] == ["injected-parameters"]
    scope: dict = {}
    exec(cell.source, scope)
    assert scope["metrics_diff"] == {"a.json": {"x": {"old": 1, "new": 2.5, "diff": 1.5}}}
    assert scope["diff_base"] is None
    assert len(nb.cells) == len(src.cells) + 1
    with pytest.raises(TypeError):
        notebook.inject_parameters(src, {"p": Path(".")})


# ------------------------------------------------------------------------------------------ pieces
def test_banding_curve_matches_the_dedup_stage(full):
    dedup = _load(full["root"], "metrics/dedup.json")
    lsh = dedup["lsh"]
    assert tables.p_candidate(lsh["threshold"], dedup["bands"], dedup["rows"]) == pytest.approx(
        lsh["p_candidate_at_threshold"]
    )
    assert tables.p_candidate(0.5, dedup["bands"], dedup["rows"]) == pytest.approx(lsh["s_curve"]["j050"])
    dflt = lsh["datasketch_default"]
    assert tables.p_candidate(lsh["threshold"], dflt["bands"], dflt["rows"]) == pytest.approx(
        dflt["p_candidate_at_threshold"]
    )


def test_change_rows_separate_results_from_run_costs():
    diff = {
        "metrics/a.json": {
            "x.acc": {"old": 0.5, "new": 0.6, "diff": 0.1},
            "y": {"old": 10, "new": 11, "diff": 1},
            "new_key": {"old": None, "new": 3, "diff": None},
            "stage.wall_s": {"old": 1.0, "new": 2.0, "diff": 1.0},
            "peak_rss_mb_workers": {"old": 1.0, "new": 2.0, "diff": 1.0},
            "docs_per_s": {"old": 1.0, "new": 2.0, "diff": 1.0},
        }
    }
    rows, n_cost = tables.change_rows(diff)
    assert n_cost == 3
    assert [r["metric"] for r in rows] == ["new_key", "x.acc", "y"]
    assert rows[1]["relative"] == pytest.approx(0.2)
    text = narrative.changes(diff, "abc1234")
    assert "| metrics/a.json | new_key | – | 3 | – | new |" in text
    assert narrative.changes({}, "abc1234").startswith("No metric changed since commit `abc1234`")


def test_distinct_ngram_ratio():
    assert tables.distinct_ngram_ratio("abcdef") == 1.0
    assert tables.distinct_ngram_ratio("aaaaaaa") == pytest.approx(1 / 4)
    assert tables.distinct_ngram_ratio("abc") is None


def test_sections_handle_a_failed_gate_and_thin_results(tmp_path):
    """What a tiny or bad run gives: negative and zero retained gains, a failed gate with an alert, one
    refinement iteration, a domain without continuation examples, no small domain. No kernel: the
    sections are built directly, and every figure renders."""
    root = _copy_inputs(tmp_path, io_speed=False, classifier=False)
    ev = _load(root, "metrics/evaluate.json")
    d0, d1 = list(ev["retained_gain"])[:2]
    ev["retained_gain"][d0], ev["retained_gain"][d1] = -0.4, 0.0
    (root / "metrics/evaluate.json").write_text(json.dumps(ev), encoding="utf-8")
    alerts = _load(root, "metrics/alerts.json")
    alerts["gate"] = "failed"
    alerts["failures"] = [
        {"rule": "min_mean_retained_gain", "metric": "mean_retained_gain", "value": 0.1, "threshold": 0.5}
    ]
    (root / "metrics/alerts.json").write_text(json.dumps(alerts), encoding="utf-8")
    split = _load(root, "metrics/split.json")
    for v in split["domains"].values():
        v["train"]["docs"] = max(v["train"]["docs"], tables.MIN_TRAIN_DOCS)
    (root / "metrics/split.json").write_text(json.dumps(split), encoding="utf-8")
    hist = root / "plots/refine_history.csv"
    hist.write_text("\n".join(hist.read_text(encoding="utf-8").splitlines()[:2]) + "\n", encoding="utf-8")
    cmp_md = root / "eval/eval_prompt_comparison.md"
    cmp_md.write_text(
        cmp_md.read_text(encoding="utf-8") + "\n## empty\n\n| prompt | reference | base | merged |\n"
        "|---|---|---|---|\n",
        encoding="utf-8",
    )

    built = sections.build_all(inputs.load_inputs(root))
    md = "\n\n".join(s.markdown() for s in built)
    assert "**Quality gate: failed**" in md
    assert "- `mean_retained_gain` = 0.1 fails `min_mean_retained_gain` (threshold 0.5)" in md
    assert f"No domain has fewer than {tables.MIN_TRAIN_DOCS} training documents." in md
    assert "**Too little data.**" not in md
    assert f"**The merge loses most on `{d0}`** (retained gain -0.400" in md
    for s in built:
        for b in s.blocks:
            if isinstance(b, sections.FigureBlock):
                with Image.open(io.BytesIO(figures.png_bytes(b.figure))) as im:
                    assert im.format == "PNG" and np.asarray(im.convert("L")).var() > 0


@pytest.mark.parametrize("passed", [0, 1])
def test_the_classifier_section_and_limits_give_the_gate_attempts_and_alias(tmp_path, passed):
    """The repository's own metrics/classifier.json (train_classifier's output): the section names the gate's
    outcome, each attempt's test macro-F1 and the registry alias; a failed gate becomes a limit, a passed
    one does not."""
    root = _copy_inputs(tmp_path, io_speed=False, classifier=False)
    real = _load(ROOT, "metrics/classifier.json")
    real["gate"]["passed"], real["registry"]["champion"] = passed, passed
    (root / inputs.CLASSIFIER_JSON).write_text(json.dumps(real), encoding="utf-8")
    md = "\n\n".join(s.markdown() for s in sections.build_all(inputs.load_inputs(root)))
    gate = real["gate"]
    per_attempt = ", ".join(f"{gate['test_macro_f1'][f'attempt_{i}']:.3f}" for i in range(gate["attempts"]))
    outcome = "passed" if passed else "failed"
    assert (
        f"Gate (test macro-F1 ≥ {gate['min_f1']}): **{outcome}** after {gate['attempts']} attempt(s) "
        f"(test macro-F1 per attempt: {per_attempt}; kept attempt {gate['kept_attempt']})"
    ) in md
    lora, base, lead = real["lora"], real["baseline"], real["lora_to_baseline"]
    assert (
        f"Paired bootstrap (95%, {real['bootstrap']['resamples']} resamples of the test documents): LoRA "
        f"[{lora['macro_f1_low']:.3f}, {lora['macro_f1_high']:.3f}], baseline [{base['macro_f1_low']:.3f}, "
        f"{base['macro_f1_high']:.3f}], difference [{lead['macro_f1_difference_low']:+.3f}, "
        f"{lead['macro_f1_difference_high']:+.3f}]"
    ) in md
    alias = "now the `champion`" if passed else "a `challenger` (the champion is unchanged)"
    assert f"Registered as version {real['registry']['version']}, {alias}." in md
    assert ("**The classifier fails its gate.**" in md) is (not passed)
    if not passed:
        assert f"reaches test macro-F1 {real['lora']['macro_f1']:.3f} < {gate['min_f1']}" in md


REPORT_STAGE = """\
stages:
  report:
    cmd: python -m stages.report
    deps: [reports/summary.ipynb, metrics/evaluate.json, metrics/validate.json]
    outs:
      - reports/report.md: {cache: false}
      - reports/figures: {cache: false}
      - reports/summary.executed.ipynb: {cache: false}
    metrics:
      - metrics/report.json: {cache: false}
metrics: [metrics/evaluate.json, metrics/validate.json]
"""


def test_dvc_repro_runs_the_stage_and_its_changes_come_from_dvc_metrics_diff(tmp_path):
    """``dvc repro report`` in a git + DVC repo: the stage calls ``dvc metrics diff HEAD --json`` while
    ``dvc repro`` runs it (no lock conflict), and the change table is that diff's."""
    repo = _copy_inputs(tmp_path / "repo", io_speed=False, classifier=False)
    (repo / "reports").mkdir()
    shutil.copy2(ROOT / SOURCE_NOTEBOOK, repo / SOURCE_NOTEBOOK)
    (repo / "dvc.yaml").write_text(REPORT_STAGE, encoding="utf-8")
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        DVC_NO_ANALYTICS="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )

    def sh(*cmd):
        return subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True, text=True, timeout=300)

    sh("git", "init", "-q", "-b", "main")
    sh("git", "config", "user.email", "ci@example.com")
    sh("git", "config", "user.name", "CI")
    sh(sys.executable, "-m", "dvc", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-q", "-m", "last run")
    head = sh("git", "rev-parse", "--short", "HEAD").stdout.strip()
    ev_path = repo / "metrics" / "evaluate.json"
    ev = json.loads(ev_path.read_text(encoding="utf-8"))
    old = ev["mean_retained_gain"]
    ev["mean_retained_gain"] = old + 0.125
    ev_path.write_text(json.dumps(ev), encoding="utf-8")

    assert "Running stage 'report'" in sh(sys.executable, "-m", "dvc", "repro", "report").stdout
    md = (repo / "reports" / "report.md").read_text(encoding="utf-8")
    assert f"Against commit `{head}`" in md
    rows = _table_rows(md, "What changed since the previous commit")
    assert [r[:4] for r in rows] == [
        ["metrics/evaluate.json", "mean_retained_gain", f"{old:.4g}", f"{old + 0.125:.4g}"]
    ]
    assert f"| mean retained gain | {old + 0.125:.3f}" in md
    metrics = json.loads((repo / "metrics" / "report.json").read_text(encoding="utf-8"))
    assert metrics["metrics_diff"] == {"available": 1, "result_changes": 1, "run_cost_changes": 0}
    assert metrics["stage"]["wall_s"] > 0
    assert (repo / "reports" / "summary.executed.ipynb").is_file()
    assert "up to date" in sh(sys.executable, "-m", "dvc", "status").stdout.lower()


def test_a_checkpoint_base_model_without_training_figures_still_reports():
    """base_model.source: path copies a checkpoint: its metrics have no tokens_seen, and the headline says so."""
    names = ["validate", "dedup", "split", "parquet", "base_model", "evaluate", "alerts", "refine"]
    m = {n: json.loads((ROOT / "metrics" / f"{n}.json").read_text()) for n in names}
    train_lora = {p.stem: json.loads(p.read_text()) for p in (ROOT / "metrics" / "train_lora").glob("*.json")}
    domains = list(m["evaluate"]["perplexity"]["base"])

    def base_row(base_model: dict) -> str:
        md = narrative.headline(
            m["validate"],
            m["dedup"],
            m["split"],
            m["parquet"],
            base_model,
            train_lora,
            m["evaluate"],
            m["alerts"],
            m["refine"],
            None,
            domains,
        )
        return next(line for line in md.splitlines() if line.startswith("| base model |"))

    assert "trained on" in base_row(m["base_model"])
    copied = {k: v for k, v in m["base_model"].items() if k in ("n_params", "val_perplexity")}
    assert "local checkpoint" in base_row(copied)
