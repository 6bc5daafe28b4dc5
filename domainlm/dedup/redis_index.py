"""The ``candidates`` step on a Redis server (``dedup.lsh_backend: redis``): a datasketch ``MinHashLSH``
index with Redis storage, holding every exact keeper as a datasketch ``LeanMinHash``.

The index groups documents by the bytes of each band's ``rows`` signature values, the same buckets
as the sorted band keys of the ``sort`` backend (:func:`domainlm.dedup.minhash_lsh.bucket_pairs`), and
each bucket is expanded by that same function, so both backends give the same candidate pairs and
byte-identical outputs. The index is a shared, persistent alternative for teams that keep one in
Redis; it inserts document by document from this process, so the ``sort`` backend is the one that
scales out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from domainlm.dedup import minhash_lsh as mh


def storage_config(redis_cfg: dict[str, Any]) -> dict[str, Any]:
    """datasketch ``storage_config`` for a Redis index named ``redis_cfg['basename']`` (default ``dedup``).

    Raises:
        ValueError: when ``host`` or ``port`` is missing.
    """
    missing = [k for k in ("host", "port") if k not in (redis_cfg or {})]
    if missing:
        raise ValueError(f"dedup.redis is missing {missing} (needed for lsh_backend: redis)")
    basename = str(redis_cfg.get("basename", "dedup")).encode("utf-8")
    return {"type": "redis", "basename": basename, "redis": {"host": redis_cfg["host"], "port": int(redis_cfg["port"])}}


def clear_index(config: dict[str, Any]) -> None:
    """Delete every Redis key of the index named ``config['basename']`` (a stale index would add old
    documents to this run's buckets)."""
    import redis

    client = redis.Redis(**config["redis"])
    keys = list(client.scan_iter(match=config["basename"] + b"_*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i : i + 1000])
    client.close()


def redis_band_pairs(work: Path, n: int, banding: dict[str, Any], params) -> list[dict[str, Any]]:
    """Candidate pairs per band from a Redis-backed ``MinHashLSH``; writes ``bands/<j>.npy`` like
    :func:`domainlm.dedup.workflow.candidates_task` and returns the same per-band stats.

    The index is cleared before use and removed afterwards.
    """
    from datasketch import LeanMinHash, MinHashLSH

    from domainlm.dedup.workflow import read_rows, save_json, save_npy

    bands, rows, num_perm = banding["bands"], banding["rows"], params.num_perm
    config = storage_config(params.redis)
    keeper_of = np.load(work / "keeper_of.npy", mmap_mode="r")
    clear_index(config)
    results = []
    try:
        lsh = MinHashLSH(num_perm=num_perm, params=(bands, rows), storage_config=config, prepickle=False)
        with lsh.insertion_session(buffer_size=50_000) as session:
            for start in range(0, n, 4096):
                stop = min(start + 4096, n)
                sigs = read_rows(work / "signatures.u32", np.arange(start, stop), num_perm)
                for k in range(stop - start):
                    doc = start + k
                    if keeper_of[doc] != doc or (sigs[k] == mh.EMPTY_VALUE).all():
                        continue  # exact copies are not searched; an empty set has no bucket partner
                    lean = LeanMinHash(seed=params.seed, hashvalues=sigs[k], scheme=mh.SCHEME)
                    session.insert(b"%d" % doc, lean, check_duplication=False)
        for j, table in enumerate(lsh.hashtables):
            bucket_keys = list(table.keys())
            bucket_of, members = [], []
            for b, docs in enumerate(table.getmany(*bucket_keys) if bucket_keys else ()):
                for d in docs:
                    bucket_of.append(b)
                    members.append(int(d))
            order = np.argsort(np.array(members, dtype=np.int64), kind="stable")
            keys = np.array(bucket_of, dtype=np.uint64)[order]
            docs_arr = np.array(members, dtype=np.int64)[order]
            pairs, oversized = mh.bucket_pairs(keys, docs_arr, params.max_bucket_size)
            save_npy(work / "bands" / f"{j:04d}.npy", pairs)
            stats = {
                "pairs": int(len(pairs)),
                "oversized_buckets": len(oversized),
                "largest_oversized_bucket": int(max(oversized, default=0)),
                "skipped": 0,
            }
            save_json(work / "bands" / f"{j:04d}.json", stats)
            results.append(stats)
    finally:
        clear_index(config)
    return results
