"""The classifier on a real-size checkpoint, on CPU: benchmarks/real_shape.py's Qwen2-0.5B-shaped checkpoint
(hidden 896, 24 layers, vocab 151,936; randomly initialised, no hub) as train_classifier's LoRA sequence classifier.

1. **build**: ``real_shape.phase_build`` writes the checkpoint as an HF folder (or ``--work`` reuses one).
2. **train**: the checkpoint through the project's own classifier code, gradient checkpointing off and on, each in a
   fresh process: ``domainlm.classify.model.load_sequence_classifier`` (``classifier.attn_implementation``, or
   ``--attn``) + ``attach_lora`` with the reference LoRA (:data:`REFERENCE_LORA`: r 16, alpha 32, dropout 0.1 on
   q/k/v/o), ``--steps`` steps of ``--batch`` windows of ``--context`` tokens (random ids below the vocabulary size,
   EOS last) through the HF Trainer with ``domainlm.classify.training.training_arguments`` (lr 2e-4, no warmup) and
   the compute policy of params.yaml (``domainlm.common.compute.resolve``: bf16 autocast where the CPU has
   AMX-BF16 or AVX512-BF16). Measured: seconds per Trainer step (the first step left out as warm-up when there are
   three or more), peak RSS over the steps, over ``trainer.train()`` (with its end-of-epoch evaluation and
   checkpoint) and over the whole process (the load included; ``VmHWM``, reset at train begin through
   ``/proc/self/clear_refs``), against :func:`estimate`. The estimate counts live tensors; glibc's malloc keeps
   much of the memory a step frees (``malloc_trim`` hands it back), and that retention is in the RSS too.
   ``--mmap-threshold BYTES`` runs the two cases again with ``MALLOC_MMAP_THRESHOLD_`` set, so every freed block of
   that size goes back to the system at once and the peak RSS is that of the live memory (steps then run slower:
   each large allocation faults in fresh pages).
3. **gate loop**: in a temporary pipeline folder, ``stages.train_classifier.run`` with the checkpoint as the merged
   LM, on a labelled split of 3 classes × 8 train / 4 val / 4 test documents (:func:`write_labelled_split`) with
   params.yaml's ``classifier`` section and :func:`gate_overrides` (reference LoRA, ``--context``-token windows, one
   window per document, uncompiled, batch ``--batch``, one epoch per attempt of at most 2 steps,
   ``train.max_steps_per_epoch``). ``gate.min_f1`` stays 0.75, which a random model fails, so every attempt of the
   gate runs (1 + ``gate.max_retries``), each saving its classifier, then the registry and the alerts. Recorded: the
   stage's returned metrics (gate, timing, the kept attempt's steps and seconds), per attempt its nested MLflow run's
   figures (train_s, steps, val/test macro-F1) and peak RSS (sampled every 0.2 s between the run's start and end),
   and the stage's wall seconds and peak RSS, against the estimate of the training step without checkpointing.

Writes benchmarks/results/real_shape_classifier.csv (one row per training case, then one for the gate loop) and
real_shape_classifier.json (the details: step times, estimate terms, attempts), each with its ``.meta.json``
sidecar (hardware, commit, date). ``--tiny`` (hidden 64, 2 layers, vocab 4096) checks the code path in under a
minute and writes its results under the work folder instead.
Usage: ``python benchmarks/real_shape_classifier.py [--steps 3] [--batch 4] [--context 512] [--work DIR] [--tiny]
[--mmap-threshold 1048576]`` (about 6 min on 2 cores with AMX-BF16: build 20 s, each training case 1-1.5 min, the
gate loop 4 min; ``--mmap-threshold`` adds the two cases again, several minutes more).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from measure import deep_update, vm_hwm_mb, vm_rss_mb, write_csv, write_meta  # noqa: E402
from real_shape import MIB, QWEN2_05B, docs, phase_build, train_flops  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "real_shape_classifier.csv"
#: The LoRA of the reference classifier: rank 16, alpha 32, dropout 0.1 on the attention projections.
REFERENCE_LORA = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.1,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "top_layers": None,
}
#: ``--tiny``: the same architecture, small enough that a whole run takes well under a minute.
TINY = {
    "vocab_size": 4096,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
CLASSES = ["faq", "law", "mixed"]
CASES = ("checkpointing_off", "checkpointing_on")
FIELDS = [
    "row",
    "case",
    "malloc",
    "attn",
    "dtype",
    "threads",
    "params",
    "trainable_params",
    "context",
    "batch",
    "steps",
    "s_per_step",
    "first_step_s",
    "tokens_per_s",
    "gflop_per_step",
    "achieved_gflop_per_s",
    "peak_rss_steps_mb",
    "peak_rss_train_mb",
    "peak_rss_process_mb",
    "runtime_mb",
    "est_weights_mb",
    "est_weight_copies_mb",
    "est_lora_state_mb",
    "est_activations_mb",
    "est_total_mb",
    "peak_over_estimate",
    "gate_attempts",
    "gate_passed",
    "attempt_steps",
    "attempt_train_s",
    "wall_s",
]


# ------------------------------------------------------------------------------------------------- the estimate
def layer_linear_params(cfg: dict) -> int:
    """Weights of one decoder layer's linear maps: q and o (h × h), k and v (h × d_kv) and the MLP's gate, up and
    down (h × i), biases left out."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    d_kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    return 2 * h * h + 2 * h * d_kv + 3 * h * i


def activation_bytes_per_token(cfg: dict, context: int, batch: int, *, bf16: bool, attn: str, r: int) -> float:
    """Bytes autograd keeps per token in one decoder layer of the LoRA classifier (LoRA with dropout on q, k, v, o).

    With h hidden, i intermediate, n heads of width d = h/n, d_kv = kv heads · d, s = ``context`` and a the bytes of
    an activation that autocast computes (2 under bf16, 4 in fp32):

    - the inputs of the two RMSNorms, in the fp32 residual stream: 2 · 4h;
    - per LoRA module (q, k, v, o; each reads h features): the dropout mask, fp32 like the dropout's input (4h),
      lora_A's input (a·h) and lora_B's input (a·r);
    - the MLP's gate, up and SiLU outputs: 3a·i (down_proj is frozen, so its input is not kept);
    - attention, ``sdpa``: q, k, v (k and v at d_kv: grouped-query attention), its output and the log-sum-exp:
      2a·h + 2a·d_kv + 4n; ``eager``: q, and k and v repeated to every head (3a·h), the softmax output (fp32,
      4n·s) and under bf16 its bf16 copy for the matmul with v (2n·s): the only term that grows with s;
    - RoPE's cos and sin, per position: 2 · 4d / ``batch`` per token.

    Counted against ``torch.autograd.graph.saved_tensors_hooks`` on this model (transformers 5, peft 0.21), the
    method of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models").

    Raises:
        ValueError: ``attn`` is neither ``sdpa`` nor ``eager``.
    """
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    d = h // n
    d_kv = cfg["num_key_value_heads"] * d
    a = 2 if bf16 else 4
    lora = 4 * (4 * h + a * h + a * r)
    if attn == "sdpa":
        attention = 2 * a * h + 2 * a * d_kv + 4 * n
    elif attn == "eager":
        attention = 3 * a * h + n * context * (4 + (2 if bf16 else 0))
    else:
        raise ValueError(f"attn must be 'sdpa' or 'eager', got {attn!r}")
    return 2 * 4 * h + lora + 3 * a * i + attention + 2 * 4 * d / batch


def estimate(
    cfg: dict,
    n_params: int,
    n_lora: int,
    context: int,
    batch: int,
    checkpointing: bool,
    *,
    bf16: bool,
    attn: str,
    r: int = REFERENCE_LORA["r"],
) -> dict[str, float]:
    """Analytical memory of one LoRA training step of the sequence classifier, in MiB; the process's runtime RSS
    before loading comes on top.

    - ``weights_mb``: every parameter in fp32, once: 4 · ``n_params``. transformers maps the safetensors file into
      memory, so a weight is resident once it is read: every layer's, but of the embedding only the rows of the
      tokens seen (an upper bound by up to 4 · vocab · h, 544 MiB at Qwen2-0.5B's shape).
    - ``weight_copies_mb``: under bf16 autocast each frozen linear weight is cast to bf16 in the forward pass, and
      the matmul keeps that copy for the backward pass (for the gradient of its input): 2 bytes per weight of
      :func:`layer_linear_params`, for every layer; with checkpointing, for the one layer being recomputed. 0 in
      fp32 (the matmul keeps the weight itself).
    - ``lora_state_mb``: the ``n_lora`` trainable parameters (LoRA matrices and the score head), their gradients
      and AdamW's two moments: 4 · 4 · ``n_lora``.
    - ``activations_mb``: T = ``batch`` · ``context`` tokens, A = :func:`activation_bytes_per_token`, L layers.
      Without checkpointing: L · A · T kept, plus one layer's A · T of gradients in flight while a layer is
      differentiated. With checkpointing each layer keeps only its input (4h · T, fp32), and one layer is
      recomputed (A · T) and differentiated (A · T) at a time: L · 4h · T + 2 · A · T.

    The score head's logits, the loss and the embedding output are a few vectors per token: left out. So is the
    memory glibc's malloc keeps after a free (see the module docstring).

    Args:
        cfg: the model's shape (``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
            ``num_attention_heads``, ``num_key_value_heads``).
        n_params, n_lora: the classifier's parameters, all and trainable.
        context, batch: tokens per window and windows per step.
        checkpointing: gradient checkpointing of every decoder layer.
        bf16, attn, r: bf16 autocast (else fp32), ``sdpa`` | ``eager``, the LoRA rank.

    Returns:
        ``{"weights_mb", "weight_copies_mb", "lora_state_mb", "activations_mb"}`` (MiB).

    Raises:
        ValueError: ``attn`` is neither ``sdpa`` nor ``eager``.
    """
    layers, h = cfg["num_hidden_layers"], cfg["hidden_size"]
    tokens = context * batch
    per_layer = activation_bytes_per_token(cfg, context, batch, bf16=bf16, attn=attn, r=r) * tokens
    if checkpointing:
        acts = layers * 4 * h * tokens + 2 * per_layer
    else:
        acts = (layers + 1) * per_layer
    copies = 2 * layer_linear_params(cfg) * (1 if checkpointing else layers) if bf16 else 0
    return {
        "weights_mb": 4 * n_params / MIB,
        "weight_copies_mb": copies / MIB,
        "lora_state_mb": 4 * 4 * n_lora / MIB,
        "activations_mb": acts / MIB,
    }


# ------------------------------------------------------------------------------------------------- phases
def shape(tiny: bool) -> dict:
    """The checkpoint's shape: Qwen2-0.5B's, or :data:`TINY` over it."""
    return {**QWEN2_05B, **(TINY if tiny else {})}


def phase_build_checkpoint(work: Path, context: int, tiny: bool) -> None:
    """real_shape's build step (checkpoint + byte-level BPE tokenizer) at :func:`shape`."""
    QWEN2_05B.update(shape(tiny))  # real_shape.phase_build reads its module's shape
    phase_build(work, context)


def random_windows(vocab: int, eos: int, n: int, context: int, seed: int) -> list[list[int]]:
    """``n`` windows of ``context`` token ids: ``context − 1`` ids drawn uniformly from [4, ``vocab``) (past the
    tokenizer's pad, bos, eos and unk), then ``eos``."""
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(context - 1)] + [eos] for _ in range(n)]


def phase_train(work: Path, case: str, args) -> None:
    import numpy as np
    import torch
    import yaml
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback

    from domainlm.classify import model as cls_model
    from domainlm.classify.metrics import macro_f1
    from domainlm.classify.training import EncodedDataset, training_arguments, weighted_cross_entropy
    from domainlm.common.compute import resolve

    runtime_mb = vm_rss_mb()  # the interpreter, torch, transformers and peft, before any model

    class TrainWindow(TrainerCallback):
        """Peak RSS before training (the load), over the steps and over ``train()``; each step's seconds."""

        def __init__(self):
            self.step_s: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.peak_load = vm_hwm_mb()
            self.rss_before = vm_rss_mb()
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS

        def on_step_begin(self, args, state, control, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s.append(time.perf_counter() - self.t)
            self.peak_steps = vm_hwm_mb()

        def on_train_end(self, args, state, control, **kwargs):
            self.peak_train = vm_hwm_mb()

    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    compute = resolve(params.get("compute"))
    compute.apply()
    attn = cls_model.attention_implementation(args.attn or params["classifier"].get("attn_implementation"))
    lm_dir = work / "checkpoint"
    base, tok = cls_model.load_sequence_classifier(lm_dir, CLASSES, attn_implementation=attn)
    n_params = base.num_parameters()
    model = cls_model.attach_lora(base, REFERENCE_LORA, seed=0)
    trainable, _ = model.get_nb_trainable_parameters()
    vocab = int(base.config.vocab_size)
    n = args.steps * args.batch
    windows = random_windows(vocab, tok.eos_token_id, n, args.context, seed=0)
    labels = [k % len(CLASSES) for k in range(n)]
    settings = {
        "epochs": 1,
        "batch_size": args.batch,
        "eval_batch_size": args.batch,
        "lr": 2e-4,
        "weight_decay": 0.0,
        "warmup_steps": 0,
        "grad_clip": 1.0,
        "logging_steps": 1,
        "gradient_checkpointing": case == "checkpointing_on",
    }

    def compute_metrics(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        return {"macro_f1": macro_f1(list(pred.label_ids), list(np.asarray(logits).argmax(axis=1)))}

    window = TrainWindow()
    trainer = Trainer(
        model=model,
        args=training_arguments(work / case / "trainer", settings, seed=0, compute=compute),
        train_dataset=EncodedDataset(windows, labels),
        eval_dataset=EncodedDataset(windows[: args.batch], labels[: args.batch]),
        data_collator=DataCollatorWithPadding(tok, padding="longest"),
        compute_metrics=compute_metrics,
        compute_loss_func=weighted_cross_entropy(None),
        callbacks=[window],
    )
    t0 = time.perf_counter()
    trainer.train()
    train_wall_s = time.perf_counter() - t0
    shutil.rmtree(work / case / "trainer", ignore_errors=True)
    steps = window.step_s
    timed = steps[1:] if len(steps) >= 3 else steps
    cfg = base.config.to_dict()
    out = {
        "case": case,
        "attn": attn,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "compute": compute.metrics(),
        "torch_threads": torch.get_num_threads(),
        "n_params": n_params,
        "layer_linear_params": layer_linear_params(cfg) * cfg["num_hidden_layers"],
        "trainable_params": trainable,
        "step_s": steps,
        "s_per_step": sum(timed) / len(timed),
        "warmup_steps_excluded": len(steps) - len(timed),
        "train_wall_s": train_wall_s,
        "runtime_mb": runtime_mb,
        "rss_before_train_mb": window.rss_before,
        "peak_rss_load_mb": window.peak_load,
        "peak_rss_steps_mb": window.peak_steps,
        "peak_rss_train_mb": window.peak_train,
        "peak_rss_process_mb": max(window.peak_load, window.peak_train, vm_hwm_mb()),
        "config": {k: cfg[k] for k in (*QWEN2_05B, "max_position_embeddings") if k in cfg},
    }
    (work / f"{case}.json").write_text(json.dumps(out))


def write_labelled_split(root: Path, context: int) -> tuple[Path, Path, list[str]]:
    """A labelled split in the pipeline's layout under ``root``: ``split/<domain>/{train,val,test}.parquet`` and the
    label table ``labels.parquet`` (label = source label), 8 / 4 / 4 documents per class.

    Classes: ``law`` and ``faq`` (real_shape's synthetic Korean documents of those vocabularies, two joined per
    document, so the first window is a full ``context`` tokens) and ``mixed`` (a law document then a faq one). The
    LM is random, so the text decides nothing here but the window lengths.

    Returns:
        ``(split_dir, labels_path, domains)``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from domainlm.common import paths
    from domainlm.documents.labels import LABELS_SCHEMA, write_label_table
    from domainlm.documents.schema import DOC_SCHEMA

    split_dir, rows = root / "split", []
    counts = {"train": 8, "val": 4, "test": 4}
    for label in CLASSES:
        for k, (split, n) in enumerate(counts.items()):
            law, faq = docs("law", 2 * n, 10 * k + 1), docs("faq", 2 * n, 10 * k + 2)
            pairs = {"law": (law[0::2], law[1::2]), "faq": (faq[0::2], faq[1::2]), "mixed": (law[0::2], faq[0::2])}
            texts = [f"{a} {b}" for a, b in zip(*pairs[label])]
            ids = [f"{label}-{split}-{j}" for j in range(n)]
            path = paths.split_path(split_dir, label, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            table = {
                "id": ids,
                "text": texts,
                "domain": pa.array([label] * n, pa.string()).dictionary_encode(),
                "label": [label] * n,
                "n_chars": pa.array([len(t) for t in texts], pa.int32()),
                "source": ["synthetic"] * n,
            }
            pq.write_table(pa.table(table).cast(DOC_SCHEMA), path)
            rows += [{"id": i, "domain": label, "split": split, "source_label": label, "label": label} for i in ids]
    labels_path = write_label_table(root / "labels.parquet", pa.Table.from_pylist(rows, schema=LABELS_SCHEMA))
    return split_dir, labels_path, list(CLASSES)


def gate_overrides(context: int, batch: int, attn: str | None) -> dict:
    """params.yaml ``classifier`` overrides of the gate loop: the reference LoRA, ``context``-token windows, the
    first window only, uncompiled, ``batch`` documents a step, one epoch per attempt of at most 2 steps, no
    DeepSpeed (one process); ``attn`` when given. The gate (``min_f1``, ``max_retries``) stays as params.yaml."""
    out = {
        "lora": dict(REFERENCE_LORA),
        "max_length": context,
        "windows": {"train": 1, "predict": 1},
        "compile": False,
        "train": {"batch_size": batch, "epochs": 1, "max_steps_per_epoch": 2},
        "gate": {"retry_epochs": 1},
        "deepspeed": {"enabled": False},
    }
    if attn:
        out["attn_implementation"] = attn
    return out


class RssSampler:
    """``VmRSS`` every ``period_s`` seconds in a daemon thread, as ``(unix seconds, MiB)`` pairs."""

    def __init__(self, period_s: float = 0.2):
        self.samples: list[tuple[float, float]] = []
        self.period_s, self._stop = period_s, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.time(), vm_rss_mb()))
            self._stop.wait(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def peak(self, start_s: float = float("-inf"), end_s: float = float("inf")) -> tuple[float, float]:
        """The largest sample taken between ``start_s`` and ``end_s`` (unix seconds) and when it was taken;
        ``(nan, nan)`` when none was."""
        inside = [(mb, t) for t, mb in self.samples if start_s <= t <= end_s]
        return max(inside) if inside else (float("nan"), float("nan"))


def phase_gate(work: Path, args) -> None:
    import yaml
    from mlflow import MlflowClient

    from domainlm.common.compute import resolve
    from domainlm.common.tracking import mlflow_run
    from stages import train_classifier

    root = work / "pipeline"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    os.chdir(root)  # MLflow's default artifact root (./mlartifacts, ./mlruns) lands here, not in the repository
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    split_dir, labels_path, domains = write_labelled_split(root, args.context)
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    cfg = deep_update(copy.deepcopy(params["classifier"]), gate_overrides(args.context, args.batch, args.attn))
    compute = resolve(params.get("compute"))
    compute.apply()
    Path("/proc/self/clear_refs").write_text("5")
    with RssSampler() as rss:
        t0, start = time.perf_counter(), time.time()
        with mlflow_run("train_classifier", cfg) as ml:
            parent = ml.active_run().info.run_id
            metrics = train_classifier.run(
                domains,
                cfg,
                ml,
                split_dir=split_dir,
                labels_path=labels_path,
                lm_dir=work / "checkpoint",
                out_dir=root / "models" / "classifier",
                token_stats_json=root / "metrics" / "token_stats.json",
                confusion_csv=root / "plots" / "classifier_confusion.csv",
                baseline_confusion_csv=root / "plots" / "classifier_baseline_confusion.csv",
                alerts_json=root / "metrics" / "classifier_alerts.json",
                compute=compute,
            )
        wall_s = time.perf_counter() - t0
    peak = vm_hwm_mb()
    client = MlflowClient()
    attempts = []
    runs = client.search_runs(
        [client.get_run(parent).info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    for r in sorted(runs, key=lambda r: r.info.start_time):
        history = client.get_metric_history(r.info.run_id, "train_runtime")
        begin, end = r.info.start_time / 1000, r.info.end_time / 1000
        attempts.append(
            {
                "attempt": r.info.run_name,
                "steps": int(max((m.step for m in history), default=0)),
                "train_s": r.data.metrics.get("train_s"),
                "val_macro_f1": r.data.metrics.get("val_macro_f1"),
                "test_macro_f1": r.data.metrics.get("test_macro_f1"),
                "wall_s": end - begin,
                "start_s": begin - start,  # seconds after the stage's start
                "peak_rss_mb": rss.peak(begin, end)[0],
            }
        )
    keep = ("gate", "timing", "docs", "classes", "windows", "attn_implementation", "compiled_layers")
    sampled_mb, sampled_at = rss.peak()
    out = {
        "wall_s": wall_s,
        "peak_rss_mb": peak,
        "peak_rss_sampled_mb": sampled_mb,  # the largest 0.2 s sample, and when: which part of the stage peaks
        "peak_rss_sampled_at_s": sampled_at - start,
        "compute": compute.metrics(),
        "overrides": gate_overrides(args.context, args.batch, args.attn),
        "attempts": attempts,
        "metrics": {k: metrics[k] for k in keep if k in metrics},
        "kept_attempt": {k: metrics["lora"].get(k) for k in ("steps", "train_s", "epochs_run", "val_macro_f1")},
    }
    (work / "gate.json").write_text(json.dumps(out, default=float))


# --------------------------------------------------------------------------------------------------- driver
def child(phase: str, work: Path, args, env: dict[str, str] | None = None) -> float:
    """Run ``phase`` of this script in a fresh process (``env`` added to its environment); returns its wall
    seconds."""
    cmd = [sys.executable, __file__, "--phase", phase, "--work", str(work)]
    cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--context", str(args.context)]
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--attn", args.attn] if args.attn else []
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - t0
    print(f"{phase}: {wall:.0f} s", flush=True)
    return wall


def train_row(m: dict, args) -> dict:
    """A training case's CSV row and its estimate."""
    cfg, gc = m["config"], m["case"] == "checkpointing_on"
    bf16 = bool(m["compute"]["bf16"])
    est = estimate(cfg, m["n_params"], m["trainable_params"], args.context, args.batch, gc, bf16=bf16, attn=m["attn"])
    est_total = m["runtime_mb"] + sum(est.values())
    tokens = args.context * args.batch
    flops = train_flops(m["layer_linear_params"], tokens, gc)  # the linear layers' matmuls; attention left out
    return {
        "row": "train",
        "case": m["case"],
        "attn": m["attn"],
        "dtype": m["compute"]["dtype"],
        "threads": m["compute"]["threads"],
        "params": m["n_params"],
        "trainable_params": m["trainable_params"],
        "context": args.context,
        "batch": args.batch,
        "steps": len(m["step_s"]),
        "s_per_step": round(m["s_per_step"], 3),
        "first_step_s": round(m["step_s"][0], 3),
        "tokens_per_s": round(tokens / m["s_per_step"], 1),
        "gflop_per_step": round(flops / 1e9, 1),
        "achieved_gflop_per_s": round(flops / 1e9 / m["s_per_step"], 1),
        "peak_rss_steps_mb": round(m["peak_rss_steps_mb"]),
        "peak_rss_train_mb": round(m["peak_rss_train_mb"]),
        "peak_rss_process_mb": round(m["peak_rss_process_mb"]),
        "runtime_mb": round(m["runtime_mb"]),
        "est_weights_mb": round(est["weights_mb"]),
        "est_weight_copies_mb": round(est["weight_copies_mb"]),
        "est_lora_state_mb": round(est["lora_state_mb"], 1),
        "est_activations_mb": round(est["activations_mb"]),
        "est_total_mb": round(est_total),
        "peak_over_estimate": round(m["peak_rss_train_mb"] / est_total, 3),
        "wall_s": round(m["train_wall_s"], 1),
    }, {**est, "total_mb": est_total}


def gate_row(g: dict, n_params: int, est_total_mb: float | None, args) -> dict:
    """The gate loop's CSV row; its peak against ``est_total_mb``, the training step's estimate without
    checkpointing (the stage's setting, ``classifier.train.gradient_checkpointing: false``)."""
    gate = g["metrics"]["gate"]
    return {
        "row": "gate_loop",
        "case": "train_classifier.run",
        "malloc": "glibc",
        "attn": g["metrics"].get("attn_implementation", ""),
        "dtype": g["compute"]["dtype"],
        "threads": g["compute"]["threads"],
        "params": n_params,
        "context": args.context,
        "batch": args.batch,
        "steps": sum(a["steps"] for a in g["attempts"]),
        "peak_rss_process_mb": round(g["peak_rss_mb"]),
        "est_total_mb": round(est_total_mb) if est_total_mb else "",
        "peak_over_estimate": round(g["peak_rss_mb"] / est_total_mb, 3) if est_total_mb else "",
        "gate_attempts": gate["attempts"],
        "gate_passed": gate["passed"],
        "attempt_steps": "/".join(str(a["steps"]) for a in g["attempts"]),
        "attempt_train_s": "/".join(f"{a['train_s']:.1f}" for a in g["attempts"]),
        "wall_s": round(g["wall_s"], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--attn", choices=["eager", "sdpa"], default=None, help="default: classifier.attn_implementation")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model: checks the code path, results not published")
    ap.add_argument("--skip-gate", action="store_true")
    ap.add_argument(
        "--mmap-threshold",
        type=int,
        default=None,
        metavar="BYTES",
        help="also run the training cases with MALLOC_MMAP_THRESHOLD_=BYTES (glibc then returns every freed block of "
        "at least BYTES to the system at once): the peak of live memory, without the freed memory glibc keeps",
    )
    ap.add_argument("--phase", choices=["build", *CASES, "gate"])
    args = ap.parse_args()
    if args.phase:
        if args.phase == "build":
            phase_build_checkpoint(args.work, args.context, args.tiny)
        elif args.phase == "gate":
            phase_gate(args.work, args)
        else:
            phase_train(args.work, args.phase, args)
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="real_shape_classifier_"))
    work.mkdir(parents=True, exist_ok=True)
    out_csv = work / "results" / RESULTS.name if args.tiny else RESULTS
    try:
        config = work / "checkpoint" / "config.json"
        want = {k: shape(args.tiny)[k] for k in TINY}  # the sizes; a reused checkpoint must have them
        if not config.exists() or any(json.loads(config.read_text()).get(k) != v for k, v in want.items()):
            child("build", work, args)
        rows, detail = [], {"train": {}, "gate_loop": None}
        allocators = {"glibc": {}}
        if args.mmap_threshold:
            allocators[f"mmap_threshold={args.mmap_threshold}"] = {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)}
        for malloc, env in allocators.items():
            for case in CASES:
                child(case, work, args, env)
                m = json.loads((work / f"{case}.json").read_text())
                row, est = train_row(m, args)
                rows.append({**row, "malloc": malloc})
                detail["train"][case if malloc == "glibc" else f"{case} ({malloc})"] = {**m, "estimate_mb": est}
        if not args.skip_gate:
            child("gate", work, args)
            g = json.loads((work / "gate.json").read_text())
            off = detail["train"]["checkpointing_off"]
            rows.append(gate_row(g, off["n_params"], off["estimate_mb"]["total_mb"], args))
            detail["gate_loop"] = g
        rows = [{k: r.get(k, "") for k in FIELDS} for r in rows]
        meta = {"shape": "tiny" if args.tiny else "Qwen2-0.5B", "steps": args.steps, "batch": args.batch}
        write_csv(out_csv, rows, **meta)
        out_json = out_csv.with_suffix(".json")
        out_json.write_text(json.dumps(detail, indent=1, default=float) + "\n")
        write_meta(out_json, **meta)
        print(out_csv.read_text())
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
