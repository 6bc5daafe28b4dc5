"""The LM release (:mod:`domainlm.documents.release`): bootstrap, cut, the ``lm_data`` copy, new-document counts,
and the round's reasons to cut one (:func:`domainlm.rounds.release.release_due`). No DVC: plain files in tmp_path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from domainlm.common.paths import SPLITS, split_path
from domainlm.documents import release as rel
from domainlm.documents.labels import LABELS_SCHEMA, write_label_table
from domainlm.rounds.release import release_due
from stages import lm_data

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("law", "med")
ROWS = {"train": 3, "val": 2, "test": 1}


def _write_docs(path: Path, ids: list[str], text: str = "문서") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "text": [f"{text} {i}" for i in ids]}), path)


def _write_split(root: Path, domains=DOMAINS, rows=ROWS, text: str = "문서") -> list[str]:
    """``root/<domain>/<split>.parquet`` with ``rows[split]`` documents each; returns every id."""
    ids = []
    for d in domains:
        for s in SPLITS:
            part = [f"{d}-{s}-{i}" for i in range(rows[s])]
            _write_docs(split_path(root, d, s), part, text)
            ids += part
    return ids


def _write_labels(path: Path, ids: list[str]) -> Path:
    n = len(ids)
    cols = {"id": ids, "domain": ["law"] * n, "split": ["train"] * n, "source_label": ["law"] * n, "label": ["law"] * n}
    return write_label_table(path, pa.table(cols, schema=LABELS_SCHEMA))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def cut(tmp_path):
    """Release 1 cut from a two-domain split: ``(split_dir, labels_path, release_dir, ids, manifest)``."""
    split_dir, labels = tmp_path / "split", tmp_path / "labels.parquet"
    ids = _write_split(split_dir)
    _write_labels(labels, ids)
    manifest = rel.cut_release(split_dir, labels, tmp_path / "release", DOMAINS, 1)
    return split_dir, labels, tmp_path / "release", ids, manifest


# ---- bootstrap and read_release


def test_bootstrap_is_release_zero_and_never_overwrites(tmp_path):
    out = rel.write_bootstrap(tmp_path / "release")
    assert _files(out) == {"release.json": rel.BOOTSTRAP_BYTES}
    assert rel.read_release(out) == {"release": 0}
    with pytest.raises(FileExistsError):
        rel.write_bootstrap(out)
    assert (out / "release.json").read_bytes() == rel.BOOTSTRAP_BYTES


def test_read_release_missing_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="release-lm --bootstrap"):
        rel.read_release(tmp_path / "release")


@pytest.mark.parametrize("manifest", [{"release": -1}, {"release": "1"}, {"release": 1.0}, [0], {"domains": []}])
def test_read_release_rejects_bad_shapes(tmp_path, manifest):
    (tmp_path / "release.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(rel.ReleaseError):
        rel.read_release(tmp_path)


@pytest.mark.parametrize("victim", ["med/val.parquet", rel.LABELS_FILE])
def test_read_release_rejects_a_cut_release_missing_a_file(cut, victim):
    release_dir = cut[2]
    assert rel.read_release(release_dir)["release"] == 1
    (release_dir / victim).unlink()
    with pytest.raises(rel.ReleaseError, match=victim.split("/")[-1]):
        rel.read_release(release_dir)


# ---- cut_release


def test_cut_copies_bytes_and_counts_rows(cut):
    split_dir, labels, release_dir, ids, manifest = cut
    assert manifest == {"release": 1, "domains": list(DOMAINS), "docs": {d: ROWS for d in DOMAINS}, "total": len(ids)}
    assert rel.read_release(release_dir) == manifest
    for d in DOMAINS:
        for s in SPLITS:
            assert split_path(release_dir, d, s).read_bytes() == split_path(split_dir, d, s).read_bytes()
            assert pq.ParquetFile(split_path(release_dir, d, s)).metadata.num_rows == manifest["docs"][d][s]
    assert (release_dir / rel.LABELS_FILE).read_bytes() == labels.read_bytes()
    assert set(_files(release_dir)) == {f"{d}/{s}.parquet" for d in DOMAINS for s in SPLITS} | {
        "release.json",
        rel.LABELS_FILE,
    }


def test_cut_is_deterministic(cut, tmp_path):
    split_dir, labels, release_dir, _, _ = cut
    rel.cut_release(split_dir, labels, tmp_path / "again", DOMAINS, 1)
    assert _files(tmp_path / "again") == _files(release_dir)


@pytest.mark.parametrize("number", [0, -1])
def test_cut_rejects_numbers_below_one(cut, tmp_path, number):
    split_dir, labels = cut[:2]
    with pytest.raises(ValueError, match="numbered from 1"):
        rel.cut_release(split_dir, labels, tmp_path / "bad", DOMAINS, number)
    assert not (tmp_path / "bad").exists()


def test_cut_missing_split_file_leaves_nothing(tmp_path):
    split_dir, labels = tmp_path / "split", tmp_path / "labels.parquet"
    _write_labels(labels, _write_split(split_dir))
    split_path(split_dir, "med", "test").unlink()
    out = tmp_path / "out" / "release"
    with pytest.raises(FileNotFoundError, match=r"med/test\.parquet"):
        rel.cut_release(split_dir, labels, out, DOMAINS, 1)
    assert not out.exists()
    assert not list(tmp_path.rglob(".release*"))  # no temporary folder left beside it either


# ---- lm_documents (the lm_data stage)


def test_lm_documents_at_release_zero_copies_the_split(tmp_path):
    split_dir = tmp_path / "split"
    ids = _write_split(split_dir)
    rel.write_bootstrap(tmp_path / "release")
    metrics = lm_data.run(tmp_path / "release", split_dir, tmp_path / "lm", DOMAINS)
    assert metrics == {"release": 0, "source": "split", "docs": {d: ROWS for d in DOMAINS}, "total": len(ids)}
    assert _files(tmp_path / "lm") == _files(split_dir)


def test_lm_documents_after_a_release_ignore_new_split_files(cut, tmp_path):
    split_dir, _, release_dir, ids, manifest = cut
    _write_split(split_dir, rows={"train": 5, "val": 4, "test": 4}, text="새 문서")  # the split moved on
    assert _files(split_dir) != {k: v for k, v in _files(release_dir).items() if "/" in k}
    metrics = rel.lm_documents(release_dir, split_dir, tmp_path / "lm", DOMAINS)
    assert metrics == {"release": 1, "source": "release", "docs": manifest["docs"], "total": len(ids)}
    assert _files(tmp_path / "lm") == {k: v for k, v in _files(release_dir).items() if "/" in k}


def test_lm_documents_reject_a_domain_the_release_lacks(cut, tmp_path):
    split_dir, _, release_dir = cut[:3]
    _write_split(split_dir, domains=("news",))
    with pytest.raises(rel.ReleaseError, match="news"):
        rel.lm_documents(release_dir, split_dir, tmp_path / "lm", [*DOMAINS, "news"])
    assert not (tmp_path / "lm").exists()


def test_lm_data_stage_help_and_empty_domains(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stages.lm_data", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "lm_data" in proc.stdout
    with pytest.raises(ValueError, match="domains"):
        lm_data.run(tmp_path / "release", tmp_path / "split", tmp_path / "lm", [])


# ---- new_documents


def test_new_documents_counts_ids_the_release_lacks(cut, tmp_path):
    _, _, release_dir, ids, _ = cut
    current = _write_labels(tmp_path / "today.parquet", ids[2:] + ["n1", "n2", "n3"])
    assert rel.new_documents(release_dir, current) == {
        "release_docs": len(ids),
        "current_docs": len(ids) + 1,
        "new_docs": 3,
    }
    boot = rel.write_bootstrap(tmp_path / "boot")
    assert rel.new_documents(boot, current) == {
        "release_docs": 0,
        "current_docs": len(ids) + 1,
        "new_docs": len(ids) + 1,
    }


# ---- release_due (reads params.yaml and data/ relative to the cwd)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A cwd with data/release (release 1 of 10 documents, domains a and b) and a writer for params.yaml and the
    current label table."""
    monkeypatch.chdir(tmp_path)
    ids = _write_split(Path("data/split"), domains=("a", "b"), rows={"train": 3, "val": 1, "test": 1})
    _write_labels(Path("data/labels/split_labels.parquet"), ids)
    rel.cut_release("data/split", "data/labels/split_labels.parquet", "data/release", ["a", "b"], 1)

    def setup(params: str, new: int = 0) -> None:
        Path("params.yaml").write_text(params, encoding="utf-8")
        _write_labels(Path("data/labels/split_labels.parquet"), ids + [f"new-{i}" for i in range(new)])

    return setup


def test_release_due_at_release_zero(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("domains: [a, b]\n", encoding="utf-8")
    rel.write_bootstrap("data/release")
    assert release_due() == "no LM release cut yet"


def test_release_due_for_a_new_domain(project):
    project("domains: [a, b, c]\n")
    reason = release_due()
    assert reason is not None and "'c'" in reason and "release 1" in reason


@pytest.mark.parametrize(("new", "due"), [(0, False), (1, False), (2, True), (5, True)])
def test_release_due_by_new_fraction(project, new, due):
    project("domains: [a, b]\nrelease: {new_fraction: 0.2}\n", new=new)
    reason = release_due()
    assert (reason is not None) is due
    if due:
        assert f"{new} documents arrived since LM release 1" in reason


def test_release_due_without_a_release_section(project):
    project("domains: [a, b]\n", new=10)
    assert release_due() is None


def test_only_a_pipeline_that_reads_the_release_cuts_one(tmp_path):
    from domainlm.rounds.release import in_pipeline

    assert not in_pipeline(tmp_path)  # no dvc.yaml
    (tmp_path / "dvc.yaml").write_text("stages:\n  hello:\n    cmd: echo hello > hello.txt\n", encoding="utf-8")
    assert not in_pipeline(tmp_path)
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    assert in_pipeline(tmp_path)
