"""Airflow DAG ``domainlm_daily_round``: the daily round (``python -m domainlm.rounds round``) once a day.

Airflow runs in its own virtualenv (``dags/requirements-airflow.txt``); the task calls the project's interpreter, so
no project package is imported here. Settings (environment of the Airflow worker):

- ``DOMAINLM_REPO``: the repository root (default: the folder above ``dags/``).
- ``DOMAINLM_PYTHON``: the project's python (default: ``$DOMAINLM_REPO/.venv/bin/python``).
- ``DOMAINLM_ROUND_ARGS``: extra arguments for the round (e.g. ``--ports 5077,5078`` or ``--no-deploy``).
- ``DOMAINLM_SCHEDULE``: a cron expression (default ``0 3 * * *``, 03:00 UTC).

The round's exit code is the task's: 0 succeeds (promoted, kept, or nothing new), 2 (the gate failed; the stage has
already stored and sent the alert) and 1 (an error, or another round holding the lock) fail the task. The round's
JSON summary is its last stdout line, so it becomes the task's XCom ``return_value``. ``max_active_runs=1`` and the
round's own ``flock`` keep two rounds from overlapping.
"""

from __future__ import annotations

import os
import shlex
from datetime import datetime, timedelta
from pathlib import Path

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG

REPO = Path(os.environ.get("DOMAINLM_REPO", Path(__file__).resolve().parents[1]))
PYTHON = Path(os.environ.get("DOMAINLM_PYTHON", REPO / ".venv" / "bin" / "python"))
ROUND_ARGS = os.environ.get("DOMAINLM_ROUND_ARGS", "")

with DAG(
    dag_id="domainlm_daily_round",
    description="dvc repro with the deployed classifier evaluated first; promote, push, commit, tag, redeploy",
    schedule=os.environ.get("DOMAINLM_SCHEDULE", "0 3 * * *"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 0, "execution_timeout": timedelta(hours=6)},
    tags=["domainlm", "seed-003"],
) as dag:
    BashOperator(
        task_id="round",
        bash_command=(
            f"cd {shlex.quote(str(REPO))} && exec {shlex.quote(str(PYTHON))} -m domainlm.rounds round {ROUND_ARGS}"
        ),
        env={
            "PATH": f"{PYTHON.parent}:/usr/local/bin:/usr/bin:/bin",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "DVC_NO_ANALYTICS": "1",
        },
        append_env=True,
    )
