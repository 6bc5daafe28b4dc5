"""DeepSpeed ZeRO for ``train_lora``: the ``enabled`` switch, the one place where the shipped config is
adapted to DeepSpeed's CPU accelerator, the process-group set-up that accelerate needs there, and the
rank of this process. ZeRO stage 2 partitions optimizer states and gradients across data-parallel
ranks (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models"); the HF Trainer drives it from a DeepSpeed config (transformers ``integrations/deepspeed``).

``train_lora.deepspeed`` in params.yaml::

    enabled: auto | true | false   # auto: on when CUDA is present and deepspeed imports
    config: {...}                  # the DeepSpeed config handed to the HF Trainer, as shipped

With ``enabled: true`` on a machine without CUDA, DeepSpeed runs on its CPU accelerator
(``DS_ACCELERATOR=cpu``; without oneCCL its communication backend is gloo) and the keys listed by
:func:`cpu_config` are changed, each for a stated reason; every other key passes through as shipped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENABLED_VALUES = ("auto", True, False)
# Set to a folder, this makes every rank write what it saw to <folder>/rank<r>.json (engine, ZeRO stage,
# world size, losses, digests) and its LoRA tensors to <folder>/rank<r>_lora.safetensors. Tests only.
PROBE_ENV = "DOMAINLM_ZERO_PROBE_DIR"
_REMOVED = "<removed>"


@dataclass(frozen=True)
class ConfigChange:
    """One key of the shipped DeepSpeed config that differs on the CPU accelerator.

    Attributes:
        key: dotted path into the config (``"bf16.enabled"``).
        shipped: the value in params.yaml.
        used: the value used on CPU, or ``"<removed>"`` when the key (block) is dropped.
        reason: why it must differ.
    """

    key: str
    shipped: Any
    used: Any
    reason: str


def parse_enabled(value: Any) -> str | bool:
    """``train_lora.deepspeed.enabled`` as ``"auto"``, ``True`` or ``False``.

    Raises:
        ValueError: any other value (a YAML string ``"true"`` included: write the boolean).
    """
    if value is None:
        return "auto"
    if isinstance(value, bool) or value == "auto":
        return value
    raise ValueError(f"train_lora.deepspeed.enabled must be auto, true or false, not {value!r}")


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _set(config: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        node = node[part]
    if value == _REMOVED:
        del node[last]
    else:
        node[last] = value


def cpu_config(config: Mapping[str, Any]) -> tuple[dict, list[ConfigChange]]:
    """The shipped ZeRO config adapted to DeepSpeed's CPU accelerator, and the list of changes made.

    Only the keys below change; every other key (ZeRO stage, offload device, buckets, ``auto`` batch,
    clipping and optimizer values) passes through as shipped:

    - ``bf16.enabled`` → ``False``. The HF Trainer fills this key from its own ``bf16`` argument and
      raises on a mismatch; ``TrainingArguments(bf16=True)`` raises "Your setup doesn't support
      bf16/gpu" unless ``use_cpu=True`` or CUDA is present, and ``use_cpu=True`` bypasses DeepSpeed
      (accelerate then sets up plain multi-CPU DDP). So ZeRO on CPU trains in fp32.

    Returns:
        ``(config, changes)``: a deep copy with the changes applied; one :class:`ConfigChange` per key
        whose value actually changed (a key already at its CPU value is not listed).
    """
    out = copy.deepcopy(dict(config))
    rules = [
        (
            "bf16.enabled",
            False,
            "transformers refuses TrainingArguments(bf16=True) without CUDA unless use_cpu=True, and use_cpu=True "
            "bypasses DeepSpeed; the Trainer requires this key to equal its bf16 argument, so ZeRO on CPU runs fp32",
        ),
    ]
    changes = []
    for key, used, reason in rules:
        shipped = _get(out, key)
        if shipped is None or shipped == used:
            continue
        _set(out, key, used)
        changes.append(ConfigChange(key, shipped, used, reason))
    return out, changes


def process_rank() -> int:
    """This process's global rank as the launcher set it (``RANK``: torchrun, the deepspeed launcher); 0 alone."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True on global rank 0, the one process that writes the adapter, the Trainer log and the metrics."""
    return process_rank() == 0


def launch_env() -> dict[str, str]:
    """Make a process started without a launcher a world of one on 127.0.0.1; return the variables it set.

    DeepSpeed needs ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; when one is
    missing it goes looking for MPI. A launcher (torchrun, deepspeed) sets them all; then nothing changes.
    """
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return {}
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) != 1:
        raise RuntimeError(
            "WORLD_SIZE is set but RANK, LOCAL_RANK, MASTER_ADDR or MASTER_PORT is not: "
            "launch with torchrun or the deepspeed launcher"
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    log.info("no launcher: DeepSpeed runs as a world of one on 127.0.0.1:%s", os.environ["MASTER_PORT"])
    return env


def ensure_build_tools() -> None:
    """Make sure DeepSpeed can JIT-build its CPU ops: ``shm_comm`` at start-up, ``cpu_adam`` for the offloaded
    optimizer.

    torch's ``cpp_extension`` runs ``ninja`` from ``PATH`` and the C++ compiler ``$CXX`` (default ``c++``)
    against the Python headers. The ``ninja`` wheel (a deepspeed requirement) puts its binary beside this
    Python; a venv that is not activated does not have it on ``PATH``, so it is added.

    Raises:
        RuntimeError: no ninja, no C++ compiler, or no ``Python.h``, naming what to install.
    """
    import shutil
    import sysconfig

    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError as exc:
            raise RuntimeError("DeepSpeed's CPU ops are built with ninja: pip install -r requirements.txt") from exc
        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError("DeepSpeed's CPU ops are built with a C++ compiler: apt-get install g++")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        raise RuntimeError(
            f"DeepSpeed's CPU ops need the Python headers ({sysconfig.get_paths()['include']}/Python.h): "
            "apt-get install python3-dev"
        )


def init_cpu_process_group():
    """Set up accelerate's process state for DeepSpeed on CPU before ``TrainingArguments`` is built.

    Left to itself, ``TrainingArguments`` (with ``use_cpu=False``, as DeepSpeed needs) creates
    ``PartialState`` with no backend: on a machine without CUDA accelerate then initialises DeepSpeed's
    process group but records ``num_processes=1`` and ``process_index=0`` on every rank, so each rank
    would read the whole batch and every rank would act as the main process. Creating the state first
    with ``backend="gloo"`` (DeepSpeed's CPU accelerator's backend without oneCCL) and
    ``ACCELERATE_USE_DEEPSPEED=true`` gives the real world size and rank; the Trainer then reuses it
    through ``accelerator_config={"use_configured_state": True}`` (:func:`accelerator_config`).

    Returns:
        the ``accelerate.PartialState``.

    Raises:
        RuntimeError: the state's world size is not ``WORLD_SIZE``.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    state = PartialState(backend="gloo")
    if state.distributed_type != DistributedType.DEEPSPEED or state.num_processes != int(os.environ["WORLD_SIZE"]):
        raise RuntimeError(
            f"accelerate set up {state.distributed_type} with {state.num_processes} processes, "
            f"expected DeepSpeed with WORLD_SIZE={os.environ['WORLD_SIZE']}"
        )
    return state


def init_gpu_process_group() -> None:
    """Initialise DeepSpeed's process group on CUDA (backend from its accelerator: NCCL) unless one exists.

    accelerate, when ``TrainingArguments`` sets it up for DeepSpeed, keeps an existing group; having it
    before the Trainer lets :func:`shared_tempdir` name one checkpoint folder to every rank. The tests run
    without a GPU, so they exercise the CPU path, not this one.
    """
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(auto_mpi_discovery=False)


def accelerator_config() -> dict[str, Any]:
    """``TrainingArguments.accelerator_config`` that makes the Trainer reuse :func:`init_cpu_process_group`'s state."""
    return {"use_configured_state": True}


def shared_tempdir(prefix: str) -> str:
    """A temporary folder made by rank 0 and named to every rank (``broadcast_object_list``; one path for all).

    The DeepSpeed checkpoints of ``load_best_model_at_end`` are written by every rank into one folder and
    read back from it, so with several machines it must be on a filesystem they share (``TMPDIR``).
    """
    import tempfile

    import torch.distributed as dist

    path = [tempfile.mkdtemp(prefix=prefix) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    return path[0]


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def finish() -> None:
    """Wait for every rank (rank 0 saves and scores the adapter meanwhile), then tear the process group down."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def frozen_digest(model) -> str:
    """SHA-256 over the names and bytes of every parameter that does not require grad (the frozen base)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def write_probe(trainer, model, base_digest_before: str, *, saved_adapter: bool) -> None:
    """When ``$DOMAINLM_ZERO_PROBE_DIR`` is set, write what this rank saw (tests read it); otherwise nothing.

    ``rank<r>.json`` holds the Trainer's wrapped model class, its ZeRO stage, world sizes, optimizer
    classes, bf16, the frozen-base digest before and after training, the Trainer's log history and
    whether this rank saved the adapter; ``rank<r>_lora.safetensors`` this rank's LoRA tensors.
    """
    folder = os.environ.get(PROBE_ENV)
    if not folder:
        return
    import torch.distributed as dist
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    engine = trainer.model_wrapped
    rank = process_rank()
    record = {
        "rank": rank,
        "engine_class": f"{type(engine).__module__}.{type(engine).__name__}",
        "zero_stage": engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None,
        "engine_world_size": getattr(engine, "world_size", None),
        "dp_world_size": getattr(engine, "dp_world_size", None),
        "dist_world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "dist_backend": dist.get_backend() if dist.is_initialized() else None,
        "trainer_world_size": trainer.args.world_size,
        "trainer_process_index": trainer.args.process_index,
        "optimizer_class": type(getattr(engine, "optimizer", None)).__name__,
        "basic_optimizer_class": type(getattr(engine, "basic_optimizer", None)).__name__,
        "bf16": bool(engine.bfloat16_enabled()) if hasattr(engine, "bfloat16_enabled") else None,
        "accelerator": _accelerator_name(),
        "base_digest_before": base_digest_before,
        "base_digest_after": frozen_digest(model),
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "log_history": trainer.state.log_history,
        "saved_adapter": saved_adapter,
    }
    Path(folder).mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(Path(folder) / f"rank{rank}_lora.safetensors"))
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")


def _accelerator_name() -> str | None:
    try:
        from deepspeed.accelerator import get_accelerator
    except Exception:  # deepspeed not importable: no accelerator to name
        return None
    return get_accelerator().device_name()
