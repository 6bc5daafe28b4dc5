"""The data half under real DVC, in a temporary git repo, on a small slice of the real corpus.

`dvc repro` runs corpus → validate → dedup → parquet → split; a change to `dedup.threshold` re-runs
only dedup and what depends on it; `dvc push`/`dvc pull` round-trip every output byte for byte through
the default local remote and through a real S3-compatible server (moto on 127.0.0.1).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import boto3
import pytest
from conftest import make_pipeline_repo, run, set_params

pytestmark = pytest.mark.slow
DATA_STAGES = ["corpus", "validate", "dedup", "parquet", "split"]
SLICE = {"corpus": {"max_docs_per_domain": 60}}


def file_digests(root: Path, folders=("data", "metrics")) -> dict[str, str]:
    """sha256 of every file under ``folders`` of ``root``, keyed by relative path."""
    out = {}
    for folder in folders:
        for p in sorted((root / folder).rglob("*")):
            if p.is_file():
                out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def ran_stages(output: str) -> list[str]:
    """Stage names that `dvc repro` actually ran (it prints "Running stage 'x':")."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


@pytest.fixture(scope="module")
def data_repo(tmp_path_factory):
    repo = make_pipeline_repo(tmp_path_factory.mktemp("pipeline") / "repo", SLICE)
    proc = run(["dvc", "repro", "split"], repo)
    assert ran_stages(proc.stdout) == DATA_STAGES
    run(["git", "commit", "-q", "-m", "repro data half"], repo)
    return repo


def test_repro_builds_every_declared_output(data_repo):
    for d in ("law", "bill", "office_help", "faq"):
        for part in ("train", "val", "test"):
            assert (data_repo / "data" / "split" / d / f"{part}.parquet").stat().st_size > 0
    for name in ("validate", "dedup", "parquet", "split"):
        assert isinstance(json.loads((data_repo / "metrics" / f"{name}.json").read_text()), dict)
    v = json.loads((data_repo / "metrics" / "validate.json").read_text())["totals"]
    assert v["kept"] + v["rejected"] == v["lines_read"] == 60 + 10 + 60 + 16
    status = run(["dvc", "status", "--with-deps", "split"], data_repo).stdout
    assert "up to date" in status.lower()
    assert "data/split" in (data_repo / "dvc.lock").read_text()


def test_push_pull_roundtrip_local_and_s3(data_repo, tmp_path, s3_env):
    before = file_digests(data_repo)
    assert len(before) > 20
    # default local remote
    run(["dvc", "push", "--with-deps", "split"], data_repo)
    # S3 remote on moto: endpoint in .dvc/config, secrets in .dvc/config.local (--local), never committed
    boto3.client("s3").create_bucket(Bucket="dvc-store")
    run(["dvc", "remote", "add", "s3store", "s3://dvc-store/domain-lm"], data_repo)
    run(["dvc", "remote", "modify", "s3store", "endpointurl", s3_env], data_repo)
    run(["dvc", "remote", "modify", "--local", "s3store", "access_key_id", "testing"], data_repo)
    run(["dvc", "remote", "modify", "--local", "s3store", "secret_access_key", "testing"], data_repo)
    run(["dvc", "push", "--with-deps", "-r", "s3store", "split"], data_repo)
    run(["git", "add", "-A"], data_repo)
    run(["git", "commit", "-q", "-m", "s3 remote"], data_repo)
    assert "secret_access_key" not in (data_repo / ".dvc" / "config").read_text()
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="dvc-store").get("Contents", [])]
    assert len(keys) >= 10

    for remote in ("local", "s3store"):
        clone = tmp_path / f"clone-{remote}"
        run(["git", "clone", "-q", str(data_repo), str(clone)], tmp_path)
        if remote == "s3store":
            run(["dvc", "remote", "modify", "--local", "s3store", "access_key_id", "testing"], clone)
            run(["dvc", "remote", "modify", "--local", "s3store", "secret_access_key", "testing"], clone)
        assert not (clone / "data" / "split").exists()
        run(["dvc", "pull", "--with-deps", "-r", remote, "split"], clone)
        after = file_digests(clone)
        assert after == before, f"pull from {remote} differs"
        assert "up to date" in run(["dvc", "status", "--with-deps", "split"], clone).stdout.lower()


def test_threshold_change_reruns_only_dedup_and_dependents(data_repo):
    set_params(data_repo, {"dedup": {"threshold": 0.7}})
    status = run(["dvc", "status", "--with-deps", "split"], data_repo).stdout
    assert "dedup:" in status
    for upstream in ("corpus:", "validate:"):
        assert upstream not in status
    proc = run(["dvc", "repro", "split"], data_repo)
    ran = ran_stages(proc.stdout)
    assert ran[0] == "dedup"
    assert "corpus" not in ran and "validate" not in ran
    assert "up to date" in run(["dvc", "status", "--with-deps", "split"], data_repo).stdout.lower()
    assert "0.7" in (data_repo / "dvc.lock").read_text()
