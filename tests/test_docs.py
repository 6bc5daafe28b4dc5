"""The documentation's generated parts (docs/scripts/tables.py, docs/scripts/gen_pages.py) match the committed files:
README.md's generated blocks, the configuration and command-line references, a section per benchmark result with
its commit and date; and no tracked file speaks of development history."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
# Development history that project files must not carry (CHANGELOG.md is history by design). The patterns are
# written in two pieces so that this file, which is tracked too, does not match them itself.
HISTORY_WORDS = re.compile(
    "|".join(
        a + b
        for a, b in [("sess", "ion [0-9]"), ("this ", "VM"), ("hyper", "visor"), ("seed ", "00"), ("iss", "ue [0-9]")]
    ),
    re.IGNORECASE,
)


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


tables = _load("domainlm_docs_tables", ROOT / "docs" / "scripts" / "tables.py")


@pytest.fixture(scope="module")
def configuration() -> str:
    return tables.configuration_markdown()


@pytest.fixture(scope="module")
def benchmarks_page() -> str:
    return tables.benchmarks_markdown()


def _rows(markdown: str) -> dict[str, list[str]]:
    """The configuration tables' rows, keyed by the key in their first cell: the other cells as text."""
    rows = {}
    for line in markdown.splitlines():
        m = re.match(r"^\| `([^`]+)` \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = re.split(r"(?<!\\) \| ", m.group(2))
    return rows


def _dvc_yaml_params() -> dict[str, list[str]]:
    """dvc.yaml's stages (foreach stages by their own name) and their params lists, read without DVC."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    out = {}
    for name, st in stages.items():
        body = st.get("do", st)
        out[name] = [p for p in body.get("params", []) if isinstance(p, str)]
    return out


# --------------------------------------------------------------------------------------------------- README


def test_readme_generated_blocks_match_the_committed_files():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    names = tables.block_names(text)
    assert "results" in names, "README.md has no <!-- BEGIN generated: results --> block"
    assert tables.fill_blocks(text) == text, (
        f"README.md's generated blocks {tables.stale_blocks(ROOT / 'README.md')} are out of date: "
        "run `python docs/scripts/tables.py --write-readme`"
    )


def test_docs_pages_generated_blocks_match_the_committed_files():
    pages = tables.block_files()[1:]
    assert ROOT / "docs" / "pipeline.md" in pages, "docs/pipeline.md has no <!-- BEGIN generated: dag --> block"
    stale = {str(p.relative_to(ROOT)): tables.stale_blocks(p) for p in pages}
    assert not any(stale.values()), f"out of date (run `python docs/scripts/tables.py --write-readme`): {stale}"


def test_dag_block_has_every_stage_of_dvc_yaml():
    block = tables.dag_block()
    for stage in _dvc_yaml_params():
        assert f'["{stage}' in block, stage
    assert "-.->" in block and "-->" in block


def test_readme_results_block_is_short_and_cites_its_files():
    block = tables.readme_results_markdown()
    assert len(block.splitlines()) <= 15
    for source in ("metrics/classifier.json", "metrics/evaluate.json", "metrics/dedup.json", "metrics/refine.json"):
        assert source in block
    classifier = json.loads((ROOT / "metrics" / "classifier.json").read_text(encoding="utf-8"))
    assert f"{classifier['lora']['macro_f1']:.3f} [{classifier['lora']['macro_f1_low']:.3f}," in block


def test_readme_fits_its_line_budget():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (budget {README_MAX_LINES})"


def test_check_readme_fails_on_a_stale_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- BEGIN generated: results -->\nold figures\n<!-- END generated: results -->\n")
    assert tables.main(["--check-readme", "--readme", str(readme)]) == 1
    assert tables.main(["--write-readme", "--readme", str(readme)]) == 0
    assert "old figures" not in readme.read_text()
    assert tables.main(["--check-readme", "--readme", str(readme)]) == 0


def test_fill_blocks_replaces_only_block_bodies_and_refuses_unknown_names():
    text = "a\n<!-- BEGIN generated: one -->\nx\n<!-- END generated: one -->\nb\n"
    assert tables.fill_blocks(text, {"one": lambda: "new"}) == (
        "a\n<!-- BEGIN generated: one -->\nnew\n<!-- END generated: one -->\nb\n"
    )
    with pytest.raises(KeyError):
        tables.fill_blocks(text, {})


# --------------------------------------------------------------------------------------------------- results


def test_results_page_cites_metrics_and_every_stage_cost():
    page = tables.results_markdown()
    commit = subprocess.run(
        ["git", "log", "-1", "--format=%h", "--", "metrics"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    if commit:
        assert f"commit `{commit}`" in page
    for st in _dvc_yaml_params():
        assert f"| `{st}" in page, f"the time and memory table has no row for stage {st}"
    assert "**total**" in page


# --------------------------------------------------------------------------------------------------- configuration


def test_configuration_names_every_leaf_key(configuration):
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    rows = _rows(configuration)
    missing = [k for k in tables.leaf_keys(params) if k not in rows]
    assert not missing, f"keys of params.yaml missing from the configuration reference: {missing}"
    assert "classifier.gate.min_f1" in rows


def test_configuration_names_a_reading_stage_for_every_listed_key(configuration):
    rows = _rows(configuration)
    bad = []
    for stage, params in _dvc_yaml_params().items():
        for p in params:
            covered = [k for k in rows if k == p or k.startswith(p + ".")]
            if not covered:
                bad.append(f"{stage}: {p} has no row")
            bad += [f"{stage}: {k} does not name it" for k in covered if f"`{stage}`" not in rows[k][1]]
    assert not bad, bad


def test_configuration_carries_the_comments_of_params_yaml(configuration):
    rows = _rows(configuration)
    assert "test macro-F1" in rows["classifier.gate.min_f1"][2]


def test_params_comments_reader(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(
        "# about a\n"
        "a:\n"
        "  # the section's description\n"
        "  b: 1      # inline on b\n"
        "            # continued\n"
        "\n"
        "  # above c\n"
        "  c: {d: 2}\n"
        "e: 3\n"
    )
    notes = tables.params_comments(p)
    assert notes["a"] == "about a the section's description"
    assert notes["a.b"] == "inline on b continued"
    assert notes["a.c"] == "above c"
    assert "e" not in notes


# --------------------------------------------------------------------------------------------------- benchmarks


def test_every_benchmark_result_has_a_section_with_commit_and_date(benchmarks_page):
    files = [
        p.name
        for p in sorted((ROOT / "benchmarks" / "results").iterdir())
        if p.is_file() and not p.name.endswith(".meta.json")
    ]
    assert files
    sections = re.split(r"^## ", benchmarks_page, flags=re.MULTILINE)
    for name in files:
        section = next((s for s in sections if s.startswith(f"{name} ")), None)
        assert section is not None, f"benchmarks page has no section for {name}"
        assert re.search(r"\*\*Commit:\*\* `[0-9a-f]{7,}`", section), f"{name}: no commit"
        assert re.search(r"\*\*Date:\*\* \d{4}-\d{2}-\d{2}", section), f"{name}: no date"
        assert "**Hardware:**" in section


def test_result_sidecars_record_hardware_commit_and_date():
    for meta in sorted((ROOT / "benchmarks" / "results").glob("*.meta.json")):
        m = json.loads(meta.read_text(encoding="utf-8"))
        assert (meta.parent / meta.name.removesuffix(".meta.json")).is_file(), f"{meta.name} describes no file"
        assert m.get("hardware") and re.fullmatch(r"[0-9a-f]{7,40}", m.get("commit") or ""), meta.name
        assert re.match(r"\d{4}-\d{2}-\d{2}", m.get("date") or ""), meta.name


def test_write_meta_records_the_machine(tmp_path):
    measure = _load("benchmarks_measure", ROOT / "benchmarks" / "measure.py")
    out = measure.write_csv(tmp_path / "r.csv", [{"a": 1}], note="x")
    meta = json.loads((tmp_path / "r.csv.meta.json").read_text())
    assert out == tmp_path / "r.csv"
    assert set(meta["flags"]) == {"avx512f", "avx512_bf16", "amx_bf16"}
    assert meta["cores"] >= 1 and meta["hardware"] and meta["note"] == "x"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", meta["date"])
    assert isinstance(meta["dirty"], bool) and meta["python"].startswith("3.")


def test_benchmark_script_by_name_prefix():
    assert tables.benchmark_script("label_noise_seed1.csv").name == "label_noise.py"
    assert tables.benchmark_script("cpu_train_quality.csv").name == "cpu_train.py"
    assert tables.benchmark_script("no_such_thing.csv") is None


# --------------------------------------------------------------------------------------------------- CLI


def test_cli_page_has_a_section_per_command():
    page = tables.cli_markdown()
    pages = tables.help_pages()
    assert len(pages) > 1
    for command, text in pages:
        assert f"## `{command}`" in page, command
        assert text.strip().splitlines()[0] in page


# --------------------------------------------------------------------------------------------------- history


def test_no_tracked_file_speaks_of_development_history():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    hits = []
    for raw in files:
        name = raw.decode()
        path = ROOT / name
        if not name or name == "CHANGELOG.md" or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        for i, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if HISTORY_WORDS.search(line):
                hits.append(f"{name}:{i}: {line.strip()[:100]}")
    assert not hits, "development history in tracked files:\n" + "\n".join(hits)
