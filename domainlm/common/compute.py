"""One compute policy for every torch stage: which dtype the matrix work runs in, and on how many threads.

The ``compute`` params section holds ``dtype: auto | fp32 | bf16`` and ``threads`` (null = every core this process
may run on). :func:`resolve` turns it into a :class:`ComputePolicy`:

- ``auto`` picks bf16 *autocast* where the hardware computes bf16 fast: a CUDA device with bf16
  (``torch.cuda.is_bf16_supported()``), or a CPU whose ``/proc/cpuinfo`` flags include ``amx_bf16`` or
  ``avx512_bf16`` (PyTorch's oneDNN kernels use them under ``torch.autocast("cpu", dtype=torch.bfloat16)``);
  fp32 everywhere else, since emulated bf16 is slower than fp32. ``transformers.is_torch_bf16_cpu_available()`` is
  not used: it checks the PyTorch build, not the processor.
- Weights, gradients and optimizer states stay fp32 in every case; autocast only runs eligible ops (matmuls,
  linear layers) in bf16 (PyTorch AMP, Micikevicius et al. 2018), so no gradient scaler is needed for bf16.

Every torch stage (base_model, train_lora, evaluate_experts, evaluate, train_classifier, refine_labels' LM member)
calls :meth:`domainlm.common.stage.StageRun.use_compute`, which applies the threads, logs the policy and writes
:meth:`ComputePolicy.metrics` into the stage's metrics; the served classifier applies the policy logged with it.

Threads: OpenMP threads spin while they wait, so a 2-thread torch job on a 2-core machine whose other core is busy
runs several times slower than 1 thread. The default (all cores) is right on an idle machine; set ``threads: 1``
when the machine is shared.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DTYPES = ("auto", "fp32", "bf16")
#: /proc/cpuinfo flags that mean the CPU computes bf16 dot products in hardware.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags of the first processor in ``cpuinfo`` (empty when the file is missing, e.g. macOS)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def available_cores() -> int:
    """CPU cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count()`` where that is missing)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def fast_bf16(device: str, flags: set[str] | None = None) -> tuple[bool, str]:
    """Whether ``device`` (``cpu`` or ``cuda``) computes bf16 fast, and why (a short reason for the log)."""
    import torch

    if device == "cuda":
        ok = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        return ok, "CUDA device with bf16" if ok else "CUDA device without bf16"
    flags = cpu_flags() if flags is None else flags
    found = [f for f in CPU_BF16_FLAGS if f in flags]
    if found:
        return True, f"CPU with {'+'.join(found)}"
    return False, f"CPU without {' or '.join(CPU_BF16_FLAGS)}: bf16 would be emulated, slower than fp32"


@dataclass(frozen=True)
class ComputePolicy:
    """A resolved compute policy.

    Attributes:
        dtype: ``"bf16"`` (autocast) or ``"fp32"``.
        threads: intra-op compute threads for torch and the BLAS/OpenMP pools (≥ 1).
        device: ``"cpu"`` or ``"cuda"``.
        reason: why this dtype (hardware detection or an explicit setting).
    """

    dtype: str
    threads: int
    device: str
    reason: str = ""

    @property
    def bf16(self) -> bool:
        """True when matrix work runs under bf16 autocast."""
        return self.dtype == "bf16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast(device, dtype=torch.bfloat16)`` when :attr:`bf16`, else a no-op context."""
        import torch

        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=torch.bfloat16)

    def trainer_kwargs(self) -> dict[str, Any]:
        """``transformers.TrainingArguments`` keywords: ``bf16`` (the Trainer's autocast, via accelerate) and
        ``use_cpu``."""
        return {"bf16": self.bf16, "use_cpu": self.device == "cpu"}

    def metrics(self) -> dict[str, Any]:
        """What a stage writes into its metrics: ``dtype`` (str), ``bf16`` (0/1), ``threads``, ``device``."""
        return {"dtype": self.dtype, "bf16": int(self.bf16), "threads": self.threads, "device": self.device}

    def describe(self) -> str:
        """One log line: dtype, device, threads and the reason."""
        return f"{self.dtype} on {self.device}, {self.threads} thread(s) ({self.reason})"

    def apply(self) -> None:
        """Set torch's intra-op threads and the BLAS/OpenMP pools (threadpoolctl) to :attr:`threads`, for the
        rest of the process (a stage is one process)."""
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(self.threads)
        threadpool_limits(limits=self.threads)

    @contextlib.contextmanager
    def applied(self) -> Iterator[ComputePolicy]:
        """:meth:`apply` for the block only; the previous torch and BLAS thread settings come back after it."""
        import torch
        from threadpoolctl import threadpool_limits

        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with threadpool_limits(limits=self.threads):
                yield self
        finally:
            torch.set_num_threads(previous)


def autocast(policy: ComputePolicy | None) -> contextlib.AbstractContextManager:
    """``policy.autocast()``, or a no-op context for ``None`` (fp32, as without a policy)."""
    return policy.autocast() if policy is not None else contextlib.nullcontext()


def resolve(
    cfg: Mapping[str, Any] | None, *, device: str | None = None, flags: set[str] | None = None
) -> ComputePolicy:
    """The policy for the ``compute`` params section ``cfg`` (``dtype``, ``threads``) on this machine.

    Args:
        cfg: ``{"dtype": "auto" | "fp32" | "bf16", "threads": int | None}``; None or missing keys mean
            ``auto`` and all cores.
        device: ``cpu`` or ``cuda``; default ``cuda`` when ``torch.cuda.is_available()``.
        flags: CPU flags to decide on (tests); default :func:`cpu_flags`.

    Returns:
        A :class:`ComputePolicy`. ``bf16`` asked for explicitly is honoured even where it is slow (the reason says so).

    Raises:
        ValueError: ``dtype`` not in :data:`DTYPES`, or ``threads`` below 1.
    """
    import torch

    cfg = dict(cfg or {})
    dtype = str(cfg.get("dtype") or "auto").lower()
    if dtype not in DTYPES:
        raise ValueError(f"compute.dtype must be one of {DTYPES}, got {cfg.get('dtype')!r}")
    threads = cfg.get("threads")
    if threads is None:
        threads = available_cores()
    elif int(threads) < 1:
        raise ValueError(f"compute.threads must be >= 1 or null (all cores), got {threads!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    fast, why = fast_bf16(device, flags)
    if dtype == "auto":
        dtype, reason = ("bf16" if fast else "fp32"), f"auto: {why}"
    else:
        reason = f"set in params ({why})"
    return ComputePolicy(dtype=dtype, threads=int(threads), device=device, reason=reason)
