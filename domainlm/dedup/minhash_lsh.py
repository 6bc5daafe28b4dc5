"""Near-duplicate detection by MinHash-LSH, as pure functions on numpy arrays (one file per algorithm, as
text-dedup does). The engines (:mod:`domainlm.dedup.engines`) run these same functions on blocks of
documents, in this process's worker pool or on Ray; :mod:`domainlm.dedup.workflow` chains them.

MinHash: Broder 1997, with datasketch's ``affine32`` permutations (datasketch >= 2.0), so a signature
here equals ``datasketch.MinHash(num_perm, seed).update_batch(...)`` over the same 32-bit shingle
hashes. Banding: Leskovec, Rajaraman & Ullman, "Mining of Massive Datasets" (MMDS), ch. 3.4. The named
steps, in order:

1. **shingles** (:func:`domainlm.korean.hangul.shingle_hashes_many`): jamo 3-grams ∪ word 5-grams;
2. **signature** (:func:`signatures`): ``num_perm`` MinHash values per document;
3. **band** keys (:func:`band_keys`): one 64-bit key per band of ``rows`` signature values;
4. **candidate pair**\\ s (:func:`bucket_pairs`): documents sharing a band key, by sorting the keys;
5. **estimated Jaccard** filter (:func:`estimated_jaccard`, :func:`estimate_floor`);
6. **verification** by exact Jaccard (:func:`jaccard`) of re-shingled documents;
7. **clusters** (:func:`cluster`, union-find over verified pairs) and their **cluster representative**
   (:func:`choose_representatives`), then removal rows (:func:`removal_rows`) and counts (:func:`domain_counts`).

Bands × rows are chosen from the *measured* background: on a seeded sample of document pairs, the
exact Jaccard of unrelated Korean documents is far from 0 (jamo 3-grams come from a small alphabet),
and it, not the threshold alone, decides how many false candidate pairs a banding admits
(:func:`choose_bands_rows`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

SCHEME = "affine32"  # datasketch >= 2.0 default permutation scheme: a*h + b mod 2**32 after an fmix32 pre-mix
EMPTY_VALUE = np.uint32(0xFFFFFFFF)  # the value of every permutation of an empty set (datasketch's init)
S_CURVE_POINTS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
_U64 = np.uint64


# ------------------------------------------------------------------ banding (bands x rows)


def candidate_probability(j: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """LSH S-curve: probability that a pair with Jaccard ``j`` becomes a candidate pair.

    ``P(j) = 1 - (1 - j**rows) ** bands``: the pair collides in at least one of ``bands``
    bands of ``rows`` MinHash values each (MMDS ch. 3.4). Computed as
    ``-expm1(bands · log1p(-j**rows))``, exact where ``j**rows`` is tiny. Vectorised over an array ``j``.
    """
    if isinstance(j, np.ndarray):
        return -np.expm1(bands * np.log1p(-(j.astype(np.float64) ** rows)))
    return -math.expm1(bands * math.log1p(-(j**rows))) if j < 1.0 else 1.0


def _integral(f, lo: float, hi: float, points: int = 128) -> float:
    """∫_lo^hi f(s) ds by Gauss-Legendre quadrature (``numpy.polynomial.legendre.leggauss``); the S-curve is
    a polynomial of degree ``bands · rows``, smooth enough that 128 nodes agree with adaptive quadrature
    to 1e-12 on the bandings used here."""
    x, w = np.polynomial.legendre.leggauss(points)
    s = 0.5 * (hi - lo) * x + 0.5 * (hi + lo)
    return float(0.5 * (hi - lo) * np.dot(w, f(s)))


def false_positive_area(threshold: float, bands: int, rows: int) -> float:
    """∫₀^threshold P(j) dj: the S-curve area below the threshold (datasketch's FP measure)."""
    return _integral(lambda s: candidate_probability(s, bands, rows), 0.0, threshold)


def false_negative_area(threshold: float, bands: int, rows: int) -> float:
    """∫_threshold^1 (1 - P(j)) dj: the area above the S-curve past the threshold."""
    return _integral(lambda s: 1.0 - candidate_probability(s, bands, rows), threshold, 1.0)


def false_candidate_rate(background: np.ndarray | None, threshold: float, bands: int, rows: int) -> float:
    """Expected share of unrelated document pairs that become candidate pairs (false candidates).

    ``mean over sampled pairs of P(J) · [J < threshold]``: the S-curve averaged over the measured
    background Jaccard distribution (pairs at or above the threshold are true near duplicates, not
    false candidates). Without a sample (``None`` or empty), the background is taken as uniform on
    ``[0, threshold)``: ``∫₀^t P(j) dj / t`` (:func:`false_positive_area`).

    Args:
        background: ``float64`` exact Jaccard of sampled document pairs, shape ``(k,)``.
    """
    if background is None or len(background) == 0:
        return false_positive_area(threshold, bands, rows) / threshold
    below = background[background < threshold]
    return float(candidate_probability(below, bands, rows).sum() / len(background))


def _smallest_bands(threshold: float, rows: int, min_recall: float) -> int:
    """The fewest bands of ``rows`` rows (at least 2, datasketch's minimum) with P(threshold) >= min_recall."""
    bands = max(2, math.ceil(math.log1p(-min_recall) / math.log1p(-(threshold**rows))))
    while bands > 2 and candidate_probability(threshold, bands - 1, rows) >= min_recall:
        bands -= 1  # guard against rounding in the closed form
    while candidate_probability(threshold, bands, rows) < min_recall:
        bands += 1
    return bands


def choose_bands_rows(
    num_perm: int, threshold: float, min_recall: float, background: np.ndarray | None = None
) -> tuple[int, int]:
    """Pick LSH bands ``b`` and rows ``r``: recall at the threshold first, then the fewest false candidates.

    Among ``(b, r)`` with ``b·r <= num_perm``, ``b >= 2`` and ``P(threshold) = 1 - (1 - t**r)**b >=
    min_recall``, minimise the expected false-candidate rate on the measured background
    (:func:`false_candidate_rate`). For a fixed ``r`` both P(t) and the rate grow with ``b``, so
    only the smallest feasible ``b`` per ``r`` is a contender; the search is over ``r``. Ties go to
    the larger P(t). More rows make the S-curve steeper: each extra row divides the rate at a
    background Jaccard ``j`` by about ``j / t``, and costs about ``1 / t`` times more bands.

    With ``background=None`` (uniform background) this is text-dedup's rule and gives 16 x 6 for
    ``num_perm=128, t=0.8, min_recall=0.99``. On Korean documents the background Jaccard of
    unrelated pairs is around 0.13-0.2, so the rate is dominated by that bulk and the rule picks
    the most rows ``num_perm`` allows: 26 x 8 at ``num_perm=256`` (P(0.8) = 0.9916).

    Returns:
        ``(bands, rows)``.

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
        if 2 * rows > num_perm or math.log1p(-min_recall) / math.log1p(-(threshold**rows)) * rows > num_perm + rows:
            continue  # even the closed-form least number of bands does not fit num_perm
        bands = _smallest_bands(threshold, rows, min_recall)
        if bands * rows > num_perm:
            continue
        key = (
            false_candidate_rate(background, threshold, bands, rows),
            -candidate_probability(threshold, bands, rows),
            bands,
            rows,
        )
        if best is None or key < best:
            best = key
    if best is None:
        raise ValueError(
            f"no bands x rows with b*r <= dedup.num_perm={num_perm} reaches "
            f"dedup.min_recall_at_threshold={min_recall} at threshold {threshold}: raise num_perm"
        )
    return best[2], best[3]


def num_perm_for(
    max_rate: float, threshold: float, min_recall: float, background: np.ndarray | None, limit: int = 2048
) -> int | None:
    """The fewest permutations whose best banding keeps the false-candidate rate at or under ``max_rate``
    (the advice the stage logs when ``dedup.num_perm`` is too small for the corpus), or ``None`` up to ``limit``."""
    for rows in range(1, limit):
        if math.log1p(-min_recall) / math.log1p(-(threshold**rows)) * rows > limit + rows:
            return None
        bands = _smallest_bands(threshold, rows, min_recall)
        if bands * rows > limit:
            return None
        if false_candidate_rate(background, threshold, bands, rows) <= max_rate:
            return bands * rows
    return None


def banding_report(
    num_perm: int, threshold: float, bands: int, rows: int, background: np.ndarray | None = None, n_docs: int = 0
) -> dict[str, Any]:
    """Numbers describing a banding: P(candidate) at the threshold, FP/FN areas, S-curve points, and the
    expected false candidates on the measured background.

    ``expected_false_candidate_rate`` is per unrelated pair; ``expected_false_candidate_pairs_per_doc``
    is that rate times ``(n_docs - 1) / 2``, comparable to the measured ``candidate_pairs / docs``.
    """
    rate = false_candidate_rate(background, threshold, bands, rows)
    return {
        "num_perm": num_perm,
        "threshold": threshold,
        "bands": bands,
        "rows": rows,
        "perms_used": bands * rows,
        "p_candidate_at_threshold": candidate_probability(threshold, bands, rows),
        "false_positive_area": false_positive_area(threshold, bands, rows),
        "false_negative_area": false_negative_area(threshold, bands, rows),
        "expected_false_candidate_rate": rate,
        "expected_false_candidate_pairs_per_doc": rate * max(n_docs - 1, 0) / 2.0,
        "s_curve": {f"j{round(j * 100):03d}": candidate_probability(j, bands, rows) for j in S_CURVE_POINTS},
    }


def datasketch_default_banding(num_perm: int, threshold: float) -> dict[str, Any]:
    """The banding datasketch would pick by default (``MinHashLSH(threshold, num_perm)``:
    equal false-positive/false-negative weights) and its P(candidate) at the threshold."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return {"bands": lsh.b, "rows": lsh.r, "p_candidate_at_threshold": candidate_probability(threshold, lsh.b, lsh.r)}


def background_summary(background: np.ndarray) -> dict[str, float]:
    """Quantiles of the measured background Jaccard (``pairs``, ``j_median``, ``j_p99``, ``j_p999``, ``j_max``)."""
    if len(background) == 0:
        return {"pairs": 0, "j_median": 0.0, "j_p99": 0.0, "j_p999": 0.0, "j_max": 0.0}
    q = np.quantile(background, [0.5, 0.99, 0.999])
    return {
        "pairs": int(len(background)),
        "j_median": float(q[0]),
        "j_p99": float(q[1]),
        "j_p999": float(q[2]),
        "j_max": float(background.max()),
    }


def sample_pairs(k: int, max_pairs: int, seed: int) -> np.ndarray:
    """Index pairs ``(i, j)``, ``i < j < k``, for the background sample: all of them when there are at most
    ``max_pairs``, else ``max_pairs`` drawn with a seeded ``numpy.random.default_rng`` (distinct pairs).

    Returns:
        ``int64`` array of shape ``(p, 2)``.
    """
    total = k * (k - 1) // 2
    if total <= max_pairs:
        i, j = np.triu_indices(k, 1)
        return np.stack([i, j], axis=1).astype(np.int64)
    rng = np.random.default_rng(seed)
    picked: set[int] = set()
    while len(picked) < max_pairs:
        draw = rng.integers(0, k, size=(max_pairs, 2))
        draw = draw[draw[:, 0] != draw[:, 1]]
        for a, b in np.sort(draw, axis=1).tolist():
            picked.add(a * k + b)
            if len(picked) == max_pairs:
                break
    flat = np.array(sorted(picked), dtype=np.int64)
    return np.stack([flat // k, flat % k], axis=1)


# ------------------------------------------------------------------ signatures


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's ``affine32`` permutation parameters ``(a, b)``, each ``uint32`` of shape ``(num_perm,)``.

    Taken from ``datasketch.MinHash(num_perm, seed, scheme="affine32").permutations`` itself (a
    seeded ``numpy.random.RandomState``), so the signatures here are datasketch's.
    """
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME).permutations
    return a.astype(np.uint32), b.astype(np.uint32)


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (the pre-mix datasketch's ``affine32`` applies to every input hash)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def signatures(
    hashes: np.ndarray, bounds: np.ndarray, perms: tuple[np.ndarray, np.ndarray], out: np.ndarray | None = None
) -> np.ndarray:
    """MinHash signatures of many sets of 32-bit shingle hashes, equal to datasketch's.

    For set ``d`` (``hashes[bounds[d]:bounds[d + 1]]``) and permutation ``k``:
    ``min over h of (a_k · fmix32(h) + b_k) mod 2**32``, which is what
    ``MinHash(num_perm, seed, hashfunc=identity).update_batch(hashes)`` computes (tests check it);
    an empty set keeps ``0xFFFFFFFF`` everywhere, as datasketch's initial values. The
    ``(shingles × num_perm)`` products are never materialised: a numba-compiled loop keeps each
    document's running minimum (5-6× numpy's broadcast-and-reduce on 256 permutations, measured).

    Args:
        hashes: ``uint32`` shingle hashes laid end to end (repeats allowed: they do not change a minimum).
        bounds: ``int64`` segment bounds ``(k + 1,)``.
        perms: ``(a, b)`` from :func:`permutations`.
        out: ``uint32`` C-contiguous ``(k, num_perm)`` signatures to lower in place (the MinHash of a
            union is the element-wise minimum: the jamo and the word shingles may be signed in turn).

    Returns:
        ``uint32`` array of shape ``(k, num_perm)`` (``out`` when given).
    """
    from domainlm.dedup.affine32 import min_affine32  # numba: imported where signatures are computed only

    a, b = (np.ascontiguousarray(x, dtype=np.uint32) for x in perms)
    if out is None:
        out = np.full((len(bounds) - 1, len(a)), EMPTY_VALUE, dtype=np.uint32)
    min_affine32(
        fmix32(np.ascontiguousarray(hashes, dtype=np.uint32)), np.ascontiguousarray(bounds, dtype=np.int64), a, b, out
    )
    return out


def minhash_signature(text: str, num_perm: int = 256, seed: int = 1) -> np.ndarray:
    """MinHash signature of one text's shingle set, ``uint32`` ``(num_perm,)`` (normalized here first)."""
    from domainlm.korean.hangul import normalize_text, shingle_hashes_many

    hashes, bounds = shingle_hashes_many([normalize_text(text)])
    return signatures(hashes, bounds, permutations(num_perm, seed))[0]


def band_keys(sigs: np.ndarray, bands: int, rows: int, docs: np.ndarray) -> np.ndarray:
    """One 64-bit key per band: a hash of the band's ``rows`` signature values.

    Band ``j`` covers signature columns ``[j·rows, (j+1)·rows)``; its key chains MurmurHash3's 64-bit
    finalizer over the values, seeded by ``j``, so two documents share a band key exactly when they
    share the band's values (up to a 2**-64 collision, which only adds a candidate pair that the
    estimated-Jaccard filter then drops). A document with an empty shingle set (all values
    ``0xFFFFFFFF``) gets its own key from its index in every band, so empty documents are not
    bucketed together.

    Args:
        sigs: ``uint32`` ``(k, num_perm)``. docs: ``int64`` ``(k,)`` global document indices.

    Returns:
        ``uint64`` array of shape ``(k, bands)``.
    """
    from domainlm.korean.hangul import fmix64

    k = len(sigs)
    keys = np.empty((k, bands), dtype=_U64)
    for j in range(bands):
        h = np.full(k, (0x9E3779B97F4A7C15 * (j + 1)) % (1 << 64), dtype=_U64)
        for col in range(j * rows, (j + 1) * rows):
            h = fmix64(h ^ sigs[:, col].astype(_U64))
        keys[:, j] = h
    empty = (sigs == EMPTY_VALUE).all(axis=1)
    if empty.any():
        keys[empty] = fmix64((docs[empty].astype(_U64) << _U64(8)) | _U64(0xE))[:, None]
    return keys


# ------------------------------------------------------------------ candidate pairs


def pack_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Document-index pairs as ``uint64`` ``(a << 32) | b`` (indices below 2**32), sortable as pairs."""
    return (a.astype(_U64) << _U64(32)) | b.astype(_U64)


def unpack_pairs(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_pairs`: two ``int64`` arrays."""
    return (packed >> _U64(32)).astype(np.int64), (packed & _U64(0xFFFFFFFF)).astype(np.int64)


def bucket_pairs(keys: np.ndarray, docs: np.ndarray, max_bucket: int) -> tuple[np.ndarray, list[int]]:
    """Candidate pairs of one band: documents that share a band key, found by sorting the keys.

    A stable sort groups equal keys into runs (a bucket each) without a Python object per key. A
    bucket of ``m <= max_bucket`` documents gives all ``m(m-1)/2`` pairs; a larger one (boilerplate
    shared by thousands of pages) is not expanded into ``m²`` pairs: it gives the ``m - 1`` pairs of
    its smallest document with every other one (a star: its members still reach one cluster if they
    are near duplicates of that document) and is reported.

    Args:
        keys: ``uint64`` band keys ``(k,)``. docs: ``int64`` document indices ``(k,)``, ascending.
        max_bucket: the largest bucket expanded into all of its pairs (``dedup.max_bucket_size``).

    Returns:
        ``(pairs, oversized)``: sorted distinct :func:`pack_pairs` values ``a < b``, and the sizes of
        the buckets that were larger than ``max_bucket``.
    """
    if len(keys) < 2:
        return np.empty(0, dtype=_U64), []
    order = np.argsort(keys, kind="stable")
    skeys, sdocs = keys[order], docs[order]
    starts = np.flatnonzero(np.concatenate(([True], skeys[1:] != skeys[:-1])))
    sizes = np.diff(np.append(starts, len(skeys)))
    parts: list[np.ndarray] = []
    oversized = sizes[sizes > max_bucket].tolist()
    for m in np.unique(sizes[(sizes >= 2) & (sizes <= max_bucket)]).tolist():
        first = starts[sizes == m]
        members = sdocs[first[:, None] + np.arange(m)]  # (buckets, m), ascending within a bucket
        i, j = np.triu_indices(m, 1)
        parts.append(pack_pairs(members[:, i].ravel(), members[:, j].ravel()))
    for first, m in zip(starts[sizes > max_bucket].tolist(), oversized):
        members = sdocs[first : first + m]
        parts.append(pack_pairs(np.full(m - 1, members[0]), members[1:]))
    if not parts:
        return np.empty(0, dtype=_U64), oversized
    return np.unique(np.concatenate(parts)), oversized


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Signature-estimated Jaccard of row pairs: the share of equal MinHash values, as ``MinHash.jaccard``.

    Args:
        sig_a, sig_b: ``uint32`` ``(p, num_perm)``.

    Returns:
        ``float64`` ``(p,)``.
    """
    return np.count_nonzero(sig_a == sig_b, axis=1) / float(sig_a.shape[1])


def estimate_floor(threshold: float, num_perm: int, sigmas: float) -> float:
    """The least estimated Jaccard a candidate pair needs to be verified exactly.

    The estimate is a binomial share over ``num_perm`` values, standard deviation
    ``σ = sqrt(t(1 - t) / num_perm)`` at ``J = t`` (0.025 at t = 0.8, 256 permutations); a pair
    right at the threshold falls below ``t - sigmas·σ`` with probability about ``Φ(-sigmas)``
    (3e-7 at 5σ), so the filter loses nothing measurable.
    """
    return threshold - sigmas * math.sqrt(threshold * (1.0 - threshold) / num_perm)


# ------------------------------------------------------------------ exact Jaccard, clusters


def exact_key(normalized: str) -> bytes:
    """Exact-duplicate key: 16-byte BLAKE2b digest of a :func:`domainlm.korean.hangul.normalize_text`
    result, UTF-8 encoded.

    Raises:
        UnicodeEncodeError: on a lone surrogate (a JSON ``\\ud800`` escape).
    """
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).digest()


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard |A∩B| / |A∪B| of two sorted unique ``uint64`` shingle arrays (0 if both empty)."""
    inter = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - inter
    return inter / union if union else 0.0


def exact_keepers(key_hi: np.ndarray, key_lo: np.ndarray, id_order: np.ndarray) -> np.ndarray:
    """Exact-duplicate groups: for every document, the index of its group's keeper (the smallest id).

    Args:
        key_hi, key_lo: ``uint64`` halves of each document's :func:`exact_key`, shape ``(n,)``.
        id_order: ``int64`` rank of each document's id in sorted id order (ids are unique), ``(n,)``.

    Returns:
        ``int64`` ``keeper_of`` of shape ``(n,)``; ``keeper_of[i] == i`` for keepers.
    """
    n = len(key_hi)
    order = np.lexsort((id_order, key_lo, key_hi))  # by key, then by id: each group's first is its keeper
    if n == 0:
        return np.empty(0, dtype=np.int64)
    hi, lo = key_hi[order], key_lo[order]
    new_group = np.concatenate(([True], (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])))
    group_first = order[np.flatnonzero(new_group)]
    keeper_of = np.empty(n, dtype=np.int64)
    keeper_of[order] = group_first[np.cumsum(new_group) - 1]
    return keeper_of


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


def cluster(links: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components of the verified near-duplicate links, by :class:`UnionFind`.

    Only the documents in a link take part (the union-find is over them, relabelled ``0..m-1``),
    so the cost follows the verified pairs, not the corpus.

    Args:
        links: ``(i, j)`` document indices whose exact Jaccard passed the threshold.

    Returns:
        The clusters (each of two or more indices, ascending), ordered by their smallest index.
    """
    links = list(links)
    members = sorted({k for pair in links for k in pair})
    local = {doc: k for k, doc in enumerate(members)}
    uf = UnionFind(len(members))
    for i, j in links:
        uf.union(local[i], local[j])
    by_root: dict[int, list[int]] = {}
    for doc in members:
        by_root.setdefault(uf.find(local[doc]), []).append(doc)
    return list(by_root.values())


def choose_representatives(
    clusters: Sequence[Sequence[int]], shingle_counts: Mapping[int, int], ids: Sequence[str]
) -> dict[int, int]:
    """The cluster representative (the one document kept) of every clustered document.

    A cluster's representative has the most distinct shingles (the token count used here); ties
    go to the smallest id.

    Args:
        clusters: from :func:`cluster`. shingle_counts: document -> number of distinct shingles, for
            every clustered document. ids: document id by index (anything indexable by int).

    Returns:
        ``{document: representative}`` for every clustered document (unclustered ones represent themselves).
    """
    representative: dict[int, int] = {}
    for members in clusters:
        rep = min(members, key=lambda k: (-shingle_counts[k], ids[k]))
        for k in members:
            representative[k] = rep
    return representative


def removal_rows(
    ids: Sequence[str],
    domains: Sequence[str],
    keeper_of: np.ndarray,
    representative: Mapping[int, int],
    rep_jaccard: Mapping[int, float],
) -> list[dict[str, Any]]:
    """One row per removed document: every document that is not its cluster's representative.

    A document's cluster is that of its exact keeper (an exact group of one keeper is a cluster
    too). Clusters are numbered ``0, 1, ...`` in the order of their representatives' ids.

    Args:
        ids, domains: document id and domain by index. keeper_of: from :func:`exact_keepers`.
        representative: from :func:`choose_representatives` (keepers only; others represent themselves).
        rep_jaccard: keeper -> exact Jaccard of its shingle set to its representative's, for every
            clustered keeper that is not a representative.

    Returns:
        Rows ``{"id", "domain", "kind" ("exact" | "near"), "cluster_id", "representative_id",
        "representative_domain", "jaccard"}`` sorted by ``(cluster_id, id)``; ``jaccard`` is 1.0 for
        an exact copy of the representative.
    """
    n = len(keeper_of)
    rep_of_keeper = np.arange(n, dtype=np.int64)
    if representative:
        keys = np.fromiter(representative.keys(), dtype=np.int64, count=len(representative))
        rep_of_keeper[keys] = np.fromiter(representative.values(), dtype=np.int64, count=len(representative))
    rep = rep_of_keeper[keeper_of]
    removed = np.flatnonzero(rep != np.arange(n))
    reps = sorted({int(r) for r in rep[removed]}, key=lambda r: ids[r])
    cluster_no = {r: c for c, r in enumerate(reps)}
    rows: list[dict[str, Any]] = []
    for i in removed.tolist():
        keeper, r = int(keeper_of[i]), int(rep[i])
        rows.append(
            {
                "id": ids[i],
                "domain": domains[i],
                "kind": "exact" if keeper != i else "near",
                "cluster_id": cluster_no[r],
                "representative_id": ids[r],
                "representative_domain": domains[r],
                "jaccard": 1.0 if keeper == r else rep_jaccard[keeper],
            }
        )
    rows.sort(key=lambda row: (row["cluster_id"], row["id"]))
    return rows


def domain_counts(
    domains: Sequence[str], before: Mapping[str, int], removed: Sequence[dict[str, Any]]
) -> dict[str, dict[str, int]]:
    """Per domain (in ``domains`` order): ``before``, ``after``, ``exact_removed``, ``near_removed``
    documents, with ``before == after + exact_removed + near_removed``.

    Args:
        domains: every domain, in output order. before: documents read per domain.
        removed: from :func:`removal_rows`.
    """
    counts = {d: {"before": int(before.get(d, 0)), "after": 0, "exact_removed": 0, "near_removed": 0} for d in domains}
    for row in removed:
        counts[row["domain"]][f"{row['kind']}_removed"] += 1
    for c in counts.values():
        c["after"] = c["before"] - c["exact_removed"] - c["near_removed"]
    return counts
