"""LoRA vs full fine-tuning of the same causal LM: training tokens/s, trainable parameters, peak RSS.

Both modes run the same plain training step (forward, backward, AdamW step) on the same packed
blocks; only what is trainable differs (peft LoRA from params.yaml ``train_lora.lora`` vs every
weight). Each measurement is a fresh subprocess, so its peak RSS is its own; modes alternate
(lora, full, lora, full, ...) so that load from other processes hits both alike, and the median
over repeats is reported. The model is ``--base-dir`` (default ``models/base``) when it exists,
else a randomly initialised Qwen2 with the ``base_model.model`` sizes; the blocks come from
``data/split/*/train.parquet`` when they exist, else random token ids (throughput does not depend
on the text).

Writes benchmarks/results/lora_vs_full.csv: one row per mode plus ratios LoRA / full; its ``.meta.json``
sidecar records the hardware, commit and date.
Usage: ``python benchmarks/lora_vs_full.py [--repeats 3] [--steps 8] [--warmup 2]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "lora_vs_full.csv"


def load_model_and_blocks(batch_size: int, n_batches: int, base_dir: Path):
    """The model to fine-tune and ``n_batches`` batches of packed blocks (int64 [batch_size, context])."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from domainlm.common.params import domains, section
    from domainlm.common.paths import PARAMS_FILE, SPLIT_DIR
    from domainlm.lm import data as lm_data

    if (base_dir / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
        source = str(base_dir)
    else:
        sizes = section("base_model", ROOT / PARAMS_FILE)
        m, vocab = sizes["model"], int(sizes["tokenizer"]["vocab_size"])
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=vocab,
                hidden_size=m["hidden_size"],
                intermediate_size=m["intermediate_size"],
                num_hidden_layers=m["num_hidden_layers"],
                num_attention_heads=m["num_attention_heads"],
                num_key_value_heads=m["num_key_value_heads"],
                max_position_embeddings=m["context_length"],
                tie_word_embeddings=m.get("tie_word_embeddings", True),
            )
        )
        tokenizer, source = None, f"random init (no {base_dir})"
    context = int(model.config.max_position_embeddings)
    need = batch_size * n_batches
    split_root = ROOT / SPLIT_DIR
    texts = []
    if tokenizer is not None and split_root.exists():
        for d in domains(ROOT / PARAMS_FILE):
            path = lm_data.split_path(split_root, d, "train")
            if path.exists():
                texts += lm_data.read_texts(path)[:50]
    if texts:
        ids = lm_data.pack_blocks(tokenizer, texts, context)["input_ids"]
        ids = ids.repeat((need + len(ids) - 1) // len(ids), 1)[:need]
        source += " + data/split train blocks"
    else:
        ids = torch.randint(4, model.config.vocab_size, (need, context), generator=torch.Generator().manual_seed(0))
        source += " + random token ids"
    return model, ids.view(n_batches, batch_size, context), source


def measure(mode: str, steps: int, warmup: int, batch_size: int, base_dir: Path) -> dict:
    """Run ``warmup + steps`` training steps in ``mode`` ('lora' or 'full'); return throughput and memory."""
    import torch

    from domainlm.common.metrics import peak_rss_mb
    from domainlm.common.params import section
    from domainlm.common.paths import PARAMS_FILE
    from domainlm.lm.lora import attach_lora

    model, batches, source = load_model_and_blocks(batch_size, warmup + steps, base_dir)
    total = sum(p.numel() for p in model.parameters())
    if mode == "lora":
        model = attach_lora(model, section("train_lora", ROOT / PARAMS_FILE)["lora"], seed=0)
    elif mode != "full":
        raise ValueError(f"mode must be 'lora' or 'full', got {mode!r}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()
    timed_s = 0.0
    for i, ids in enumerate(batches):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            timed_s += time.perf_counter() - t0
    tokens = steps * batches.shape[1] * batches.shape[2]
    return {
        "mode": mode,
        "tokens_per_s": tokens / timed_s,
        "step_s": timed_s / steps,
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": total,
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
        "source": source,
    }


def main() -> None:
    from domainlm.common.paths import BASE_DIR

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--base-dir",
        type=Path,
        default=ROOT / BASE_DIR,
        help="HF folder of the model to fine-tune (default: models/base)",
    )
    ap.add_argument("--child", choices=["lora", "full"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.warmup, args.batch_size, args.base_dir)))
        return

    runs: dict[str, list[dict]] = {"lora": [], "full": []}
    for r in range(args.repeats):
        for mode in ("lora", "full"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    mode,
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                    "--batch-size",
                    str(args.batch_size),
                    "--base-dir",
                    str(args.base_dir),
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
            res = json.loads(out.stdout.strip().splitlines()[-1])
            runs[mode].append(res)
            print(
                f"repeat {r + 1}/{args.repeats} {mode}: {res['tokens_per_s']:.0f} tokens/s, "
                f"peak RSS {res['peak_rss_mb']:.0f} MB",
                flush=True,
            )

    rows = []
    for mode, results in runs.items():
        rows.append(
            {
                "mode": mode,
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in results),
                "step_s": statistics.median(r["step_s"] for r in results),
                "trainable_params": results[0]["trainable_params"],
                "total_params": results[0]["total_params"],
                "trainable_fraction": results[0]["trainable_params"] / results[0]["total_params"],
                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in results),
                "repeats": len(results),
                "steps": args.steps,
                "batch_size": args.batch_size,
                "threads": results[0]["threads"],
                "source": results[0]["source"],
            }
        )
    lora, full = rows
    rows.append(
        {
            "mode": "ratio_lora_over_full",
            "tokens_per_s": lora["tokens_per_s"] / full["tokens_per_s"],
            "step_s": lora["step_s"] / full["step_s"],
            "trainable_params": lora["trainable_params"] / full["trainable_params"],
            "total_params": lora["total_params"] / full["total_params"],
            "trainable_fraction": lora["trainable_fraction"] / full["trainable_fraction"],
            "peak_rss_mb": lora["peak_rss_mb"] / full["peak_rss_mb"],
            "repeats": args.repeats,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "threads": lora["threads"],
            "source": lora["source"],
        }
    )
    from measure import write_meta

    from domainlm.common.atomic import atomic_path

    with atomic_path(RESULTS) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_meta(RESULTS)
    for row in rows:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
