"""refine_labels: ensemble self-training that relabels confidently mislabelled documents, iteratively.

Out-of-fold ensemble probabilities flag rows whose label disagrees with a confident prediction, as in
confident learning (Northcutt et al., JAIR 2021): :mod:`domainlm.refine.loop` over a SQLite table.
``python -m stages.refine_labels promote`` then writes the refined labels to the label overrides.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sqlite_utils

from domainlm.common import params as P
from domainlm.common import paths
from domainlm.common.compute import resolve
from domainlm.common.metrics import peak_rss_mb
from domainlm.common.stage import configure_logging, stage_parser, stage_run
from domainlm.common.threads import limit_threads
from domainlm.common.tracking import mlflow_run
from domainlm.documents.jsonl import write_records
from domainlm.refine import features as feat
from domainlm.refine import members as mem
from domainlm.refine import store
from domainlm.refine.loop import RefineConfig, promote, refine, review_queue


def run(
    domains: Sequence[str],
    cfg: RefineConfig,
    *,
    split_dir: str | Path,
    labels_path: str | Path | None,
    model_dir: str | Path,
    db_path: str | Path,
    snapshot_dir: str | Path,
    review_queue_path: str | Path,
    history_path: str | Path,
    compute=None,
) -> dict[str, Any]:
    """The whole stage, on at most ``cfg.threads`` compute threads (torch + BLAS); the LM embedding pass on
    ``compute``'s.

    Loads the ``sentences`` table (texts from the split outputs, labels from the split stage's
    label table), builds the five ensemble members on the frozen merged LM, runs the refinement
    loop (:func:`domainlm.refine.loop.refine`) inside an MLflow run (one nested run per
    iteration), and writes the review queue.

    Args:
        domains: the domains whose split outputs are loaded, in order.
        cfg: the ``refine`` params (:class:`domainlm.refine.loop.RefineConfig`).
        split_dir: ``<split_dir>/<domain>/{train,val,test}.parquet``.
        labels_path: the split stage's label table (overrides applied); ``None`` = the document
            files' own ``label`` column.
        model_dir: the merged model (Hugging Face folder).
        db_path: the SQLite ``sentences`` database to (re)create.
        snapshot_dir: per-iteration ``iter_<t>.parquet`` snapshots; emptied first, so snapshots of
            an older, longer run do not linger.
        review_queue_path: JSONL of the ``cfg.review_size`` least confident rows.
        history_path: CSV with one row per iteration (:func:`domainlm.refine.loop.history_fields`).
        compute: the compute policy (:mod:`domainlm.common.compute`): the frozen LM's embedding pass runs under
            its autocast (None = fp32); the other members are not torch matmul work and stay fp32.

    Returns:
        The metrics: row counts (``rows``, ``unlabelled_rows``, ``rows_per_split``), ``classes``,
        ``iterations``, ``converged`` (0/1), ``labels_changed``, ``label_change_rate`` (fraction),
        ``mean_confidence``, ``review_queue_rows``, ``final_iteration`` (its history row, NaNs left
        out), the last round's member ``weights``, ``temperatures`` and out-of-fold accuracy
        ``oof_accuracy``, durations in seconds (``load_s``, ``lexical_features_s``, ``tfidf_features_s``,
        ``tokenize_s``, ``embed_s``, ``refine_s``, ``wall_s``) and ``peak_rss_mb`` (MiB).

    Raises:
        FileNotFoundError: when a split output, the label table or the merged model is missing.
        ValueError: on bad split outputs or label table (:mod:`domainlm.refine.store`), or when
            no document has a label.
    """
    wall0 = time.perf_counter()
    snapshot_dir, review_queue_path = Path(snapshot_dir), Path(review_queue_path)
    with limit_threads(cfg.threads):
        if snapshot_dir.exists():
            shutil.rmtree(snapshot_dir)

        t0 = time.perf_counter()
        report = store.LoadReport()
        label_of = store.label_map(labels_path) if labels_path is not None else None
        rows = store.iter_split_rows(store.split_files(split_dir, domains), cfg.chunksize, report, label_of)
        store.create_store(db_path, rows, chunksize=cfg.chunksize)
        load_s = time.perf_counter() - t0

        with contextlib.closing(sqlite_utils.Database(db_path)) as db:
            labels = store.read_labels(db)
            classes = sorted(set(labels.original))
            texts = [t[: cfg.max_chars] for t in labels.texts]
            tokenizer, lm = mem.load_lm(model_dir)
            members, lexical, feature_secs = mem.build_members(
                texts,
                tokenizer,
                lm,
                lexical=cfg.lexical,
                tfidf=cfg.tfidf,
                lstm=cfg.lstm,
                transformer=cfg.transformer,
                compute=compute,
            )
            del lm
            feat.free_memory()

            with mlflow_run("refine_labels", dataclasses.asdict(cfg)) as mlflow:

                def log_iteration(t: int, row: dict[str, float]) -> None:
                    with mlflow_run("refine_labels", nested=True, run_name=f"iteration_{t}") as child:
                        child.log_metrics({k: float(v) for k, v in row.items() if not _isnan(v)}, step=t)
                    mlflow.log_metrics(
                        {
                            "rows_changed": float(row["rows_changed"]),
                            "val_accuracy_ensemble": float(row["val_accuracy_ensemble"]),
                        },
                        step=t,
                    )

                t0 = time.perf_counter()
                result = refine(
                    db,
                    members,
                    lexical,
                    cfg,
                    splits=labels.splits,
                    classes=classes,
                    snapshot_dir=snapshot_dir,
                    history_path=history_path,
                    on_iteration=log_iteration,
                )
                refine_s = time.perf_counter() - t0
                last = result.iterations[-1]
                queue = review_queue(db, last.ensemble.proba, classes, cfg.review_size)
                write_records(review_queue_path, queue)
                final = store.read_labels(db)
                n = len(final.ids)
                n_changed = int((final.current != final.original).sum())
                conf = np.array(
                    [r[0] for r in db.execute(f"SELECT confidence FROM {store.TABLE}").fetchall()], dtype=float
                )
                metrics = {
                    "rows": n,
                    "unlabelled_rows": report.unlabelled,
                    "rows_per_split": report.per_split,
                    "classes": len(classes),
                    "iterations": len(result.iterations),
                    "converged": int(result.converged),
                    "labels_changed": n_changed,
                    "label_change_rate": n_changed / n,
                    "mean_confidence": float(conf.mean()),
                    "review_queue_rows": len(queue),
                    "final_iteration": {k: v for k, v in last.history.items() if not _isnan(v)},
                    "weights": last.ensemble.weights,
                    "temperatures": last.ensemble.temperatures,
                    "oof_accuracy": last.ensemble.accuracy,
                    "load_s": load_s,
                    **feature_secs,
                    "refine_s": refine_s,
                    "wall_s": time.perf_counter() - wall0,
                    "peak_rss_mb": peak_rss_mb(),
                }
                mlflow.log_metrics(
                    {
                        "labels_changed": n_changed,
                        "label_change_rate": n_changed / n,
                        "iterations": len(result.iterations),
                        "wall_s": metrics["wall_s"],
                    }
                )
                mlflow.log_artifact(str(snapshot_dir / f"iter_{len(result.iterations) - 1}.parquet"), "refine")
                mlflow.log_artifact(str(review_queue_path), "refine")
    return metrics


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def main(argv: Sequence[str] = ()) -> None:
    """``python -m stages.refine_labels`` runs the stage; ``... promote`` writes the overrides."""
    parser = stage_parser("refine_labels", __doc__)
    parser.add_argument(
        "command",
        nargs="?",
        choices=["run", "promote"],
        default="run",
        help="run: the DVC stage (default); promote: write refined labels to "
        f"{paths.OVERRIDES_PATH} for the split stage",
    )
    args = parser.parse_args(argv)
    if args.command == "promote":  # a user's command, not a DVC stage: no run log, no metrics
        configure_logging()
        counts = promote(paths.REFINED_DB, paths.OVERRIDES_PATH)
        logging.getLogger("stages.refine_labels").info(
            "wrote %d overrides to %s (%d refined labels, %d older overrides kept); run `dvc add %s` and `dvc repro`",
            counts["rows"],
            paths.OVERRIDES_PATH,
            counts["new"],
            counts["kept"],
            paths.OVERRIDES_PATH,
        )
        return
    with stage_run("refine_labels") as st:
        cfg = RefineConfig.from_params(P.section("refine"))
        compute = st.use_compute(resolve(P.load_params().get("compute")))
        metrics = run(
            P.required_domains("refine_labels"),
            cfg,
            compute=compute,
            split_dir=paths.SPLIT_DIR,
            labels_path=paths.LABELS_PATH,
            model_dir=paths.MERGED_DIR,
            db_path=paths.REFINED_DB,
            snapshot_dir=paths.SNAPSHOT_DIR,
            review_queue_path=paths.REVIEW_QUEUE,
            history_path=paths.REFINE_HISTORY_CSV,
        )
        st.write_metrics("refine", metrics)
        st.log.info(
            "refine_labels: %d of %d labels changed in %d iterations, %.1fs",
            metrics["labels_changed"],
            metrics["rows"],
            metrics["iterations"],
            metrics["wall_s"],
        )


if __name__ == "__main__":
    main(sys.argv[1:])
