"""Hangul-aware text normalization and shingling for near-duplicate detection.

Precomposed Hangul syllables are decomposed arithmetically into conjoining jamo (Unicode
3.12, "Hangul Syllable Decomposition"), so two spellings that differ by one final consonant
still share most character n-grams. A document's shingle set is the union of its jamo
3-grams and its word 5-grams; every other script passes through unchanged, so English text
simply gets character 3-grams. Shingles come in two forms: readable strings (the reference
definition, used by tests and benchmarks) and 64-bit integer ids computed with numpy
(the fast path the ``dedup`` stage uses). Both forms describe the same set: the id map is
injective for jamo n-grams and a 63-bit hash for word n-grams.
"""

from __future__ import annotations

import unicodedata

import numpy as np

# Unicode Hangul syllable composition constants (The Unicode Standard, section 3.12).
S_BASE = 0xAC00  # 가, the first precomposed syllable
L_BASE = 0x1100  # ᄀ, the first leading consonant (choseong)
V_BASE = 0x1161  # ᅡ, the first vowel (jungseong)
T_BASE = 0x11A7  # one before ᆨ, the first trailing consonant (jongseong); T = 0 means none
L_COUNT, V_COUNT, T_COUNT = 19, 21, 28
N_COUNT = V_COUNT * T_COUNT  # 588 syllables per leading consonant
S_COUNT = L_COUNT * N_COUNT  # 11,172 precomposed syllables, U+AC00..U+D7A3

JAMO_NGRAM = 3
WORD_NGRAM = 5

_CODE_POINT_BITS = 21  # every Unicode code point is < 0x110000 < 2**21
_WORD_FLAG = np.uint64(1 << 63)  # set on word n-gram ids, clear on jamo n-gram ids
_U64 = np.uint64


def normalize_text(text: str) -> str:
    """Canonical form used for exact-duplicate hashing and for shingling.

    NFC (Unicode canonical composition), every run of Unicode whitespace (``str.split()``)
    collapsed to one ASCII space, leading/trailing whitespace stripped.

    Raises:
        TypeError: when ``text`` is not a ``str``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    return " ".join(unicodedata.normalize("NFC", text).split())


def code_points(text: str) -> np.ndarray:
    """Unicode code points of ``text`` as a ``uint32`` array of shape ``(len(text),)``."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def decompose_syllable(ch: str) -> str:
    """Decompose one precomposed Hangul syllable into 2 or 3 conjoining jamo.

    ``L = (s - 0xAC00) // 588``, ``V = ((s - 0xAC00) % 588) // 28``, ``T = (s - 0xAC00) % 28``,
    giving ``U+1100+L``, ``U+1161+V`` and, when ``T > 0``, ``U+11A7+T`` (Unicode section 3.12).
    Any other character is returned unchanged. Example: ``'한'`` → ``'한'``.

    Raises:
        ValueError: when ``ch`` is not exactly one character.
    """
    if len(ch) != 1:
        raise ValueError(f"expected one character, got {len(ch)}: {ch!r}")
    s = ord(ch) - S_BASE
    if not 0 <= s < S_COUNT:
        return ch
    lead, vowel, tail = s // N_COUNT, (s % N_COUNT) // T_COUNT, s % T_COUNT
    jamo = chr(L_BASE + lead) + chr(V_BASE + vowel)
    return jamo + chr(T_BASE + tail) if tail else jamo


def decompose(text: str) -> str:
    """``text`` with every precomposed Hangul syllable decomposed into conjoining jamo.

    Equals ``unicodedata.normalize('NFD', text)`` on Hangul syllables (which Unicode
    decomposes by the same arithmetic) while leaving every other character untouched.
    Example: ``decompose('한글')`` → ``'한글'`` (U+1112 U+1161 U+11AB U+1100 U+1173 U+11AF).
    """
    return jamo_code_points(text).tobytes().decode("utf-32-le")


# ---------------------------------------------------------------- string shingles (reference)


def jamo_ngrams(text: str, n: int = JAMO_NGRAM) -> list[str]:
    """Character n-grams of the jamo-decomposed normalized text, in order (duplicates kept).

    A text whose decomposition is shorter than ``n`` (but not empty) gives one n-gram, the
    whole decomposition. Spaces are part of the n-grams, so word boundaries count.
    """
    jamo = decompose(normalize_text(text))
    if not jamo:
        return []
    if len(jamo) < n:
        return [jamo]
    return [jamo[i : i + n] for i in range(len(jamo) - n + 1)]


def word_ngrams(text: str, n: int = WORD_NGRAM) -> list[str]:
    """Word n-grams (words joined by one space) of the normalized text, in order.

    Words are the whitespace-separated tokens of :func:`normalize_text`. A text of fewer than
    ``n`` words (but at least one) gives one shingle: the whole word sequence.
    """
    words = normalize_text(text).split(" ")
    if words == [""]:
        return []
    if len(words) < n:
        return [" ".join(words)]
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


def shingle_strings(text: str, jamo_n: int = JAMO_NGRAM, word_n: int = WORD_NGRAM) -> set[tuple[str, str]]:
    """The shingle set of ``text`` in readable form: ``("jamo", gram)`` and ``("word", gram)``.

    Jamo ``jamo_n``-grams (:func:`jamo_ngrams`) ∪ word ``word_n``-grams (:func:`word_ngrams`),
    each tagged with its kind, so a very short text whose whole word sequence equals one of
    its jamo n-grams still has two shingles. Reference definition of :func:`shingle_ids`
    (one id per element, same set sizes and Jaccard), used by tests and benchmarks.
    """
    return {("jamo", g) for g in jamo_ngrams(text, jamo_n)} | {("word", g) for g in word_ngrams(text, word_n)}


# ---------------------------------------------------------------- integer shingles (fast path)


def fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer (Appleby), a fixed avalanching bijection on ``uint64``.

    Element-wise on a ``uint64`` array (multiplication wraps mod 2**64); returns a new array.
    Deterministic across processes and runs, unlike Python's salted ``hash()``.
    """
    x = np.asarray(x, dtype=_U64)
    x = x ^ (x >> _U64(33))
    x *= _U64(0xFF51AFD7ED558CCD)
    x ^= x >> _U64(33)
    x *= _U64(0xC4CEB9FE1A85EC53)
    x ^= x >> _U64(33)
    return x


# Rabin-Karp polynomial hashing mod 2**64: base P (odd, so invertible mod 2**64) and P**-1.
_POLY_BASE = 0x9E3779B97F4A7C15
_POLY_INV = pow(_POLY_BASE, -1, 1 << 64)
_powers: dict[str, np.ndarray] = {"pow": np.ones(1, _U64), "inv": np.ones(1, _U64)}


def _poly_powers(m: int) -> tuple[np.ndarray, np.ndarray]:
    """``(P**i, P**-i) mod 2**64`` for ``i < m`` as ``uint64`` arrays (cached, grown by doubling)."""
    if len(_powers["pow"]) < m:
        size = 1 << max(m - 1, 1).bit_length()
        for key, base in (("pow", _POLY_BASE), ("inv", _POLY_INV)):
            steps = np.full(size, base, dtype=_U64)
            steps[0] = 1
            _powers[key] = np.multiply.accumulate(steps)  # wraps mod 2**64
    return _powers["pow"][:m], _powers["inv"][:m]


def decompose_code_points(cps: np.ndarray) -> np.ndarray:
    """:func:`jamo_code_points` for a ``uint32`` code-point array (shape ``(m,)`` → ``(m',)``)."""
    return _decompose(cps)[0]


def _decompose(cps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Jamo code points of ``cps`` and, for every code point, where its 1-3 jamo start in them.

    Each code point gets 1 slot (not a syllable), 2 (syllable without a final consonant) or 3;
    ``where = cumsum`` of those counts places the leading jamo (or the code point itself), the
    vowel one slot later and the final consonant two slots later.

    Returns:
        ``(jamo, where)``: ``uint32`` jamo of shape ``(m',)`` and ``int64`` ``(m + 1,)`` slot starts
        (``where[-1] == m'``).
    """
    s = cps - np.uint32(S_BASE)  # wraps around below U+AC00, so one comparison finds syllables
    syllable = s < S_COUNT
    where = np.zeros(len(cps) + 1, dtype=np.int64)
    if not syllable.any():
        np.cumsum(np.ones(len(cps), dtype=np.int64), out=where[1:])
        return cps.copy(), where
    s = np.where(syllable, s, np.uint32(0))
    tail = s % T_COUNT
    has_tail = syllable & (tail > 0)
    np.cumsum(1 + syllable.astype(np.int64) + has_tail, out=where[1:])
    jamo = np.empty(where[-1], dtype=np.uint32)
    start = where[:-1]
    jamo[start] = np.where(syllable, s // N_COUNT + L_BASE, cps)
    jamo[start[syllable] + 1] = (s[syllable] % N_COUNT) // T_COUNT + V_BASE
    jamo[start[has_tail] + 2] = tail[has_tail] + T_BASE
    return jamo, where


def jamo_code_points(text: str) -> np.ndarray:
    """Code points of ``text`` with every precomposed Hangul syllable decomposed into jamo.

    Vectorised form of :func:`decompose_syllable`: each code point fills a row of 3 slots
    (leading/vowel/trailing jamo for a syllable, the code point itself otherwise) and the
    used slots are read back in order, so a syllable becomes 2 (no final consonant) or 3
    code points and every other code point is copied.

    Returns:
        ``uint32`` array of shape ``(m,)`` with ``len(text) <= m <= 3 * len(text)``.
    """
    return decompose_code_points(code_points(text))


def pack_jamo_ngrams(jamo: np.ndarray, n: int = JAMO_NGRAM) -> np.ndarray:
    """Pack consecutive code-point n-grams into ``uint64`` ids, 21 bits per code point.

    Exact (injective) for ``n <= 3``: ``(c0 << 42) | (c1 << 21) | c2`` < 2**63. A sequence
    shorter than ``n`` (but not empty) gives one id for the whole sequence.

    Args:
        jamo: ``uint32`` code points, shape ``(m,)``, e.g. from :func:`jamo_code_points`.
        n: n-gram length, 1 to 3.

    Returns:
        ``uint64`` array of shape ``(max(m - n + 1, 1),)`` (``(0,)`` when ``m == 0``).

    Raises:
        ValueError: when ``n`` is outside 1..3 (longer n-grams do not fit 63 bits).
    """
    if not 1 <= n <= 3:
        raise ValueError(f"jamo n-gram length must be 1..3 to pack into 63 bits, got {n}")
    m = len(jamo)
    if m == 0:
        return np.empty(0, dtype=_U64)
    cps = jamo.astype(_U64)
    if m < n:
        packed = _U64(0)
        for c in cps:
            packed = (packed << _U64(_CODE_POINT_BITS)) | c
        return np.array([packed], dtype=_U64)
    count = m - n + 1
    packed = cps[:count].copy()
    for k in range(1, n):
        packed <<= _U64(_CODE_POINT_BITS)
        packed |= cps[k : k + count]
    return packed


def word_ngram_ids(cps: np.ndarray, n: int = WORD_NGRAM) -> np.ndarray:
    """64-bit ids of the word n-grams of a normalized text, top bit set.

    A word n-gram is the substring running from the start of word ``k`` to the end of word
    ``k + n - 1`` (single spaces included), i.e. exactly the string shingle of
    :func:`word_ngrams`. It is hashed with a Rabin-Karp polynomial hash mod 2**64 (Karp &
    Rabin 1987), all n-grams at once from prefix sums:
    ``H(i, j) = (S[j] - S[i]) · P**-i`` with ``S[k] = Σ_{t<k} (c_t + 1) · P**t``, then
    MurmurHash3's finalizer (:func:`fmix64`). The top bit keeps word n-gram ids disjoint from
    jamo n-gram ids (< 2**63). Fewer than ``n`` words (but at least one) give one id, the
    hash of the whole text.

    Args:
        cps: ``uint32`` code points of a :func:`normalize_text` result (words separated by
            exactly one U+0020, no leading/trailing space), shape ``(m,)``.
        n: words per n-gram, >= 1.

    Returns:
        ``uint64`` array of shape ``(max(w - n + 1, 1),)`` for ``w`` words; ``(0,)`` when empty.

    Raises:
        ValueError: when ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"word n-gram length must be >= 1, got {n}")
    m = len(cps)
    if m == 0:
        return np.empty(0, dtype=_U64)
    space_at = np.flatnonzero(cps == 32)
    starts = np.empty(len(space_at) + 1, dtype=np.int64)
    starts[0] = 0
    starts[1:] = space_at + 1
    ends = np.empty_like(starts)
    ends[:-1] = space_at
    ends[-1] = m
    k = min(n, len(starts))
    first, last = starts[: len(starts) - k + 1], ends[k - 1 :]
    power, inverse = _poly_powers(m + 1)
    prefix = np.empty(m + 1, dtype=_U64)
    prefix[0] = 0
    np.cumsum((cps.astype(_U64) + _U64(1)) * power[:m], out=prefix[1:])  # wraps mod 2**64
    return fmix64((prefix[last] - prefix[first]) * inverse[first]) | _WORD_FLAG


def raw_shingle_ids(norm: str, jamo_n: int = JAMO_NGRAM, word_n: int = WORD_NGRAM) -> np.ndarray:
    """Shingle ids of an already normalized text, in text order, duplicates kept.

    Jamo ``jamo_n``-grams packed exactly (:func:`pack_jamo_ngrams`, ids < 2**63) followed by
    word ``word_n``-grams hashed (:func:`word_ngram_ids`, ids >= 2**63). MinHash is
    indifferent to repeats, so callers that only sign the set may skip the de-duplication.

    Args:
        norm: output of :func:`normalize_text` (not re-normalized here).

    Returns:
        ``uint64`` array of shape ``(k,)``; ``(0,)`` for an empty text.
    """
    cps = code_points(norm)
    jamo = pack_jamo_ngrams(decompose_code_points(cps), jamo_n)
    return np.concatenate((jamo, word_ngram_ids(cps, word_n)))


def unique_sorted(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a 1-D integer array (``np.unique`` without its extra outputs)."""
    if len(values) == 0:
        return values.copy()
    values = np.sort(values)
    keep = np.empty(len(values), dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def shingle_ids(text: str, jamo_n: int = JAMO_NGRAM, word_n: int = WORD_NGRAM) -> np.ndarray:
    """The shingle set of ``text`` as a sorted, duplicate-free ``uint64`` array.

    Same set as :func:`shingle_strings` (one id per distinct string shingle): jamo
    ``jamo_n``-grams packed exactly (ids < 2**63) ∪ word ``word_n``-grams hashed
    (ids >= 2**63). Sorted unique arrays let exact Jaccard be computed with
    ``np.intersect1d(..., assume_unique=True)``.

    Returns:
        ``uint64`` array of shape ``(k,)``; ``(0,)`` for a text that is empty after
        :func:`normalize_text`.
    """
    return unique_sorted(raw_shingle_ids(normalize_text(text), jamo_n, word_n))


_FOLD_MULTIPLIER = _U64(0xD6E8FEB86659FD93)  # odd 64-bit constant


def to_hash32(ids: np.ndarray) -> np.ndarray:
    """Fold 64-bit shingle ids to 32-bit hashes, ``uint32`` of the same shape.

    Multiply-shift hashing (Dietzfelbinger et al. 1997): the top 32 bits of ``id · A mod
    2**64`` for a fixed odd ``A``; two distinct ids collide with probability about 2**-31.
    MinHash's ``affine32`` scheme (datasketch >= 2.0) then mixes these with fmix32 and
    permutes them.
    """
    return ((ids * _FOLD_MULTIPLIER) >> _U64(32)).astype(np.uint32)


# ---------------------------------------------------------------- many texts at once (the dedup fast path)


def _segment_bounds(lengths: np.ndarray) -> np.ndarray:
    """``int64`` bounds ``(k + 1,)`` of segments of the given lengths laid end to end: ``[0, l0, l0 + l1, ...]``."""
    bounds = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=bounds[1:])
    return bounds


def _pack_many(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pack_jamo_ngrams` of every segment ``values[starts[d]:ends[d]]`` at once, concatenated
    in segment order, and the ``(k + 1,)`` bounds of each segment's ids in the result.

    Every n-gram of the joined values is packed; those that cross a segment end (the ``n - 1``
    positions before each end) are dropped. A segment shorter than ``n`` (but not empty) gets one id
    for the whole segment, as :func:`pack_jamo_ngrams` gives it.
    """
    m = len(values)
    lengths = ends - starts
    counts = np.where(lengths >= n, lengths - n + 1, np.minimum(lengths, 1))
    bounds = _segment_bounds(counts)
    span = max(m - n + 1, 0)
    if span == 0:
        out = np.empty(bounds[-1], dtype=_U64)
    else:
        cps = values.astype(_U64)
        packed = cps[:span].copy()
        for k in range(1, n):
            packed <<= _U64(_CODE_POINT_BITS)
            packed |= cps[k : k + span]
        valid = np.ones(span, dtype=bool)
        for j in range(1, n):  # an n-gram starting at end - j runs past the segment's end
            at = ends[lengths > 0] - j
            valid[at[(at >= 0) & (at < span)]] = False
        if (lengths >= n).all():
            return packed[valid], bounds
        out = np.empty(bounds[-1], dtype=_U64)
        full = lengths >= n
        out[np.repeat(full, counts)] = packed[valid]
    for d in np.flatnonzero((lengths < n) & (lengths > 0)):  # shorter than n: one id for the whole segment
        out[bounds[d]] = pack_jamo_ngrams(values[starts[d] : ends[d]], n)[0]
    return out, bounds


def _word_ngram_ids_many(
    cps: np.ndarray, starts: np.ndarray, ends: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`word_ngram_ids` of every text ``cps[starts[d]:ends[d]]`` at once; ids concatenated in
    text order, with the ``(k + 1,)`` bounds of each text's ids."""
    m = len(cps)
    k_texts = len(starts)
    if m == 0:
        return np.empty(0, dtype=_U64), np.zeros(k_texts + 1, dtype=np.int64)
    text_of = np.repeat(np.arange(k_texts), ends - starts)
    space_at = np.flatnonzero(cps == 32)
    nonempty = ends > starts
    # normalized texts: words are separated by exactly one space, none leads or trails, so a word starts
    # at a text's start or right after a space, and ends at a text's end or right before a space
    is_start = np.zeros(m + 1, dtype=bool)
    is_start[starts[nonempty]] = True
    is_start[space_at + 1] = True
    w_start = np.flatnonzero(is_start[:m])
    is_end = np.zeros(m + 1, dtype=bool)
    is_end[ends[nonempty]] = True
    is_end[space_at] = True
    w_end = np.flatnonzero(is_end[1:]) + 1
    w_text = text_of[w_start]
    words = np.bincount(w_text, minlength=k_texts)
    w_bounds = _segment_bounds(words)
    counts = np.where(words >= n, words - n + 1, np.minimum(words, 1))
    bounds = _segment_bounds(counts)
    # the g-th n-gram of text d runs from word w_bounds[d] + g to word w_bounds[d] + g + min(n, words) - 1
    gram_text = np.repeat(np.arange(k_texts), counts)
    g = np.arange(bounds[-1], dtype=np.int64) - bounds[:-1][gram_text]
    first_word = w_bounds[:-1][gram_text] + g
    last_word = first_word + np.minimum(n, words[gram_text]) - 1
    first, last = w_start[first_word], w_end[last_word]
    power, inverse = _poly_powers(m + 1)
    prefix = np.empty(m + 1, dtype=_U64)
    prefix[0] = 0
    np.cumsum((cps.astype(_U64) + _U64(1)) * power[:m], out=prefix[1:])  # wraps mod 2**64
    return fmix64((prefix[last] - prefix[first]) * inverse[first]) | _WORD_FLAG, bounds


def shingle_id_parts_many(
    texts: list[str], jamo_n: int = JAMO_NGRAM, word_n: int = WORD_NGRAM
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The jamo n-gram ids and the word n-gram ids of many normalized texts, as two segmented arrays.

    Returns:
        ``(jamo_ids, jamo_bounds, word_ids, word_bounds)``: ``uint64`` ids laid end to end and ``int64``
        bounds ``(len(texts) + 1,)`` each; text ``d``'s shingles are ``jamo_ids[jamo_bounds[d]:jamo_bounds[d+1]]``
        then ``word_ids[word_bounds[d]:word_bounds[d+1]]`` (see :func:`raw_shingle_ids_many`).
    """
    if not texts:
        empty = np.zeros(1, dtype=np.int64)
        return np.empty(0, dtype=_U64), empty, np.empty(0, dtype=_U64), empty
    cps = code_points("".join(texts))
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    bounds = _segment_bounds(lengths)
    starts, ends = bounds[:-1], bounds[1:]
    jamo, jamo_bounds = _decompose(cps)  # jamo_bounds[i]: where code point i's jamo start
    jamo_ids, jb = _pack_many(jamo, jamo_bounds[starts], jamo_bounds[ends], jamo_n)
    word_ids, wb = _word_ngram_ids_many(cps, starts, ends, word_n)
    return jamo_ids, jb, word_ids, wb


def raw_shingle_ids_many(
    texts: list[str], jamo_n: int = JAMO_NGRAM, word_n: int = WORD_NGRAM
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`raw_shingle_ids` of many normalized texts in a few numpy passes over their joined code points.

    The same ids, per text, as :func:`raw_shingle_ids` (tests check this): jamo n-grams and word
    n-grams never cross a text boundary, and the Rabin-Karp word hash is position-free
    (``(S[j] - S[i]) · P**-i``), so hashing over the joined texts gives each text's own values.
    Per-text numpy calls cost more than the arithmetic on ~1.5 KB texts; this removes them.

    Args:
        texts: outputs of :func:`normalize_text` (not re-normalized here).

    Returns:
        ``(ids, bounds)``: ``uint64`` ids of every text laid end to end (each text's jamo ids, then
        its word ids) and ``int64`` bounds of shape ``(len(texts) + 1,)``: text ``d`` owns
        ``ids[bounds[d]:bounds[d + 1]]``.
    """
    jamo_ids, jb, word_ids, wb = shingle_id_parts_many(texts, jamo_n, word_n)
    k = len(jb) - 1
    out_bounds = jb + wb
    out = np.empty(out_bounds[-1], dtype=_U64)
    text_of_jamo = np.repeat(np.arange(k), np.diff(jb))
    out[np.arange(len(jamo_ids)) + wb[:-1][text_of_jamo]] = jamo_ids
    text_of_word = np.repeat(np.arange(k), np.diff(wb))
    out[np.arange(len(word_ids)) + jb[1:][text_of_word]] = word_ids
    return out, out_bounds


def segment_unique_sorted(values: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values of every segment ``values[bounds[d]:bounds[d + 1]]`` of a ``uint32`` array.

    One sort of ``(segment << 32) | value`` keys instead of one ``np.unique`` per segment.

    Returns:
        ``(values, bounds)``: ``uint32`` distinct values, segment by segment, ascending within each,
        and ``int64`` bounds ``(k + 1,)``.
    """
    k = len(bounds) - 1
    seg = np.repeat(np.arange(k, dtype=_U64), np.diff(bounds))
    keys = np.sort((seg << _U64(32)) | values.astype(_U64))
    keep = np.empty(len(keys), dtype=bool)
    if len(keys):
        keep[0] = True
        np.not_equal(keys[1:], keys[:-1], out=keep[1:])
    keys = keys[keep]
    out_bounds = np.searchsorted(keys >> _U64(32), np.arange(k + 1, dtype=_U64)).astype(np.int64)
    return (keys & _U64(0xFFFFFFFF)).astype(np.uint32), out_bounds


def shingle_hashes_many(
    texts: list[str], jamo_n: int = JAMO_NGRAM, word_n: int = WORD_NGRAM, distinct: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """32-bit shingle hashes of many normalized texts (the MinHash input).

    With ``distinct`` (the default), per text equal to ``unique_sorted(to_hash32(raw_shingle_ids(text)))``;
    without, ``to_hash32(raw_shingle_ids(text))`` in text order, repeats kept: a MinHash signature does
    not change with repeats, and skipping the per-text sort is cheaper than signing the ~20% repeats.

    Returns:
        ``(hashes, bounds)``: ``uint32`` hashes laid end to end and ``int64`` bounds ``(len(texts) + 1,)``.
    """
    ids, bounds = raw_shingle_ids_many(texts, jamo_n, word_n)
    if not distinct:
        return to_hash32(ids), bounds
    return segment_unique_sorted(to_hash32(ids), bounds)
