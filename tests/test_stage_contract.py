"""The stage contract (domainlm.common.stage): one log format, wall time and peak RSS in the metrics file,
one run-log line per stage run, the stack trace of a failed run in the error log."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from domainlm.common import paths
from domainlm.common.stage import LOG_FORMAT, RUN_LOG_FIELDS, stage_run

ROOT = Path(__file__).resolve().parents[1]


def read_run_log(path: Path) -> list[dict[str, str]]:
    return [dict(zip(RUN_LOG_FIELDS, line.split("\t"))) for line in path.read_text().splitlines()]


def test_ok_run_appends_one_line_and_writes_metrics_with_time_and_rss(tmp_path):
    run_log, err_log = tmp_path / "logs" / "run.log", tmp_path / "logs" / "err.log"
    with stage_run("dedup", run_log=run_log, error_log=err_log, metrics_root=tmp_path / "metrics") as st:
        path = st.write_metrics("dedup", {"totals": {"kept": 3}})
    values = json.loads(path.read_text())
    assert path == tmp_path / "metrics" / "dedup.json"
    assert values["totals"] == {"kept": 3}
    assert values["stage"]["wall_s"] >= 0 and values["stage"]["peak_rss_mb"] > 10
    rows = read_run_log(run_log)
    assert len(rows) == 1 and rows[0]["stage"] == "dedup" and rows[0]["status"] == "ok"
    assert float(rows[0]["wall_s"]) >= 0 and rows[0]["started_utc"].endswith("+00:00")
    assert len(rows[0]["git_commit"]) in (40, len("unknown"))
    assert not err_log.exists()
    # a second run appends, never truncates
    with stage_run("train_lora@law", run_log=run_log, error_log=err_log, metrics_root=tmp_path / "metrics") as st:
        assert st.log.name == "stages.train_lora"
        st.write_metrics("train_lora/law", {})
    assert [r["stage"] for r in read_run_log(run_log)] == ["dedup", "train_lora@law"]
    assert (tmp_path / "metrics" / "train_lora" / "law.json").exists()


def test_failed_run_logs_failed_and_the_stack_trace_and_reraises(tmp_path):
    run_log, err_log = tmp_path / "run.log", tmp_path / "err.log"
    with pytest.raises(ZeroDivisionError):
        with stage_run("split", run_log=run_log, error_log=err_log, metrics_root=tmp_path):
            _ = 1 / 0
    assert read_run_log(run_log)[0]["status"] == "failed"
    trace = err_log.read_text()
    assert trace.startswith("=== split ") and "ZeroDivisionError" in trace and "Traceback" in trace


def test_systemexit_zero_counts_as_ok(tmp_path):
    run_log, err_log = tmp_path / "run.log", tmp_path / "err.log"
    with pytest.raises(SystemExit):
        with stage_run("corpus", run_log=run_log, error_log=err_log, metrics_root=tmp_path):
            raise SystemExit(0)
    assert read_run_log(run_log)[0]["status"] == "ok" and not err_log.exists()


def test_one_log_format_for_every_stage(tmp_path, caplog):
    with stage_run("parquet", run_log=tmp_path / "r", error_log=tmp_path / "e", metrics_root=tmp_path) as st:
        st.log.info("hello")
    root = logging.getLogger()
    assert any(h.formatter is not None and h.formatter._fmt == LOG_FORMAT for h in root.handlers)


def test_a_failing_stage_process_writes_both_logs(tmp_path):
    """A real stage process (`python -m stages.split` with no input) fails, and both logs record it."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "stages.split"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode != 0
    rows = read_run_log(tmp_path / paths.RUN_LOG)
    assert rows[-1]["stage"] == "split" and rows[-1]["status"] == "failed"
    assert "FileNotFoundError" in (tmp_path / paths.ERROR_LOG).read_text()
    assert not (tmp_path / "data" / "split").exists()  # nothing half-written


def test_pipeline_logs_are_git_ignored_and_dvc_ignored():
    gitignore = (ROOT / ".gitignore").read_text().splitlines()
    dvcignore = (ROOT / ".dvcignore").read_text().splitlines()
    for log in (paths.RUN_LOG, paths.ERROR_LOG):
        assert f"/{log.as_posix()}" in gitignore and log.as_posix() in dvcignore


def test_a_stage_that_needs_domains_stops_with_a_clear_error_when_params_list_none(tmp_path):
    from domainlm.common import params as P

    empty, listed = tmp_path / "empty.yaml", tmp_path / "listed.yaml"
    empty.write_text("domains: []\nmerge: {method: linear}\n")
    listed.write_text("domains: [law, faq]\n")
    with pytest.raises(SystemExit, match="^merge: empty.yaml lists no domains$"):
        P.required_domains("merge", empty)
    (tmp_path / "none.yaml").write_text("merge: {method: linear}\n")
    with pytest.raises(SystemExit, match="lists no domains"):
        P.required_domains("merge", tmp_path / "none.yaml")
    assert P.required_domains("merge", listed) == ["law", "faq"]
