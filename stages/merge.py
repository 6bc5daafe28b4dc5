"""merge: combine the domains' task vectors into one model with a method from :mod:`stages.merging`
(task arithmetic, TIES, DARE — mergekit-style registry) and write a full HF folder to ``models/merged/``.

Sums dense Δs exactly (peft's ``add_weighted_adapter`` "linear" would combine A and B separately,
adding cross terms). ``metrics/merge.json`` records the method, λ, weights and norms.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from stages import params as P
from stages.atomic import atomic_path
from stages.merging import MERGE_METHODS, StateDict, delta_l2_norm, load_causal_lm, load_task_vectors, merge
from stages.metrics import peak_rss_mb, write_metrics
from stages.tracking import stage_run

log = logging.getLogger("merge")

BASE_DIR = Path("models/base")
DIFF_DIR = Path("models/diff")
MERGED_DIR = Path("models/merged")

# Files of an HF folder that ``save_pretrained`` of the model writes; everything else (the tokenizer) is copied.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


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


def merge_report(base: Mapping[str, torch.Tensor], merged: Mapping[str, torch.Tensor],
                 task_vectors: Mapping[str, StateDict], weights: Mapping[str, float]) -> dict[str, Any]:
    """Norms of the merge: ‖θ_merged − θ_base‖₂ over the touched keys, and per domain its weight,
    ‖Δᵢ‖₂ and the cosine between Δᵢ and the merged update (float64)."""
    keys = sorted({k for tv in task_vectors.values() for k in tv})
    update = {k: merged[k].double() - base[k].double() for k in keys}
    update_norm = sum(float(u.pow(2).sum()) for u in update.values()) ** 0.5
    per_domain = {}
    for domain, tv in task_vectors.items():
        norm = sum(float(t.double().pow(2).sum()) for t in tv.values()) ** 0.5
        dot = sum(float((tv[k].double() * update[k]).sum()) for k in tv)
        per_domain[domain] = {
            "weight": float(weights[domain]), "task_vector_l2_norm": norm,
            "cosine_to_merged_update": dot / (norm * update_norm) if norm > 0 and update_norm > 0 else 0.0,
        }
    return {"merged_update_l2_norm": delta_l2_norm(merged, base, keys), "n_tensors": len(keys), "domains": per_domain}


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


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cfg = P.section("merge")
    domains = P.domains()
    method, options = method_options(cfg)
    weights = resolve_weights(cfg.get("weights"), domains)
    start = time.perf_counter()
    model = load_causal_lm(BASE_DIR, dtype="auto")
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    task_vectors = load_task_vectors(DIFF_DIR, domains)
    merged = merge(method, base, task_vectors, weights, **options)
    model.load_state_dict(merged, strict=True)
    save_merged(model, BASE_DIR, MERGED_DIR)
    report = merge_report(base, merged, task_vectors, weights)
    metrics = {"method": method, "lam": options["lam"],
               "options": {k: v for k, v in options.items() if k != "lam"}, **report,
               "wall_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}
    write_metrics("merge", metrics)
    log.info("%s merge of %s (λ=%s): ‖update‖₂ = %.4g", method, domains, options["lam"], report["merged_update_l2_norm"])
    with stage_run("merge", cfg) as mlflow:
        mlflow.log_metrics({"merged_update_l2_norm": report["merged_update_l2_norm"], "wall_s": metrics["wall_s"],
                            "peak_rss_mb": metrics["peak_rss_mb"]})
        mlflow.log_metrics({f"{d}.cosine_to_merged_update": v["cosine_to_merged_update"]
                            for d, v in report["domains"].items()})
        mlflow.log_artifact("metrics/merge.json")


if __name__ == "__main__":
    main()
