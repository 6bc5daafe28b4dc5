"""The compiled inner loop of :func:`domainlm.dedup.minhash_lsh.signatures`: datasketch's ``affine32`` MinHash
permutations, ``(a_k · h + b_k) mod 2**32``, with a running minimum per document and permutation.

A module of its own so that numba (about 65 MiB resident) is imported only by the processes that sign
documents. Compiled once, on import, for its one signature and cached on disk (``cache=True``).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit("void(uint32[::1], int64[::1], uint32[::1], uint32[::1], uint32[:, ::1])", cache=True, nogil=True)
def min_affine32(mixed, bounds, a, b, out):  # pragma: no cover - compiled by numba
    """``out[d, k] = min(out[d, k], min over t in segment d of (a[k]·mixed[t] + b[k]) mod 2**32)``.

    Args:
        mixed: ``uint32`` fmix32-mixed shingle hashes, segments laid end to end.
        bounds: ``int64`` segment bounds ``(docs + 1,)``. a, b: ``uint32`` ``(num_perm,)`` permutations.
        out: ``uint32`` ``(docs, num_perm)`` running minima, lowered in place.
    """
    for d in range(bounds.shape[0] - 1):
        row = out[d]
        for t in range(bounds[d], bounds[d + 1]):
            h = mixed[t]
            for k in range(a.shape[0]):
                v = np.uint32((a[k] * h + b[k]) & 0xFFFFFFFF)  # numba widens to 64 bits: wrap like uint32
                if v < row[k]:
                    row[k] = v
