"""One domain expert: a LoRA adapter (Hu et al. 2021, via ``peft``) on the frozen base, trained with the HF Trainer.

:func:`train_adapter` reads top to bottom: tokenize and pack the texts, attach LoRA, plan the steps,
train with periodic evaluation, keep the adapter with the best validation loss (Trainer
``load_best_model_at_end``), measure it against the base, save it. DeepSpeed ZeRO-2 (Rajbhandari et
al. 2020) is used as ``train_lora.deepspeed.enabled`` says (:func:`deepspeed_config`): by default on a GPU
only, with ``true`` also on DeepSpeed's CPU accelerator (:mod:`domainlm.common.zero`); rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from domainlm.common import zero
from domainlm.common.atomic import atomic_path
from domainlm.common.compute import autocast
from domainlm.common.peft_files import sort_adapter_config
from domainlm.lm import data as lm_data

log = logging.getLogger(__name__)


def lora_config(lora_params: Mapping[str, Any]):
    """``peft.LoraConfig`` for a causal LM from the ``train_lora.lora`` params (r, lora_alpha, lora_dropout,
    target_modules)."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=int(lora_params["r"]),
        lora_alpha=float(lora_params["lora_alpha"]),
        lora_dropout=float(lora_params["lora_dropout"]),
        target_modules=list(lora_params["target_modules"]),
        bias="none",
    )


def attach_lora(base_model, lora_params: Mapping[str, Any], *, seed: int):
    """Wrap ``base_model`` in a ``peft.PeftModel`` with a fresh LoRA adapter; the base weights are frozen.

    LoRA A matrices are drawn after ``transformers.set_seed(seed)`` (B starts at zero, so the
    wrapped model initially equals the base).

    Raises:
        ValueError: (from peft) when a target module name matches no layer of the model.
    """
    from peft import get_peft_model
    from transformers import set_seed

    set_seed(seed)
    return get_peft_model(base_model, lora_config(lora_params))


def deepspeed_config(ds_params: Mapping[str, Any] | None) -> dict | None:
    """The DeepSpeed config to pass to the Trainer, or ``None`` when training without DeepSpeed: the
    ``train_lora.deepspeed`` section through the switch every stage shares
    (:func:`domainlm.common.zero.deepspeed_config`: ``auto`` on GPU only, ``true`` also on the CPU accelerator with
    the config adapted by :func:`domainlm.common.zero.cpu_config`, each change logged).

    Raises:
        ValueError, ImportError, RuntimeError: as :func:`domainlm.common.zero.deepspeed_config`.
    """
    return zero.deepspeed_config(ds_params, section="train_lora")


def planned_steps(n_train_blocks: int, train_params: Mapping[str, Any]) -> int:
    """Optimizer steps to run: ``min(max_steps, ceil(max_epochs · n_train_blocks / (batch_size · grad_accum)))``,
    at least 1."""
    per_step = int(train_params["batch_size"]) * int(train_params.get("gradient_accumulation_steps", 1))
    by_epochs = math.ceil(float(train_params["max_epochs"]) * n_train_blocks / per_step)
    return max(1, min(int(train_params["max_steps"]), by_epochs))


def training_arguments(
    output_dir: str | os.PathLike,
    train_params: Mapping[str, Any],
    *,
    max_steps: int,
    seed: int,
    deepspeed: dict | None = None,
    use_cpu: bool | None = None,
    accelerator_config: dict | None = None,
    compute=None,
):
    """``transformers.TrainingArguments`` for one adapter: eval + checkpoint every ``eval_steps``, keep the best by
    eval loss.

    With ``deepspeed`` set, ``bf16`` follows the config's ``bf16.enabled`` so that the
    Trainer and the ZeRO config agree; the config's ``"auto"`` values are filled from these args.
    Checkpoints then hold DeepSpeed's full state (the Trainer reloads the best one through DeepSpeed,
    and refuses ``save_only_model`` with ``load_best_model_at_end``); without it, the adapter only.
    ``use_cpu`` defaults to ``not torch.cuda.is_available()`` (DeepSpeed needs ``False``: ``True`` bypasses it).
    ``accelerator_config``: see :func:`domainlm.common.zero.accelerator_config`. Without DeepSpeed, ``bf16`` (the
    Trainer's autocast) follows the compute policy ``compute`` (:mod:`domainlm.common.compute`; None = fp32).
    """
    from transformers import TrainingArguments

    eval_steps = max(1, min(int(train_params["eval_steps"]), max_steps))
    if deepspeed:
        bf16 = bool(deepspeed.get("bf16", {}).get("enabled", False))
    else:
        bf16 = bool(compute is not None and compute.bf16)
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=int(train_params["batch_size"]),
        per_device_eval_batch_size=int(train_params["eval_batch_size"]),
        gradient_accumulation_steps=int(train_params.get("gradient_accumulation_steps", 1)),
        learning_rate=float(train_params["lr"]),
        weight_decay=float(train_params["weight_decay"]),
        warmup_steps=float(train_params["warmup_steps"]),
        lr_scheduler_type="cosine",
        max_grad_norm=float(train_params["grad_clip"]),
        eval_strategy="steps",
        eval_steps=eval_steps,
        eval_on_start=True,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=1,
        save_only_model=deepspeed is None,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_strategy="steps",
        logging_steps=int(train_params["logging_steps"]),
        include_num_input_tokens_seen="non_padding",
        label_names=["labels"],
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        report_to="none",
        bf16=bf16,
        deepspeed=deepspeed,
        gradient_checkpointing=bool(train_params.get("gradient_checkpointing", False)),
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_cpu=(not torch.cuda.is_available()) if use_cpu is None else use_cpu,
        accelerator_config=accelerator_config,
    )


def json_lines_log(fh, mlflow=None):
    """A ``transformers.TrainerCallback`` that writes one JSON line per Trainer log event to ``fh`` and times
    the training steps (its ``step_s`` attribute, seconds; evaluation and checkpointing excluded).

    Each line holds ``step``, ``epoch`` and the event's figures (``loss`` or ``eval_loss``, ``lr``, …); the
    end-of-training summary is not written. With ``mlflow`` (the module, inside an active run) the numeric
    figures are also logged as MLflow metrics at that step. The class is defined on first call so that this
    module imports without loading the Trainer.
    """
    from transformers import TrainerCallback

    class JsonLinesLog(TrainerCallback):
        """Write one JSON line per Trainer log event (step, epoch, loss | eval_loss, lr, …) and time the training
        steps."""

        def __init__(self, fh, mlflow=None):
            self.fh, self.mlflow = fh, mlflow
            self.step_s, self._t = 0.0, None

        def on_step_begin(self, args, state, control, **kwargs):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s += time.perf_counter() - self._t

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            if "train_loss" in logs and "loss" not in logs:  # the end-of-training summary, not a logging step
                return
            if "learning_rate" in logs:
                logs["lr"] = logs.pop("learning_rate")
            record = {"step": state.global_step, "epoch": state.epoch, **logs}
            self.fh.write(json.dumps(record) + "\n")
            self.fh.flush()
            if self.mlflow is not None:
                self.mlflow.log_metrics(
                    {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}, step=state.global_step
                )

    return JsonLinesLog(fh, mlflow)


def train_adapter(
    base_dir: str | os.PathLike,
    train_texts: Sequence[str],
    val_texts: Sequence[str],
    params: Mapping[str, Any],
    out_dir: str | os.PathLike,
    log_path: str | os.PathLike,
    *,
    mlflow=None,
    callbacks: Sequence = (),
    compute=None,
) -> dict[str, Any]:
    """Train one LoRA adapter on ``train_texts``, keep the best by validation loss, save it to ``out_dir``.

    Texts are packed into blocks of the base's context length (``model.config.max_position_embeddings``
    capped by ``train.context_length`` when set). Validation (periodic and final) uses at most
    ``train.eval_max_blocks`` evenly spaced val blocks (all when null). ``out_dir`` receives the
    ``peft`` ``save_pretrained`` files (adapter_config.json, adapter_model.safetensors); ``log_path``
    one JSON line per log event. Both are written atomically.

    Args:
        base_dir: HF folder of the base causal LM with its tokenizer.
        params: the ``train_lora`` params section (seed, lora, train, deepspeed).
        mlflow: the ``mlflow`` module inside an active run, to log every log event's figures; or None.
        callbacks: more ``transformers.TrainerCallback`` objects for the Trainer (benchmarks measure with them).
        compute: the compute policy (:mod:`domainlm.common.compute`): training and validation run under its
            bf16 autocast where it says so; None = fp32.

    Returns:
        metrics dict: train_loss, val_loss (token-weighted NLL of the kept adapter, nats/token),
        val_perplexity, base_val_loss, base_val_perplexity, best_step, steps, tokens_seen,
        tokens_per_s (training steps only), trainable_params, total_params, train_s (seconds),
        deepspeed (1 when ZeRO was used, else 0).

    Raises:
        OSError: (from transformers) ``base_dir`` is not a loadable HF folder.
        ValueError: no texts to pack, or a LoRA target module matches no layer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, default_data_collator

    seed, train_params = int(params["seed"]), params["train"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32)
    block_size = int(base.config.max_position_embeddings)
    if train_params.get("context_length"):
        block_size = min(block_size, int(train_params["context_length"]))
    train_blocks = lm_data.pack_blocks(tokenizer, train_texts, block_size, desc="tokenize train")
    val_blocks = lm_data.evenly_spaced_blocks(
        lm_data.pack_blocks(tokenizer, val_texts, block_size, desc="tokenize val"), train_params.get("eval_max_blocks")
    )

    model = attach_lora(base, params["lora"], seed=seed)
    trainable, total = model.get_nb_trainable_parameters()
    steps = planned_steps(int(train_blocks["input_ids"].shape[0]), train_params)
    ds = deepspeed_config(params.get("deepspeed"))
    log.info(
        "LoRA: %d trainable of %d parameters; %d train blocks of %d tokens; %d steps; DeepSpeed %s",
        trainable,
        total,
        train_blocks["input_ids"].shape[0],
        block_size,
        steps,
        "on" if ds else "off",
    )
    ds_on_cpu = ds is not None and not torch.cuda.is_available()
    if ds is not None:
        zero.init_process_group()
    main = zero.is_main_process()  # rank 0 alone writes the log, the adapter and (in the stage) the metrics
    probe_base = zero.frozen_digest(model) if os.environ.get(zero.PROBE_ENV) else ""

    ckpt_dir = (
        zero.shared_tempdir("train_lora_ckpt_") if ds is not None else tempfile.mkdtemp(prefix="train_lora_ckpt_")
    )
    log_file = atomic_path(log_path) if main else contextlib.nullcontext(Path(os.devnull))
    try:
        with log_file as tmp_log, tmp_log.open("w", encoding="utf-8") as fh:
            callback = json_lines_log(fh, mlflow if main else None)
            args = training_arguments(
                ckpt_dir,
                train_params,
                max_steps=steps,
                seed=seed,
                deepspeed=ds,
                use_cpu=False if ds_on_cpu else None,
                accelerator_config=zero.accelerator_config() if ds_on_cpu else None,
                compute=compute,
            )
            trainer = Trainer(
                model=model,
                args=args,
                data_collator=default_data_collator,
                train_dataset=lm_data.BlockDataset(train_blocks),
                eval_dataset=lm_data.BlockDataset(val_blocks),
                callbacks=[callback, *callbacks],
            )
            result = trainer.train()
            best_step = int(trainer.state.best_global_step or 0)
            tokens_seen = int(trainer.state.num_input_tokens_seen)
            step_s = callback.step_s
        if ds is not None:
            zero.barrier()  # every rank has reloaded the best checkpoint before rank 0 removes the folder
    finally:
        if main:
            shutil.rmtree(ckpt_dir, ignore_errors=True)

    model = trainer.model
    if not main:
        zero.write_probe(trainer, model, probe_base, saved_adapter=False)
        zero.finish()
        return {}
    with autocast(compute if ds is None else None):  # under DeepSpeed, validation in the dtype it trained in
        val_nll, _ = lm_data.mean_nll(
            model, val_blocks, batch_size=int(train_params["eval_batch_size"]), desc="val adapter"
        )
        with model.disable_adapter():
            base_nll, _ = lm_data.mean_nll(
                model, val_blocks, batch_size=int(train_params["eval_batch_size"]), desc="val base"
            )
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        sort_adapter_config(Path(tmp) / "adapter_config.json")
    zero.write_probe(trainer, model, probe_base, saved_adapter=True)
    if ds is not None:
        zero.finish()
    return {
        "train_loss": float(result.training_loss),
        "val_loss": val_nll,
        "val_perplexity": math.exp(val_nll),
        "base_val_loss": base_nll,
        "base_val_perplexity": math.exp(base_nll),
        "best_step": best_step,
        "steps": int(trainer.state.global_step),
        "tokens_seen": tokens_seen,
        "tokens_per_s": tokens_seen / step_s if step_s else 0.0,
        "trainable_params": int(trainable),
        "total_params": int(total),
        "train_s": step_s,
        "deepspeed": int(ds is not None),
    }
