"""Task-vector merge methods behind one signature, mergekit style: task arithmetic (Ilharco et al. 2023),
TIES (Yadav et al. 2023) and DARE (Yu et al. 2024); plus loading checkpoints and task vectors, the
merge params (weights, method options), the merge report and saving the merged HF folder.

Every method is ``fn(base, task_vectors, weights, **options) -> merged`` where ``base`` is a model
state dict, ``task_vectors[domain]`` maps some of its keys to dense deltas Δ (see :mod:`domainlm.lm.task_vectors`)
and ``weights[domain]`` is a float. Adding a method is adding one function decorated with
:func:`register`. Deltas are combined densely in float32 and the result is cast back to each base
tensor's dtype; keys no task vector touches are returned unchanged (same tensor objects).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from domainlm.common.atomic import atomic_path

Tensor = torch.Tensor
StateDict = dict[str, Tensor]
MergeFn = Callable[..., StateDict]

MERGE_METHODS: dict[str, MergeFn] = {}


def register(name: str) -> Callable[[MergeFn], MergeFn]:
    """Decorator adding a merge function to :data:`MERGE_METHODS` under ``name``."""

    def deco(fn: MergeFn) -> MergeFn:
        if name in MERGE_METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        MERGE_METHODS[name] = fn
        return fn

    return deco


def merge(
    method: str,
    base: Mapping[str, Tensor],
    task_vectors: Mapping[str, Mapping[str, Tensor]],
    weights: Mapping[str, float],
    **options,
) -> StateDict:
    """Run the registered merge ``method``.

    Raises:
        KeyError: unknown method (the message lists the known ones).
        ValueError: from :func:`check_inputs` (missing weights or keys, shape mismatches).
    """
    if method not in MERGE_METHODS:
        raise KeyError(f"unknown merge method {method!r}; known: {sorted(MERGE_METHODS)}")
    return MERGE_METHODS[method](base, task_vectors, weights, **options)


def check_inputs(
    base: Mapping[str, Tensor], task_vectors: Mapping[str, Mapping[str, Tensor]], weights: Mapping[str, float]
) -> list[str]:
    """Validate merge inputs and return the sorted union of the keys the task vectors touch.

    Raises:
        ValueError: no task vectors; a domain without a weight; a task-vector key missing from
            ``base``; a Δ whose shape differs from the base tensor's.
    """
    if not task_vectors:
        raise ValueError("no task vectors to merge")
    missing = sorted(set(task_vectors) - set(weights))
    if missing:
        raise ValueError(f"no merge weight for domain(s) {missing}")
    keys: set[str] = set()
    for domain, tv in task_vectors.items():
        for key, delta in tv.items():
            if key not in base:
                raise ValueError(f"task vector of {domain!r} has key {key!r} that the base model lacks")
            if tuple(delta.shape) != tuple(base[key].shape):
                raise ValueError(
                    f"task vector of {domain!r}: {key} has shape {tuple(delta.shape)}, "
                    f"base has {tuple(base[key].shape)}"
                )
            keys.add(key)
    return sorted(keys)


def _apply(base: Mapping[str, Tensor], deltas: Mapping[str, Tensor]) -> StateDict:
    """``base`` with ``base[k] + deltas[k]`` (computed in float32, cast back to the base dtype)."""
    out = dict(base)
    for key, delta in deltas.items():
        out[key] = (base[key].float() + delta).to(base[key].dtype)
    return out


def _sorted_domains(task_vectors: Mapping[str, Mapping[str, Tensor]]) -> list[str]:
    return sorted(task_vectors)


@register("linear")
def linear(
    base: Mapping[str, Tensor],
    task_vectors: Mapping[str, Mapping[str, Tensor]],
    weights: Mapping[str, float],
    *,
    lam: float = 1.0,
) -> StateDict:
    """Task arithmetic: θ = θ_base + λ·Σᵢ wᵢ·Δᵢ (Ilharco et al. 2023, "Editing Models with Task Arithmetic").

    Args:
        base: state dict, any float dtypes.
        task_vectors: domain -> {key: Δ}; a domain may touch a subset of keys (missing = 0).
        weights: domain -> wᵢ.
        lam: the scaling coefficient λ.

    Returns:
        A new state dict with every base key, same shapes and dtypes as ``base``.
    """
    keys = check_inputs(base, task_vectors, weights)
    deltas: StateDict = {}
    for key in keys:
        acc = torch.zeros(base[key].shape, dtype=torch.float32)
        for domain in _sorted_domains(task_vectors):
            if key in task_vectors[domain]:
                acc += float(weights[domain]) * task_vectors[domain][key].float()
        deltas[key] = lam * acc
    return _apply(base, deltas)


def trim_top_magnitude(delta: Tensor, density: float) -> Tensor:
    """Keep the ``round(density·n)`` entries of largest |Δ|, zero the rest (TIES "trim" step).

    Trimming is per tensor, as mergekit does (the paper trims the whole flattened task vector).

    Raises:
        ValueError: ``density`` outside (0, 1].
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if density == 1.0:
        return delta
    flat = delta.reshape(-1)
    k = int(round(density * flat.numel()))
    out = torch.zeros_like(flat)
    if k > 0:
        idx = torch.topk(flat.abs(), k, sorted=False).indices
        out[idx] = flat[idx]
    return out.reshape(delta.shape)


@register("ties")
def ties(
    base: Mapping[str, Tensor],
    task_vectors: Mapping[str, Mapping[str, Tensor]],
    weights: Mapping[str, float],
    *,
    lam: float = 1.0,
    density: float = 0.2,
) -> StateDict:
    """TIES-Merging: trim, elect sign, disjoint mean, then scale by λ (Yadav et al. 2023, NeurIPS).

    For each key: τ̂ᵢ = trim(wᵢ·Δᵢ, density); γ = sign(Σᵢ τ̂ᵢ) (the sign with the larger total
    mass); τ_m = mean of the τ̂ᵢ whose sign equals γ, per entry (entries where no task agrees
    stay 0); θ = θ_base + λ·τ_m. With equal weights wᵢ = 1 this is the paper's algorithm.

    Args:
        density: share of entries kept per tensor, in (0, 1].
        lam: the scaling coefficient λ.

    Returns:
        A new state dict, same keys, shapes and dtypes as ``base``.
    """
    keys = check_inputs(base, task_vectors, weights)
    deltas: StateDict = {}
    for key in keys:
        trimmed = torch.stack(
            [
                trim_top_magnitude(float(weights[d]) * task_vectors[d][key].float(), density)
                for d in _sorted_domains(task_vectors)
                if key in task_vectors[d]
            ]
        )
        elected = torch.sign(trimmed.sum(dim=0))
        agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
        count = agree.sum(dim=0).clamp(min=1)
        deltas[key] = lam * (trimmed * agree).sum(dim=0) / count
    return _apply(base, deltas)


@register("dare")
def dare(
    base: Mapping[str, Tensor],
    task_vectors: Mapping[str, Mapping[str, Tensor]],
    weights: Mapping[str, float],
    *,
    lam: float = 1.0,
    drop_rate: float = 0.9,
    seed: int = 0,
) -> StateDict:
    """DARE then task arithmetic: drop each Δ entry with probability p, rescale survivors by 1/(1−p),
    then :func:`linear` (Yu et al. 2024, "Language Models are Super Mario").

    The Bernoulli masks come from one ``torch.Generator`` seeded with ``seed``, drawn in sorted
    (domain, key) order, so the same inputs and seed give the same result.

    Args:
        drop_rate: p in [0, 1).
        seed: seed of the drop masks.
        lam: the scaling coefficient λ of the linear step.

    Raises:
        ValueError: ``drop_rate`` outside [0, 1).
    """
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    check_inputs(base, task_vectors, weights)
    gen = torch.Generator().manual_seed(int(seed))
    dropped: dict[str, StateDict] = {}
    for domain in _sorted_domains(task_vectors):
        dropped[domain] = {}
        for key in sorted(task_vectors[domain]):
            delta = task_vectors[domain][key].float()
            keep = torch.rand(delta.shape, generator=gen) >= drop_rate
            dropped[domain][key] = delta * keep / (1.0 - drop_rate)
    return linear(base, dropped, weights, lam=lam)


def load_causal_lm(model_dir: str | os.PathLike, dtype: torch.dtype | str = torch.float32):
    """Load an HF causal-LM folder from disk only (``local_files_only``), in eval mode.

    ``dtype="auto"`` keeps the dtype the checkpoint was saved in.

    Raises:
        FileNotFoundError: ``model_dir`` or its ``config.json`` is missing.
    """
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not an HF model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
    return model.eval()


def load_task_vectors(diff_dir: str | os.PathLike, domains: list[str]) -> dict[str, StateDict]:
    """Read ``<diff_dir>/<domain>.safetensors`` for each domain (keys = base state-dict names).

    Raises:
        FileNotFoundError: a domain's file is missing (run the ``diff`` stage).
    """
    out: dict[str, StateDict] = {}
    for domain in domains:
        path = Path(diff_dir) / f"{domain}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"task vector {path} is missing: run the diff stage for {domain!r}")
        out[domain] = load_file(str(path))
    return out


def delta_l2_norm(merged: Mapping[str, Tensor], base: Mapping[str, Tensor], keys: list[str]) -> float:
    """‖merged − base‖₂ over ``keys`` (float64 accumulation)."""
    total = 0.0
    for key in keys:
        total += float((merged[key].double() - base[key].double()).pow(2).sum())
    return total**0.5


# ------------------------------------------------------------ the merge stage: params, report, output
def resolve_weights(weights: Mapping[str, float] | None, domains: list[str], default: float = 1.0) -> dict[str, float]:
    """Per-domain merge weights: ``weights[d]`` where given, ``default`` otherwise.

    Raises:
        ValueError: ``weights`` names a domain not in ``domains``.
    """
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(domains))
    if unknown:
        raise ValueError(f"merge.weights names unknown domain(s) {unknown}; domains are {domains}")
    return {d: float(weights.get(d, default)) for d in domains}


def method_options(cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(method, options)`` from the ``merge`` params: λ (``lam``) plus the method's own sub-section.

    Raises:
        KeyError: unknown method, listing the registered ones.
    """
    method = cfg.get("method", "linear")
    if method not in MERGE_METHODS:
        raise KeyError(f"merge.method {method!r} is not registered; known: {sorted(MERGE_METHODS)}")
    return method, {"lam": float(cfg.get("lam", 1.0)), **(cfg.get(method) or {})}


def merge_report(
    base: Mapping[str, torch.Tensor],
    merged: Mapping[str, torch.Tensor],
    task_vectors: Mapping[str, StateDict],
    weights: Mapping[str, float],
) -> dict[str, Any]:
    """Norms of the merge: ‖θ_merged − θ_base‖₂ over the touched keys, and per domain its weight,
    ‖Δᵢ‖₂ and the cosine between Δᵢ and the merged update (float64 accumulation).

    Returns:
        ``{"merged_update_l2_norm", "n_tensors", "domains": {domain: {"weight", "task_vector_l2_norm",
        "cosine_to_merged_update"}}}``; the cosine is 0.0 when either norm is 0.
    """
    keys = sorted({k for tv in task_vectors.values() for k in tv})
    update = {k: merged[k].double() - base[k].double() for k in keys}
    update_norm = sum(float(u.pow(2).sum()) for u in update.values()) ** 0.5
    per_domain = {}
    for domain, tv in task_vectors.items():
        norm = sum(float(t.double().pow(2).sum()) for t in tv.values()) ** 0.5
        dot = sum(float((tv[k].double() * update[k]).sum()) for k in tv)
        per_domain[domain] = {
            "weight": float(weights[domain]),
            "task_vector_l2_norm": norm,
            "cosine_to_merged_update": dot / (norm * update_norm) if norm > 0 and update_norm > 0 else 0.0,
        }
    return {"merged_update_l2_norm": delta_l2_norm(merged, base, keys), "n_tensors": len(keys), "domains": per_domain}


# Files of an HF folder that ``save_pretrained`` of the model writes; everything else (the tokenizer) is copied.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def save_merged(model, base_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write ``model`` (``save_pretrained``: config + safetensors) and the base folder's tokenizer
    files to ``out_dir``, atomically (the folder appears whole or not at all)."""
    base_dir = Path(base_dir)
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        for path in sorted(base_dir.iterdir()):
            if path.is_file() and path.name not in MODEL_FILES and not path.name.endswith(MODEL_SUFFIXES):
                shutil.copy2(path, tmp / path.name)
    return Path(out_dir)
