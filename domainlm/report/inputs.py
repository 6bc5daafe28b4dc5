"""What the report reads: the pipeline's metrics, plots and eval files (never data or models).

Every path is relative to a root folder (the repository in the pipeline, a copy in tests), built from
:mod:`domainlm.common.paths`. Two inputs are optional; a missing one leaves its report section out
with a note:

- ``benchmarks/results/io_speed.csv`` (``make bench``): Parquet vs JSONL load speed.
- ``metrics/classifier.json`` (the domain classifier, not landed yet). Expected shape::

      {"lora":     {"macro_f1": 0.91,
                    "confusion_matrix": {"labels": ["law", "bill", ...],      # n class names
                                         "matrix": [[12, 0, ...], ...]}},   # n x n counts, row = true label,
                                                                            # column = predicted label
       "baseline": {"macro_f1": 0.84, "name": "TF-IDF + logistic regression"}}   # name optional

  ``lora.confusion`` as ``{actual: {predicted: documents}}`` (what
  ``domainlm.classify.metrics.score`` returns) is accepted in place of ``lora.confusion_matrix``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from domainlm.common import paths

# Metrics files the report reads (``dvc.yaml`` lists each as a dep of the ``report`` stage).
VALIDATE_JSON = paths.METRICS_DIR / "validate.json"
DEDUP_JSON = paths.METRICS_DIR / "dedup.json"
PARQUET_JSON = paths.METRICS_DIR / "parquet.json"
SPLIT_JSON = paths.METRICS_DIR / "split.json"
BASE_MODEL_JSON = paths.METRICS_DIR / "base_model.json"
MERGE_JSON = paths.METRICS_DIR / "merge.json"
EVALUATE_JSON = paths.METRICS_DIR / "evaluate.json"
REFINE_JSON = paths.METRICS_DIR / "refine.json"
CLASSIFIER_JSON = paths.METRICS_DIR / "classifier.json"  # optional
IO_SPEED_CSV = Path("benchmarks/results/io_speed.csv")  # optional (make bench)

REQUIRED_FILES = (
    VALIDATE_JSON,
    DEDUP_JSON,
    PARQUET_JSON,
    SPLIT_JSON,
    BASE_MODEL_JSON,
    MERGE_JSON,
    EVALUATE_JSON,
    paths.ALERTS_JSON,
    REFINE_JSON,
    paths.COSINE_CSV,
    paths.PERPLEXITY_CSV,
    paths.TRAIN_LOSS_CSV,
    paths.REFINE_HISTORY_CSV,
    paths.COMPARISON_MD,
)
REQUIRED_DIRS = (paths.TRAIN_METRICS_DIR, paths.DIFF_METRICS_DIR)  # one <domain>.json per domain
OPTIONAL_FILES = (IO_SPEED_CSV, CLASSIFIER_JSON)

IO_SPEED_COLUMNS = (
    "loader",
    "columns",
    "bytes_on_disk",
    "docs",
    "median_s",
    "docs_per_s",
    "speedup_vs_jsonl",
    "cpu_count",
    "load_avg_1m_at_start",
)


@dataclass
class ReportInputs:
    """Everything the report shows, read once.

    Attributes:
        domains: domain names in the pipeline's order (the order of ``metrics/split.json``).
        validate, dedup, parquet, split, base_model, merge, evaluate, alerts, refine: the stage
            metrics dicts, as written.
        train_lora: domain -> ``metrics/train_lora/<domain>.json``.
        task_vectors: domain -> ``metrics/diff/<domain>.json``.
        cosine: ``plots/task_vector_cosine.csv`` (domain_a, domain_b, cosine).
        perplexity: ``plots/perplexity.csv`` (model, domain, perplexity).
        train_loss: ``plots/train_loss.csv`` (domain, step, loss, eval_loss; loss in nats/token).
        refine_history: ``plots/refine_history.csv`` (one row per iteration).
        comparison_md: the text of ``eval/eval_prompt_comparison.md``.
        io_speed: ``benchmarks/results/io_speed.csv`` or None when absent.
        classifier: ``metrics/classifier.json`` or None when absent.
        missing: the optional inputs that were absent (paths relative to the root).
    """

    domains: list[str]
    validate: dict[str, Any]
    dedup: dict[str, Any]
    parquet: dict[str, Any]
    split: dict[str, Any]
    base_model: dict[str, Any]
    merge: dict[str, Any]
    evaluate: dict[str, Any]
    alerts: dict[str, Any]
    refine: dict[str, Any]
    train_lora: dict[str, dict[str, Any]]
    task_vectors: dict[str, dict[str, Any]]
    cosine: pd.DataFrame
    perplexity: pd.DataFrame
    train_loss: pd.DataFrame
    refine_history: pd.DataFrame
    comparison_md: str
    io_speed: pd.DataFrame | None = None
    classifier: dict[str, Any] | None = None
    missing: list[str] = field(default_factory=list)


def _json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as fh:
        return json.load(fh)


def _per_domain(folder: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: _json(p) for p in sorted(folder.glob("*.json"))}


def check_classifier(obj: dict[str, Any]) -> dict[str, Any]:
    """Check ``metrics/classifier.json`` has the shape in this module's docstring.

    Returns:
        The same dict, with ``lora.confusion_matrix`` ({labels, matrix}) filled in from ``lora.confusion``
        when only that form is given.

    Raises:
        ValueError: naming the first missing key or the mismatched shape.
    """
    try:
        lora_f1 = float(obj["lora"]["macro_f1"])
        base_f1 = float(obj["baseline"]["macro_f1"])
        if "confusion_matrix" not in obj["lora"] and isinstance(obj["lora"].get("confusion"), dict):
            nested = obj["lora"]["confusion"]
            labels = sorted(set(nested) | {p for row in nested.values() for p in row})
            obj["lora"]["confusion_matrix"] = {
                "labels": labels,
                "matrix": [[int(nested.get(a, {}).get(p, 0)) for p in labels] for a in labels],
            }
        labels = list(obj["lora"]["confusion_matrix"]["labels"])
        matrix = obj["lora"]["confusion_matrix"]["matrix"]
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"metrics/classifier.json lacks {exc}: expected lora.macro_f1, baseline.macro_f1, "
            "lora.confusion_matrix.{labels, matrix}"
        ) from exc
    if len(matrix) != len(labels) or any(len(row) != len(labels) for row in matrix):
        raise ValueError(
            f"metrics/classifier.json: confusion matrix must be {len(labels)} x {len(labels)} "
            "(one row and one column per label)"
        )
    for name, f1 in (("lora", lora_f1), ("baseline", base_f1)):
        if not 0.0 <= f1 <= 1.0:
            raise ValueError(f"metrics/classifier.json: {name}.macro_f1 = {f1} is not in [0, 1]")
    return obj


def load_inputs(root: str | os.PathLike = ".") -> ReportInputs:
    """Read every report input under ``root``.

    Args:
        root: the folder holding ``metrics/``, ``plots/``, ``eval/`` (and ``benchmarks/results/``).

    Returns:
        A :class:`ReportInputs`; absent optional inputs are None and listed in ``missing``.

    Raises:
        FileNotFoundError: naming every required input that is absent (run the pipeline first).
        ValueError: when ``metrics/classifier.json`` or ``io_speed.csv`` exists but has the wrong shape.
    """
    root = Path(root)
    absent = [str(p) for p in REQUIRED_FILES if not (root / p).is_file()]
    absent += [f"{d}/*.json" for d in REQUIRED_DIRS if not any((root / d).glob("*.json"))]
    if absent:
        raise FileNotFoundError(
            f"report inputs missing under {root}: {', '.join(absent)} (run the pipeline first: dvc repro)"
        )
    split = _json(root / SPLIT_JSON)
    missing: list[str] = []

    io_speed = None
    if (root / IO_SPEED_CSV).is_file():
        io_speed = pd.read_csv(root / IO_SPEED_CSV)
        lacking = [c for c in IO_SPEED_COLUMNS if c not in io_speed.columns]
        if lacking:
            raise ValueError(f"{IO_SPEED_CSV} lacks columns {lacking} (written by benchmarks/io_speed.py)")
    else:
        missing.append(str(IO_SPEED_CSV))

    classifier = None
    if (root / CLASSIFIER_JSON).is_file():
        classifier = check_classifier(_json(root / CLASSIFIER_JSON))
    else:
        missing.append(str(CLASSIFIER_JSON))

    return ReportInputs(
        domains=list(split["domains"]),
        validate=_json(root / VALIDATE_JSON),
        dedup=_json(root / DEDUP_JSON),
        parquet=_json(root / PARQUET_JSON),
        split=split,
        base_model=_json(root / BASE_MODEL_JSON),
        merge=_json(root / MERGE_JSON),
        evaluate=_json(root / EVALUATE_JSON),
        alerts=_json(root / paths.ALERTS_JSON),
        refine=_json(root / REFINE_JSON),
        train_lora=_per_domain(root / paths.TRAIN_METRICS_DIR),
        task_vectors=_per_domain(root / paths.DIFF_METRICS_DIR),
        cosine=pd.read_csv(root / paths.COSINE_CSV),
        perplexity=pd.read_csv(root / paths.PERPLEXITY_CSV),
        train_loss=pd.read_csv(root / paths.TRAIN_LOSS_CSV),
        refine_history=pd.read_csv(root / paths.REFINE_HISTORY_CSV),
        comparison_md=(root / paths.COMPARISON_MD).read_text(encoding="utf-8"),
        io_speed=io_speed,
        classifier=classifier,
        missing=missing,
    )
