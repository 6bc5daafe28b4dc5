"""A real-size checkpoint through the model half, on CPU: Qwen2-0.5B's shape, randomly initialised (no hub).

1. **build**: a ``Qwen2ForCausalLM`` with Qwen2-0.5B's shape (hidden 896, 24 layers, 14 query / 2 KV heads,
   intermediate 4864, vocab 151,936, tied embeddings; 494M parameters) from a config, seeded, saved as an HF
   folder with a small byte-level BPE tokenizer (ids < 151,936, so the model's vocabulary is all there).
2. **train**: ``domainlm.lm.lora.train_adapter`` (train_lora's LoRA setup: params.yaml ``train_lora.lora``,
   fp32) for ``--steps`` steps of one block of ``--context`` tokens, gradient checkpointing off and on, each in
   a fresh process. Measured: seconds per training step (Trainer steps only), peak RSS over ``trainer.train()``
   (``VmHWM`` after resetting it at train begin, ``/proc/self/clear_refs``) and over the whole process, against
   :func:`estimate` (weights + LoRA parameters, gradients and AdamW moments + activations + the runtime's RSS
   measured before loading).
3. **model half**: in a temporary pipeline folder, ``stages.base_model.run`` with ``source: path`` copies and
   scores that checkpoint; ``stages.train_lora.run`` trains two 1-step adapters; ``stages.diff.run``,
   ``stages.merge.run`` (linear, λ 0.5) and one ``stages.evaluate.run`` pass (short test streams and
   continuations) handle it, each stage's wall seconds and peak RSS recorded.

Writes benchmarks/results/real_shape.csv (one row per training case, then one per model-half stage) and
real_shape.json (the model half's details), each with its ``.meta.json`` sidecar (hardware, commit, date).
Usage: ``python benchmarks/real_shape.py [--steps 3] [--context 512] [--work DIR]`` (about 15 min on 2 cores).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from measure import vm_hwm_mb, vm_rss_mb, write_meta  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "real_shape.csv"

QWEN2_05B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
}
WORDS = {
    "law": ["대한민국", "국민", "헌법", "법률", "권리", "의무", "국회", "대통령", "조약", "재판", "법원", "조례"],
    "faq": [
        "데비안",
        "패키지",
        "설치",
        "커널",
        "저장소",
        "업그레이드",
        "명령",
        "시스템",
        "사용자",
        "파일",
        "버전",
        "설정",
    ],
}
ENDINGS = ["을 선택합니다.", "은 보장된다.", "에 관한 질문입니다.", "를 확인하십시오.", "이 필요합니다.", "로 정한다."]
MIB = 1024 * 1024


def docs(domain: str, n: int, seed: int) -> list[str]:
    """``n`` synthetic Korean documents of about 400 tokens (the text does not matter for memory or speed)."""
    rng = random.Random(f"{domain}-{seed}")
    w = WORDS[domain]
    return [
        " ".join(f"제{rng.randint(1, 99)}조 {rng.choice(w)} {rng.choice(w)}{rng.choice(ENDINGS)}" for _ in range(60))
        for _ in range(n)
    ]


def estimate(cfg: dict, n_params: int, n_lora: int, context: int, batch: int, checkpointing: bool) -> dict[str, float]:
    """Analytical memory of one fp32 LoRA training step, in MiB (4 bytes per element).

    - weights: every parameter once (tied embeddings counted once).
    - lora_state: the LoRA parameters, their gradients and AdamW's two moments (4 copies).
    - activations: what autograd keeps for backward, per token and layer, counting the tensors the ops save
      (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", done for this
      block): 2 RMSNorms (input and output, 2h each), the LoRA dropout outputs of q/k/v/o (4 × h, masks 4 ×
      h/4), q and k before and after RoPE (2h + small), k and v repeated to all heads for SDPA (2h), the
      attention output and the o_proj input (2h), and in the MLP gate, SiLU(gate), up and their product (4i):
      15h + 4i. The LM head adds 3 × vocab per token at its peak (the log-softmax kept by the loss, its
      gradient and the logits' gradient). With checkpointing each layer keeps only its input (h per token)
      and one layer is recomputed at a time.
    """
    h, i, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    tokens = context * batch
    per_layer = (15 * h + 4 * i) * tokens * 4
    head = 3 * vocab * tokens * 4
    acts = (layers * h * tokens * 4 + per_layer) if checkpointing else layers * per_layer
    return {
        "weights_mb": n_params * 4 / MIB,
        "lora_state_mb": 4 * n_lora * 4 / MIB,
        "activations_mb": (acts + head) / MIB,
    }


def train_flops(n_params: int, tokens: int, checkpointing: bool) -> float:
    """FLOPs of one step: forward 2·N·T, backward to the activations only (frozen weights) 2·N·T, recompute 2·N·T."""
    return (6 if checkpointing else 4) * n_params * tokens


# ------------------------------------------------------------------------------------------------- phases
def phase_build(work: Path, context: int) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from domainlm.lm import data as lm_data

    texts = docs("law", 40, 0) + docs("faq", 40, 0)
    tok = lm_data.train_bpe_tokenizer(texts, vocab_size=2000, model_max_length=context)
    torch.manual_seed(0)
    config = Qwen2Config(
        **QWEN2_05B,
        max_position_embeddings=context,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    out = work / "checkpoint"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (work / "build.json").write_text(json.dumps({"n_params": model.num_parameters(), "vocab": config.vocab_size}))


def phase_train(work: Path, case: str, steps: int, context: int) -> None:
    import yaml
    from transformers import TrainerCallback

    from domainlm.lm import lora

    class TrainWindow(TrainerCallback):
        """Reset the peak RSS when training begins; read it when it ends."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.rss_before = vm_rss_mb()
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
            self.t = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.peak = vm_hwm_mb()

    runtime_mb = vm_rss_mb()
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["train_lora"]
    params["deepspeed"]["enabled"] = False
    params["train"].update(
        max_steps=steps,
        batch_size=1,
        eval_batch_size=1,
        eval_steps=steps,
        eval_max_blocks=1,
        logging_steps=1,
        context_length=context,
        warmup_steps=0,
        gradient_checkpointing=case == "checkpointing_on",
    )
    window = TrainWindow()
    m = lora.train_adapter(
        work / "checkpoint",
        docs("law", 12, 1),
        docs("law", 2, 2),
        params,
        work / case / "adapter",
        work / case / "train.log",
        callbacks=[window],
    )
    m.update(
        runtime_mb=runtime_mb,
        rss_before_train_mb=window.rss_before,
        peak_rss_train_mb=window.peak,
        peak_rss_process_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    (work / f"{case}.json").write_text(json.dumps(m))


def phase_model_half(work: Path, context: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from domainlm.common import paths
    from domainlm.common.metrics import write_metrics
    from domainlm.common.tracking import mlflow_run
    from domainlm.documents.schema import DOC_SCHEMA
    from domainlm.lm.merging import method_options, resolve_weights
    from stages import base_model, diff, evaluate, merge, train_lora

    root = work / "pipeline"
    root.mkdir(parents=True, exist_ok=True)
    os.chdir(root)  # MLflow's default artifact root (./mlartifacts, ./mlruns) lands here, not in the repository
    domains = ["law", "faq"]
    for d in domains:
        for split, n, seed in (("train", 6, 1), ("val", 2, 2), ("test", 3, 3)):
            texts = docs(d, n, seed)
            path = paths.split_path(root / "data" / "split", d, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(
                pa.table(
                    {
                        "id": [f"{d}-{split}-{k}" for k in range(n)],
                        "text": texts,
                        "domain": pa.array([d] * n, pa.string()).dictionary_encode(),
                        "label": [d] * n,
                        "n_chars": pa.array([len(t) for t in texts], pa.int32()),
                        "source": ["synthetic"] * n,
                    }
                ).cast(DOC_SCHEMA),
                path,
            )
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    rows = []

    def timed(stage, fn):
        t0 = time.perf_counter()
        out = fn()
        rows.append({"stage": stage, "wall_s": time.perf_counter() - t0, "peak_rss_mb": vm_hwm_mb()})
        Path("/proc/self/clear_refs").write_text("5")
        print(f"{stage}: {rows[-1]}", flush=True)
        return out

    bm = {**params["base_model"], "source": "path", "path": str(work / "checkpoint")}
    bm["model"] = {**bm["model"], "context_length": context}
    bm["train"] = {**bm["train"], "eval_batch_size": 1}
    base_metrics = timed(
        "base_model (source: path)",
        lambda: base_model.run(root / "data" / "split", domains, bm, root / "models" / "base"),
    )
    tl = params["train_lora"]
    tl["deepspeed"]["enabled"] = False
    tl["train"].update(
        max_steps=1,
        batch_size=1,
        eval_batch_size=1,
        eval_steps=1,
        eval_max_blocks=1,
        logging_steps=1,
        context_length=context,
        warmup_steps=0,
    )
    for d in domains:
        m = timed(
            f"train_lora@{d}",
            lambda d=d: train_lora.run(
                d,
                root / "models" / "base",
                root / "data" / "split",
                tl,
                root / "models" / "lora" / d,
                paths.train_log_path(d, root / "logs"),
            ),
        )
        write_metrics(d, m, root=root / "metrics" / "train_lora")
    diff_out = timed(
        "diff",
        lambda: diff.run(
            root / "models" / "base",
            root / "models" / "lora",
            domains,
            diff_dir=root / "models" / "diff",
            train_metrics_dir=root / "metrics" / "train_lora",
            cosine_csv=root / "plots" / "cosine.csv",
            summary_csv=root / "plots" / "summary.csv",
        ),
    )
    method, options = method_options(params["merge"])
    merged = timed(
        "merge (linear)",
        lambda: merge.run(
            root / "models" / "base",
            root / "models" / "diff",
            root / "models" / "merged",
            method,
            options,
            resolve_weights(params["merge"].get("weights"), domains),
        ),
    )
    ev = {
        **params["evaluate"],
        "max_length": context,
        "stride": context // 2,
        "batch_size": 1,
        "max_tokens_per_domain": context + context // 2,
        "continuation": {
            **params["evaluate"]["continuation"],
            "n_docs": 2,
            "prompt_tokens": 16,
            "new_tokens": 8,
            "batch_size": 2,
            "show_per_domain": 1,
        },
    }

    def run_evaluate():
        with mlflow_run("evaluate", ev) as mlflow:
            return evaluate.run(
                domains,
                ev,
                mlflow,
                base_dir=root / "models" / "base",
                merged_dir=root / "models" / "merged",
                diff_dir=root / "models" / "diff",
                split_dir=root / "data" / "split",
                log_dir=root / "logs",
                perplexity_csv=root / "eval" / "perplexity.csv",
                train_loss_csv=root / "eval" / "train_loss.csv",
                comparison_md=root / "eval" / "comparison.md",
                alerts_json=root / "eval" / "alerts.json",
            )

    ev_metrics = timed("evaluate (one pass)", run_evaluate)
    detail = {
        "base_n_params": base_metrics["n_params"],
        "base_val_perplexity": base_metrics["val_perplexity"],
        "diff_l2": {d: diff_out["task_vectors"][d]["l2_norm"] for d in domains},
        "merged_update_l2_norm": merged["merged_update_l2_norm"],
        "perplexity": ev_metrics["perplexity"],
        "gate_passed": ev_metrics["gate"]["passed"],
    }
    (work / "model_half.json").write_text(json.dumps({"rows": rows, "detail": detail}, default=float))


# --------------------------------------------------------------------------------------------------- driver
def child(phase: str, work: Path, args) -> None:
    cmd = [
        sys.executable,
        __file__,
        "--phase",
        phase,
        "--work",
        str(work),
        "--steps",
        str(args.steps),
        "--context",
        str(args.context),
        "--layers",
        str(args.layers),
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    print(f"{phase}: {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--phase", choices=["build", "checkpointing_off", "checkpointing_on", "model_half"])
    ap.add_argument("--skip-model-half", action="store_true")
    ap.add_argument("--layers", type=int, default=24, help="fewer layers for a quick smoke run (results not written)")
    args = ap.parse_args()
    QWEN2_05B["num_hidden_layers"] = args.layers
    if args.phase:
        {
            "build": lambda: phase_build(args.work, args.context),
            "model_half": lambda: phase_model_half(args.work, args.context),
        }.get(args.phase, lambda: phase_train(args.work, args.phase, args.steps, args.context))()
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="real_shape_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not (work / "checkpoint" / "config.json").exists():
            child("build", work, args)
        built = json.loads((work / "build.json").read_text())
        rows = []
        for case in ("checkpointing_off", "checkpointing_on"):
            child(case, work, args)
            m = json.loads((work / f"{case}.json").read_text())
            gc = case == "checkpointing_on"
            est = estimate(QWEN2_05B, built["n_params"], m["trainable_params"], args.context, 1, gc)
            est_total = m["runtime_mb"] + sum(est.values())
            s_step = m["train_s"] / m["steps"]
            flops = train_flops(built["n_params"], args.context, gc)
            rows.append(
                {
                    "row": "train",
                    "case": case,
                    "params": built["n_params"],
                    "trainable_params": m["trainable_params"],
                    "context": args.context,
                    "batch": 1,
                    "steps": m["steps"],
                    "dtype": "fp32",
                    "s_per_step": round(s_step, 2),
                    "tokens_per_s": round(args.context / s_step, 1),
                    "gflop_per_step": round(flops / 1e9),
                    "achieved_gflop_per_s": round(flops / 1e9 / s_step, 1),
                    "peak_rss_train_mb": round(m["peak_rss_train_mb"]),
                    "peak_rss_process_mb": round(m["peak_rss_process_mb"]),
                    "rss_before_train_mb": round(m["rss_before_train_mb"]),
                    "runtime_mb": round(m["runtime_mb"]),
                    "est_weights_mb": round(est["weights_mb"]),
                    "est_lora_state_mb": round(est["lora_state_mb"], 1),
                    "est_activations_mb": round(est["activations_mb"]),
                    "est_total_mb": round(est_total),
                    "peak_over_estimate": round(m["peak_rss_train_mb"] / est_total, 3),
                    "wall_s": round(m["wall_s"], 1) if "wall_s" in m else "",
                    "stage": "",
                }
            )
        if not args.skip_model_half:
            child("model_half", work, args)
            half = json.loads((work / "model_half.json").read_text())
            for r in half["rows"]:
                rows.append(
                    {
                        "row": "model_half",
                        "stage": r["stage"],
                        "wall_s": round(r["wall_s"], 1),
                        "peak_rss_process_mb": round(r["peak_rss_mb"]),
                        "params": built["n_params"],
                        "context": args.context,
                    }
                )
            if args.layers == 24:
                RESULTS.with_suffix(".json").write_text(json.dumps(half["detail"], indent=1, default=float) + "\n")
                write_meta(RESULTS.with_suffix(".json"))
        fields = list(dict.fromkeys(k for r in rows for k in r))
        if args.layers != 24:
            print(json.dumps(rows, indent=1))
            return
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        tmp = RESULTS.with_suffix(".csv.tmp")
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, RESULTS)
        write_meta(RESULTS)
        print(RESULTS.read_text())
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
