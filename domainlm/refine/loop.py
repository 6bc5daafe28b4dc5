"""The self-training loop of label refinement: iterate cross-fitted ensemble rounds, relabel the
rows the ensemble confidently disagrees with, stop when the label change rate falls below epsilon.

Candidates follow confident learning (Northcutt et al., JAIR 2021): out-of-fold probabilities
(:mod:`domainlm.refine.ensemble`), a rising confidence threshold and a self-confidence bound (cleanlab's
label quality score). Labels live in the SQLite ``sentences`` table (:mod:`domainlm.refine.store`); the
loop also writes the review queue of least confident rows and promotes refined labels to the label
overrides (:mod:`domainlm.documents.labels`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import sqlite_utils

from domainlm.common.atomic import atomic_path, write_text
from domainlm.common.compute import available_cores
from domainlm.common.paths import OVERRIDES_PATH
from domainlm.documents.labels import OVERRIDES_SCHEMA, read_overrides
from domainlm.refine import ensemble as ens
from domainlm.refine import members as mem
from domainlm.refine import store

log = logging.getLogger(__name__)


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


def select_changes(
    y: np.ndarray, proba: np.ndarray, tau: float, max_change_fraction: float, max_self_confidence: float = 1.0
) -> np.ndarray:
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

#: Sub-sections of ``refine`` and the member settings they hold.
_MEMBER_SECTIONS = {
    "lexical": mem.LexicalConfig,
    "tfidf": mem.TfidfConfig,
    "lstm": mem.LSTMConfig,
    "transformer": mem.TransformerConfig,
}


@dataclass
class RefineConfig:
    """The ``refine`` section of params.yaml.

    The loop (:func:`refine`): ``folds`` (k of the cross-fitting), ``seed`` (iteration t uses
    ``seed + t``), ``max_iterations``, ``epsilon`` (stop once the label change rate is below it),
    ``tau0``/``tau_step``/``tau_max`` (:func:`threshold`), ``max_change_fraction`` and
    ``max_self_confidence`` (:func:`select_changes`), ``top_k_features`` (per class, for
    :func:`feature_change_rate`), ``combiner`` (``soft_vote`` or ``stack``) and ``stack_C``
    (:func:`domainlm.refine.ensemble.cross_fit_ensemble`).

    The stage around it: ``chunksize`` (rows per sqlite-utils insert batch and per Parquet record
    batch), ``threads`` (compute threads, torch + BLAS; ``None`` = leave as is), ``workers`` (processes that
    cross-fit the members' folds side by side, each on ``threads`` threads; ``None`` = every core), ``max_chars``
    (documents are cut to this many characters for every member), ``review_size`` (rows in the
    review queue), and the members' settings ``lexical``, ``tfidf``, ``lstm``, ``transformer``
    (:class:`domainlm.refine.members.LexicalConfig` and its siblings).
    """

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
    combiner: str = "soft_vote"
    stack_C: float = 1.0
    chunksize: int = 500
    threads: int | None = None
    workers: int | None = 1
    max_chars: int = 4000
    review_size: int = 200
    lexical: mem.LexicalConfig = field(default_factory=mem.LexicalConfig)
    tfidf: mem.TfidfConfig = field(default_factory=mem.TfidfConfig)
    lstm: mem.LSTMConfig = field(default_factory=mem.LSTMConfig)
    transformer: mem.TransformerConfig = field(default_factory=mem.TransformerConfig)

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> RefineConfig:
        """Pick this dataclass's fields out of the ``refine`` params: each present key cast to its
        default's type (``threads`` and ``workers`` may be null), sub-sections through their own ``from_params``;
        missing keys keep their default, other keys are ignored."""
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in p:
                continue
            value = p[f.name]
            if f.name in _MEMBER_SECTIONS:
                kw[f.name] = _MEMBER_SECTIONS[f.name].from_params(value)
            elif f.name in ("threads", "workers"):
                kw[f.name] = None if value is None else int(value)
            else:
                kw[f.name] = type(f.default)(value)
        return cls(**kw)


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
    """Column order of the history CSV (``plots/refine_history.csv`` in the pipeline) for these members."""
    return (
        HISTORY_FIELDS_HEAD
        + [f"val_accuracy_{m}" for m in member_names]
        + ["val_accuracy_ensemble", "lexical_feature_change_rate"]
    )


def write_history(path: str | Path, rows: list[dict[str, float]], fields: list[str]) -> None:
    """Write the history CSV (header + one row per iteration so far) atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    write_text(path, buf.getvalue())


def refine(
    db: sqlite_utils.Database,
    members: Sequence[mem.Member],
    lexical: mem.LexicalNB | None,
    cfg: RefineConfig,
    *,
    splits: np.ndarray,
    classes: Sequence[str],
    snapshot_dir: str | Path,
    history_path: str | Path,
    on_iteration: Callable[[int, dict[str, float]], None] | None = None,
) -> RefineResult:
    """Run refinement iterations on the ``sentences`` table until convergence or the cap.

    Iteration t: read the current labels; cross-fit every member with ``cfg.folds`` folds
    (:func:`domainlm.refine.ensemble.cross_fit_ensemble`); pick changes with :func:`select_changes` at
    ``τ_t`` (:func:`threshold`); write labels and confidences in one transaction
    (:func:`domainlm.refine.store.apply_updates`; a row's confidence is the ensemble probability of
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
    workers = cfg.workers if cfg.workers is not None else available_cores()
    for t in range(cfg.max_iterations):
        t0 = time.perf_counter()
        ids, current = store.read_current(db)
        unknown = sorted(set(current) - set(index))
        if unknown:
            raise ValueError(f"labels {unknown} are not in the label space {classes}")
        y = np.array([index[c] for c in current], dtype=np.int64)
        round_ = ens.cross_fit_ensemble(
            members,
            y,
            len(classes),
            folds=cfg.folds,
            seed=cfg.seed + t,
            combiner=cfg.combiner,
            stack_C=cfg.stack_C,
            workers=workers,
            threads=cfg.threads,
        )
        tau = threshold(t, cfg.tau0, cfg.tau_step, cfg.tau_max)
        new = select_changes(y, round_.proba, tau, cfg.max_change_fraction, cfg.max_self_confidence)
        conf = round_.proba[np.arange(len(y)), new]
        changed = new != y
        updates = (
            store.RowUpdate(ids[i], float(conf[i]), classes[new[i]] if changed[i] else None) for i in range(len(y))
        )
        n_changed = store.apply_updates(db, updates, t)
        store.write_snapshot(db, snapshot_dir / f"iter_{t}.parquet")

        if lexical is not None and n_changed:
            k = cfg.top_k_features
            fcr = feature_change_rate(
                lexical.top_features(y, len(classes), k), lexical.top_features(new, len(classes), k)
            )
        else:
            fcr = 0.0 if lexical is not None else float("nan")
        row: dict[str, float] = {
            "iteration": t,
            "tau": round(tau, 6),
            "rows_changed": n_changed,
            "label_change_rate": n_changed / len(y),
        }
        for name, oof in round_.members.items():
            row[f"val_accuracy_{name}"] = _accuracy(oof.proba, y, val)
        row["val_accuracy_ensemble"] = _accuracy(round_.proba, y, val)
        row["lexical_feature_change_rate"] = fcr
        rows.append(row)
        write_history(history_path, rows, fields)
        result.iterations.append(Iteration(row, round_, new))
        log.info(
            "iteration %d: tau %.2f, %d labels changed (%.4f), ensemble val accuracy %.4f, %.1fs",
            t,
            tau,
            n_changed,
            row["label_change_rate"],
            row["val_accuracy_ensemble"],
            time.perf_counter() - t0,
        )
        if on_iteration is not None:
            on_iteration(t, row)
        if row["label_change_rate"] < cfg.epsilon:
            result.converged = True
            break
    return result


def _accuracy(proba: np.ndarray, y: np.ndarray, mask: np.ndarray) -> float:
    """Share of the ``mask`` rows whose ``argmax proba`` equals ``y`` (NaN when no row is masked)."""
    return float((proba[mask].argmax(1) == y[mask]).mean()) if mask.any() else float("nan")


# ------------------------------------------------------------------ review queue and promotion


def review_queue(
    db: sqlite_utils.Database, proba: np.ndarray, classes: Sequence[str], size: int, top: int = 3
) -> list[dict[str, Any]]:
    """The ``size`` rows with the lowest confidence in their current label, lowest first.

    Each record: id, domain, split, original_label, current_label, confidence, the ensemble's
    ``suggestions`` (its ``top`` labels with probabilities, from the last iteration's out-of-fold
    ``proba``, rows in load order) and the text, for a person or an LLM to relabel.
    """
    rows = db.execute(
        f"SELECT rowid, id, domain, split, original_label, current_label, confidence, text "
        f"FROM {store.TABLE} ORDER BY confidence ASC, rowid ASC LIMIT ?",
        [size],
    ).fetchall()
    rowids = [r[0] for r in db.execute(f"SELECT rowid FROM {store.TABLE} ORDER BY rowid").fetchall()]
    position = {rid: i for i, rid in enumerate(rowids)}
    out = []
    for rowid, id_, domain, split, orig, cur, conf, text in rows:
        p = proba[position[rowid]]
        best = np.argsort(-p, kind="stable")[:top]
        out.append(
            {
                "id": id_,
                "domain": domain,
                "split": split,
                "original_label": orig,
                "current_label": cur,
                "confidence": conf,
                "suggestions": [{"label": classes[j], "probability": round(float(p[j]), 6)} for j in best],
                "text": text,
            }
        )
    return out


#: Seconds a promote waits for another one holding the overrides lock before it gives up.
PROMOTE_LOCK_TIMEOUT_S = 600.0


def promote_lock_path(overrides_path: str | Path) -> Path:
    """The lock file of ``overrides_path``: ``<overrides_path>.lock`` beside it (git-ignored)."""
    overrides_path = Path(overrides_path)
    return overrides_path.with_name(overrides_path.name + ".lock")


def promote(
    db_path: str | Path, overrides_path: str | Path = OVERRIDES_PATH, *, lock_timeout_s: float = PROMOTE_LOCK_TIMEOUT_S
) -> dict[str, int]:
    """Write the refined labels to the label-override file the split stage applies.

    Rows whose ``current_label`` differs from ``original_label`` become ``(id, label)``
    overrides. They are merged into the existing file: an older override whose id has no new
    one is kept, because the split stage already applied it, so it is the ``original_label``
    this refinement started from and would otherwise be undone. The existing file is read with
    the split stage's checks (:func:`domainlm.documents.labels.read_overrides`). The file is written
    atomically, sorted by id, schema ``id: string, label: string``.

    Returns:
        ``{"new": refined labels from this database, "kept": older overrides kept,
        "rows": rows written}``.

    The read-merge-write holds an exclusive lock on :func:`promote_lock_path` (``filelock.FileLock``, an
    ``fcntl.flock`` that the kernel releases when the holder dies, even by SIGKILL), so two promotes at once
    run one after the other: the second reads what the first wrote and never interleaves with it.

    Raises:
        FileNotFoundError: when ``db_path`` does not exist.
        TimeoutError: another promote held the lock for more than ``lock_timeout_s`` seconds.
    """
    from filelock import FileLock, Timeout

    db_path = Path(db_path)
    if not db_path.exists():
        raise FileNotFoundError(f"{db_path} not found: run `dvc repro refine_labels` first")
    lock_path = promote_lock_path(overrides_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another promote holds %s; waiting up to %.0f s", lock_path, lock_timeout_s)
        try:
            lock.acquire(timeout=lock_timeout_s)
        except Timeout:
            raise TimeoutError(
                f"another promote has held {lock_path} for over {lock_timeout_s:.0f} s; "
                "check that no promote is running and try again"
            ) from None
    try:
        return _promote_locked(db_path, Path(overrides_path))
    finally:
        lock.release()


def _promote_locked(db_path: Path, overrides_path: Path) -> dict[str, int]:
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
    table = pa.table(
        {"id": pa.array(ids, pa.string()), "label": pa.array([merged[i] for i in ids], pa.string())},
        schema=OVERRIDES_SCHEMA,
    )
    with atomic_path(overrides_path) as tmp:
        pq.write_table(table, tmp)
    return {"new": new.num_rows, "kept": kept, "rows": table.num_rows}
