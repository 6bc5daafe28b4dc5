"""dvc.yaml declares what each stage reads: project modules it imports (transitively), and external inputs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from domainlm.common.pipeline import UndeclaredInputError, covers, declared_deps, require_declared, undeclared

ROOT = Path(__file__).resolve().parents[1]


def _module_file(mod: str) -> Path | None:
    base = ROOT.joinpath(*mod.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imported_files(path: Path) -> set[Path]:
    """Project files ``path`` imports (absolute and relative imports; a package's __init__ counts)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = path.parent.relative_to(ROOT).parts
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = list(pkg[: len(pkg) - node.level + 1]) + ([base] if base else [])
                base = ".".join(parts)
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    found: set[Path] = set()
    for name in names:
        parts = name.split(".")
        for k in range(len(parts), 0, -1):
            f = _module_file(".".join(parts[:k]))
            if f:
                found.add(f)
                found.update(g for j in range(1, k) if (g := _module_file(".".join(parts[:j]))))
                break
    return found


def _closure(path: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = [path]
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(_imported_files(p) - seen)
    return seen


def _stage_entries() -> list[tuple[str, str, list[str]]]:
    """(stage name, module, deps) for every stage in dvc.yaml; foreach stages once, with ${item} kept."""
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    out = []
    for name, st in doc["stages"].items():
        body = st.get("do", st)
        module = body["cmd"].split("-m ", 1)[1].split()[0]
        out.append((name, module, [str(d) for d in body.get("deps", [])]))
    return out


def _covered(file: Path, deps: list[str]) -> bool:
    rel = file.relative_to(ROOT).as_posix()
    return any(rel == d.rstrip("/") or rel.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("name, module, deps", _stage_entries(), ids=[e[0] for e in _stage_entries()])
def test_stage_deps_cover_every_project_module_it_imports(name, module, deps):
    entry = _module_file(module)
    assert entry is not None, f"{name}: {module} is not a project module"
    missing = sorted(f.relative_to(ROOT).as_posix() for f in _closure(entry) if not _covered(f, deps))
    assert not missing, f"stage {name} imports {missing} but dvc.yaml does not list them (or a folder above) in deps"


def test_no_stage_module_imports_another_stage_module():
    stage_files = {p for p in (ROOT / "stages").glob("*.py") if p.name != "__init__.py"}
    offenders = [f"{f.name} -> {g.name}" for f in stage_files for g in _imported_files(f) & stage_files if g != f]
    assert not offenders


def test_stages_folder_holds_only_entry_points_named_in_dvc_yaml():
    modules = {m for _, m, _ in _stage_entries()}
    files = {f"stages.{p.stem}" for p in (ROOT / "stages").glob("*.py") if p.name != "__init__.py"}
    assert files == modules, f"not DVC entry points: {sorted(files - modules)}; missing: {sorted(modules - files)}"


def test_the_import_walk_sees_a_transitive_import():
    """The checker itself: stages.corpus reaches domainlm.common.atomic only through another module."""
    closure = {f.relative_to(ROOT).as_posix() for f in _closure(ROOT / "stages" / "corpus.py")}
    assert "domainlm/documents/sources.py" in closure and "domainlm/common/atomic.py" in closure
    assert not _covered(ROOT / "domainlm/common/atomic.py", ["domainlm/documents"])


# ------------------------------------------------------------------ external inputs


def test_covers_folders_and_s3_prefixes(tmp_path):
    assert covers("data/in", "data/in/news.jsonl", tmp_path)
    assert covers("data/in/", "data/in", tmp_path)
    assert not covers("data/in", "data/input/news.jsonl", tmp_path)
    assert covers("s3://b/news", "s3://b/news/2026", tmp_path)
    assert not covers("s3://b/new", "s3://b/news", tmp_path)
    assert not covers("data/in", "s3://b/data/in", tmp_path)
    assert covers(str(tmp_path / "x"), "x/a.jsonl", tmp_path)  # absolute dep, relative input
    assert undeclared(["s3://b/news", "data/in/a.jsonl"], ["data/in"], tmp_path) == ["s3://b/news"]


def test_require_declared_names_the_missing_dep(tmp_path):
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text(yaml.safe_dump({"stages": {"corpus": {"cmd": "x", "deps": ["stages/corpus.py", "in"]}}}))
    assert declared_deps("corpus", dvc_yaml) == ["stages/corpus.py", "in"]
    require_declared("corpus", [str(tmp_path / "in" / "a.jsonl")], dvc_yaml)
    with pytest.raises(UndeclaredInputError, match=r"s3://b/news") as err:
        require_declared("corpus", ["s3://b/news"], dvc_yaml)
    assert "stages.corpus.deps" in str(err.value) and "- s3://b/news" in str(err.value)
    with pytest.raises(KeyError, match="validate"):
        declared_deps("validate", dvc_yaml)
    require_declared("corpus", ["s3://anything"], tmp_path / "absent.yaml")  # outside a DVC project: no check
