"""Thread limits for compute: PyTorch's intra-op pool and the BLAS/OpenMP pools (threadpoolctl)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def limit_threads(n: int | None, *, blas: bool = True) -> Iterator[None]:
    """Run the block with at most ``n`` compute threads, then restore the previous settings.

    Sets PyTorch's intra-op pool (``torch.set_num_threads``) and, with ``blas=True``, the BLAS/OpenMP
    pools numpy and scikit-learn use (``threadpoolctl.threadpool_limits``). ``None`` leaves
    everything as it is.

    Small models on the shared 2-core machine are the reason: 2 threads measured 10x slower than 1
    for the refinement ensemble's LSTM and LM embedding and 75x slower for its logistic regression,
    because threads that wait for a busy core spin instead of computing.

    Raises:
        ValueError: when ``n`` is not ``None`` and below 1.
    """
    if n is None:
        yield
        return
    if int(n) < 1:
        raise ValueError(f"thread count must be >= 1 or null, got {n!r}")
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        if blas:
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=int(n)):
                yield
        else:
            yield
    finally:
        torch.set_num_threads(previous)
