"""Task vectors of LoRA experts: Δ = (base with the LoRA merged) − base for every weight the adapter touches,
from peft's ``get_delta_weight`` (B·A·scaling, ``fan_in_fan_out`` respected; Hu et al. 2021 LoRA,
Ilharco et al. 2023 task vectors), with their statistics, pairwise cosine similarities and the
training summary the ``diff`` stage writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from domainlm.common.metrics import flatten_numbers
from domainlm.lm.merging import StateDict, load_causal_lm


def check_adapter_config(config) -> None:
    """Reject adapter configs whose effect is not the plain LoRA product B·A·scaling.

    Raises:
        ValueError: naming the field — not a LoRA adapter, DoRA (``use_dora``), trained biases
            (``bias`` ≠ "none"), ``modules_to_save`` or ``target_parameters``.
    """
    kind = getattr(config, "peft_type", None)
    kind = getattr(kind, "value", kind)
    if kind != "LORA":
        raise ValueError(f"adapter is {kind!r}, not a LoRA adapter")
    if getattr(config, "use_dora", False):
        raise ValueError("adapter uses DoRA (use_dora=True): its update is not B·A·scaling; not supported")
    if getattr(config, "bias", "none") != "none":
        raise ValueError(f"adapter trains biases (bias={config.bias!r}); only bias='none' is supported")
    if getattr(config, "modules_to_save", None):
        raise ValueError(f"adapter has modules_to_save={config.modules_to_save}; not supported")
    if getattr(config, "target_parameters", None):
        raise ValueError(f"adapter has target_parameters={config.target_parameters}; not supported")


def lora_task_vector(peft_model, param_names: Mapping[int, str], adapter_name: str = "default") -> StateDict:
    """Dense Δ for every base weight a peft LoRA adapter touches.

    Args:
        peft_model: a ``peft.PeftModel`` with ``adapter_name`` loaded.
        param_names: ``id(parameter) -> name`` of the base model's ``named_parameters()`` taken
            BEFORE peft wrapped it (peft keeps the same Parameter objects as ``base_layer.weight``).
        adapter_name: the peft adapter to read.

    Returns:
        ``{base state-dict key: Δ}``, each Δ float32 with the base weight's shape, equal to
        ``layer.get_delta_weight(adapter)`` (B@A·scaling, transposed when ``fan_in_fan_out``).

    Raises:
        ValueError: the adapter touches no layer, or a Δ's shape differs from its base weight.
        KeyError: a touched weight is not among ``param_names``.
    """
    from peft.tuners.lora import LoraLayer

    out: StateDict = {}
    for module_name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter_name not in module.lora_A and adapter_name not in module.lora_embedding_A:
            continue
        weight = module.get_base_layer().weight
        if id(weight) not in param_names:
            raise KeyError(f"{module_name}: its base weight is not a parameter of the base model")
        key = param_names[id(weight)]
        with torch.no_grad():
            delta = module.get_delta_weight(adapter_name).detach().to(torch.float32).contiguous()
        if delta.shape != weight.shape:
            raise ValueError(f"{key}: Δ has shape {tuple(delta.shape)}, base weight {tuple(weight.shape)}")
        out[key] = delta
    if not out:
        raise ValueError(f"adapter {adapter_name!r} touches no layer of the model")
    return out


def task_vector(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike) -> StateDict:
    """Load ``base_dir`` (HF causal LM) and ``adapter_dir`` (peft ``save_pretrained`` LoRA); return its Δ.

    See :func:`lora_task_vector` for the result. The base is loaded in float32.

    Raises:
        FileNotFoundError: ``adapter_dir`` has no ``adapter_config.json``.
        ValueError: from :func:`check_adapter_config`.
    """
    from peft import PeftConfig, PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a peft adapter folder (no adapter_config.json)")
    check_adapter_config(PeftConfig.from_pretrained(str(adapter_dir)))
    base = load_causal_lm(base_dir)
    names = {id(p): n for n, p in base.named_parameters()}
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    return lora_task_vector(model, names)


def task_vector_stats(
    tv: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor] | None = None, top_k: int = 5
) -> dict[str, Any]:
    """Summary numbers of one task vector.

    Returns:
        ``l2_norm`` (global ‖Δ‖₂ over all touched tensors), ``max``, ``min``, ``mean_abs``,
        ``n_params`` and ``n_tensors``; ``relative_l2_norm`` = ‖Δ‖₂ / ‖W_base‖₂ over the same
        tensors when ``base`` is given; ``top_tensor_l2_norms``: the ``top_k`` largest per-tensor
        norms, ``{key: norm}`` in decreasing order. Accumulated in float64.
    """
    sq = 0.0
    abs_sum = 0.0
    n = 0
    vmax = -float("inf")
    vmin = float("inf")
    norms: dict[str, float] = {}
    base_sq = 0.0
    for key, delta in tv.items():
        d = delta.double()
        norms[key] = float(d.norm())
        sq += norms[key] ** 2
        abs_sum += float(d.abs().sum())
        n += d.numel()
        vmax = max(vmax, float(d.max()))
        vmin = min(vmin, float(d.min()))
        if base is not None:
            base_sq += float(base[key].double().pow(2).sum())
    top = sorted(norms.items(), key=lambda kv: kv[1], reverse=True)[:top_k]
    stats: dict[str, Any] = {
        "l2_norm": sq**0.5,
        "max": vmax,
        "min": vmin,
        "mean_abs": abs_sum / max(n, 1),
        "n_params": n,
        "n_tensors": len(tv),
    }
    if base is not None:
        stats["relative_l2_norm"] = (sq**0.5) / base_sq**0.5 if base_sq > 0 else 0.0
    stats["top_tensor_l2_norms"] = dict(top)
    return stats


def pairwise_cosine(task_vectors: Mapping[str, Mapping[str, torch.Tensor]]) -> list[dict[str, Any]]:
    """Cosine similarity between every ordered pair of flattened task vectors (diagonal included).

    Keys one domain lacks count as zeros. Returns long-format rows ``{domain_a, domain_b, cosine}``
    in the order of ``task_vectors`` (float64 accumulation).

    Raises:
        ValueError: a task vector is all zeros (its adapter did not move: cosine undefined).
    """
    domains = list(task_vectors)
    norms = {d: sum(float(t.double().pow(2).sum()) for t in task_vectors[d].values()) ** 0.5 for d in domains}
    for d, norm in norms.items():
        if norm == 0.0:
            raise ValueError(f"task vector of {d!r} is all zeros: its LoRA B matrices never moved from 0")
    rows = []
    for a in domains:
        for b in domains:
            # sorted: a set's order follows the per-process hash seed, and float sums depend on order
            shared = sorted(set(task_vectors[a]) & set(task_vectors[b]))
            dot = sum(float((task_vectors[a][k].double() * task_vectors[b][k].double()).sum()) for k in shared)
            rows.append({"domain_a": a, "domain_b": b, "cosine": dot / (norms[a] * norms[b])})
    return rows


def training_summary(metric_files: Mapping[str, str | os.PathLike]) -> list[dict[str, Any]]:
    """One row per domain with the numeric figures of its ``metrics/train_lora/<domain>.json``.

    Returns rows ``{"domain": d, <flattened key>: number, ...}`` in the order given.

    Raises:
        FileNotFoundError: a metrics file is missing (naming it).
    """
    rows = []
    for domain, path in metric_files.items():
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training metrics {path} for {domain!r} are missing: run train_lora@{domain}")
        rows.append({"domain": domain, **flatten_numbers(json.loads(path.read_text(encoding="utf-8")))})
    return rows
