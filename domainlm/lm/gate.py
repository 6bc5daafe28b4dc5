"""The quality gate on the merged model and its MLflow Model Registry entry.

The gate compares perplexities (:mod:`domainlm.lm.evaluation`): every expert must beat the base on its own
domain, and the merge must keep enough of the experts' gains (thresholds in ``params.yaml``). The merged
model is then registered as a new version whose alias is ``champion`` (passed) or ``challenger`` (failed),
and the verdict is written to ``metrics/alerts.json``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from domainlm.common.atomic import write_json
from domainlm.common.tracking import ensure_registered_model

log = logging.getLogger(__name__)


def check_gate(
    ppl: Mapping[str, Mapping[str, float]], retained: Mapping[str, float], gate: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Failing figures of the quality gate; an empty list means PASS.

    Rules (each skipped when its threshold is null in params):
      - ``min_mean_retained_gain``: mean retained gain ≥ threshold;
      - ``max_perplexity``: merged perplexity ≤ threshold on every domain;
      - ``merged_below_base`` (bool): merged perplexity < base perplexity on every domain;
      - always: each expert's perplexity on its own domain < the base's (else no gain exists).

    Args:
        ppl: ``{"base" | "merged" | "expert_<domain>": {domain: perplexity}}``.
        retained: ``{domain: retained gain}`` (:func:`domainlm.lm.evaluation.retained_gains`).
        gate: the ``evaluate.gate`` params.

    Returns:
        ``[{"rule", "metric", "value", "threshold"}]``.
    """
    failures = []
    domains = list(retained)
    for d in domains:
        if ppl[f"expert_{d}"][d] >= ppl["base"][d]:
            failures.append(
                {
                    "rule": "expert_below_base",
                    "metric": f"perplexity.expert_{d}.{d}",
                    "value": ppl[f"expert_{d}"][d],
                    "threshold": ppl["base"][d],
                }
            )
    mean_gain = sum(retained.values()) / len(retained)
    if gate.get("min_mean_retained_gain") is not None and mean_gain < gate["min_mean_retained_gain"]:
        failures.append(
            {
                "rule": "min_mean_retained_gain",
                "metric": "mean_retained_gain",
                "value": mean_gain,
                "threshold": float(gate["min_mean_retained_gain"]),
            }
        )
    for d in domains:
        if gate.get("max_perplexity") is not None and ppl["merged"][d] > gate["max_perplexity"]:
            failures.append(
                {
                    "rule": "max_perplexity",
                    "metric": f"perplexity.merged.{d}",
                    "value": ppl["merged"][d],
                    "threshold": float(gate["max_perplexity"]),
                }
            )
        if gate.get("merged_below_base") and ppl["merged"][d] >= ppl["base"][d]:
            failures.append(
                {
                    "rule": "merged_below_base",
                    "metric": f"perplexity.merged.{d}",
                    "value": ppl["merged"][d],
                    "threshold": ppl["base"][d],
                }
            )
    return failures


def register_merged(
    mlflow, model_dir: str | Path, model_name: str, passed: bool, tags: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Log ``model_dir`` as the active run's ``model`` artifact folder, register it as a new
    version of ``model_name`` and point alias ``champion`` (gate passed) or ``challenger``
    (failed) at it. A failed gate leaves the existing ``champion`` alias where it was.

    The folder is logged as plain artifacts and registered with ``MlflowClient.create_model_version``
    on the run's artifact URI (works offline with a sqlite store; ``mlflow.register_model`` in
    MLflow 3 wants a logged-model object instead).

    Returns:
        ``{"name", "version", "alias", "source"}``.
    """
    from mlflow import MlflowClient

    run = mlflow.active_run()
    mlflow.log_artifacts(str(model_dir), artifact_path="model")
    source = mlflow.get_artifact_uri("model")
    client = MlflowClient()
    ensure_registered_model(client, model_name, "Merged domain language model (stages.merge).")
    version = client.create_model_version(model_name, source=source, run_id=run.info.run_id, tags=dict(tags or {}))
    alias = "champion" if passed else "challenger"
    client.set_registered_model_alias(model_name, alias, version.version)
    return {"name": model_name, "version": int(version.version), "alias": alias, "source": source}


def record_verdict(
    mlflow,
    failures: list[dict[str, Any]],
    *,
    mean_retained_gain: float,
    model_dir: str | Path,
    model_name: str,
    thresholds: Mapping[str, Any],
    alerts_json: str | os.PathLike,
) -> dict[str, Any]:
    """Publish the gate's verdict: tag the active MLflow run (``gate`` = passed | failed; ``gate.alert``
    lists the failures), register ``model_dir`` (:func:`register_merged`), write ``alerts_json``
    (``{"gate", "time" (UTC, ISO 8601), "model", "thresholds", "failures"}``) and log the verdict.

    Args:
        mlflow: the ``mlflow`` module inside an active run.
        failures: :func:`check_gate`'s result (empty: passed).

    Returns:
        :func:`register_merged`'s ``{"name", "version", "alias", "source"}``.
    """
    passed = not failures
    verdict = "passed" if passed else "failed"
    mlflow.set_tag("gate", verdict)
    if failures:
        mlflow.set_tag(
            "gate.alert",
            "; ".join(f"{f['metric']}={f['value']:.4g} vs {f['threshold']:.4g} ({f['rule']})" for f in failures),
        )
    registered = register_merged(
        mlflow, model_dir, model_name, passed, tags={"gate": verdict, "mean_retained_gain": f"{mean_retained_gain:.4f}"}
    )
    write_json(
        alerts_json,
        {
            "gate": verdict,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": registered,
            "thresholds": dict(thresholds),
            "failures": failures,
        },
    )
    log.log(
        logging.INFO if passed else logging.WARNING,
        "gate %s: mean retained gain %.3f; %s v%s is now %r",
        verdict.upper(),
        mean_retained_gain,
        model_name,
        registered["version"],
        registered["alias"],
    )
    for f in failures:
        log.warning("gate: %s = %.4g fails %s (threshold %.4g)", f["metric"], f["value"], f["rule"], f["threshold"])
    return registered
