"""Alerts of the classifier stage: a record per problem, written to the stage's alerts file and POSTed to a
webhook (Slack-compatible: the JSON body carries a ``text`` field, so a Slack incoming-webhook URL works as is).

A webhook that fails (refused, timed out, non-2xx) is logged and recorded in the alert (``webhook``); it never
fails the stage. The alerts file is the record of *this* run: ``dvc`` tracks it as the stage's output, so it
never holds a stale alert of an older run.

The classifier stage raises two (:func:`gate_alerts`): an ``error`` when the gate failed after every retry, a
``warning`` when the model passed but the champion scores higher on the same test set.
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

from domainlm.classify.gate import GateOutcome
from domainlm.classify.registry import CHAMPION
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


def gate_alerts(
    outcome: GateOutcome,
    path: str | os.PathLike,
    *,
    stage: str,
    model_name: str,
    alias: str,
    registered_version: int,
    champion: Mapping[str, Any],
    git_commit: str,
    mlflow_run_id: str | None,
    webhook_url: str | None = None,
    timeout_s: float = 5.0,
    deployed_beside: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The gate's alerts, published (:func:`publish`): an ``error`` when the gate failed (every attempt's test
    macro-F1, the kept attempt, the version registered), else a ``warning`` when the model was not promoted (the
    champion's score on this test set); no alert when it passed and became (or stayed) champion. A challenger (a
    classifier on a new LM) that fails the gate while the deployed model scored beside it passes gives a ``warning``:
    the round keeps the deployed model.

    Args:
        outcome: the gate's :class:`domainlm.classify.gate.GateOutcome`; ``min_f1`` is the error's threshold.
        path: the alerts file (``metrics/classifier_alerts.json``), written atomically.
        stage: the stage name in each record.
        model_name: the registered model's name.
        alias: the alias the run's version got (``champion`` | ``challenger``,
            :func:`domainlm.classify.registry.choose_alias`).
        registered_version: the version registered (or kept) this run.
        champion: :func:`domainlm.classify.registry.champion_macro_f1` before this run (``version``, ``macro_f1``
            or None, ``how``); its ``macro_f1`` is the warning's threshold when known, else ``outcome.min_f1``.
        git_commit, mlflow_run_id: where the records point (the stage's commit and MLflow run).
        webhook_url, timeout_s: :func:`publish`'s webhook (None: not posted) and its timeout in seconds.
        deployed_beside: for a challenger, the deployed model scored beside it: ``{"version", "macro_f1"}``; None
            otherwise.

    Returns:
        The document written (:func:`publish`); ``"alerts"`` holds zero or one record.
    """
    kept = outcome.kept
    alerts = []
    f1s = ", ".join(f"{a.macro_f1:.4f}" for a in outcome.attempts)
    deployed_passes = deployed_beside is not None and float(deployed_beside["macro_f1"]) >= outcome.min_f1

    def record(severity: str, threshold: float, message: str) -> dict[str, Any]:
        return alert_record(
            stage=stage,
            severity=severity,
            metric="macro_f1",
            value=kept.macro_f1,
            threshold=threshold,
            attempts=len(outcome.attempts),
            git_commit=git_commit,
            mlflow_run_id=mlflow_run_id,
            message=message,
        )

    if not outcome.passed and deployed_passes:
        alerts.append(
            record(
                "warning",
                outcome.min_f1,
                f"the challenger (a classifier on the new LM) failed the gate after {len(outcome.attempts)} "
                f"attempts (test macro-F1 per attempt: {f1s}); the deployed v{deployed_beside['version']} passes "
                f"on this test split ({float(deployed_beside['macro_f1']):.4f}) and stays; registered "
                f"{model_name} v{registered_version} as {alias}",
            )
        )
    elif not outcome.passed:
        alerts.append(
            record(
                "error",
                outcome.min_f1,
                f"classifier gate failed after {len(outcome.attempts)} attempts ({outcome.retries} retries; "
                f"test macro-F1 per attempt: {f1s}); kept attempt {kept.index} (best val macro-F1), registered "
                f"{model_name} v{registered_version} as {alias}; champion unchanged",
            )
        )
    elif alias != CHAMPION:
        alerts.append(
            record(
                "warning",
                champion["macro_f1"] if champion["macro_f1"] is not None else outcome.min_f1,
                f"the classifier passed the gate but was not promoted: champion v{champion['version']} "
                f"scores {champion['macro_f1']} on this test set ({champion['how']}); registered "
                f"v{registered_version} as {alias}",
            )
        )
    return publish(
        alerts,
        path,
        stage=stage,
        gate="passed" if outcome.passed else "failed",
        webhook_url=webhook_url,
        timeout_s=timeout_s,
    )
