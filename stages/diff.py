"""diff: each domain's task vector Δ = (base with its LoRA merged) − base, from peft's ``get_delta_weight``
(B·A·scaling, fan_in_fan_out respected; Hu et al. 2021 LoRA, Ilharco et al. 2023 task vectors).

Writes ``models/diff/<domain>.safetensors`` (keys = base state-dict names), ``metrics/diff/<domain>.json``,
``plots/task_vector_cosine.csv`` (pairwise cosine of the flattened task vectors, long format) and
``metrics/summary.csv`` (every domain's training figures from ``metrics/train_lora/<domain>.json``).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from stages import params as P
from stages.atomic import atomic_path, write_json, write_text
from stages.merging import StateDict, load_causal_lm
from stages.metrics import flatten_numbers, peak_rss_mb
from stages.tracking import stage_run

log = logging.getLogger("diff")

BASE_DIR = Path("models/base")
LORA_DIR = Path("models/lora")
DIFF_DIR = Path("models/diff")
METRICS_DIR = Path("metrics/diff")
TRAIN_METRICS_DIR = Path("metrics/train_lora")
COSINE_CSV = Path("plots/task_vector_cosine.csv")
SUMMARY_CSV = Path("metrics/summary.csv")


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


def task_vector_stats(tv: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor] | None = None,
                      top_k: int = 5) -> dict[str, Any]:
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
        "l2_norm": sq ** 0.5, "max": vmax, "min": vmin, "mean_abs": abs_sum / max(n, 1),
        "n_params": n, "n_tensors": len(tv),
    }
    if base is not None:
        stats["relative_l2_norm"] = (sq ** 0.5) / base_sq ** 0.5 if base_sq > 0 else 0.0
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
            shared = set(task_vectors[a]) & set(task_vectors[b])
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


def rows_to_csv(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """CSV text of ``rows`` (``None`` → empty field); columns default to the keys in the order first seen."""
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cfg = P.section("diff")
    domains = P.domains()
    if not domains:
        raise SystemExit("diff: params.yaml lists no domains")
    top_k = int(cfg.get("top_k", 5))
    start = time.perf_counter()
    base_state = {k: v.detach().clone() for k, v in load_causal_lm(BASE_DIR).state_dict().items()}
    tvs: dict[str, StateDict] = {}
    stats: dict[str, dict[str, Any]] = {}
    with atomic_path(DIFF_DIR, is_dir=True) as tmp:
        for domain in tqdm(domains, desc="diff", unit="domain"):
            t0 = time.perf_counter()
            tvs[domain] = task_vector(BASE_DIR, LORA_DIR / domain)
            save_file(tvs[domain], str(tmp / f"{domain}.safetensors"), metadata={"domain": domain})
            stats[domain] = task_vector_stats(tvs[domain], base_state, top_k=top_k)
            stats[domain]["wall_s"] = time.perf_counter() - t0
            log.info("%s: %d tensors, ‖Δ‖₂ = %.4g", domain, stats[domain]["n_tensors"], stats[domain]["l2_norm"])
    cosine = pairwise_cosine(tvs)
    summary = training_summary({d: TRAIN_METRICS_DIR / f"{d}.json" for d in domains})
    wall_s = time.perf_counter() - start
    with atomic_path(METRICS_DIR, is_dir=True) as tmp:
        for domain in domains:
            write_json(tmp / f"{domain}.json", {**stats[domain], "peak_rss_mb": peak_rss_mb()})
    write_text(COSINE_CSV, rows_to_csv(cosine, ["domain_a", "domain_b", "cosine"]))
    write_text(SUMMARY_CSV, rows_to_csv(summary))
    with stage_run("diff", cfg) as mlflow:
        for domain in domains:
            mlflow.log_metrics({f"{domain}.{k}": v for k, v in stats[domain].items() if not isinstance(v, dict)})
        mlflow.log_metrics({f"cosine.{r['domain_a']}.{r['domain_b']}": r["cosine"] for r in cosine})
        mlflow.log_metrics({"wall_s": wall_s, "peak_rss_mb": peak_rss_mb()})
        mlflow.log_artifact(str(COSINE_CSV))
        mlflow.log_artifact(str(SUMMARY_CSV))


if __name__ == "__main__":
    main()
