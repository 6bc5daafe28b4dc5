"""Near-duplicate removal: exact hashing, then MinHash-LSH with estimated- and exact-Jaccard verification.

:mod:`~domainlm.dedup.minhash_lsh` holds the algorithm (pure functions), :mod:`~domainlm.dedup.workflow` its
named steps over a resumable work folder, :mod:`~domainlm.dedup.engines` where the steps' tasks run (a local
process pool or Ray), :mod:`~domainlm.dedup.redis_index` the Redis-backed candidate step and
:mod:`~domainlm.dedup.files` the stage's outputs and metrics.
"""
