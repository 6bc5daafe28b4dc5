"""Split each domain's documents into train/val/test, stratified by label, then apply label overrides.

Two outputs: the documents (``data/split/<domain>/<split>.parquet``, text with the label it was
ingested with) and the label table (``data/labels/split_labels.parquet``: id, domain, split,
source_label, label), where label overrides (refined labels from ``refine_labels promote``) are
applied. Membership is decided on the documents' own labels, so an override changes a document's
label but never its split, and never the document files: the language-model stages, which read
only the text, stay up to date across refinement rounds, and ``dvc metrics diff HEAD~1`` compares
like with like.

Stratified hold-out with scikit-learn's ``train_test_split(stratify=...)``; rare labels and
unstratifiable domains are handled explicitly (see :func:`split_indices`).
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sklearn.model_selection import train_test_split

from stages.atomic import atomic_path
from stages.metrics import peak_rss_mb, write_metrics
from stages.params import domains as param_domains
from stages.params import section
from stages.parquet import SCHEMA_FILE, SchemaMismatchError, read_docs, read_layout, schema_text, write_docs

log = logging.getLogger(__name__)

IN_DIR = Path("data/parquet")
OUT_DIR = Path("data/split")
OVERRIDES_PATH = Path("data/labels/overrides.parquet")
LABELS_PATH = Path("data/labels/split_labels.parquet")
SPLITS = ("train", "val", "test")
#: Metrics key for documents whose label is null.
NULL_LABEL_KEY = "_null"

OVERRIDES_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("label", pa.string())])
#: The label table: one row per document, in document-file order (domains, then train/val/test).
#: ``source_label`` is the label the document was ingested with, ``label`` the one after overrides.
LABELS_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("domain", pa.string()),
                           pa.field("split", pa.string()), pa.field("source_label", pa.string()),
                           pa.field("label", pa.string())])


class DomainTooSmallError(ValueError):
    """A domain has too few documents to give train, val and test at least one each."""


@dataclass
class SplitResult:
    """Row indices of one domain's splits (each sorted ascending, disjoint, covering all rows).

    Attributes:
        indices: split name -> int64 array of row indices into the domain table.
        stratified: per hold-out step (``"test"``, ``"val"``): True when the step was stratified
            by label, False when it fell back to an unstratified (seeded) shuffle split.
        rare_to_train: number of documents kept in train because their label had a single
            document in a step's pool (scikit-learn cannot stratify a one-member class).
    """

    indices: dict[str, np.ndarray]
    stratified: dict[str, bool] = field(default_factory=dict)
    rare_to_train: int = 0


def duplicate_id(ids: pa.ChunkedArray | pa.Array) -> str | None:
    """The first id (in ``pyarrow.compute.value_counts`` order) that occurs more than once, or None."""
    if pc.count_distinct(ids).as_py() == len(ids):
        return None
    return next(v["values"] for v in pc.value_counts(ids).to_pylist() if v["counts"] > 1)


def read_overrides(path: str | os.PathLike) -> pa.Table:
    """Read a label-override table (``id: string``, ``label: string``), checking it.

    Returns:
        ``pa.Table`` with exactly the columns ``id`` and ``label`` (strings).

    Raises:
        ValueError: naming ``path`` when a column is missing or not a string, an id or label is
            null, or an id appears twice (an override must be unambiguous).
    """
    schema = pq.read_schema(path)
    for f in OVERRIDES_SCHEMA:
        if f.name not in schema.names:
            raise ValueError(f"{path}: label overrides need a column {f.name!r}")
        if not schema.field(f.name).type.equals(pa.string()):
            raise ValueError(f"{path}: column {f.name!r} is {schema.field(f.name).type}, expected string")
    table = pq.read_table(path, columns=["id", "label"])
    for name in ("id", "label"):
        if table[name].null_count:
            i = pc.index(pc.is_null(table[name]), True).as_py()
            raise ValueError(f"{path}: row {i} has a null {name!r}")
    dup = duplicate_id(table["id"])
    if dup is not None:
        raise ValueError(f"{path}: id {dup!r} has more than one override")
    return table


def apply_overrides(table: pa.Table, overrides: pa.Table) -> tuple[pa.Table, int, int]:
    """Replace the ``label`` of every document whose ``id`` has an override.

    Args:
        table: documents (:data:`stages.parquet.DOC_SCHEMA`).
        overrides: ``id: string``, ``label: string`` (unique ids; see :func:`read_overrides`).

    Returns:
        ``(table, n_applied, n_unknown)``: the table with the new labels (same schema, same row
        order), how many of its documents got an override (even one equal to the old label), and
        how many override ids match no document in ``table``.
    """
    overrides = overrides.select(["id", "label"]).cast(OVERRIDES_SCHEMA)
    pos = pc.index_in(table["id"], value_set=overrides["id"])  # row of the override, or null
    has_override = pc.is_valid(pos)
    new_label = pc.if_else(has_override, pc.take(overrides["label"], pos), table["label"])
    n_applied = pc.sum(has_override.cast(pa.int64())).as_py() or 0
    matched = pc.is_in(overrides["id"], value_set=table["id"])
    n_unknown = overrides.num_rows - (pc.sum(matched.cast(pa.int64())).as_py() or 0)
    label_idx = table.schema.get_field_index("label")
    out = table.set_column(label_idx, table.schema.field("label"), new_label.cast(pa.string()))
    return out, n_applied, n_unknown


def write_label_table(path: str | os.PathLike, table: pa.Table) -> Path:
    """Write the label table (:data:`LABELS_SCHEMA`) to ``path`` atomically (zstd Parquet)."""
    with atomic_path(path) as tmp:
        pq.write_table(table.cast(LABELS_SCHEMA), tmp, compression="zstd")
    return Path(path)


def read_label_table(path: str | os.PathLike) -> pa.Table:
    """Read the label table the split stage wrote (:data:`LABELS_SCHEMA`).

    Raises:
        FileNotFoundError: when ``path`` does not exist (run the split stage first).
        ValueError: naming ``path`` when a column of :data:`LABELS_SCHEMA` is missing or an id
            appears twice.
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"label table {path} is missing: run the split stage first")
    names = pq.read_schema(path).names
    missing = [f.name for f in LABELS_SCHEMA if f.name not in names]
    if missing:
        raise ValueError(f"{path}: the label table needs column(s) {missing}")
    table = pq.read_table(path, columns=LABELS_SCHEMA.names).cast(LABELS_SCHEMA)
    dup = duplicate_id(table["id"])
    if dup is not None:
        raise ValueError(f"{path}: id {dup!r} appears more than once")
    return table


def split_sizes(n: int, val_size: float, test_size: float, domain: str) -> tuple[int, int, int]:
    """Document counts ``(train, val, test)`` for a domain of ``n`` documents.

    Held-out counts round up (as scikit-learn's ``train_test_split`` does for fractions), so
    val and test get at least one document each; train gets the rest.

    Raises:
        ValueError: when a fraction is not in (0, 1) or they sum to 1 or more.
        DomainTooSmallError: naming ``domain`` when train would be empty.
    """
    for name, frac in (("val_size", val_size), ("test_size", test_size)):
        if not 0 < frac < 1:
            raise ValueError(f"split.{name} must be in (0, 1), got {frac!r}")
    if val_size + test_size >= 1:
        raise ValueError(f"split.val_size + split.test_size must be < 1, got {val_size + test_size!r}")
    # round() first: 0.07 * 100 is 7.000000000000001 in binary floating point, which must give 7.
    n_test = math.ceil(round(test_size * n, 9))
    n_val = math.ceil(round(val_size * n, 9))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise DomainTooSmallError(
            f"domain {domain!r} has {n} document(s): too few to give train, val and test at least one each "
            f"(val_size={val_size} -> {n_val}, test_size={test_size} -> {n_test}, train -> {n_train})"
        )
    return n_train, n_val, n_test


def _label_codes(labels: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """int64 stratum per document: dictionary index of the label, -1 for a null label."""
    enc = pc.dictionary_encode(labels)
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    return pc.fill_null(enc.indices.cast(pa.int64()), -1).to_numpy(zero_copy_only=False)


def _hold_out(idx: np.ndarray, strata: np.ndarray, n_out: int, seed: int
              ) -> tuple[np.ndarray, np.ndarray, bool, np.ndarray]:
    """Split ``idx`` into (kept, held_out) with ``len(held_out) == n_out``.

    Stratified when possible; returns (kept, held_out, stratified, rare rows forced into kept).
    """
    classes, counts = np.unique(strata[idx], return_counts=True)
    rare_classes = classes[counts < 2]
    rare = np.isin(strata[idx], rare_classes)
    pool = idx[~rare]
    n_classes = int((counts >= 2).sum())
    if n_classes and n_out >= n_classes and len(pool) - n_out >= n_classes:
        kept, out = train_test_split(pool, test_size=n_out, stratify=strata[pool], random_state=seed, shuffle=True)
        return np.concatenate([kept, idx[rare]]), out, True, idx[rare]
    kept, out = train_test_split(idx, test_size=n_out, random_state=seed, shuffle=True)
    return kept, out, False, idx[:0]


def split_indices(labels: pa.ChunkedArray | pa.Array, domain: str, *, seed: int, val_size: float,
                  test_size: float) -> SplitResult:
    """Stratified train/val/test split of one domain's rows (scikit-learn ``train_test_split``).

    Two seeded hold-out steps: test (``ceil(test_size * n)`` docs) from all rows, then val
    (``ceil(val_size * n)`` docs) from the rest; sizes are fractions of the whole domain. Each
    step stratifies by label, a null label being a stratum of its own. Classes too small to
    stratify are handled explicitly, never by crashing:

    * a label with a single document in a step's pool cannot be stratified (scikit-learn needs
      two per class), so that document stays in train (counted in ``rare_to_train``);
    * if the held-out count, or what is left for train, is smaller than the number of labels
      (so not every label can be represented), that step falls back to an unstratified seeded
      shuffle split of the whole pool (``stratified[step] = False``, logged as a warning).

    Args:
        labels: one label (string or null) per row, length ``n``.
        domain: domain name, for errors and warnings.
        seed: ``random_state`` of both steps; the result is a pure function of the inputs.
        val_size, test_size: fractions of ``n`` in (0, 1), summing to less than 1.

    Returns:
        A :class:`SplitResult`; index arrays are sorted, disjoint and cover ``range(n)``.

    Raises:
        DomainTooSmallError: naming ``domain`` when ``n`` is too small for three non-empty splits.
    """
    n = len(labels)
    _, n_val, n_test = split_sizes(n, val_size, test_size, domain)
    strata = _label_codes(labels)
    rest, test, strat_test, rare_a = _hold_out(np.arange(n), strata, n_test, seed)
    train, val, strat_val, rare_b = _hold_out(np.sort(rest), strata, n_val, seed)
    result = SplitResult(
        indices={"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)},
        stratified={"test": strat_test, "val": strat_val},
        rare_to_train=len(np.union1d(rare_a, rare_b)),
    )
    for step, ok in result.stratified.items():
        if not ok:
            log.warning("split %s: %s hold-out not stratified (more labels than held-out or train docs)",
                        domain, step)
    return result


def label_counts(labels: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    """``{label: docs}`` sorted by label; null labels under :data:`NULL_LABEL_KEY`."""
    counts = Counter(NULL_LABEL_KEY if v is None else v for v in labels.to_pylist())
    return dict(sorted(counts.items()))


def split_domain(table: pa.Table, domain: str, *, seed: int, val_size: float, test_size: float
                 ) -> tuple[dict[str, pa.Table], SplitResult]:
    """Split one domain's document table into ``{"train", "val", "test"}`` tables (same schema).

    Raises:
        ValueError: naming ``domain`` and the id when an id occurs twice (splits could not be disjoint).
        DomainTooSmallError: see :func:`split_indices`.
    """
    dup = duplicate_id(table["id"])
    if dup is not None:
        raise ValueError(f"domain {domain!r}: id {dup!r} occurs more than once")
    result = split_indices(table["label"], domain, seed=seed, val_size=val_size, test_size=test_size)
    return {name: table.take(pa.array(result.indices[name])) for name in SPLITS}, result


def run(in_dir: str | os.PathLike, out_dir: str | os.PathLike, domains: list[str], *, seed: int,
        val_size: float, test_size: float, overrides_path: str | os.PathLike | None = OVERRIDES_PATH,
        labels_path: str | os.PathLike | None = None) -> dict:
    """Split ``<in_dir>/<domain>.parquet`` for every domain into ``<out_dir>/<domain>/{train,val,test}.parquet``
    and write the label table to ``labels_path``.

    ``out_dir`` is replaced as a whole, atomically, and so is ``labels_path``. Each document file
    keeps the input's per-column codecs and row-group size and the documents' own labels. When
    ``overrides_path`` exists its labels replace the documents' labels in the label table
    (:func:`apply_overrides`, :data:`LABELS_SCHEMA`), after the split: overrides move no document
    between splits and leave the document files byte for byte as they were. Label counts and
    shares in the metrics are those after the overrides. ``labels_path=None`` (the default; the
    DVC stage passes :data:`LABELS_PATH`) writes no label table.

    Returns:
        Metrics: ``{"domains": {d: {"docs", "overrides_applied", "rare_to_train",
        "stratified": {"test", "val"} (0/1), "<split>": {"docs", "share", "labels": {label: docs},
        "label_share": {label: fraction}}}}, "overrides": {"rows", "applied", "unknown_ids"},
        "total": {"<split>": docs}, "wall_s", "peak_rss_mb"}``.

    Raises:
        ValueError: when ``domains`` is empty.
        FileNotFoundError: naming a domain whose Parquet file is missing.
        SchemaMismatchError: when an input file (or ``schema.txt``) does not match the document schema.
        DomainTooSmallError: naming a domain too small to split.
    """
    t0 = time.perf_counter()
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not domains:
        raise ValueError("params.yaml `domains` is empty: nothing to split")
    missing = [d for d in domains if not (in_dir / f"{d}.parquet").exists()]
    if missing:
        raise FileNotFoundError(f"domain(s) {missing} listed in params.yaml have no {in_dir}/<domain>.parquet")
    _check_schema_file(in_dir / SCHEMA_FILE)

    overrides = read_overrides(overrides_path) if overrides_path and Path(overrides_path).exists() else None
    found = np.zeros(overrides.num_rows if overrides is not None else 0, dtype=bool)
    metrics: dict = {"domains": {}}
    label_parts: list[pa.Table] = []
    with atomic_path(out_dir, is_dir=True) as tmp_dir:
        for domain in domains:
            path = in_dir / f"{domain}.parquet"
            table = read_docs(path)
            parts, result = split_domain(table, domain, seed=seed, val_size=val_size, test_size=test_size)
            layout = read_layout(path)
            applied = 0
            relabelled: dict[str, pa.Table] = {}
            for name in SPLITS:
                write_docs(tmp_dir / domain / f"{name}.parquet", parts[name], layout)
                relabelled[name], n_applied, _ = (apply_overrides(parts[name], overrides) if overrides is not None
                                                  else (parts[name], 0, 0))
                applied += n_applied
                n = parts[name].num_rows
                label_parts.append(pa.table([parts[name]["id"], pa.array([domain] * n, pa.string()),
                                             pa.array([name] * n, pa.string()), parts[name]["label"],
                                             relabelled[name]["label"]], schema=LABELS_SCHEMA))
            if overrides is not None:
                found |= pc.is_in(overrides["id"], value_set=table["id"]).to_numpy(zero_copy_only=False)
            dm: dict = {
                "docs": table.num_rows,
                "overrides_applied": applied,
                "rare_to_train": result.rare_to_train,
                "stratified": {k: int(v) for k, v in result.stratified.items()},
            }
            for name, part in relabelled.items():
                labels = label_counts(part["label"])
                dm[name] = {
                    "docs": part.num_rows,
                    "share": round(part.num_rows / table.num_rows, 4),
                    "labels": labels,
                    "label_share": {k: round(v / part.num_rows, 4) for k, v in labels.items()},
                }
            metrics["domains"][domain] = dm
            log.info("split %s: %s", domain, {s: dm[s]["docs"] for s in SPLITS})
        if labels_path is not None:
            write_label_table(labels_path, pa.concat_tables(label_parts) if label_parts
                              else LABELS_SCHEMA.empty_table())
    metrics["overrides"] = {
        "rows": int(len(found)),
        "applied": sum(d["overrides_applied"] for d in metrics["domains"].values()),
        "unknown_ids": int((~found).sum()),
    }
    metrics["total"] = {s: sum(d[s]["docs"] for d in metrics["domains"].values()) for s in SPLITS}
    metrics["wall_s"] = round(time.perf_counter() - t0, 3)
    metrics["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return metrics


def _check_schema_file(path: Path) -> None:
    """The ``schema.txt`` the parquet stage wrote must match this code's document schema."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: re-run the parquet stage")
    if path.read_text(encoding="utf-8") != schema_text():
        raise SchemaMismatchError(
            f"{path} differs from stages.parquet.DOC_SCHEMA: the Parquet files were written by another "
            "schema version; re-run the parquet stage"
        )


def main() -> None:
    """DVC entry point: params ``domains`` + ``split`` -> data/split/, data/labels/split_labels.parquet,
    metrics/split.json."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = section("split")
    metrics = run(IN_DIR, OUT_DIR, param_domains(), seed=int(p["seed"]), val_size=float(p["val_size"]),
                  test_size=float(p["test_size"]), labels_path=LABELS_PATH)
    write_metrics("split", metrics)


if __name__ == "__main__":
    main()
