"""Alerts of the classifier stage: a record per problem, written to the stage's alerts file and POSTed to a
webhook (Slack-compatible: the JSON body carries a ``text`` field, so a Slack incoming-webhook URL works as is).

A webhook that fails (refused, timed out, non-2xx) is logged and recorded in the alert (``webhook``); it never
fails the stage. The alerts file is the record of *this* run: ``dvc`` tracks it as the stage's output, so it
never holds a stale alert of an older run.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from domainlm.common.atomic import write_json

log = logging.getLogger(__name__)

#: The fields of an alert record, in order.
ALERT_FIELDS = (
    "time",
    "stage",
    "severity",
    "metric",
    "value",
    "threshold",
    "attempts",
    "git_commit",
    "mlflow_run_id",
    "message",
)


def alert_record(
    *,
    stage: str,
    severity: str,
    metric: str,
    value: float,
    threshold: float,
    attempts: int,
    git_commit: str,
    mlflow_run_id: str | None,
    message: str,
    time: str | None = None,
) -> dict[str, Any]:
    """One alert (:data:`ALERT_FIELDS`); ``time`` defaults to now (UTC, ISO 8601, seconds).

    Raises:
        ValueError: ``severity`` is not ``info``, ``warning`` or ``error``.
    """
    if severity not in ("info", "warning", "error"):
        raise ValueError(f"severity must be info, warning or error, got {severity!r}")
    return {
        "time": time or datetime.now(UTC).isoformat(timespec="seconds"),
        "stage": stage,
        "severity": severity,
        "metric": metric,
        "value": float(value),
        "threshold": float(threshold),
        "attempts": int(attempts),
        "git_commit": git_commit,
        "mlflow_run_id": mlflow_run_id,
        "message": message,
    }


def slack_text(record: Mapping[str, Any]) -> str:
    """The one-paragraph ``text`` a chat webhook shows: severity, stage, the figure against its threshold, the
    attempts, commit and run."""
    return (
        f"[{record['severity'].upper()}] {record['stage']}: {record['message']} "
        f"({record['metric']} = {record['value']:.4f}, threshold {record['threshold']:.4f}, "
        f"{record['attempts']} attempt(s), commit {str(record['git_commit'])[:12]}, "
        f"MLflow run {record['mlflow_run_id']})"
    )


def post_webhook(url: str, record: Mapping[str, Any], *, timeout_s: float = 5.0) -> str:
    """POST ``record`` plus a ``text`` field (:func:`slack_text`) as JSON (UTF-8) to ``url``.

    Returns:
        ``"delivered (HTTP <status>)"``, or ``"failed: <reason>"`` (logged at WARNING); never raises for a
        network or HTTP error.
    """
    body = json.dumps({**record, "text": slack_text(record)}, ensure_ascii=False).encode("utf-8")
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json; charset=utf-8"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return f"delivered (HTTP {response.status})"
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError, ValueError) as exc:  # refused, timed out, bad URL
        reason = str(getattr(exc, "reason", exc))
    log.warning("alert webhook %s failed: %s (the stage goes on)", url, reason)
    return f"failed: {reason}"


def publish(
    alerts: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    *,
    stage: str,
    gate: str,
    webhook_url: str | None = None,
    timeout_s: float = 5.0,
) -> dict[str, Any]:
    """Log each alert, POST it to ``webhook_url`` when set (recording the outcome in its ``webhook`` field),
    and write the alerts file ``{"stage", "time", "gate": passed | failed, "alerts": [...]}`` atomically.

    Returns:
        The document written.
    """
    out = []
    for record in alerts:
        record = dict(record)
        level = logging.ERROR if record["severity"] == "error" else logging.WARNING
        log.log(level, "ALERT %s", slack_text(record))
        record["webhook"] = post_webhook(webhook_url, record, timeout_s=timeout_s) if webhook_url else "not configured"
        out.append(record)
    doc = {"stage": stage, "time": datetime.now(UTC).isoformat(timespec="seconds"), "gate": gate, "alerts": out}
    write_json(path, doc)
    return doc
