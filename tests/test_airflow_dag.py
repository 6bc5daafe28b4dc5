"""The Airflow DAG ``domainlm_daily_round`` under real Airflow, in its own virtualenv
(``dags/requirements-airflow.txt``, cached under ``.cache/airflow-venv`` and rebuilt when the pins change), on
SQLite, offline: ``airflow db migrate`` then ``airflow dags test``. The task runs the round through the project's
python in a small git + DVC repository whose pipeline is up to date, so the round runs ``dvc repro``, finds nothing
new and exits 0."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run

pytestmark = pytest.mark.slow

VENV = ROOT / ".cache" / "airflow-venv"
REQUIREMENTS = ROOT / "dags" / "requirements-airflow.txt"
DAG_ID = "domainlm_daily_round"


@pytest.fixture(scope="session")
def airflow_bin() -> Path:
    """``.cache/airflow-venv/bin``, installed from the pinned requirements unless the stamp says it already is."""
    want = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    stamp = VENV / ".installed"
    if not (stamp.is_file() and stamp.read_text() == want):
        subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(VENV)], check=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                str(VENV / "bin" / "python"),
                "install",
                "-q",
                "--progress-bar",
                "off",
                "--no-deps",
                "-r",
                str(REQUIREMENTS),
            ],
            check=True,
            timeout=1800,
        )
        stamp.write_text(want)
    return VENV / "bin"


@pytest.fixture
def up_to_date_repo(tmp_path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    for cmd in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "config", "user.email", "ci@example.com"],
        ["git", "config", "user.name", "CI"],
        ["dvc", "init", "-q"],
    ):
        run(cmd, repo)
    (repo / "dvc.yaml").write_text("stages:\n  hello:\n    cmd: echo hello > hello.txt\n    outs:\n      - hello.txt\n")
    run(["dvc", "repro", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "pipeline, reproduced"], repo)
    return repo


def json_list(text: str) -> list:
    """The last non-empty JSON list in ``text``: Airflow's CLI may print other lines around its ``-o json`` output."""
    decoder, found = json.JSONDecoder(), []
    for i, ch in enumerate(text):
        if ch == "[":
            try:
                value, _ = decoder.raw_decode(text[i:])
            except ValueError:
                continue
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                found.append(value)
    assert found, f"no JSON list of runs in: {text[-2000:]}"
    return found[-1]


def test_airflow_dags_test_runs_the_round_in_the_projects_python(airflow_bin, up_to_date_repo, tmp_path):
    home = tmp_path / "airflow"
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "DOMAINLM_REPO": str(up_to_date_repo),
        "DOMAINLM_PYTHON": sys.executable,
        "DOMAINLM_ROUND_ARGS": "--no-deploy --no-push",
        "PYTHONPATH": str(ROOT),
        "PATH": f"{airflow_bin}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("VIRTUAL_ENV", None)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{up_to_date_repo / 'mlflow.db'}"  # the repository's own store
    airflow = str(airflow_bin / "airflow")
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=600)
    # Airflow 3 lists DAGs from its database: parse dags/ into it first (the DAG imports in Airflow's own venv)
    subprocess.run([airflow, "dags", "reserialize"], env=env, check=True, capture_output=True, timeout=300)
    listed = subprocess.run(
        [airflow, "dags", "list", "-o", "json"], env=env, capture_output=True, text=True, timeout=300
    )
    assert DAG_ID in listed.stdout, listed.stdout + listed.stderr
    # `dags test` runs one DagRun in this process and exits non-zero ("DagRun failed") when the task fails
    test = subprocess.run([airflow, "dags", "test", DAG_ID], env=env, capture_output=True, text=True, timeout=600)
    out = (
        test.stdout
        + test.stderr
        + "".join(p.read_text(errors="replace") for p in (home / "logs").rglob("*") if p.is_file())
        if (home / "logs").exists()
        else test.stdout + test.stderr
    )
    assert test.returncode == 0, out[-6000:]
    runs = json_list(
        subprocess.run(
            [airflow, "dags", "list-runs", DAG_ID, "-o", "json"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        ).stdout
    )
    assert [r["state"] for r in runs] == ["success"], runs
    # the round itself ran in the repository: it took its lock and ran dvc repro, which found nothing to do
    assert (up_to_date_repo / ".cache" / "round.lock").is_file()
    assert '"action": "nothing_new"' in out, out[-6000:]
