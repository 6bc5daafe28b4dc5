"""Train/val/test split of one domain's documents: stratified (scikit-learn ``train_test_split(stratify=...)``),
or sticky to an LM release.

- **Stratified** (:func:`split_indices`): two seeded hold-out steps (test, then val), each stratified by label
  with a null label as a stratum of its own; rare labels and unstratifiable domains are handled explicitly.
  A domain that the LM release does not cover (or every domain, before a release is cut) is split this way.
- **Sticky** (:func:`sticky_split_indices`): once a release is cut, a domain it covers keeps the release's
  split for every document still present, and each new document gets its split from a hash of
  ``(seed, id)`` (:func:`hash_split_codes`). A document keeps its split once assigned, so no document the
  deployed classifier trained on ever enters the test split when new documents arrive.

The split is decided on ids and labels alone; the documents are then streamed into the split files
(:func:`write_split_files`), so memory does not grow with the texts.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sklearn.model_selection import train_test_split

from domainlm.common.atomic import atomic_path
from domainlm.common.paths import SPLITS
from domainlm.documents.labels import NULL_LABEL_KEY, duplicate_id
from domainlm.documents.schema import ParquetLayout, iter_doc_batches, open_writer

log = logging.getLogger(__name__)


class DomainTooSmallError(ValueError):
    """A domain has too few documents to give train, val and test at least one each."""


@dataclass
class SplitResult:
    """Row indices of one domain's splits (each sorted ascending, disjoint, covering all rows).

    Attributes:
        indices: split name -> int64 array of row indices into the domain table.
        stratified: per hold-out step (``"test"``, ``"val"``): True when the step was stratified
            by label, False when it fell back to an unstratified (seeded) shuffle split, or when the
            split is sticky (:func:`sticky_split_indices`).
        rare_to_train: number of documents kept in train because their label had a single
            document in a step's pool (scikit-learn cannot stratify a one-member class).
        sticky: True when the split follows an LM release (:func:`sticky_split_indices`).
        release_docs: documents whose split came from the release.
        new_docs: documents whose split came from the hash rule (:func:`hash_split_codes`).
        dropped_release_docs: release documents of this domain absent from the domain today.
        other_domain_docs: documents the release records under another domain (included in ``new_docs``).
    """

    indices: dict[str, np.ndarray]
    stratified: dict[str, bool] = field(default_factory=dict)
    rare_to_train: int = 0
    sticky: bool = False
    release_docs: int = 0
    new_docs: int = 0
    dropped_release_docs: int = 0
    other_domain_docs: int = 0


def check_fractions(val_size: float, test_size: float) -> None:
    """Check the split fractions.

    Raises:
        ValueError: when a fraction is not in (0, 1) or they sum to 1 or more.
    """
    for name, frac in (("val_size", val_size), ("test_size", test_size)):
        if not 0 < frac < 1:
            raise ValueError(f"split.{name} must be in (0, 1), got {frac!r}")
    if val_size + test_size >= 1:
        raise ValueError(f"split.val_size + split.test_size must be < 1, got {val_size + test_size!r}")


def split_sizes(n: int, val_size: float, test_size: float, domain: str) -> tuple[int, int, int]:
    """Document counts ``(train, val, test)`` for a domain of ``n`` documents.

    Held-out counts round up (as scikit-learn's ``train_test_split`` does for fractions), so
    val and test get at least one document each; train gets the rest.

    Raises:
        ValueError: when a fraction is not in (0, 1) or they sum to 1 or more.
        DomainTooSmallError: naming ``domain`` when train would be empty.
    """
    check_fractions(val_size, test_size)
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


def _hold_out(
    idx: np.ndarray, strata: np.ndarray, n_out: int, seed: int
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


def split_indices(
    labels: pa.ChunkedArray | pa.Array, domain: str, *, seed: int, val_size: float, test_size: float
) -> SplitResult:
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
            log.warning("split %s: %s hold-out not stratified (more labels than held-out or train docs)", domain, step)
    return result


#: Columns of the release's label table that the sticky split reads.
RELEASE_COLUMNS = ("id", "domain", "split")


def read_release_splits(path: str | os.PathLike | None) -> pa.Table | None:
    """Read the ``id``, ``domain`` and ``split`` columns of an LM release's label table.

    Args:
        path: the release's ``split_labels.parquet`` (a copy of the split stage's label table,
            :data:`~domainlm.documents.labels.LABELS_SCHEMA`), or ``None``.

    Returns:
        A table with the string columns ``id``, ``domain``, ``split`` (one row per released document),
        or ``None`` when ``path`` is ``None`` or does not exist (no release cut yet).

    Raises:
        ValueError: naming ``path`` when a column is missing or not a string, a value is null, a split is
            not one of :data:`~domainlm.common.paths.SPLITS`, or an id appears twice.
    """
    if path is None or not Path(path).exists():
        return None
    schema = pq.read_schema(path)
    for name in RELEASE_COLUMNS:
        if name not in schema.names:
            raise ValueError(f"{path}: the release label table needs a column {name!r}")
        if not schema.field(name).type.equals(pa.string()):
            raise ValueError(f"{path}: column {name!r} is {schema.field(name).type}, expected string")
    table = pq.read_table(path, columns=list(RELEASE_COLUMNS))
    for name in RELEASE_COLUMNS:
        if table[name].null_count:
            i = pc.index(pc.is_null(table[name]), True).as_py()
            raise ValueError(f"{path}: row {i} has a null {name!r}")
    bad = pc.invert(pc.is_in(table["split"], value_set=pa.array(SPLITS)))
    if pc.any(bad).as_py():
        i = pc.index(bad, True).as_py()
        raise ValueError(f"{path}: row {i} has split {table['split'][i].as_py()!r}, expected one of {SPLITS}")
    dup = duplicate_id(table["id"])
    if dup is not None:
        raise ValueError(f"{path}: id {dup!r} appears more than once")
    return table


def hash_units(ids: pa.ChunkedArray | pa.Array, seed: int) -> np.ndarray:
    """A number in [0, 1) per id, a pure function of ``(seed, id)``.

    ``u = int.from_bytes(sha256(f"{seed}\\0{id}".encode()).digest()[:8], "big") / 2**64``: the first 8 bytes
    of the SHA-256 digest as a big-endian unsigned integer, scaled to [0, 1).

    Args:
        ids: document ids (strings, no nulls), length ``n``.
        seed: mixed into every hash, so another seed draws another assignment.

    Returns:
        ``float64`` array of shape ``(n,)``.
    """
    digests = b"".join(hashlib.sha256(f"{seed}\0{i}".encode()).digest()[:8] for i in ids.to_pylist())
    # uint64 -> float64 rounds to nearest, and 2**64 is a power of two: the same value as the Python int division.
    return np.frombuffer(digests, dtype=">u8").astype(np.float64) / 2.0**64


def hash_split_codes(ids: pa.ChunkedArray | pa.Array, *, seed: int, val_size: float, test_size: float) -> np.ndarray:
    """The split of each id by the hash rule: test if ``u < test_size``, val if ``u < test_size + val_size``,
    else train, with ``u`` from :func:`hash_units`.

    Each id's split depends on ``(seed, id)`` alone, never on the other documents or on the order they
    arrive in, so a document gets the same split in every run. The split ignores the label, so every
    label lands in test, val and train with probabilities ``test_size``, ``val_size`` and the rest: the
    split is stratified in expectation (not exactly, as :func:`split_indices` is).

    Returns:
        ``int8`` array of shape ``(n,)``, the index of each id's split in :data:`~domainlm.common.paths.SPLITS`.

    Raises:
        ValueError: when a fraction is not in (0, 1) or they sum to 1 or more.
    """
    check_fractions(val_size, test_size)
    u = hash_units(ids, seed)
    codes = np.full(len(u), SPLITS.index("train"), dtype=np.int8)
    codes[u < test_size + val_size] = SPLITS.index("val")
    codes[u < test_size] = SPLITS.index("test")
    return codes


def sticky_split_indices(
    ids: pa.ChunkedArray | pa.Array,
    release: pa.Table,
    domain: str,
    *,
    seed: int,
    val_size: float,
    test_size: float,
) -> SplitResult:
    """Train/val/test split of one domain's rows that keeps the split an LM release recorded.

    A row whose id the release records under ``domain`` keeps its recorded split; every other row (a new
    id, or one the release records under another domain) is assigned by the hash rule of
    :func:`hash_split_codes`, a pure function of ``(seed, id)``. A document thus keeps its split once
    assigned: none that the deployed classifier trained on moves into the test split when new documents
    arrive, and a new document's split does not depend on which other documents arrive with it. Hashing a
    key into split buckets is what TFX's ExampleGen does for a consistent partition
    (``SplitConfig(splits=[... hash_buckets ...], partition_feature_name=...)``); production loops that
    warm-start a daily model and judge it against the deployed one need that consistency, since a re-drawn
    split leaks training documents into the evaluation set.
    The hash rule is stratified in expectation only; release ids no longer in the domain are dropped
    and counted. An empty split is allowed here (logged as a warning, never raised).

    Args:
        ids: the domain's document ids today (unique strings), length ``n``, in file order.
        release: the release's ``id``, ``domain``, ``split`` columns (:func:`read_release_splits`), all domains.
        domain: the domain these rows belong to.
        seed, val_size, test_size: as in :func:`hash_split_codes`.

    Returns:
        A :class:`SplitResult` with ``sticky=True``, ``stratified={"test": False, "val": False}`` and the
        counts ``release_docs``, ``new_docs``, ``dropped_release_docs`` and ``other_domain_docs``; index
        arrays are sorted, disjoint and cover ``range(n)``.

    Raises:
        ValueError: for a bad fraction (see :func:`check_fractions`).
    """
    check_fractions(val_size, test_size)
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    n = len(ids)
    mine = release.filter(pc.equal(release["domain"], domain))
    pos = pc.index_in(ids, value_set=mine["id"])  # row of the id in the domain's release, or null when new
    kept = pc.is_valid(pos).to_numpy(zero_copy_only=False)
    release_codes = pc.index_in(mine["split"], value_set=pa.array(SPLITS)).to_numpy(zero_copy_only=False)
    codes = np.empty(n, dtype=np.int8)
    codes[kept] = release_codes[pc.drop_null(pos).to_numpy(zero_copy_only=False)]
    new_rows = np.flatnonzero(~kept)
    new_ids = ids.take(pa.array(new_rows, pa.int64()))
    codes[new_rows] = hash_split_codes(new_ids, seed=seed, val_size=val_size, test_size=test_size)
    n_kept = int(kept.sum())
    present = pc.sum(pc.is_in(mine["id"], value_set=ids).cast(pa.int64())).as_py() or 0
    other = pc.sum(pc.is_in(new_ids, value_set=release["id"]).cast(pa.int64())).as_py() or 0
    result = SplitResult(
        indices={name: np.flatnonzero(codes == k) for k, name in enumerate(SPLITS)},
        stratified={"test": False, "val": False},
        sticky=True,
        release_docs=n_kept,
        new_docs=n - n_kept,
        dropped_release_docs=mine.num_rows - present,
        other_domain_docs=other,
    )
    empty = [name for name in SPLITS if not len(result.indices[name])]
    if empty:
        log.warning(
            "split %s: sticky split has empty %s (%d docs: %d from the release, %d new, %d release docs dropped)",
            domain,
            "/".join(empty),
            n,
            n_kept,
            n - n_kept,
            result.dropped_release_docs,
        )
    return result


def covers_domain(release: pa.Table | None, domain: str) -> bool:
    """True when ``release`` (:func:`read_release_splits`) records at least one document of ``domain``."""
    return release is not None and bool(pc.any(pc.equal(release["domain"], domain)).as_py())


def label_counts(labels: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    """``{label: docs}`` sorted by label; null labels under :data:`NULL_LABEL_KEY`."""
    counts = Counter(NULL_LABEL_KEY if v is None else v for v in labels.to_pylist())
    return dict(sorted(counts.items()))


def split_domain(
    table: pa.Table,
    domain: str,
    *,
    seed: int,
    val_size: float,
    test_size: float,
    release: pa.Table | None = None,
) -> tuple[dict[str, pa.Table], SplitResult]:
    """Split one domain's table into ``{"train", "val", "test"}`` tables (same columns as ``table``, input order).

    ``table`` needs ``id`` and ``label`` only; the split stage passes just those two columns and streams
    the documents themselves with :func:`write_split_files`. When ``release`` records at least one
    document of ``domain`` (:func:`covers_domain`) the split is sticky (:func:`sticky_split_indices`);
    otherwise it is the stratified split of the whole domain (:func:`split_indices`).

    Args:
        release: the release's ``id``, ``domain``, ``split`` columns (:func:`read_release_splits`), or ``None``.

    Raises:
        ValueError: naming ``domain`` and the id when an id occurs twice (splits could not be disjoint).
        DomainTooSmallError: see :func:`split_indices` (stratified split only).
    """
    dup = duplicate_id(table["id"])
    if dup is not None:
        raise ValueError(f"domain {domain!r}: id {dup!r} occurs more than once")
    if covers_domain(release, domain):
        result = sticky_split_indices(table["id"], release, domain, seed=seed, val_size=val_size, test_size=test_size)
    else:
        result = split_indices(table["label"], domain, seed=seed, val_size=val_size, test_size=test_size)
    return {name: table.take(pa.array(result.indices[name])) for name in SPLITS}, result


def split_metrics(n_docs: int, parts: dict[str, pa.Table], result: SplitResult, overrides_applied: int) -> dict:
    """The metrics of one domain's split (the ``domains.<domain>`` entry of ``metrics/split.json``).

    Args:
        n_docs: documents in the domain.
        parts: split name -> its documents, with the labels to count (after overrides).
        result: the :class:`SplitResult` the parts came from.
        overrides_applied: documents of the domain that got a label override.

    Returns:
        ``{"docs", "overrides_applied", "rare_to_train", "stratified": {"test", "val"} (0/1),
        "sticky" (0/1), "release_docs", "new_docs", "dropped_release_docs", "other_domain_docs",
        "<split>": {"docs", "share", "labels": {label: docs}, "label_share": {label: fraction}}}``;
        shares are fractions in [0, 1] rounded to 4 places (0 for an empty domain or split). The release
        counts are those of :class:`SplitResult` (all 0 for a stratified split).
    """
    dm: dict = {
        "docs": n_docs,
        "overrides_applied": overrides_applied,
        "rare_to_train": result.rare_to_train,
        "stratified": {k: int(v) for k, v in result.stratified.items()},
        "sticky": int(result.sticky),
        "release_docs": result.release_docs,
        "new_docs": result.new_docs,
        "dropped_release_docs": result.dropped_release_docs,
        "other_domain_docs": result.other_domain_docs,
    }
    for name, part in parts.items():
        labels = label_counts(part["label"])
        dm[name] = {
            "docs": part.num_rows,
            "share": round(part.num_rows / n_docs, 4) if n_docs else 0.0,
            "labels": labels,
            "label_share": {k: round(v / part.num_rows, 4) for k, v in labels.items()},
        }
    return dm


def split_codes(result: SplitResult, n: int) -> np.ndarray:
    """The split of every row as an ``int8`` code, the index of its name in :data:`~domainlm.common.paths.SPLITS`."""
    codes = np.full(n, -1, dtype=np.int8)
    for k, name in enumerate(SPLITS):
        codes[result.indices[name]] = k
    if (codes < 0).any():
        raise AssertionError("split indices do not cover every row")  # an internal bug; never expected
    return codes


def write_split_files(
    src: str | os.PathLike, out_paths: Mapping[str, str | os.PathLike], codes: np.ndarray, layout: ParquetLayout
) -> dict[str, int]:
    """Stream one domain's document Parquet file into one file per split, in bounded memory.

    Reads ``src`` one row group at a time (:func:`~domainlm.documents.schema.iter_doc_batches`) and routes
    each row to the writer of its split (``codes``, :func:`split_codes`), keeping the input order within
    each split. Every output row group holds ``layout.row_group_rows`` rows (the last one fewer), so the
    files are those :func:`~domainlm.documents.schema.write_docs` writes from ``table.take(indices)``,
    byte for byte (tests check this), while at most one input row group and one pending row group per
    split are in memory. Each file is written atomically.

    Args:
        src: the parquet stage's ``<domain>.parquet``. out_paths: split name -> output path.
        codes: ``int8`` split code per row of ``src``, shape ``(rows,)``.
        layout: codecs and row-group size of the outputs (:func:`~domainlm.documents.schema.read_layout`).

    Returns:
        ``{split: rows written}``.

    Raises:
        ValueError: when ``codes`` does not have one entry per row of ``src``.
    """
    rows_per_group = layout.row_group_rows
    written = {name: 0 for name in SPLITS}
    pending: dict[str, list[pa.Table]] = {name: [] for name in SPLITS}
    with contextlib.ExitStack() as stack:
        writers = {}
        for name in SPLITS:
            tmp = stack.enter_context(atomic_path(out_paths[name]))
            writers[name] = stack.enter_context(open_writer(tmp, layout))

        def flush(name: str, final: bool) -> None:
            buf = pa.concat_tables(pending[name]) if pending[name] else None
            if buf is None:
                return
            while buf.num_rows >= rows_per_group or (final and buf.num_rows):
                take = min(rows_per_group, buf.num_rows)
                # one contiguous chunk per row group: a chunked one would cut its data pages elsewhere
                writers[name].write_table(buf.slice(0, take).combine_chunks(), row_group_size=rows_per_group)
                written[name] += take
                buf = buf.slice(take)
            pending[name] = [buf] if buf.num_rows else []

        offset = 0
        for batch in iter_doc_batches(src, batch_rows=rows_per_group):
            part = codes[offset : offset + batch.num_rows]
            if len(part) != batch.num_rows:
                raise ValueError(f"{src}: more rows than split codes ({len(codes)})")
            table = pa.Table.from_batches([batch])
            for k, name in enumerate(SPLITS):
                rows = np.flatnonzero(part == k)
                if len(rows):
                    pending[name].append(table.take(pa.array(rows)))
                    flush(name, final=False)
            offset += batch.num_rows
        if offset != len(codes):
            raise ValueError(f"{src}: {offset} rows but {len(codes)} split codes")
        for name in SPLITS:
            flush(name, final=True)
    return written
