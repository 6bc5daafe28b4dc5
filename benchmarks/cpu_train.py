"""Training-step speed of the three torch workloads on this CPU: fp32 vs bf16 autocast, 1 vs 2 threads, and the
attention kernel (``attn``: transformers' ``sdpa``, PyTorch's fused attention, vs ``eager``, matmuls and a softmax).

Workloads (the default shapes of ``params.yaml``):

- ``pretrain``: full training step (forward, backward, AdamW) of the base Qwen2 LM (``base_model.model``), batch
  ``base_model.train.batch_size`` × ``context_length`` tokens.
- ``lora``: the same model frozen with a LoRA adapter (``train_lora.lora``), batch ``train_lora.train.batch_size``.
- ``classifier``: ``Qwen2ForSequenceClassification`` with LoRA on every linear layer (``classifier.lora``) and a
  trained score head, batch ``classifier.train.batch_size`` × ``classifier.max_length`` with an attention mask, a
  quarter of the rows right-padded to half length (as the stage's collator pads; with a padding mask the sdpa
  kernel cannot take its causal fast path).

Each cell runs in a fresh subprocess (its own thread pools) with the policy of :mod:`domainlm.common.compute`
(``torch.autocast("cpu", dtype=torch.bfloat16)`` for bf16; weights, gradients and AdamW states fp32), times
``--steps`` steps after ``--warmup`` and reports the median.

FLOP count per token, with N the parameters of the linear layers that run (the tied LM head counted as a
vocab × hidden matmul for the LMs; no LM head for the classifier), L layers, T context, d hidden:

- forward: ``2N + 2·L·T·d`` (Kaplan et al. 2020, eq. 2.2: weights plus attention scores and values);
- full training: 3 × forward (backward = 2 × forward);
- LoRA: forward + the backward's activation gradients through every frozen layer (``2N + 2·L·T·d``) + the LoRA
  matrices' weight gradients (``2·N_lora``), i.e. ``4N + 4·L·T·d + 4·N_lora`` (the frozen weights get no
  weight gradient, which is what LoRA saves).

Peak = cores × FLOP/cycle/core × clock. FLOP/cycle/core: fp32 AVX-512 FMA 64; bf16 AMX 1024 (``amx_bf16``),
else AVX512-BF16 (``vdpbf16ps``, 2 × 32 bf16 products accumulated per cycle = 128). The clock is the one
``/proc/cpuinfo`` reports (``cpu MHz``); turbo may run faster.

The benchmark also checks quality (``--quality``, needs ``models/base`` and ``data/split``): the base model's
validation perplexity under fp32 and under bf16 autocast, and the final validation loss of two short
pretraining runs from the same seed, fp32 vs bf16 (the bar: within 1%).

Writes benchmarks/results/cpu_train.csv (and cpu_train_quality.csv). Run it on an idle machine:
``python benchmarks/cpu_train.py [--steps 6] [--warmup 2] [--quality]``. The attention kernels of the classifier:
``python benchmarks/cpu_train.py --workloads classifier --threads 2 --attn sdpa eager --steps 10
--out benchmarks/results/cpu_train_attention.csv``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from measure import write_csv  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "cpu_train.csv"
QUALITY = ROOT / "benchmarks" / "results" / "cpu_train_quality.csv"
WORKLOADS = ("pretrain", "lora", "classifier")


def _params():
    from domainlm.common.params import load_params

    return load_params(ROOT / "params.yaml")


def _model_config(params, vocab: int = 8000):
    from transformers import Qwen2Config

    m = params["base_model"]["model"]
    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=m["hidden_size"],
        intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_hidden_layers"],
        num_attention_heads=m["num_attention_heads"],
        num_key_value_heads=m["num_key_value_heads"],
        max_position_embeddings=m["context_length"],
        tie_word_embeddings=True,
        pad_token_id=0,
    )


def _linear_params(model, *, include_head: bool) -> int:
    import torch

    n = sum(
        mod.weight.numel()
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
        and "lora_" not in name
        and (include_head or "lm_head" not in name)
        and not name.endswith("score")
        and ".score." not in name
        and "modules_to_save" not in name
    )
    return n


def build(workload: str, params, attn: str = "sdpa"):
    """``(model, batch, tokens_per_step, flop_per_step, n_trainable)`` for one workload (random weights and ids),
    its attention computed by ``attn`` (a transformers ``attn_implementation``)."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import Qwen2ForCausalLM, Qwen2ForSequenceClassification

    torch.manual_seed(0)
    cfg = _model_config(params)
    L, d = cfg.num_hidden_layers, cfg.hidden_size
    if workload == "classifier":
        c = params["classifier"]
        B, T = int(c["train"]["batch_size"]), int(c["max_length"])
        cfg.num_labels = 12
        model = Qwen2ForSequenceClassification(cfg)
        model.set_attn_implementation(attn)
        lcfg = c["lora"]
        model = get_peft_model(
            model,
            LoraConfig(
                task_type=TaskType.SEQ_CLS,
                r=lcfg["r"],
                lora_alpha=lcfg["lora_alpha"],
                lora_dropout=lcfg["lora_dropout"],
                target_modules=list(lcfg["target_modules"]),
                modules_to_save=["score"],
            ),
        )
        n = _linear_params(model, include_head=False)
        # as train_classifier's collator pads: an attention mask, and a quarter of the rows right-padded to half length
        mask = torch.ones(B, T, dtype=torch.long)
        mask[: B // 4, T // 2 :] = 0
        ids = torch.randint(1, cfg.vocab_size, (B, T)).masked_fill(mask == 0, 0)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 12, (B,))}
    else:
        T = int(params["base_model"]["model"]["context_length"])
        B = int(
            params["base_model"]["train"]["batch_size"]
            if workload == "pretrain"
            else params["train_lora"]["train"]["batch_size"]
        )
        model = Qwen2ForCausalLM(cfg)
        model.set_attn_implementation(attn)
        n = _linear_params(model, include_head=True)
        if workload == "lora":
            lcfg = params["train_lora"]["lora"]
            model = get_peft_model(
                model,
                LoraConfig(
                    task_type=TaskType.CAUSAL_LM,
                    r=lcfg["r"],
                    lora_alpha=lcfg["lora_alpha"],
                    lora_dropout=lcfg["lora_dropout"],
                    target_modules=list(lcfg["target_modules"]),
                ),
            )
        ids = torch.randint(1, cfg.vocab_size, (B, T))
        batch = {"input_ids": ids, "labels": ids.clone()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    attn = 2 * L * T * d
    fwd = 2 * n + attn
    flop_per_token = 3 * fwd if workload == "pretrain" else 2 * fwd + 4 * trainable
    tokens = B * T
    return model, batch, tokens, flop_per_token * tokens, trainable


def cell(workload: str, dtype: str, threads: int, steps: int, warmup: int, attn: str = "sdpa") -> dict:
    """Time one (workload, dtype, threads, attn) cell in this process."""
    import torch

    from domainlm.common.compute import resolve

    policy = resolve({"dtype": dtype, "threads": threads}, device="cpu")
    policy.apply()
    model, batch, tokens, flop, trainable = build(workload, _params(), attn)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with policy.autocast():
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {
        "workload": workload,
        "dtype": dtype,
        "threads": threads,
        "attn": attn,
        "step_ms": round(1000 * step_s, 1),
        "tokens_per_step": tokens,
        "tokens_per_s": round(tokens / step_s, 1),
        "gflop_per_step": round(flop / 1e9, 3),
        "achieved_gflop_s": round(flop / step_s / 1e9, 2),
        "trainable_params": trainable,
        "loss_finite": int(math.isfinite(float(loss))),
    }


def peak_gflop_s(dtype: str, threads: int) -> tuple[float, str]:
    """Peak GFLOP/s of ``threads`` cores in ``dtype`` at the reported clock, and the FLOP/cycle rule used."""
    from domainlm.common.compute import cpu_flags

    mhz = 0.0
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            mhz = float(line.split(":")[1])
            break
    flags = cpu_flags()
    if dtype == "bf16":
        per_cycle, rule = (1024, "AMX bf16") if "amx_bf16" in flags else (128, "AVX512-BF16")
    else:
        per_cycle, rule = 64, "AVX-512 fp32 FMA"
    return threads * per_cycle * mhz / 1e3, f"{rule} {per_cycle} FLOP/cycle x {mhz:.0f} MHz"


def quality(steps: int = 60) -> list[dict]:
    """fp32 vs bf16: the base model's val perplexity per domain, and two short pretraining runs' final val loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domainlm.common.compute import resolve
    from domainlm.common.params import domains
    from domainlm.lm import data as lm_data
    from domainlm.lm.pretrain import pretrain, qwen2_config

    params = _params()
    base_dir, split_dir = ROOT / "models/base", ROOT / "data/split"
    tok = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True).eval()
    block = int(model.config.max_position_embeddings)
    val = lm_data.read_domain_texts(split_dir, domains(ROOT / "params.yaml"), "val")
    rows = []
    for domain, texts in val.items():
        blocks = lm_data.pack_blocks(tok, texts, block)
        nll = {}
        for dtype in ("fp32", "bf16"):
            with resolve({"dtype": dtype}, device="cpu").autocast():
                nll[dtype], _ = lm_data.mean_nll(model, blocks, batch_size=16)
        rows.append(
            {
                "check": f"base val perplexity {domain}",
                "fp32": round(math.exp(nll["fp32"]), 4),
                "bf16": round(math.exp(nll["bf16"]), 4),
                "rel_diff": round(abs(math.exp(nll["bf16"]) - math.exp(nll["fp32"])) / math.exp(nll["fp32"]), 5),
            }
        )
    train = lm_data.read_domain_texts(split_dir, domains(ROOT / "params.yaml"), "train")
    train_blocks = lm_data.concat_blocks([lm_data.pack_blocks(tok, t, block) for t in train.values()])
    val_blocks = lm_data.evenly_spaced_blocks(
        lm_data.concat_blocks([lm_data.pack_blocks(tok, t, block) for t in val.values()]), 64
    )
    tp = {**params["base_model"]["train"], "steps": steps, "warmup_steps": 10, "log_every": steps}
    losses = {}
    for dtype in ("fp32", "bf16"):
        torch.manual_seed(int(params["base_model"]["seed"]))
        from transformers import Qwen2ForCausalLM

        m = Qwen2ForCausalLM(qwen2_config(tok, params["base_model"]["model"]))
        policy = resolve({"dtype": dtype}, device="cpu")
        pretrain(m, train_blocks, tp, seed=0, compute=policy)
        losses[dtype], _ = lm_data.mean_nll(m, val_blocks, batch_size=16)
    rows.append(
        {
            "check": f"pretrain {steps} steps: val loss (fp32 eval)",
            "fp32": round(losses["fp32"], 5),
            "bf16": round(losses["bf16"], 5),
            "rel_diff": round(abs(losses["bf16"] - losses["fp32"]) / losses["fp32"], 5),
        }
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    ap.add_argument(
        "--attn",
        nargs="+",
        default=["sdpa"],
        help="attention implementations to time (the first is the baseline), e.g. --attn sdpa eager",
    )
    ap.add_argument("--out", type=Path, default=RESULTS, help="the CSV to write")
    ap.add_argument(
        "--quality", action="store_true", help="also compare fp32 and bf16 losses (needs models/base, data/split)"
    )
    ap.add_argument("--cell", help=argparse.SUPPRESS)  # internal: workload,dtype,threads,attn
    args = ap.parse_args()
    if args.cell:
        w, dt, th, at = args.cell.split(",")
        print(json.dumps(cell(w, dt, int(th), args.steps, args.warmup, at)))
        return
    rows = []
    for workload in args.workloads:
        for attn, threads, dtype in itertools.product(args.attn, args.threads, ("fp32", "bf16")):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--cell",
                    f"{workload},{dtype},{threads},{attn}",
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                ],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            peak, rule = peak_gflop_s(dtype, threads)
            row.update(
                {
                    "peak_gflop_s": round(peak, 1),
                    "utilisation": round(row["achieved_gflop_s"] / peak, 4),
                    "peak_rule": rule,
                }
            )
            rows.append(row)
            print(
                f"{workload:10s} {attn:5s} {dtype} {threads} thr: {row['step_ms']:8.1f} ms/step, "
                f"{row['tokens_per_s']:8.0f} tok/s, "
                f"{row['achieved_gflop_s']:7.1f} GFLOP/s ({100 * row['utilisation']:.1f}% of {rule})",
                flush=True,
            )
    # the baseline of each workload: fp32 on 1 thread with the first --attn (sdpa, transformers' default)
    base = {
        r["workload"]: r["step_ms"]
        for r in rows[::-1]
        if r["dtype"] == "fp32" and r["threads"] == 1 and r["attn"] == args.attn[0]
    }
    for r in rows:
        r["speedup_vs_fp32_1thread"] = round(base[r["workload"]] / r["step_ms"], 3) if r["workload"] in base else None
    write_csv(args.out, rows)
    print(f"wrote {args.out}")
    if args.quality:
        q = quality()
        write_csv(QUALITY, q)
        for r in q:
            print(r)
        print(f"wrote {QUALITY}")


if __name__ == "__main__":
    main()
