"""DeepSpeed ZeRO for the stages that train with the HF Trainer (``train_lora``, ``train_classifier``): the ``enabled``
switch (:func:`deepspeed_config`), the one place where a shipped config is adapted to DeepSpeed's CPU accelerator
(:func:`cpu_config`), the process-group set-up that accelerate needs there, the rank of this process, and the small
collectives (barrier, object broadcast) the stages coordinate their ranks with. ZeRO stage 2 partitions optimizer
states and gradients across data-parallel ranks (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models"); the HF Trainer drives it from a DeepSpeed config (transformers ``integrations/deepspeed``).

``<section>.deepspeed`` in params.yaml (``train_lora.deepspeed``, ``classifier.deepspeed``)::

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
# world size, losses, digests) and its adapter tensors to <folder>/rank<r>_lora.safetensors (write_probe). Tests only.
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


def parse_enabled(value: Any, section: str = "") -> str | bool:
    """``<section>.deepspeed.enabled`` as ``"auto"``, ``True`` or ``False`` (None = ``"auto"``); ``section`` names the
    params section in the error message.

    Raises:
        ValueError: any other value (a YAML string ``"true"`` included: write the boolean).
    """
    if value is None:
        return "auto"
    if isinstance(value, bool) or value == "auto":
        return value
    key = f"{section}.deepspeed.enabled" if section else "deepspeed.enabled"
    raise ValueError(f"{key} must be auto, true or false, not {value!r}")


def deepspeed_config(ds_params: Mapping[str, Any] | None, *, section: str) -> dict | None:
    """The DeepSpeed config to pass to the Trainer, or ``None`` when training without DeepSpeed.

    ``ds_params`` is a stage's ``deepspeed`` params section: ``enabled`` (``auto`` | ``true`` | ``false``) and
    ``config`` (the DeepSpeed config as shipped); ``section`` names the stage's params section in messages
    (``train_lora``, ``classifier``). ``auto`` uses DeepSpeed when ``torch.cuda.is_available()`` and ``deepspeed``
    imports, and otherwise logs the reason at WARNING level. ``true`` always uses it: without CUDA on DeepSpeed's CPU
    accelerator (``DS_ACCELERATOR=cpu``, gloo), with the config adapted by :func:`cpu_config`, each change logged.
    On CUDA, ``bf16.enabled: auto`` becomes ``torch.cuda.is_bf16_supported()`` (bf16 where the GPU has it).

    Returns:
        a deep copy of the config (never the params' own dict), or None.

    Raises:
        ValueError: ``enabled`` is not auto/true/false, or ``enabled: true`` with an empty ``config``.
        ImportError: ``enabled: true`` and deepspeed does not import.
        RuntimeError: ``enabled: true`` without CUDA and DeepSpeed chose an accelerator other than cpu.
    """
    import torch

    ds_params = ds_params or {}
    enabled = parse_enabled(ds_params.get("enabled", "auto"), section)
    config = ds_params.get("config")
    if enabled is False:
        log.info("%s.deepspeed.enabled is false: training without DeepSpeed", section)
        return None
    if not config:
        if enabled is True:
            raise ValueError(f"{section}.deepspeed.enabled is true but {section}.deepspeed.config is empty")
        log.warning("%s.deepspeed.config is empty: training without DeepSpeed", section)
        return None
    cuda = torch.cuda.is_available()
    if enabled == "auto":
        if not cuda:
            log.warning(
                "no CUDA device: training on CPU without DeepSpeed (%s.deepspeed.enabled: auto uses it on GPU "
                "only; set it to true for ZeRO on the CPU accelerator)",
                section,
            )
            return None
        try:
            import deepspeed  # noqa: F401
        except Exception as exc:  # ImportError, or a CUDA/toolchain error raised while importing
            log.warning("deepspeed does not import (%s): training without DeepSpeed", exc)
            return None
        return gpu_config(config)
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, at deepspeed's first get_accelerator()
    import deepspeed  # noqa: F401  (enabled: true: an import error is the user's to see)

    if cuda:
        return gpu_config(config)
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        raise RuntimeError(
            f"no CUDA device but DeepSpeed chose the {get_accelerator().device_name()!r} accelerator "
            f"(DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')!r}); unset it or set it to cpu"
        )
    ensure_build_tools()
    adapted, changes = cpu_config(config)
    for ch in changes:
        log.warning("DeepSpeed on CPU: %s %r -> %r: %s", ch.key, ch.shipped, ch.used, ch.reason)
    return adapted


def gpu_config(config: Mapping[str, Any]) -> dict:
    """The shipped config for CUDA: a deep copy in which ``bf16.enabled: auto`` is resolved to whether the GPU
    computes in bf16 (``torch.cuda.is_bf16_supported()``: compute capability 8.0 and later); logged."""
    import torch

    out = copy.deepcopy(dict(config))
    if _get(out, "bf16.enabled") == "auto":
        bf16 = bool(torch.cuda.is_bf16_supported())
        _set(out, "bf16.enabled", bf16)
        log.info("DeepSpeed: bf16.enabled auto -> %s (torch.cuda.is_bf16_supported())", bf16)
    return out


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

    - ``bf16.enabled`` (``true`` or ``auto``) → ``False``. The HF Trainer fills this key from its own ``bf16``
      argument and raises on a mismatch; ``TrainingArguments(bf16=True)`` raises "Your setup doesn't support
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
    """True on global rank 0, the one process that writes a stage's outputs (models, logs, metrics, MLflow)."""
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


def init_process_group() -> None:
    """Join (or, started without a launcher, create as a world of one: :func:`launch_env`) DeepSpeed's process group:
    on CUDA through :func:`init_gpu_process_group`, otherwise through :func:`init_cpu_process_group`. Idempotent.

    Raises:
        RuntimeError: see :func:`launch_env` and :func:`init_cpu_process_group`.
    """
    import torch

    launch_env()
    if torch.cuda.is_available():  # the Trainer's accelerate state joins this group (DeepSpeed picks NCCL on CUDA)
        init_gpu_process_group()
    else:
        init_cpu_process_group()


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
    before the Trainer lets :func:`shared_tempdir` name one checkpoint folder to every rank. Each rank takes the GPU
    of its ``LOCAL_RANK`` first: NCCL's object collectives (:func:`broadcast_object`) run on the current device. The
    tests run without a GPU, so they exercise the CPU path, not this one.
    """
    import deepspeed
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        deepspeed.init_distributed(auto_mpi_discovery=False)


def accelerator_config() -> dict[str, Any]:
    """``TrainingArguments.accelerator_config`` that makes the Trainer reuse :func:`init_cpu_process_group`'s state."""
    return {"use_configured_state": True}


def reset_accelerator_state() -> None:
    """Forget the last Trainer's accelerate ``AcceleratorState`` (which holds its DeepSpeed plugin), keeping the
    process group (``PartialState``), so that another Trainer can start in this process.

    accelerate refuses a second DeepSpeed plugin in one process ("You cannot pass in a `deepspeed_plugin` when
    creating a second `Accelerator`"); ``TrainingArguments`` resets the state itself, process group included, unless
    ``use_configured_state`` (:func:`accelerator_config`) asks it to keep the state :func:`init_cpu_process_group`
    configured. A stage that trains several times under DeepSpeed on the CPU accelerator (the classifier gate's
    retries) calls this before each ``TrainingArguments``.
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


def broadcast_object(obj: Any = None, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``torch.distributed.broadcast_object_list``: pickled; keep it small).
    Without a process group, ``obj`` itself. Every rank must call it, in the same order as the other collectives."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def release_engine(trainer) -> None:
    """Destroy the DeepSpeed engine a Trainer trained with (``DeepSpeedEngine.destroy``: its optimizer's ZeRO hooks
    and buffers), so that a process which trains again (the classifier gate's retries) does not keep every engine
    alive; on CUDA the freed blocks go back to the allocator. Without an engine, nothing."""
    import torch

    engine = getattr(trainer, "model_wrapped", None)
    if hasattr(engine, "destroy"):
        engine.destroy()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def write_probe(
    trainer, model, base_digest_before: str, *, saved_adapter: bool | None = None, name: str | None = None
) -> None:
    """When ``$DOMAINLM_ZERO_PROBE_DIR`` is set, write what this rank saw (tests read it); otherwise nothing.

    ``<name>.json`` (``name`` defaults to ``rank<r>``) holds the Trainer's wrapped model class, its ZeRO stage, world
    sizes, optimizer classes, bf16, the frozen-base digest before and after training, the Trainer's log history and
    whether this rank saved the adapter (None: the caller saves elsewhere); ``<name>_lora.safetensors`` this rank's
    adapter tensors (peft's ``get_peft_model_state_dict``: LoRA matrices and any ``modules_to_save``).
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
    name = name or f"rank{rank}"
    Path(folder).mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(Path(folder) / f"{name}_lora.safetensors"))
    (Path(folder) / f"{name}.json").write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")


def _accelerator_name() -> str | None:
    try:
        from deepspeed.accelerator import get_accelerator
    except Exception:  # deepspeed not importable: no accelerator to name
        return None
    return get_accelerator().device_name()
