"""refine_labels: ensemble self-training that relabels confidently mislabelled documents, iteratively.

Out-of-fold ensemble probabilities (stages.ensemble) flag rows whose label disagrees with a confident
prediction, as in confident learning (Northcutt et al., JAIR 2021); labels live in a SQLite table.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import sqlite_utils

from stages import ensemble as ens
from stages import sentence_store as store
from stages.atomic import atomic_path, write_text
from stages.jsonl import write_records
from stages.metrics import peak_rss_mb, write_metrics
from stages.params import domains as param_domains
from stages.params import section
from stages.split import LABELS_PATH, OVERRIDES_PATH, OVERRIDES_SCHEMA, read_overrides

log = logging.getLogger("stages.refine_labels")

SPLIT_ROOT = Path("data/split")
MODEL_DIR = Path("models/merged")
OUT_DIR = Path("data/refined")
DB_PATH = OUT_DIR / "sentences.db"
SNAPSHOT_DIR = OUT_DIR / "snapshots"
REVIEW_QUEUE = OUT_DIR / "review_queue.jsonl"
HISTORY_CSV = Path("plots/refine_history.csv")


# ------------------------------------------------------------------ the update rule

def threshold(iteration: int, tau0: float, step: float, tau_max: float) -> float:
    """Confidence threshold of iteration ``t`` (0-based): ``τ_t = min(τ0 + step·t, τ_max)``.

    The threshold rises as labels get cleaner, so later iterations only make changes the
    ensemble is ever more sure of.

    Raises:
        ValueError: when ``iteration < 0`` or a threshold lies outside ``[0, 1]``.
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    for name, v in (("tau0", tau0), ("tau_max", tau_max)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"refine.{name} must be in [0, 1], got {v}")
    return min(tau0 + step * iteration, tau_max)


def select_changes(y: np.ndarray, proba: np.ndarray, tau: float, max_change_fraction: float,
                   max_self_confidence: float = 1.0) -> np.ndarray:
    """The new labels after one iteration.

    A row is a candidate when the ensemble's predicted label ``argmax proba`` differs from its
    current label ``y``, the confidence ``max proba`` is at least ``tau``, and the row's
    self-confidence ``proba[y]`` (the probability of its current label, cleanlab's label quality
    score; Northcutt et al. 2021) is at most ``max_self_confidence``: a label the ensemble still
    finds plausible is kept even when another class wins, which spares ambiguous rows. Guard: of the rows
    currently in class c, at most ``floor(max_change_fraction · |c|)`` may change; when more are
    candidates, the most confident ones change (ties: lower row index first).

    Args:
        y: int64 ``(n,)`` current class indices.
        proba: float ``(n, C)`` ensemble out-of-fold probabilities.
        tau: confidence threshold in ``[0, 1]``.
        max_change_fraction: per-class cap in ``[0, 1]``.
        max_self_confidence: in ``[0, 1]``; 1 disables the self-confidence condition.

    Returns:
        int64 ``(n,)`` new class indices (``y`` where nothing changes).

    Raises:
        ValueError: on mismatched shapes, or a cap or self-confidence bound outside ``[0, 1]``.
    """
    if proba.ndim != 2 or proba.shape[0] != len(y):
        raise ValueError(f"proba has shape {proba.shape}, expected ({len(y)}, n_classes)")
    if not 0.0 <= max_change_fraction <= 1.0:
        raise ValueError(f"refine.max_change_fraction must be in [0, 1], got {max_change_fraction}")
    if not 0.0 <= max_self_confidence <= 1.0:
        raise ValueError(f"refine.max_self_confidence must be in [0, 1], got {max_self_confidence}")
    pred = proba.argmax(axis=1)
    conf = proba[np.arange(len(y)), pred]
    self_conf = proba[np.arange(len(y)), y]
    candidate = (pred != y) & (conf >= tau) & (self_conf <= max_self_confidence)
    new = y.copy()
    for c in np.unique(y[candidate]):
        rows = np.flatnonzero(candidate & (y == c))
        cap = math.floor(max_change_fraction * int((y == c).sum()))
        if len(rows) > cap:
            rows = rows[np.argsort(-conf[rows], kind="stable")[:cap]]
        new[rows] = pred[rows]
    return new


def feature_change_rate(before: dict[int, frozenset[str]], after: dict[int, frozenset[str]]) -> float:
    """Mean over classes of the share of a class's top-k features that are not in its new top-k.

    Classes present on only one side count as fully changed. Returns a rate in ``[0, 1]``
    (0 for two empty inputs).
    """
    classes = set(before) | set(after)
    if not classes:
        return 0.0
    rates = []
    for c in classes:
        b, a = before.get(c, frozenset()), after.get(c, frozenset())
        k = max(len(b), len(a))
        rates.append(1.0 - len(a & b) / k if k else 0.0)
    return float(np.mean(rates))


# ------------------------------------------------------------------ the loop

@dataclass
class RefineConfig:
    """Knobs of the loop (the ``refine`` section of params.yaml)."""

    folds: int = 4
    seed: int = 0
    max_iterations: int = 5
    epsilon: float = 0.005
    tau0: float = 0.7
    tau_step: float = 0.05
    tau_max: float = 0.95
    max_change_fraction: float = 0.1
    max_self_confidence: float = 1.0
    top_k_features: int = 20

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> "RefineConfig":
        """Pick this dataclass's fields out of the ``refine`` params (other keys ignored)."""
        return cls(**{k: type(getattr(cls, k))(p[k]) for k in cls.__dataclass_fields__ if k in p})


@dataclass
class Iteration:
    """One finished iteration: its history row and the ensemble round it acted on."""

    history: dict[str, float]
    ensemble: ens.EnsembleResult
    new_labels: np.ndarray


@dataclass
class RefineResult:
    """The loop's outcome: ``iterations`` run (in order), ``converged`` (label change rate fell
    below epsilon before ``max_iterations``), the label space ``classes``."""

    iterations: list[Iteration] = field(default_factory=list)
    converged: bool = False
    classes: list[str] = field(default_factory=list)


HISTORY_FIELDS_HEAD = ["iteration", "tau", "rows_changed", "label_change_rate"]


def history_fields(member_names: Sequence[str]) -> list[str]:
    """Column order of ``plots/refine_history.csv`` for these members."""
    return (HISTORY_FIELDS_HEAD + [f"val_accuracy_{m}" for m in member_names]
            + ["val_accuracy_ensemble", "lexical_feature_change_rate"])


def write_history(path: str | Path, rows: list[dict[str, float]], fields: list[str]) -> None:
    """Write the history CSV (header + one row per iteration so far) atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    write_text(path, buf.getvalue())


def refine(db: sqlite_utils.Database, members: Sequence[ens.Member], lexical: ens.LexicalNB | None,
           cfg: RefineConfig, *, splits: np.ndarray, classes: Sequence[str], snapshot_dir: str | Path,
           history_path: str | Path,
           on_iteration: Callable[[int, dict[str, float]], None] | None = None) -> RefineResult:
    """Run refinement iterations on the ``sentences`` table until convergence or the cap.

    Iteration t: read the current labels; cross-fit every member with ``cfg.folds`` folds
    (:func:`stages.ensemble.cross_fit_ensemble`); pick changes with :func:`select_changes` at
    ``τ_t`` (:func:`threshold`); write labels and confidences in one transaction
    (:func:`stages.sentence_store.apply_updates`; a row's confidence is the ensemble probability of
    its label after the iteration, which for a changed row is the confidence of the prediction
    that changed it); write ``snapshot_dir/iter_<t>.parquet``; append the history row to
    ``history_path``. Stops after the first iteration whose label change rate (changed rows /
    all rows) is below ``cfg.epsilon``, or after ``cfg.max_iterations``.

    History row: ``iteration, tau, rows_changed, label_change_rate``, each member's and the
    ensemble's out-of-fold accuracy on the val split against the labels the iteration started
    from, and ``lexical_feature_change_rate``: :func:`feature_change_rate` between the lexical
    member's top-k features per class fitted on the labels before and after the iteration (the
    change the next iteration's lexicon will show; 0 when nothing changed).

    Args:
        members: ensemble members over the rows in load (``rowid``) order.
        lexical: the naive Bayes member (for the feature change rate); ``None`` leaves the rate NaN.
        splits: split name of every row, object ``(n,)``, same order.
        classes: the label space; every current label must be in it.
        on_iteration: called with ``(t, history_row)`` after each iteration is committed.

    Raises:
        ValueError: when a current label is not in ``classes``.
    """
    classes = list(classes)
    index = {c: i for i, c in enumerate(classes)}
    fields = history_fields([m.name for m in members])
    result = RefineResult(classes=classes)
    rows: list[dict[str, float]] = []
    val = np.asarray(splits) == "val"
    snapshot_dir = Path(snapshot_dir)
    for t in range(cfg.max_iterations):
        t0 = time.perf_counter()
        ids, current = store.read_current(db)
        unknown = sorted(set(current) - set(index))
        if unknown:
            raise ValueError(f"labels {unknown} are not in the label space {classes}")
        y = np.array([index[c] for c in current], dtype=np.int64)
        round_ = ens.cross_fit_ensemble(members, y, len(classes), folds=cfg.folds, seed=cfg.seed + t)
        tau = threshold(t, cfg.tau0, cfg.tau_step, cfg.tau_max)
        new = select_changes(y, round_.proba, tau, cfg.max_change_fraction, cfg.max_self_confidence)
        conf = round_.proba[np.arange(len(y)), new]
        changed = new != y
        updates = (store.RowUpdate(ids[i], float(conf[i]), classes[new[i]] if changed[i] else None)
                   for i in range(len(y)))
        n_changed = store.apply_updates(db, updates, t)
        store.write_snapshot(db, snapshot_dir / f"iter_{t}.parquet")

        if lexical is not None and n_changed:
            k = cfg.top_k_features
            fcr = feature_change_rate(lexical.top_features(y, len(classes), k),
                                      lexical.top_features(new, len(classes), k))
        else:
            fcr = 0.0 if lexical is not None else float("nan")
        row: dict[str, float] = {"iteration": t, "tau": round(tau, 6), "rows_changed": n_changed,
                                 "label_change_rate": n_changed / len(y)}
        for name, oof in round_.members.items():
            row[f"val_accuracy_{name}"] = _accuracy(oof.proba, y, val)
        row["val_accuracy_ensemble"] = _accuracy(round_.proba, y, val)
        row["lexical_feature_change_rate"] = fcr
        rows.append(row)
        write_history(history_path, rows, fields)
        result.iterations.append(Iteration(row, round_, new))
        log.info("iteration %d: tau %.2f, %d labels changed (%.4f), ensemble val accuracy %.4f, %.1fs",
                 t, tau, n_changed, row["label_change_rate"], row["val_accuracy_ensemble"], time.perf_counter() - t0)
        if on_iteration is not None:
            on_iteration(t, row)
        if row["label_change_rate"] < cfg.epsilon:
            result.converged = True
            break
    return result


def _accuracy(proba: np.ndarray, y: np.ndarray, mask: np.ndarray) -> float:
    return float((proba[mask].argmax(1) == y[mask]).mean()) if mask.any() else float("nan")


# ------------------------------------------------------------------ features and members

def build_members(texts: Sequence[str], p: dict[str, Any], tokenizer: Any, lm: Any) -> tuple[list[ens.Member], ens.LexicalNB, dict[str, float]]:
    """Compute every member's features once (texts never change during refinement) and build
    the four members: lexical NB, LSTM, BiLSTM, and the frozen-LM head.

    Args:
        texts: documents in load order, already cut to ``refine.max_chars``.
        p: the ``refine`` params (sub-sections ``lexical``, ``lstm``, ``transformer``).
        tokenizer, lm: the merged model's tokenizer and causal LM (frozen).

    Returns:
        ``(members, lexical_member, seconds)`` with feature-building wall times in seconds.
    """
    secs: dict[str, float] = {}
    lx, ls, tr = p["lexical"], p["lstm"], p["transformer"]
    t0 = time.perf_counter()
    counts, names = ens.lexical_counts(texts, word_ngrams=tuple(lx["word_ngrams"]),
                                       jamo_ngrams=tuple(lx["jamo_ngrams"]), min_df=int(lx["min_df"]),
                                       jamo_weight=float(lx["jamo_weight"]))
    lexical = ens.LexicalNB(counts, names, alpha=float(lx["alpha"]), doc_tokens=float(lx["doc_tokens"]))
    secs["lexical_features_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    enc = tokenizer(list(texts), truncation=True, max_length=int(ls["max_tokens"]), add_special_tokens=False)["input_ids"]
    ids, lengths, vocab = ens.token_matrix(enc, min_count=int(ls["min_token_count"]), max_len=int(ls["max_tokens"]))
    secs["tokenize_s"] = time.perf_counter() - t0
    lstm_kw = dict(embed_dim=int(ls["embed_dim"]), hidden=int(ls["hidden"]), epochs=int(ls["epochs"]),
                   batch_size=int(ls["batch_size"]), lr=float(ls["lr"]))

    t0 = time.perf_counter()
    emb, _ = ens.embed_mean_pooled(lm, tokenizer, texts, max_tokens=int(tr["max_tokens"]),
                                   batch_size=int(tr["batch_size"]))
    secs["embed_s"] = time.perf_counter() - t0
    members: list[ens.Member] = [
        lexical,
        ens.LSTMMember(ids, lengths, vocab, bidirectional=False, **lstm_kw),
        ens.LSTMMember(ids, lengths, vocab, bidirectional=True, **lstm_kw),
        ens.EmbeddingHead(emb, C=float(tr["C"]), max_iter=int(tr["max_iter"])),
    ]
    return members, lexical, secs


def load_lm(model_dir: str | Path) -> tuple[Any, Any]:
    """Load the merged causal LM (eval mode, frozen) and its tokenizer from a local folder.

    Raises:
        FileNotFoundError: when ``model_dir`` has no ``config.json`` (run the merge stage first).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} holds no Hugging Face model (config.json): run the merge stage first")
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    for prm in lm.parameters():
        prm.requires_grad_(False)
    return tok, lm


# ------------------------------------------------------------------ review queue and promotion

def review_queue(db: sqlite_utils.Database, proba: np.ndarray, classes: Sequence[str], size: int,
                 top: int = 3) -> list[dict[str, Any]]:
    """The ``size`` rows with the lowest confidence in their current label, lowest first.

    Each record: id, domain, split, original_label, current_label, confidence, the ensemble's
    ``suggestions`` (its ``top`` labels with probabilities, from the last iteration's out-of-fold
    ``proba``, rows in load order) and the text, for a person or an LLM to relabel.
    """
    rows = db.execute(f"SELECT rowid, id, domain, split, original_label, current_label, confidence, text "
                      f"FROM {store.TABLE} ORDER BY confidence ASC, rowid ASC LIMIT ?", [size]).fetchall()
    rowids = [r[0] for r in db.execute(f"SELECT rowid FROM {store.TABLE} ORDER BY rowid").fetchall()]
    position = {rid: i for i, rid in enumerate(rowids)}
    out = []
    for rowid, id_, domain, split, orig, cur, conf, text in rows:
        p = proba[position[rowid]]
        best = np.argsort(-p, kind="stable")[:top]
        out.append({"id": id_, "domain": domain, "split": split, "original_label": orig, "current_label": cur,
                    "confidence": conf,
                    "suggestions": [{"label": classes[j], "probability": round(float(p[j]), 6)} for j in best],
                    "text": text})
    return out


def promote(db_path: str | Path, overrides_path: str | Path = OVERRIDES_PATH) -> dict[str, int]:
    """Write the refined labels to the label-override file the split stage applies.

    Rows whose ``current_label`` differs from ``original_label`` become ``(id, label)``
    overrides. They are merged into the existing file: an older override whose id has no new
    one is kept, because the split stage already applied it, so it is the ``original_label``
    this refinement started from and would otherwise be undone. The existing file is read with
    the split stage's checks (:func:`stages.split.read_overrides`). The file is written
    atomically, sorted by id, schema ``id: string, label: string``.

    Returns:
        ``{"new": refined labels from this database, "kept": older overrides kept,
        "rows": rows written}``.

    Raises:
        FileNotFoundError: when ``db_path`` does not exist.
    """
    db_path = Path(db_path)
    if not db_path.exists():
        raise FileNotFoundError(f"{db_path} not found: run `dvc repro refine_labels` first")
    db = sqlite_utils.Database(db_path)
    try:
        new = store.changed_labels(db)
    finally:
        db.close()
    merged = dict(zip(new["id"].to_pylist(), new["label"].to_pylist()))
    kept = 0
    if Path(overrides_path).exists():
        old = read_overrides(overrides_path)
        for i, lab in zip(old["id"].to_pylist(), old["label"].to_pylist()):
            if i not in merged:
                merged[i] = lab
                kept += 1
    ids = sorted(merged)
    table = pa.table({"id": pa.array(ids, pa.string()), "label": pa.array([merged[i] for i in ids], pa.string())},
                     schema=OVERRIDES_SCHEMA)
    with atomic_path(overrides_path) as tmp:
        pq.write_table(table, tmp)
    return {"new": new.num_rows, "kept": kept, "rows": table.num_rows}


def write_empty_overrides(path: str | Path = OVERRIDES_PATH) -> Path:
    """Create an empty override file (schema ``id: string, label: string``), atomically."""
    with atomic_path(path) as tmp:
        pq.write_table(OVERRIDES_SCHEMA.empty_table(), tmp)
    return Path(path)


# ------------------------------------------------------------------ stage entry points

def run_stage(p: dict[str, Any], domain_names: Sequence[str], *, split_root: Path = SPLIT_ROOT,
              labels_path: Path | None = LABELS_PATH, model_dir: Path = MODEL_DIR, out_dir: Path = OUT_DIR,
              history_path: Path = HISTORY_CSV, metrics_root: Path = Path("metrics")) -> dict[str, Any]:
    """The whole stage: load the table (texts from ``split_root``, labels from the split stage's
    label table ``labels_path``; ``None`` = the document files' own labels), build the members,
    refine, write the review queue, metrics and MLflow runs, on at most ``refine.threads``
    compute threads (:func:`stages.ensemble.limit_threads`). Returns the metrics dict."""
    with ens.limit_threads(p.get("threads")):
        return _run_stage(p, domain_names, split_root=Path(split_root),
                          labels_path=Path(labels_path) if labels_path is not None else None,
                          model_dir=Path(model_dir), out_dir=Path(out_dir), history_path=Path(history_path),
                          metrics_root=Path(metrics_root))


def _run_stage(p: dict[str, Any], domain_names: Sequence[str], *, split_root: Path, labels_path: Path | None,
               model_dir: Path, out_dir: Path, history_path: Path, metrics_root: Path) -> dict[str, Any]:
    from stages.tracking import stage_run

    wall0 = time.perf_counter()
    cfg = RefineConfig.from_params(p)
    db_path, snapshot_dir, queue_path = out_dir / "sentences.db", out_dir / "snapshots", out_dir / "review_queue.jsonl"
    if snapshot_dir.exists():
        shutil.rmtree(snapshot_dir)  # snapshots of an older, longer run must not linger

    t0 = time.perf_counter()
    report = store.LoadReport()
    label_of = store.label_map(labels_path) if labels_path is not None else None
    rows = store.iter_split_rows(store.split_files(split_root, domain_names), int(p["chunksize"]), report, label_of)
    store.create_store(db_path, rows, chunksize=int(p["chunksize"]))
    load_s = time.perf_counter() - t0

    db = sqlite_utils.Database(db_path)
    try:
        labels = store.read_labels(db)
        classes = sorted(set(labels.original))
        texts = [t[: int(p["max_chars"])] for t in labels.texts]
        tokenizer, lm = load_lm(model_dir)
        members, lexical, feature_secs = build_members(texts, p, tokenizer, lm)
        del lm
        ens.free_memory()

        with stage_run("refine_labels", p) as mlflow:
            def log_iteration(t: int, row: dict[str, float]) -> None:
                with stage_run("refine_labels", nested=True, run_name=f"iteration_{t}") as child:
                    child.log_metrics({k: float(v) for k, v in row.items() if not _isnan(v)}, step=t)
                mlflow.log_metrics({"rows_changed": float(row["rows_changed"]),
                                    "val_accuracy_ensemble": float(row["val_accuracy_ensemble"])}, step=t)

            t0 = time.perf_counter()
            result = refine(db, members, lexical, cfg, splits=labels.splits, classes=classes,
                            snapshot_dir=snapshot_dir, history_path=history_path, on_iteration=log_iteration)
            refine_s = time.perf_counter() - t0
            last = result.iterations[-1]
            queue = review_queue(db, last.ensemble.proba, classes, int(p["review_size"]))
            write_records(queue_path, queue)
            final = store.read_labels(db)
            n = len(final.ids)
            n_changed = int((final.current != final.original).sum())
            conf = np.array([r[0] for r in db.execute(f"SELECT confidence FROM {store.TABLE}").fetchall()], dtype=float)
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
            mlflow.log_metrics({"labels_changed": n_changed, "label_change_rate": n_changed / n,
                                "iterations": len(result.iterations), "wall_s": metrics["wall_s"]})
            mlflow.log_artifact(str(snapshot_dir / f"iter_{len(result.iterations) - 1}.parquet"), "refine")
            mlflow.log_artifact(str(queue_path), "refine")
    finally:
        db.close()
    write_metrics("refine", metrics, root=metrics_root)
    return metrics


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m stages.refine_labels`` runs the stage; ``... promote`` writes the overrides."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m stages.refine_labels", description=__doc__)
    parser.add_argument("command", nargs="?", choices=["run", "promote"], default="run",
                        help="run: the DVC stage (default); promote: write refined labels to "
                             f"{OVERRIDES_PATH} for the split stage")
    args = parser.parse_args(argv)
    if args.command == "promote":
        counts = promote(DB_PATH, OVERRIDES_PATH)
        log.info("wrote %d overrides to %s (%d refined labels, %d older overrides kept); "
                 "run `dvc add %s` and `dvc repro`", counts["rows"], OVERRIDES_PATH, counts["new"],
                 counts["kept"], OVERRIDES_PATH)
        return
    metrics = run_stage(section("refine"), param_domains())
    log.info("refine_labels: %d of %d labels changed in %d iterations, %.1fs", metrics["labels_changed"],
             metrics["rows"], metrics["iterations"], metrics["wall_s"])


if __name__ == "__main__":
    main()
