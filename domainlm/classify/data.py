"""Labelled documents for the classifier: texts from the split files, labels from the split stage's label table.

Which label each split uses (:data:`LABEL_COLUMN`):

- ``train`` and ``val``: ``label``, the label after overrides, i.e. what ``refine_labels promote`` wrote. The
  classifier learns (and early-stops) on the refined labels.
- ``test``: ``source_label``, the label the document was ingested with. Overrides never touch it, so the test
  metrics of two refinement rounds score the same answers and stay comparable.

The classes are the train split's distinct labels over all domains, sorted (:func:`class_list`): the label
space ``refine_labels`` works in (its ``classes`` are the sorted labels of the same table).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from domainlm.common.paths import SPLITS, split_path
from domainlm.documents.labels import read_label_table

#: The label-table column each split is read with.
LABEL_COLUMN = {"train": "label", "val": "label", "test": "source_label"}


@dataclass(frozen=True)
class LabelledSplit:
    """One split's labelled documents, in document-file order (domains as given, then file rows).

    Attributes:
        split: ``train``, ``val`` or ``test``.
        label_column: the label-table column the labels come from (:data:`LABEL_COLUMN`).
        ids, texts, labels, domains: parallel lists of str, one entry per labelled document (``texts`` is empty
            when the split was read without them, :func:`read_split`).
        rows: each labelled document's position among all the split's documents in file order (labelled or not;
            the row of :class:`domainlm.classify.window_cache.WindowCache`).
        unlabelled: documents of the split left out because their label is null.
    """

    split: str
    label_column: str
    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    unlabelled: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def texts_by_domain(self) -> dict[str, list[str]]:
        """``{domain: texts}`` in document order (every domain with at least one labelled document)."""
        out: dict[str, list[str]] = {}
        for d, t in zip(self.domains, self.texts):
            out.setdefault(d, []).append(t)
        return out


def read_split(
    split_dir: str | os.PathLike,
    labels_path: str | os.PathLike,
    domains: Sequence[str],
    split: str,
    *,
    label_column: str | None = None,
    with_texts: bool = True,
) -> LabelledSplit:
    """Join ``<split_dir>/<domain>/<split>.parquet`` (id, text) with the label table on ``id``.

    The join runs in Arrow (``pyarrow.compute.index_in``), one domain file at a time.

    Args:
        split_dir: the split stage's document folder.
        labels_path: the split stage's label table (:data:`domainlm.documents.labels.LABELS_SCHEMA`).
        domains: the domains to read, in order.
        split: one of ``train``, ``val``, ``test``.
        label_column: ``label`` or ``source_label``; default :data:`LABEL_COLUMN` ``[split]``.
        with_texts: read the texts too; False leaves ``texts`` empty (training reads token windows from a
            :mod:`domainlm.classify.window_cache` instead).

    Returns:
        A :class:`LabelledSplit`; documents with a null label are counted in ``unlabelled`` and left out.

    Raises:
        FileNotFoundError: a split file or the label table is missing (run the split stage).
        ValueError: ``split`` or ``label_column`` is unknown, or a document has no row in the label table.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    column = label_column or LABEL_COLUMN[split]
    if column not in ("label", "source_label"):
        raise ValueError(f"label_column must be 'label' or 'source_label', got {column!r}")
    table = read_label_table(labels_path)
    table = table.filter(pc.equal(table["split"], split))
    out = LabelledSplit(split=split, label_column=column)
    unlabelled = offset = 0
    for domain in domains:
        path = split_path(split_dir, domain, split)
        if not path.exists():
            raise FileNotFoundError(f"split file {path} not found (run `dvc repro split` first)")
        docs = pq.read_table(path, columns=["id", "text"] if with_texts else ["id"])
        where = pc.index_in(docs["id"], value_set=table["id"])
        if where.null_count:
            first = docs["id"][int(pc.index(pc.is_null(where), True).as_py())].as_py()
            raise ValueError(f"{path}: document {first!r} has no {split!r} row in the label table {labels_path}")
        labels = table[column].take(where)
        keep = pc.is_valid(labels)
        kept = int(pc.sum(keep).as_py() or 0)
        unlabelled += len(docs) - kept
        out.ids.extend(pc.filter(docs["id"], keep).to_pylist())
        out.labels.extend(pc.filter(labels, keep).to_pylist())
        if with_texts:
            out.texts.extend(pc.filter(docs["text"], keep).to_pylist())
        out.domains.extend([domain] * kept)
        out.rows.extend((offset + np.flatnonzero(keep.to_numpy(zero_copy_only=False))).tolist())
        offset += len(docs)
    return dataclasses.replace(out, unlabelled=unlabelled)


def read_splits(
    split_dir: str | os.PathLike, labels_path: str | os.PathLike, domains: Sequence[str], *, with_texts: bool = True
) -> dict[str, LabelledSplit]:
    """``{"train", "val", "test"}`` → :func:`read_split` with each split's :data:`LABEL_COLUMN` (and ``with_texts``).

    Raises:
        ValueError: the train split has no labelled document (besides :func:`read_split`'s errors).
    """
    splits = {s: read_split(split_dir, labels_path, domains, s, with_texts=with_texts) for s in SPLITS}
    if not len(splits["train"]):
        raise ValueError(f"no labelled train document in {labels_path} for domains {list(domains)}")
    return splits


def texts_at(
    split_dir: str | os.PathLike, domains: Sequence[str], split: str, rows: Sequence[int], *, batch_docs: int = 4096
) -> list[str]:
    """The texts of the documents at ``rows`` (positions among the split's documents in file order, as
    :attr:`LabelledSplit.rows`), in the order of ``rows``, read from the split files ``batch_docs`` rows at a time:
    memory follows the texts asked for, not the split.

    Raises:
        FileNotFoundError: a split file is missing.
        IndexError: a row is past the split's last document.
    """
    wanted = np.asarray(rows, dtype=np.int64)
    order = np.argsort(wanted, kind="stable")
    out: list[str | None] = [None] * len(wanted)
    k, offset = 0, 0
    for domain in domains:
        path = split_path(split_dir, domain, split)
        if not path.exists():
            raise FileNotFoundError(f"split file {path} not found (run `dvc repro split` first)")
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_docs, columns=["text"]):
            end = offset + batch.num_rows
            texts = None
            while k < len(order) and wanted[order[k]] < end:
                texts = texts if texts is not None else batch.column("text").to_pylist()
                out[order[k]] = texts[wanted[order[k]] - offset]
                k += 1
            offset = end
    if k < len(order):
        raise IndexError(f"row {int(wanted[order[k]])} is past the {offset} documents of the {split!r} split")
    return out  # type: ignore[return-value]


def class_list(train: LabelledSplit) -> list[str]:
    """The classifier's classes: the train split's distinct labels, sorted (index = class id).

    Raises:
        ValueError: fewer than two classes (nothing to classify).
    """
    classes = sorted(set(train.labels))
    if len(classes) < 2:
        raise ValueError(f"the train split has {len(classes)} distinct label(s) {classes}; a classifier needs two")
    return classes


def count_label_overrides(labels_path: str | os.PathLike) -> int:
    """Documents whose ``label`` differs from their ``source_label`` in the label table (overrides in force)."""
    table = read_label_table(labels_path)
    differs = pc.fill_null(pc.not_equal(table["label"], table["source_label"]), True)
    both_null = pc.and_(pc.is_null(table["label"]), pc.is_null(table["source_label"]))
    return int(pc.sum(pc.and_(differs, pc.invert(both_null))).as_py() or 0)


def files_sha256(files: Iterable[str | os.PathLike]) -> str:
    """SHA-256 over the files' relative names and bytes, in sorted name order (hex, 64 chars).

    The registry's ``data_sha256`` tag: the split files plus the label table fix the data a classifier saw.

    Raises:
        FileNotFoundError: a file is missing.
    """
    h = hashlib.sha256()
    for path in sorted(Path(f) for f in files):
        h.update(path.as_posix().encode("utf-8") + b"\0")
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def split_files_sha256(split_dir: str | os.PathLike, labels_path: str | os.PathLike, domains: Sequence[str]) -> str:
    """The registry's ``data_sha256`` tag of a split folder: :func:`files_sha256` of every domain's Parquet files (in
    ``domains`` order, each folder's files sorted by name) followed by the label table ``labels_path``."""
    files = [p for d in domains for p in sorted((Path(split_dir) / d).glob("*.parquet"))] + [Path(labels_path)]
    return files_sha256(files)


def split_sha256(split: LabelledSplit) -> str:
    """SHA-256 over the (id, label, text) rows of a split, in order (hex, 64 chars).

    The registry's ``test_sha256`` tag: two classifiers were scored on "the same test set" when theirs match.
    """
    h = hashlib.sha256()
    for doc_id, label, text in zip(split.ids, split.labels, split.texts):
        h.update(doc_id.encode("utf-8") + b"\0" + label.encode("utf-8") + b"\0" + text.encode("utf-8") + b"\n")
    return h.hexdigest()
