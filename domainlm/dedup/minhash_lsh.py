"""Near-duplicate removal by MinHash-LSH: exact hashing, then MinHash signatures, LSH candidate pairs and
exact-Jaccard verification, clusters by union-find (one file per algorithm, as text-dedup does).

MinHash: Broder 1997. Banding: Leskovec, Rajaraman & Ullman, "Mining of Massive Datasets", ch. 3, with
datasketch's ``MinHash``/``MinHashLSH``; bands × rows are chosen for recall at the threshold
(:func:`choose_bands_rows`, as text-dedup does), and every candidate pair is verified by exact Jaccard.
:func:`deduplicate` composes the named steps: :func:`exact_groups` → :func:`find_near_duplicates` →
:func:`cluster` → :func:`choose_representatives` → :func:`removal_rows` → :func:`domain_counts`.
"""
from __future__ import annotations

import gc
import hashlib
import math
import multiprocessing as mp
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import redis
from datasketch import LeanMinHash, MinHash, MinHashLSH
from scipy.integrate import quad
from tqdm import tqdm

from domainlm.korean.hangul import normalize_text, raw_shingle_ids, to_hash32, unique_sorted

SCHEME = "affine32"  # datasketch >= 2.0 default permutation scheme: a*h + b mod 2**32
UPDATE_CHUNK = 512  # shingles per MinHash.update_batch call: keeps the (chunk x num_perm) product in cache
S_CURVE_POINTS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
BACKENDS = ("memory", "redis")


# ------------------------------------------------------------------ banding (bands x rows)

def candidate_probability(j: float, bands: int, rows: int) -> float:
    """LSH S-curve: probability that a pair with Jaccard ``j`` becomes a candidate pair.

    ``P(j) = 1 - (1 - j**rows) ** bands``: the pair collides in at least one of ``bands``
    bands of ``rows`` MinHash values each (MMDS ch. 3.4).
    """
    return 1.0 - (1.0 - j ** rows) ** bands


def false_positive_area(threshold: float, bands: int, rows: int) -> float:
    """∫₀^threshold P(j) dj: the S-curve area below the threshold (datasketch's FP measure)."""
    return float(quad(lambda s: candidate_probability(s, bands, rows), 0.0, threshold)[0])


def false_negative_area(threshold: float, bands: int, rows: int) -> float:
    """∫_threshold^1 (1 - P(j)) dj: the area above the S-curve past the threshold."""
    return float(quad(lambda s: 1.0 - candidate_probability(s, bands, rows), threshold, 1.0)[0])


def choose_bands_rows(num_perm: int, threshold: float, min_recall: float) -> tuple[int, int]:
    """Pick LSH bands ``b`` and rows ``r`` for recall at the threshold (text-dedup style).

    Minimises the false-positive area ``∫₀^t P(j) dj`` subject to ``b·r <= num_perm``,
    ``b >= 2`` (datasketch's minimum) and ``P(t) = 1 - (1 - t**r)**b >= min_recall``. For a
    fixed ``r`` both P(t) and the FP area grow with ``b``, so only the smallest feasible ``b``
    per ``r`` is a contender; the search is over ``r``. Ties go to the larger P(t).

    With ``num_perm=128, threshold=0.8, min_recall=0.99`` this gives 16 bands x 6 rows
    (96 of the 128 values used). Its S-curve: P(0.5) = 0.223, P(0.6) = 0.534,
    P(0.7) = 0.865, P(0.75) = 0.957, P(0.8) = 0.9923, P(0.85) = 0.9995, P(0.9) > 0.99999;
    FP area 0.219, FN area 0.00015. datasketch's default optimiser (equal FP/FN weights)
    gives 9 x 13, whose P(0.8) is only 0.399: three in five pairs right at the threshold
    would never be compared. The extra candidates this admits below the threshold are
    removed by exact-Jaccard verification.

    Returns:
        ``(bands, rows)``, to pass as ``MinHashLSH(params=(bands, rows))``.

    Raises:
        ValueError: when an argument is out of range or no (b, r) meets ``min_recall``.
    """
    if not isinstance(num_perm, int) or num_perm < 2:
        raise ValueError(f"dedup.num_perm must be an integer >= 2, got {num_perm!r}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"dedup.threshold must be in (0, 1), got {threshold!r}")
    if not 0.0 < min_recall < 1.0:
        raise ValueError(f"dedup.min_recall_at_threshold must be in (0, 1), got {min_recall!r}")
    best: tuple[float, float, int, int] | None = None
    for rows in range(1, num_perm // 2 + 1):
        bands = max(2, math.ceil(math.log1p(-min_recall) / math.log1p(-(threshold ** rows))))
        while bands > 2 and candidate_probability(threshold, bands - 1, rows) >= min_recall:
            bands -= 1  # guard against rounding in the closed form
        while candidate_probability(threshold, bands, rows) < min_recall:
            bands += 1
        if bands * rows > num_perm:
            continue
        key = (false_positive_area(threshold, bands, rows), -candidate_probability(threshold, bands, rows),
               bands, rows)
        if best is None or key < best:
            best = key
    if best is None:
        raise ValueError(
            f"no bands x rows with b*r <= dedup.num_perm={num_perm} reaches "
            f"dedup.min_recall_at_threshold={min_recall} at threshold {threshold}: raise num_perm")
    return best[2], best[3]


def banding_report(num_perm: int, threshold: float, bands: int, rows: int) -> dict[str, Any]:
    """Numbers describing a banding: P(candidate) at the threshold, FP/FN areas, S-curve points."""
    return {
        "num_perm": num_perm,
        "threshold": threshold,
        "bands": bands,
        "rows": rows,
        "perms_used": bands * rows,
        "p_candidate_at_threshold": candidate_probability(threshold, bands, rows),
        "false_positive_area": false_positive_area(threshold, bands, rows),
        "false_negative_area": false_negative_area(threshold, bands, rows),
        "s_curve": {f"j{round(j * 100):03d}": candidate_probability(j, bands, rows) for j in S_CURVE_POINTS},
    }


def datasketch_default_banding(num_perm: int, threshold: float) -> dict[str, Any]:
    """The banding datasketch would pick by default (``MinHashLSH(threshold, num_perm)``:
    equal false-positive/false-negative weights) and its P(candidate) at the threshold."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return {"bands": lsh.b, "rows": lsh.r,
            "p_candidate_at_threshold": candidate_probability(threshold, lsh.b, lsh.r)}


# ------------------------------------------------------------------ signatures

def _identity(x):
    return x


def minhash_template(num_perm: int, seed: int) -> MinHash:
    """An empty datasketch ``MinHash`` (``affine32`` scheme) whose inputs are pre-hashed
    ``uint32`` values (identity ``hashfunc``); ``.copy()`` it per document."""
    return MinHash(num_perm=num_perm, seed=seed, hashfunc=_identity, scheme=SCHEME)


def sign_hashes(template: MinHash, hashes: np.ndarray) -> np.ndarray:
    """MinHash signature of a set of 32-bit shingle hashes, ``uint32`` of shape ``(num_perm,)``.

    Feeds ``template.copy().update_batch([chunk])`` one chunk of ``UPDATE_CHUNK`` hashes at a
    time: with the identity ``hashfunc``, ``[chunk]`` hands datasketch the whole array as one
    already-hashed batch, which its vectorised path (fmix32 pre-mix, ``a*h + b mod 2**32``,
    column minimum) processes without a Python call per shingle, while the chunk keeps the
    ``(chunk, num_perm)`` product in cache. Equals ``update_batch`` over the individual
    integers (tests check this). Repeated hashes do not change a MinHash.
    """
    m = template.copy()
    for start in range(0, len(hashes), UPDATE_CHUNK):
        m.update_batch([hashes[start:start + UPDATE_CHUNK]])
    return m.hashvalues


def shingle_hashes(normalized: str) -> np.ndarray:
    """Distinct 32-bit hashes of a normalized text's shingles (the MinHash input), sorted ``uint32``.

    :func:`domainlm.korean.hangul.raw_shingle_ids` folded by :func:`domainlm.korean.hangul.to_hash32`, then
    de-duplicated: a sort of 32-bit values is cheaper than one of the 64-bit ids, and every
    repeat removed is a row less for the MinHash kernel.
    """
    return unique_sorted(to_hash32(raw_shingle_ids(normalized)))


def minhash_signature(text: str, num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """datasketch MinHash signature of ``text``'s shingle set, ``uint32`` ``(num_perm,)``.

    Shingles as in :func:`domainlm.korean.hangul.shingle_ids` (jamo 3-grams ∪ word 5-grams), hashed by
    :func:`shingle_hashes`, signed by :func:`sign_hashes`. Deterministic: the permutations
    come from ``seed`` (numpy ``RandomState``), the hashes from fixed constants.
    """
    return sign_hashes(minhash_template(num_perm, seed), shingle_hashes(normalize_text(text)))


_FORK_TEXTS: Sequence[str] = ()  # normalized texts, shared with forked workers copy-on-write


def _signature_block(args: tuple[int, int, int, int]) -> tuple[int, np.ndarray]:
    """Signatures of ``_FORK_TEXTS[start:stop]`` (runs in a worker process)."""
    start, stop, num_perm, seed = args
    template = minhash_template(num_perm, seed)
    block = np.empty((stop - start, num_perm), dtype=np.uint32)
    for k, norm in enumerate(_FORK_TEXTS[start:stop]):
        block[k] = sign_hashes(template, shingle_hashes(norm))
    return start, block


def compute_signatures(normalized: Sequence[str], num_perm: int, seed: int, workers: int = 1,
                       chunk_docs: int = 64) -> np.ndarray:
    """MinHash signatures of normalized texts, computed across ``workers`` forked processes.

    The texts reach the workers through fork (copy-on-write, nothing pickled); each task
    returns a ``(docs, num_perm)`` block placed by its start row, so the result does not
    depend on scheduling.

    Args:
        normalized: texts already passed through :func:`domainlm.korean.hangul.normalize_text`.
        num_perm: MinHash permutations. seed: MinHash seed (datasketch permutations).
        workers: processes of a fork ``multiprocessing.Pool``; 1 computes in this process.
        chunk_docs: documents per task.

    Returns:
        ``uint32`` array of shape ``(len(normalized), num_perm)``, row ``i`` equal to
        :func:`minhash_signature` of text ``i``; identical for any ``workers``.
    """
    global _FORK_TEXTS
    n = len(normalized)
    tasks = [(s, min(s + chunk_docs, n), num_perm, seed) for s in range(0, n, chunk_docs)]
    sigs = np.empty((n, num_perm), dtype=np.uint32)
    _FORK_TEXTS = normalized
    try:
        with tqdm(total=n, desc="dedup: shingles + MinHash", unit="doc", leave=False) as bar:
            if workers > 1 and len(tasks) > 1:
                gc.freeze()  # keep the parent's objects out of the workers' GC: no copy-on-write of its heap
                try:
                    with mp.get_context("fork").Pool(min(workers, len(tasks))) as pool:
                        for start, block in pool.imap_unordered(_signature_block, tasks):
                            sigs[start:start + len(block)] = block
                            bar.update(len(block))
                finally:
                    gc.unfreeze()
            else:
                for task in tasks:
                    start, block = _signature_block(task)
                    sigs[start:start + len(block)] = block
                    bar.update(len(block))
    finally:
        _FORK_TEXTS = ()
    return sigs


# ------------------------------------------------------------------ LSH candidates + verification

def storage_config(backend: str, redis_cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """datasketch ``storage_config`` for ``dedup.lsh_backend`` (``memory`` or ``redis``).

    Raises:
        ValueError: on an unknown backend or a redis config without ``host``/``port``.
    """
    if backend == "memory":
        return {"type": "dict"}
    if backend == "redis":
        cfg = redis_cfg or {}
        missing = [k for k in ("host", "port") if k not in cfg]
        if missing:
            raise ValueError(f"dedup.redis is missing {missing} (needed for lsh_backend: redis)")
        basename = str(cfg.get("basename", "dedup")).encode("utf-8")
        return {"type": "redis", "basename": basename, "redis": {"host": cfg["host"], "port": int(cfg["port"])}}
    raise ValueError(f"dedup.lsh_backend must be one of {BACKENDS}, got {backend!r}")


def _clear_redis_index(config: dict[str, Any]) -> None:
    """Delete every Redis key of the index named ``config['basename']`` (a stale index would
    add old documents to this run's buckets)."""
    client = redis.Redis(**config["redis"])
    pattern = config["basename"] + b"_*"
    keys = list(client.scan_iter(match=pattern, count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i:i + 1000])
    client.close()


def lsh_candidate_pairs(signatures: np.ndarray, bands: int, rows: int, seed: int,
                        config: dict[str, Any] | None = None) -> list[tuple[int, int]]:
    """Candidate pairs from a datasketch ``MinHashLSH`` index over ``signatures``.

    Every row is inserted as a ``LeanMinHash`` under key ``b"<row index>"`` with
    ``params=(bands, rows)``; a candidate pair is two keys that share a bucket in at least
    one band, read back table by table (``keys()`` + ``getmany``: two round trips per band
    on Redis instead of one per document and band). A Redis index (basename from
    ``config``) is cleared before and after use.

    Args:
        signatures: ``uint32`` array ``(n, num_perm)`` from :func:`compute_signatures`.
        config: datasketch storage config (:func:`storage_config`); ``None`` = in memory.

    Returns:
        Sorted list of ``(i, j)`` row-index pairs with ``i < j``.
    """
    config = config or {"type": "dict"}
    n, num_perm = signatures.shape
    if config["type"] == "redis":
        _clear_redis_index(config)
    try:
        lsh = MinHashLSH(num_perm=num_perm, params=(bands, rows), storage_config=config, prepickle=False)
        with lsh.insertion_session(buffer_size=50_000) as session:
            for i in tqdm(range(n), desc="dedup: LSH insert", unit="doc", leave=False):
                lean = LeanMinHash(seed=seed, hashvalues=signatures[i], scheme=SCHEME)
                session.insert(b"%d" % i, lean, check_duplication=False)
        pairs: set[tuple[int, int]] = set()
        for table in tqdm(lsh.hashtables, desc="dedup: LSH buckets", unit="band", leave=False):
            bucket_keys = list(table.keys())
            for members in table.getmany(*bucket_keys) if bucket_keys else ():
                if len(members) < 2:
                    continue
                idx = sorted(int(k) for k in members)
                pairs.update((a, b) for p, a in enumerate(idx) for b in idx[p + 1:])
    finally:
        if config["type"] == "redis":
            _clear_redis_index(config)
    return sorted(pairs)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard |A∩B| / |A∪B| of two sorted unique ``uint64`` shingle arrays (0 if both empty)."""
    inter = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - inter
    return inter / union if union else 0.0


def verify_pairs(pairs: Sequence[tuple[int, int]], shingles: Mapping[int, np.ndarray],
                 signatures: np.ndarray) -> list[tuple[int, int, float, float]]:
    """Estimated and exact Jaccard of each candidate pair.

    Args:
        pairs: ``(i, j)`` row indices into ``signatures``.
        shingles: sorted unique ``uint64`` shingle set of every row that occurs in ``pairs``.
        signatures: ``uint32`` ``(n, num_perm)``.

    Returns:
        ``[(i, j, estimated, exact), ...]`` in the order of ``pairs``; ``estimated`` is the
        share of equal signature values (as ``MinHash.jaccard``), ``exact`` is :func:`jaccard`.
    """
    if not pairs:
        return []
    idx = np.asarray(pairs, dtype=np.int64)
    estimated = (signatures[idx[:, 0]] == signatures[idx[:, 1]]).mean(axis=1)
    return [(i, j, float(estimated[k]), jaccard(shingles[i], shingles[j]))
            for k, (i, j) in enumerate(tqdm(pairs, desc="dedup: verify", unit="pair", leave=False))]


@dataclass
class NearDuplicates:
    """Output of :func:`find_near_duplicates`; indices refer to the input texts."""

    signatures: np.ndarray  # uint32 (n, num_perm)
    shingles: dict[int, np.ndarray]  # exact shingle sets of the texts in candidate pairs
    checked: list[tuple[int, int, float, float]]  # (i, j, estimated, exact Jaccard), i < j
    seconds: dict[str, float]

    def verified(self, threshold: float) -> list[tuple[int, int]]:
        """Candidate pairs whose exact Jaccard is >= ``threshold``."""
        return [(i, j) for i, j, _, exact in self.checked if exact >= threshold]


def find_near_duplicates(normalized: Sequence[str], *, num_perm: int, bands: int, rows: int, seed: int,
                         workers: int = 1, lsh_config: dict[str, Any] | None = None) -> NearDuplicates:
    """MinHash signatures → LSH candidate pairs → exact Jaccard of every candidate pair.

    Exact shingle sets (:func:`domainlm.korean.hangul.shingle_ids`) are built only for the texts that
    appear in a candidate pair: signatures need the hashes alone.

    Args:
        normalized: texts already passed through :func:`domainlm.korean.hangul.normalize_text`.
        bands, rows: LSH banding (:func:`choose_bands_rows`).
        lsh_config: datasketch storage config (:func:`storage_config`), ``None`` = memory.
    """
    t0 = time.perf_counter()
    sigs = compute_signatures(normalized, num_perm, seed, workers=workers)
    t1 = time.perf_counter()
    pairs = lsh_candidate_pairs(sigs, bands, rows, seed, lsh_config)
    t2 = time.perf_counter()
    in_pairs = sorted({i for pair in pairs for i in pair})
    shingles = {i: unique_sorted(raw_shingle_ids(normalized[i])) for i in in_pairs}
    checked = verify_pairs(pairs, shingles, sigs)
    t3 = time.perf_counter()
    return NearDuplicates(sigs, shingles, checked, {"signature_s": t1 - t0, "lsh_s": t2 - t1, "verify_s": t3 - t2})


class UnionFind:
    """Disjoint-set forest over ``0..n-1`` with path halving and union by size (Tarjan 1975)."""

    def __init__(self, n: int):
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, x: int) -> int:
        """Root of ``x``'s set."""
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        """Merge the sets holding ``a`` and ``b``."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]


# ------------------------------------------------------------------ the whole dedup

@dataclass
class DedupResult:
    """What :func:`deduplicate` decided. ``kept`` keeps input order; ids are document ids."""

    kept: list[dict[str, Any]]
    removed: list[dict[str, Any]]
    candidates: list[dict[str, Any]]
    counts: dict[str, dict[str, int]]
    banding: dict[str, Any]
    stats: dict[str, Any] = field(default_factory=dict)


def exact_key(normalized: str) -> bytes:
    """Exact-duplicate key: 16-byte BLAKE2b digest of a :func:`domainlm.korean.hangul.normalize_text`
    result (NFC, whitespace collapsed, stripped), UTF-8 encoded."""
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).digest()


def _check_records(records: Sequence[dict[str, Any]]) -> None:
    """Raise ``ValueError`` naming the record that is not a dict with str ``id``/``text``/``domain``, or
    whose id repeats an earlier one."""
    seen: set[str] = set()
    for n, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"record #{n}: expected a dict, got {type(r).__name__}")
        for key in ("id", "text", "domain"):
            if not isinstance(r.get(key), str):
                raise ValueError(f"record #{n} (id {r.get('id')!r}): field {key!r} must be a string, "
                                 f"got {type(r.get(key)).__name__}")
        if r["id"] in seen:
            raise ValueError(f"duplicate document id {r['id']!r}: ids must be unique across all domains")
        seen.add(r["id"])


@dataclass
class ExactGroups:
    """Output of :func:`exact_groups`; indices refer to the input records.

    Attributes:
        normalized: :func:`domainlm.korean.hangul.normalize_text` of every record's text.
        keeper_of: for every record, the index of its exact group's keeper (the smallest id).
        survivors: the keepers (records that are their own keeper), in input order: the input of
            the near-duplicate search, whose *positions* the later steps use.
    """

    normalized: list[str]
    keeper_of: list[int]
    survivors: list[int]


def exact_groups(records: Sequence[dict[str, Any]]) -> ExactGroups:
    """Step 1: group records whose normalized texts are equal (:func:`exact_key`); the smallest id keeps.

    Args:
        records: dicts with a str ``id`` (unique), ``text`` and ``domain`` (see :func:`_check_records`).

    Raises:
        ValueError: naming the record when its text is empty after normalization or is not valid
            Unicode (a lone surrogate from a JSON escape).
    """
    ids = [r["id"] for r in records]
    normalized: list[str] = []
    groups: dict[bytes, list[int]] = {}
    for i, r in enumerate(records):
        norm = normalize_text(r["text"])
        if not norm:
            raise ValueError(f"record {r['id']!r} ({r['domain']}): text is empty after whitespace normalization")
        try:
            key = exact_key(norm)
        except UnicodeEncodeError as err:  # a lone surrogate from a JSON escape
            raise ValueError(f"record {r['id']!r} ({r['domain']}): text is not valid Unicode ({err.reason} "
                             f"at character {err.start})") from err
        normalized.append(norm)
        groups.setdefault(key, []).append(i)
    keeper_of = list(range(len(records)))
    for members in groups.values():
        keeper = min(members, key=ids.__getitem__)
        for i in members:
            keeper_of[i] = keeper
    survivors = [i for i in range(len(records)) if keeper_of[i] == i]
    return ExactGroups(normalized, keeper_of, survivors)


def cluster(links: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Step 3: connected components of the verified near-duplicate links, by :class:`UnionFind`.

    Args:
        links: ``(i, j)`` pairs of survivor positions whose exact Jaccard passed the threshold.

    Returns:
        The clusters (each of two or more positions, ascending), ordered by their smallest
        position. Positions in no link belong to no cluster.
    """
    members = sorted({k for pair in links for k in pair})
    uf = UnionFind(members[-1] + 1 if members else 0)
    for i, j in links:
        uf.union(i, j)
    by_root: dict[int, list[int]] = {}
    for k in members:
        by_root.setdefault(uf.find(k), []).append(k)
    return list(by_root.values())


def choose_representatives(n: int, clusters: Sequence[Sequence[int]], shingle_counts: Mapping[int, int],
                           ids: Sequence[str]) -> list[int]:
    """Step 4: the representative (the one document kept) of each survivor position's cluster.

    A cluster's representative has the most distinct shingles (the token count used here); ties
    go to the smallest id. A position in no cluster represents itself.

    Args:
        n: number of survivor positions.
        clusters: from :func:`cluster`.
        shingle_counts: position -> number of distinct shingles, for every clustered position.
        ids: document id of every position.

    Returns:
        ``representative[k]`` for ``k in range(n)``: a position.
    """
    representative = list(range(n))
    for members in clusters:
        rep = min(members, key=lambda k: (-shingle_counts[k], ids[k]))
        for k in members:
            representative[k] = rep
    return representative


def removal_rows(records: Sequence[dict[str, Any]], exact: ExactGroups, representative: Sequence[int],
                 shingles: Mapping[int, np.ndarray]) -> list[dict[str, Any]]:
    """Step 5: one row per removed record: every record that is not its cluster's representative.

    A record's cluster is that of its exact keeper; exact groups of one survivor are clusters too.
    Clusters are numbered ``0, 1, ...`` in the order of their representatives' ids.

    Args:
        records: the input records. exact: from :func:`exact_groups`.
        representative: from :func:`choose_representatives` (survivor positions).
        shingles: sorted unique ``uint64`` shingle set of every clustered survivor position.

    Returns:
        Rows ``{"id", "domain", "kind" ("exact" | "near"), "cluster_id", "representative_id",
        "representative_domain", "jaccard"}`` sorted by ``(cluster_id, id)``; ``jaccard`` is the
        exact Jaccard of the record's shingle set to its representative's (1.0 for an exact copy).
    """
    ids = [r["id"] for r in records]
    survivors, keeper_of = exact.survivors, exact.keeper_of
    pos = {doc: k for k, doc in enumerate(survivors)}
    rep_k_of = [representative[pos[keeper_of[i]]] for i in range(len(records))]
    reps = sorted({rep_k for i, rep_k in enumerate(rep_k_of) if survivors[rep_k] != i},
                  key=lambda rep_k: ids[survivors[rep_k]])
    cluster_no = {rep_k: n for n, rep_k in enumerate(reps)}
    removed: list[dict[str, Any]] = []
    for i in range(len(records)):
        rep_k = rep_k_of[i]
        rep = survivors[rep_k]
        if i == rep:
            continue
        k = pos[keeper_of[i]]
        removed.append({
            "id": ids[i], "domain": records[i]["domain"], "kind": "exact" if keeper_of[i] != i else "near",
            "cluster_id": cluster_no[rep_k], "representative_id": ids[rep],
            "representative_domain": records[rep]["domain"],
            "jaccard": 1.0 if k == rep_k else jaccard(shingles[k], shingles[rep_k]),
        })
    removed.sort(key=lambda r: (r["cluster_id"], r["id"]))
    return removed


def domain_counts(records: Sequence[dict[str, Any]], removed: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Step 6: per domain (in order of first appearance), ``before``, ``after``, ``exact_removed``,
    ``near_removed`` documents, with ``before == after + exact_removed + near_removed``."""
    counts: dict[str, dict[str, int]] = {}
    for r in records:
        c = counts.setdefault(r["domain"], {"before": 0, "after": 0, "exact_removed": 0, "near_removed": 0})
        c["before"] += 1
    for row in removed:
        counts[row["domain"]][f"{row['kind']}_removed"] += 1
    for c in counts.values():
        c["after"] = c["before"] - c["exact_removed"] - c["near_removed"]
    return counts


def candidate_rows(near: NearDuplicates, ids: Sequence[str], threshold: float) -> list[dict[str, Any]]:
    """Every checked candidate pair as ``{"a", "b" (ids), "estimated_jaccard", "jaccard", "verified"}``,
    sorted by ``(a, b)``; ``ids`` are the document ids of the positions ``near`` refers to."""
    rows = [{"a": ids[i], "b": ids[j], "estimated_jaccard": est, "jaccard": exact, "verified": exact >= threshold}
            for i, j, est, exact in near.checked]
    rows.sort(key=lambda c: (c["a"], c["b"]))
    return rows


def deduplicate(records: Sequence[dict[str, Any]], *, num_perm: int = 128, threshold: float = 0.8,
                min_recall: float = 0.99, seed: int = 1, workers: int = 1,
                lsh_config: dict[str, Any] | None = None) -> DedupResult:
    """Exact then near-duplicate removal over ``records`` (all domains together).

    1. Exact (:func:`exact_groups`): records whose :func:`domainlm.korean.hangul.normalize_text`
       forms are equal (BLAKE2b digest) form a group; its smallest id goes on, the others are
       ``exact`` removals.
    2. Near (:func:`find_near_duplicates`): the exact survivors get jamo 3-gram ∪ word 5-gram
       shingles, datasketch MinHash signatures and LSH banded by :func:`choose_bands_rows`; a
       candidate pair links two documents only if its exact Jaccard is >= ``threshold``.
    3. Clusters (:func:`cluster`): union-find over the verified links (exact groups hang off
       their keeper).
    4. Representatives (:func:`choose_representatives`): the one document of a cluster that is
       kept has the most distinct shingles (the token count used here); ties go to the smallest
       id. Links are transitive, so a removed document's Jaccard to its representative may be
       below the threshold; ``removed`` reports it.
    5. Removal rows (:func:`removal_rows`) and 6. per-domain counts (:func:`domain_counts`).

    Args:
        records: dicts with at least ``id`` (str, unique), ``text`` (str), ``domain`` (str).
        workers: processes for signatures. lsh_config: datasketch storage config.

    Returns:
        :class:`DedupResult`. ``removed`` rows: ``id``, ``domain``, ``kind`` (``exact`` |
        ``near``), ``cluster_id`` (int), ``representative_id``, ``representative_domain``,
        ``jaccard`` (exact Jaccard of the shingle sets to the representative). ``candidates``
        rows: ``a``, ``b`` (ids), ``estimated_jaccard``, ``jaccard``, ``verified``.
        ``counts`` per domain: ``before``, ``after``, ``exact_removed``, ``near_removed``
        with ``before == after + exact_removed + near_removed``.

    Raises:
        ValueError: on a record without a str ``id``/``text``/``domain``, a duplicate id,
            a text that is empty after normalization, or bad parameters.
    """
    t0 = time.perf_counter()
    bands, rows = choose_bands_rows(num_perm, threshold, min_recall)
    _check_records(records)
    exact = exact_groups(records)
    survivor_ids = [records[i]["id"] for i in exact.survivors]
    t_exact = time.perf_counter()

    near = find_near_duplicates([exact.normalized[i] for i in exact.survivors], num_perm=num_perm, bands=bands,
                                rows=rows, seed=seed, workers=workers, lsh_config=lsh_config)
    t_near = time.perf_counter()

    clusters = cluster(near.verified(threshold))
    representative = choose_representatives(len(exact.survivors), clusters,
                                            {k: len(near.shingles[k]) for ks in clusters for k in ks}, survivor_ids)
    removed = removal_rows(records, exact, representative, near.shingles)
    counts = domain_counts(records, removed)
    candidates = candidate_rows(near, survivor_ids, threshold)
    sizes = Counter(row["cluster_id"] for row in removed)  # removed members; + 1 for the representative
    stats = {
        "candidate_pairs": len(candidates),
        "verified_pairs": sum(c["verified"] for c in candidates),
        "clusters": len(sizes),
        "largest_cluster": max(sizes.values(), default=-1) + 1,
        "exact_s": t_exact - t0, **near.seconds,
        "cluster_s": time.perf_counter() - t_near,
    }
    removed_ids = {row["id"] for row in removed}
    kept = [r for r in records if r["id"] not in removed_ids]
    return DedupResult(kept, removed, candidates, counts, banding_report(num_perm, threshold, bands, rows), stats)
