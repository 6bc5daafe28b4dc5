"""Faults: SIGKILL at any long stage, a second `dvc repro` while one runs, a full disk.

Every kill goes to the whole process group of a real `dvc repro` (DVC, the stage and whatever it started) in a
temporary git repo on a slice of the real corpus with tiny models. After the kill, what each stage guarantees is
checked, then the stage is re-run with `dvc repro -f -s <stage>` (``-f``: DVC's run-cache would otherwise restore
the old outputs and hide the stage's own recovery; ``-s``: that stage only):

- dedup resumes from its work folder and writes outputs byte-identical to an uninterrupted run's;
- base_model and train_lora leave no model folder that looks complete (DVC removed the old output before the
  stage started; the stage writes into a hidden temporary and renames it), and the re-run removes the killed
  writer's temporary;
- refine_labels leaves a SQLite database that passes ``PRAGMA integrity_check`` and only whole snapshots; the
  re-run gives the same labels as the uninterrupted run;
- train_classifier, killed mid-gate, registers no version; every registered version is complete (tags, loadable
  artifacts), ``champion`` stays on a scored version, and the re-run registers a new complete version.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from classifier_fixtures import classifier_params
from conftest import ROOT, make_pipeline_repo, run
from lm_fixtures import TINY

MODEL = "domain-lm-classifier"


# ------------------------------------------------------------------------------------------------ helpers


def digests(root: Path, folder: str) -> dict[str, str]:
    """sha256 of every file under ``root/folder``, keyed by path relative to ``root``."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((root / folder).rglob("*"))
        if p.is_file()
    }


def dvc_env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def start_dvc(repo: Path, args: list[str], log: Path) -> subprocess.Popen:
    """``dvc <args>`` in its own session (so its process group is everything it starts), output to ``log``."""
    return subprocess.Popen(
        ["dvc", *args], cwd=repo, env=dvc_env(), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def kill_group_when(proc: subprocess.Popen, ready, log: Path, *, timeout: float = 600, delay: float = 0.0) -> None:
    """Poll ``ready()``; once true (and ``delay`` seconds later), SIGKILL ``proc``'s whole process group.

    Fails when the command ends before the kill point (the kill would not be mid-run).
    """
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before the kill point:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the kill point was not reached in {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.01)
    time.sleep(delay)
    assert proc.poll() is None, f"the run ended before the kill:\n{log.read_text()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while True:  # every process of the group is gone (none escaped the kill)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "processes of the killed group are still alive"
        time.sleep(0.2)


def find_key(tree, key):
    """The first value of ``key`` in nested dicts, or None."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for value in tree.values():
            found = find_key(value, key)
            if found is not None:
                return found
    return None


def log_says(log: Path, text: str):
    return lambda: log.exists() and text in log.read_text(errors="replace")


def hidden_temporaries(folder: Path, name: str) -> list[Path]:
    return sorted(folder.glob(f".{name}.*.tmp")) if folder.is_dir() else []


def params() -> dict:
    base = {**TINY, "train": {**TINY["train"], "steps": 1500}}  # long enough to be killed mid-training
    cls = classifier_params(
        gate={"min_f1": 0.0, "max_retries": 1, "retry_schedule": [{"epochs": 2}]}, train={"epochs": 3}
    )
    return {
        "corpus": {"max_docs_per_domain": 36},
        "dedup": {"workers": 1},
        "base_model": base,
        "train_lora": {"train": {"max_steps": 20, "eval_steps": 10, "logging_steps": 1, "batch_size": 4}},
        "refine": {
            "max_iterations": 3,
            "epsilon": 0.0,
            "lstm": {"epochs": 2, "max_tokens": 32},
            "transformer": {"max_tokens": 32},
        },
        "classifier": cls,
    }


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A pipeline repo run once, uninterrupted, up to refine_labels and train_classifier (champion v1)."""
    repo = make_pipeline_repo(tmp_path_factory.mktemp("faults") / "repo", params())
    run(["dvc", "repro", "refine_labels", "train_classifier"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "uninterrupted run"], repo)
    return repo


# ------------------------------------------------------------------------------------------------ atomic writes


def test_a_writer_killed_mid_write_leaves_no_output_and_the_next_write_removes_its_temporary(tmp_path):
    from domainlm.common.atomic import atomic_path

    target = tmp_path / "model"
    code = (
        "import os, sys; from domainlm.common.atomic import atomic_path\n"
        "with atomic_path(sys.argv[1], is_dir=True) as tmp:\n"
        "    (tmp / 'config.json').write_text('{}')\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(target)], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()
    stale = hidden_temporaries(tmp_path, "model")
    assert len(stale) == 1 and (stale[0] / "config.json").exists()  # hidden, never under the final name
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "config.json").write_text('{"ok": 1}')
    assert not stale[0].exists() and hidden_temporaries(tmp_path, "model") == []
    assert json.loads((target / "config.json").read_text()) == {"ok": 1}


# ------------------------------------------------------------------------------------------------ disk full


@pytest.mark.slow
def test_a_full_disk_stops_the_stage_with_a_clear_error_and_no_partial_output(tmp_path):
    """corpus writes data/raw onto a 256 KiB tmpfs: it fails naming the file and the space left; nothing is left
    under data/ (not data/raw, not its temporary) and no metrics file claims a run."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    work = make_pipeline_repo(tmp_path / "repo", {"corpus": {"max_docs_per_domain": 200}})
    data = work / "data"
    labels = tmp_path / "labels"
    os.replace(data / "labels", labels)  # data/ becomes the mount point
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(data)], check=True)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "stages.corpus"],
            cwd=work,
            capture_output=True,
            text=True,
            env={**dvc_env(), "PYTHONPATH": str(work)},
        )
        assert proc.returncode != 0
        assert (
            "no space left on the device while writing" in proc.stderr and "MiB free on that filesystem" in proc.stderr
        )
        assert "no partial output was left" in proc.stderr
        assert list(data.iterdir()) == [], [p.name for p in data.iterdir()]
        assert not (work / "metrics" / "corpus.json").exists()
        assert (
            "corpus\t" in (work / "logs" / "pipeline_run.log").read_text()
            and "\tfailed\t" in (work / "logs" / "pipeline_run.log").read_text()
        )
    finally:
        subprocess.run(["umount", str(data)], check=True)


def test_the_disk_full_message_names_the_file_and_the_free_space(tmp_path):
    from domainlm.common.stage import disk_full_message

    message = disk_full_message(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "x.jsonl")))
    assert message.startswith(f"no space left on the device while writing {tmp_path / 'out' / 'x.jsonl'} (")
    assert "MiB free on that filesystem now" in message and "re-run `dvc repro`" in message


# ------------------------------------------------------------------------------------------------ kill -9


@pytest.mark.slow
def test_dedup_killed_mid_run_resumes_and_writes_the_same_outputs(repo, tmp_path):
    reference = digests(repo, "data/dedup")
    assert reference
    log = tmp_path / "killed.log"
    proc = start_dvc(repo, ["repro", "-f", "-s", "dedup"], log)
    steps = repo / ".cache" / "dedup"
    kill_group_when(proc, lambda: any(steps.glob("*/steps/signatures.json")), log)
    assert not (repo / "data" / "dedup").exists() or digests(repo, "data/dedup") == reference
    resumed = run(["dvc", "repro", "-f", "-s", "dedup"], repo)
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert digests(repo, "data/dedup") == reference
    metrics = json.loads((repo / "metrics" / "dedup.json").read_text())
    assert find_key(metrics, "resumed_steps") >= 3  # index, background and signatures were not redone
    assert "up to date" in run(["dvc", "status", "dedup"], repo).stdout.lower()


@pytest.mark.slow
def test_base_model_killed_mid_training_leaves_no_model_folder_and_reruns(repo, tmp_path):
    from domainlm.lm.pretrain import check_causal_lm_folder

    log = tmp_path / "killed.log"
    proc = start_dvc(repo, ["repro", "-f", "-s", "base_model"], log)
    kill_group_when(proc, log_says(log, "training byte-level BPE"), log, timeout=300, delay=1.5)
    base = repo / "models" / "base"
    assert not base.exists(), "a killed base_model left models/base"
    run(["dvc", "repro", "-f", "-s", "base_model"], repo)
    check_causal_lm_folder(base)
    assert hidden_temporaries(repo / "models", "base") == []


@pytest.mark.slow
def test_train_lora_killed_mid_training_leaves_no_adapter_folder_and_reruns(repo, tmp_path):
    log = tmp_path / "killed.log"
    logs = repo / "logs"
    proc = start_dvc(repo, ["repro", "-f", "-s", "train_lora@law"], log)
    # the Trainer's log goes to a hidden temporary until training ends: its first line means training has begun
    kill_group_when(
        proc, lambda: any(p.stat().st_size > 0 for p in hidden_temporaries(logs, "train_law.log")), log, timeout=300
    )
    assert not (logs / "train_law.log").exists()
    adapter = repo / "models" / "lora" / "law"
    assert not adapter.exists(), "a killed train_lora left models/lora/law"
    run(["dvc", "repro", "-f", "-s", "train_lora@law"], repo)
    assert (adapter / "adapter_config.json").exists() and any(adapter.glob("adapter_model.*"))
    assert hidden_temporaries(repo / "models" / "lora", "law") == []


def refined_labels(repo: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(repo / "data" / "refined" / "sentences.db") as con:
        return con.execute("SELECT id, current_label FROM sentences ORDER BY id").fetchall()


@pytest.mark.slow
def test_refine_labels_killed_between_iterations_keeps_a_sound_database_and_reruns_to_the_same_labels(repo, tmp_path):
    reference = refined_labels(repo)
    log = tmp_path / "killed.log"
    snapshots = repo / "data" / "refined" / "snapshots"
    proc = start_dvc(repo, ["repro", "-f", "-s", "refine_labels"], log)
    kill_group_when(proc, lambda: (snapshots / "iter_0.parquet").exists(), log, timeout=600)
    db = repo / "data" / "refined" / "sentences.db"
    if db.exists():
        with sqlite3.connect(db) as con:
            assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    for snap in sorted(snapshots.glob("*.parquet")) if snapshots.exists() else []:
        assert pq.read_table(snap).num_rows == len(reference)  # whole, never half-written
    assert all(p.name.startswith(".") for p in (repo / "data" / "refined").rglob("*.tmp"))  # hidden temporaries only
    run(["dvc", "repro", "-f", "-s", "refine_labels"], repo)
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert refined_labels(repo) == reference


def registry_state(repo: Path) -> tuple[list, int | None]:
    """Every version of the classifier (number, tags, whether its model's files are all there) and the champion's
    number (None: no champion). Reads the repo's SQLite store; sets no global MLflow state."""
    from urllib.parse import unquote, urlparse

    from mlflow import MlflowClient

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = []
    for v in sorted(client.search_model_versions(f"name='{MODEL}'"), key=lambda v: int(v.version)):
        location = client.get_model_version_download_uri(MODEL, v.version)
        path = Path(unquote(urlparse(location).path)) if location.startswith("file:") else Path(location)
        path = path if path.is_absolute() else repo / path
        complete = (path / "MLmodel").is_file() and any(path.rglob("model.safetensors"))
        versions.append((int(v.version), dict(v.tags), complete))
    try:
        champion = int(client.get_model_version_by_alias(MODEL, "champion").version)
    except Exception:  # noqa: BLE001 - no champion alias
        champion = None
    return versions, champion


def assert_registry_sound(versions, champion) -> None:
    for number, tags, loadable in versions:
        assert loadable, f"version {number}: its model files are missing"
        assert {"macro_f1", "gate", "test_sha256", "git_commit"} <= set(tags), (
            f"version {number} half-registered: {tags}"
        )
    if champion is not None:
        tags = dict((n, t) for n, t, _ in versions)[champion]
        assert tags["gate"] == "passed" and float(tags["macro_f1"]) >= 0.0


@pytest.mark.slow
def test_a_second_repro_while_one_runs_fails_fast_and_corrupts_nothing(repo, tmp_path):
    versions_before, _ = registry_state(repo)
    log = tmp_path / "first.log"
    first = start_dvc(repo, ["repro", "-f", "-s", "train_classifier"], log)
    deadline = time.monotonic() + 120
    while "Running stage 'train_classifier'" not in log.read_text():
        assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    t0 = time.monotonic()
    second = run(["dvc", "repro"], repo, check=False)  # the whole pipeline, train_classifier included
    assert time.monotonic() - t0 < 60
    assert second.returncode != 0
    said = second.stdout + second.stderr
    assert "is busy, it is being blocked by" in said and "dvc repro -f -s train_classifier" in said, said
    assert first.poll() is None, "the second repro disturbed the first"
    assert first.wait(timeout=900) == 0, log.read_text()[-3000:]
    versions, champion = registry_state(repo)
    assert len(versions) == len(versions_before) + 1
    assert_registry_sound(versions, champion)
    assert "up to date" in run(["dvc", "status", "train_classifier"], repo).stdout.lower()


@pytest.mark.slow
def test_train_classifier_killed_mid_gate_registers_nothing_and_keeps_a_scored_champion(repo, tmp_path):
    versions_before, champion_before = registry_state(repo)
    assert champion_before is not None
    log = tmp_path / "killed.log"
    models = repo / "models"
    proc = start_dvc(repo, ["repro", "-f", "-s", "train_classifier"], log)
    kill_group_when(proc, lambda: any(models.glob(".attempts.*/attempt_0/model/config.json")), log, timeout=600)
    assert len(list(models.glob(".attempts.*"))) == 1  # the killed run's scratch folder, hidden
    versions, champion = registry_state(repo)
    assert [v[0] for v in versions] == [v[0] for v in versions_before], "a killed gate registered a version"
    assert champion == champion_before
    assert_registry_sound(versions, champion)
    run(["dvc", "repro", "-f", "-s", "train_classifier"], repo)
    versions, champion = registry_state(repo)
    assert len(versions) == len(versions_before) + 1
    assert_registry_sound(versions, champion)
    assert (models / "classifier" / "model" / "config.json").exists()
    assert list(models.glob(".attempts*")) == [], "the killed run's attempts folder was left behind"
