"""split: split each domain's documents into train/val/test, sticky to the LM release, then apply label overrides.

Two outputs: the documents (``data/split/<domain>/<split>.parquet``, text with the label it was ingested
with) and the label table (``data/labels/split_labels.parquet``), where label overrides (refined labels
from ``refine_labels promote``) are applied. A domain the LM release (``data/release/split_labels.parquet``)
does not cover, or every domain before a release is cut, gets a stratified hold-out split with scikit-learn's
``train_test_split(stratify=...)``. A domain the release covers keeps each released document's split and
assigns each new document by a hash of ``(seed, id)``, so a document never changes split once assigned
(:mod:`domainlm.documents.splitting`). Membership is decided on the documents' own labels, so an override
changes a label but never a split, nor the document files.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from domainlm.common import params as P
from domainlm.common import paths
from domainlm.common.atomic import atomic_path
from domainlm.common.metrics import peak_rss_mb
from domainlm.common.stage import parse_stage_args, stage_run
from domainlm.documents.labels import LABELS_SCHEMA, apply_overrides, read_overrides, write_label_table
from domainlm.documents.schema import SCHEMA_FILE, check_schema_file, read_docs, read_layout
from domainlm.documents.splitting import (
    read_release_splits,
    split_codes,
    split_domain,
    split_metrics,
    write_split_files,
)

log = logging.getLogger("stages.split")  # the logger stage_run("split") configures


def run(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    domains: Sequence[str],
    *,
    seed: int,
    val_size: float,
    test_size: float,
    overrides_path: str | os.PathLike | None = paths.OVERRIDES_PATH,
    labels_path: str | os.PathLike | None = None,
    release_labels_path: str | os.PathLike | None = None,
) -> dict:
    """Split ``<in_dir>/<domain>.parquet`` for every domain into ``<out_dir>/<domain>/{train,val,test}.parquet``
    and write the label table to ``labels_path``.

    ``out_dir`` is replaced as a whole, atomically, and so is ``labels_path``. Each document file
    keeps the input's per-column codecs and row-group size and the documents' own labels. Memory: the
    split is decided on each domain's ids and labels; the documents are streamed one row group at a time
    into the split files (:func:`~domainlm.documents.splitting.write_split_files`). When
    ``overrides_path`` exists its labels replace the documents' labels in the label table
    (:func:`~domainlm.documents.labels.apply_overrides`, :data:`~domainlm.documents.labels.LABELS_SCHEMA`),
    after the split: overrides move no document between splits and leave the document files byte for
    byte as they were. Label counts and shares in the metrics are those after the overrides.
    ``labels_path=None`` (the default; the DVC stage passes ``paths.LABELS_PATH``) writes no label table.

    Sticky split: when ``release_labels_path`` exists (the LM release's copy of the label table; only its
    ``id``, ``domain`` and ``split`` columns are read), every domain of which the release records at least
    one document is split by :func:`~domainlm.documents.splitting.sticky_split_indices`: a document in the
    release keeps its recorded split, a new one (or one the release records under another domain) is
    assigned by the hash rule of :func:`~domainlm.documents.splitting.hash_split_codes`, and release
    documents no longer present are dropped and counted. A domain the release does not cover, or any domain
    when the file is missing or ``release_labels_path`` is ``None``, gets the stratified split, byte for
    byte what a run without a release writes.

    Args:
        in_dir: the parquet stage's folder (``<domain>.parquet`` and ``schema.txt``).
        out_dir: the folder to write.
        domains: domain names, in output order.
        seed: ``random_state`` of both hold-out steps.
        val_size, test_size: fractions of each domain in (0, 1), summing to less than 1.
        overrides_path: label overrides (``id``, ``label``); ``None`` or a missing file applies none.
        labels_path: where to write the label table, or ``None``.
        release_labels_path: the LM release's label table (``paths.RELEASE_LABELS_PATH`` in the DVC stage);
            ``None`` or a missing file (no release cut yet) gives the stratified split everywhere.

    Returns:
        Metrics: ``{"domains": {d: {"docs", "overrides_applied", "rare_to_train",
        "stratified": {"test", "val"} (0/1; both 0 for a sticky domain), "sticky" (0/1), "release_docs",
        "new_docs", "dropped_release_docs", "other_domain_docs", "<split>": {"docs", "share",
        "labels": {label: docs}, "label_share": {label: fraction}}}}, "overrides": {"rows", "applied",
        "unknown_ids"}, "release": {"docs", "new", "dropped"}, "total": {"<split>": docs}, "wall_s",
        "peak_rss_mb"}``. ``release`` sums the domains' ``release_docs``, ``new_docs`` and
        ``dropped_release_docs``.

    Raises:
        ValueError: when ``domains`` is empty, or for a bad overrides file, release label table or fraction.
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
    check_schema_file(in_dir / SCHEMA_FILE)

    overrides = read_overrides(overrides_path) if overrides_path and Path(overrides_path).exists() else None
    release = read_release_splits(release_labels_path)  # None before a release is cut
    found = np.zeros(overrides.num_rows if overrides is not None else 0, dtype=bool)
    metrics: dict = {"domains": {}}
    label_parts: list[pa.Table] = []
    with atomic_path(out_dir, is_dir=True) as tmp_dir:
        for domain in domains:
            path = in_dir / f"{domain}.parquet"
            table = read_docs(path, columns=["id", "label"])  # ids and labels only: never the texts
            parts, result = split_domain(
                table, domain, seed=seed, val_size=val_size, test_size=test_size, release=release
            )
            write_split_files(
                path,
                {name: paths.split_path(tmp_dir, domain, name) for name in paths.SPLITS},
                split_codes(result, table.num_rows),
                read_layout(path),
            )
            applied = 0
            relabelled: dict[str, pa.Table] = {}
            for name in paths.SPLITS:
                relabelled[name], n_applied, _ = (
                    apply_overrides(parts[name], overrides) if overrides is not None else (parts[name], 0, 0)
                )
                applied += n_applied
                n = parts[name].num_rows
                label_parts.append(
                    pa.table(
                        [
                            parts[name]["id"],
                            pa.array([domain] * n, pa.string()),
                            pa.array([name] * n, pa.string()),
                            parts[name]["label"],
                            relabelled[name]["label"],
                        ],
                        schema=LABELS_SCHEMA,
                    )
                )
            if overrides is not None:
                found |= pc.is_in(overrides["id"], value_set=table["id"]).to_numpy(zero_copy_only=False)
            dm = split_metrics(table.num_rows, relabelled, result, applied)
            metrics["domains"][domain] = dm
            log.info(
                "split %s (%s): %s",
                domain,
                "sticky" if result.sticky else "stratified",
                {s: dm[s]["docs"] for s in paths.SPLITS},
            )
        if labels_path is not None:
            write_label_table(
                labels_path, pa.concat_tables(label_parts) if label_parts else LABELS_SCHEMA.empty_table()
            )
    metrics["overrides"] = {
        "rows": int(len(found)),
        "applied": sum(d["overrides_applied"] for d in metrics["domains"].values()),
        "unknown_ids": int((~found).sum()),
    }
    metrics["release"] = {
        "docs": sum(d["release_docs"] for d in metrics["domains"].values()),
        "new": sum(d["new_docs"] for d in metrics["domains"].values()),
        "dropped": sum(d["dropped_release_docs"] for d in metrics["domains"].values()),
    }
    metrics["total"] = {s: sum(d[s]["docs"] for d in metrics["domains"].values()) for s in paths.SPLITS}
    metrics["wall_s"] = round(time.perf_counter() - t0, 3)
    metrics["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return metrics


def main(argv: Sequence[str] = ()) -> None:
    """DVC entry point: params ``domains`` + ``split`` (and the LM release, when one is cut) -> data/split/,
    data/labels/split_labels.parquet, metrics/split.json."""
    parse_stage_args("split", __doc__, argv)
    with stage_run("split") as st:
        cfg = P.section("split")
        metrics = run(
            paths.PARQUET_DIR,
            paths.SPLIT_DIR,
            P.required_domains("split"),
            seed=int(cfg["seed"]),
            val_size=float(cfg["val_size"]),
            test_size=float(cfg["test_size"]),
            overrides_path=paths.OVERRIDES_PATH,
            labels_path=paths.LABELS_PATH,
            release_labels_path=paths.RELEASE_LABELS_PATH,
        )
        st.write_metrics("split", metrics)
        st.log.info(
            "split: %s documents; %d label override(s) applied, %d unknown id(s); release: %s",
            metrics["total"],
            metrics["overrides"]["applied"],
            metrics["overrides"]["unknown_ids"],
            metrics["release"],
        )


if __name__ == "__main__":
    main(sys.argv[1:])
