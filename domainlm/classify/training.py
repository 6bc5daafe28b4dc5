"""One training attempt of the LoRA classifier, read top to bottom in :func:`train_attempt`: encode the texts as
token windows, load the merged LM with a fresh score head and attach LoRA (or load a saved adapter to continue
from), train with the Hugging Face ``Trainer``, evaluate on val every epoch and stop early when the validation
macro-F1 stops improving (``EarlyStoppingCallback``); the epoch with the best validation macro-F1 is kept
(``load_best_model_at_end``).

Each epoch trains on one window per document (:class:`WindowSampledDataset`), drawn afresh every epoch from the
document's ``classifier.windows.train`` evenly spaced windows: an epoch costs what a first-window epoch costs, and
over the epochs the model reads the whole document. Validation scores documents as prediction does: the mean of
the logits of up to ``classifier.windows.predict`` windows (:func:`domainlm.classify.model.predict_proba`).

A retry of the gate (:mod:`domainlm.classify.gate`) continues from the previous attempt's kept model and trains
with a class-weighted cross-entropy, weights ``n / (k · n_c)`` (inverse class frequency, scikit-learn's
``compute_class_weight("balanced")``), passed to the Trainer as ``compute_loss_func``.

With ``classifier.compile`` on, training and validation run the decoder layers compiled by TorchInductor
(:func:`domainlm.classify.model.compiled_layers`); the compiled code is cached in the process, so the gate's
retries reuse the first attempt's compile.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from domainlm.classify import model as cls_model
from domainlm.classify.data import LabelledSplit
from domainlm.classify.metrics import macro_f1

log = logging.getLogger(__name__)


class EncodedDataset(torch.utils.data.Dataset):
    """Map-style dataset of encoded documents; item ``i`` is ``{"input_ids": list[int], "labels": int}``
    (unpadded; ``transformers.DataCollatorWithPadding`` pads each batch)."""

    def __init__(self, input_ids: Sequence[Sequence[int]], labels: Sequence[int]):
        if len(input_ids) != len(labels):
            raise ValueError(f"{len(input_ids)} inputs but {len(labels)} labels")
        self.input_ids, self.labels = list(input_ids), [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


class WindowSampledDataset(torch.utils.data.Dataset):
    """One window per document and epoch: item ``i`` is ``{"input_ids": list[int], "labels": int}`` where the window
    is drawn from document ``i``'s windows by a generator seeded with ``(seed, epoch, i)``. :func:`epoch_callback`
    moves :attr:`epoch` at each epoch's start (the Trainer's data loader runs in this process:
    ``dataloader_num_workers=0``). A document with one window always gives that window."""

    def __init__(self, windows: Sequence[Sequence[Sequence[int]]], labels: Sequence[int], *, seed: int):
        if len(windows) != len(labels):
            raise ValueError(f"{len(windows)} documents but {len(labels)} labels")
        if any(len(w) == 0 for w in windows):
            raise ValueError("every document needs at least one window")
        self.windows, self.labels = [list(map(list, w)) for w in windows], [int(y) for y in labels]
        self.seed, self.epoch = int(seed), 0

    def __len__(self) -> int:
        return len(self.windows)

    def window_index(self, i: int) -> int:
        """Which of document ``i``'s windows this epoch reads."""
        n = len(self.windows[i])
        if n == 1:
            return 0
        return int(np.random.default_rng([self.seed, self.epoch, i]).integers(n))

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.windows[i][self.window_index(i)], "labels": self.labels[i]}


def epoch_callback(dataset: WindowSampledDataset):
    """A ``TrainerCallback`` that sets ``dataset.epoch`` to the Trainer's epoch at each epoch's start."""
    from transformers import TrainerCallback

    class SetEpoch(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            dataset.epoch = int(round(state.epoch or 0))

    return SetEpoch()


def balanced_class_weights(y: Sequence[int], n_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights ``n / (k · n_c)`` over the ``k`` classes present in ``y``
    (scikit-learn ``compute_class_weight("balanced")``); a class absent from ``y`` gets weight 1.

    Returns:
        float32 tensor ``[n_classes]``.
    """
    from sklearn.utils.class_weight import compute_class_weight

    y = np.asarray(y)
    present = np.unique(y)
    weights = np.ones(n_classes, dtype=np.float32)
    weights[present] = compute_class_weight("balanced", classes=present, y=y)
    return torch.tensor(weights)


def weighted_cross_entropy(weights: torch.Tensor | None) -> Callable[..., torch.Tensor]:
    """A ``Trainer`` ``compute_loss_func``: cross-entropy of the logits, class-weighted when ``weights`` is set
    (the weighted mean ``Σ w_y·ℓ / Σ w_y``, as ``torch.nn.functional.cross_entropy``)."""

    def loss(outputs, labels, num_items_in_batch=None) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        w = weights.to(logits.device) if weights is not None else None
        return torch.nn.functional.cross_entropy(logits.float(), labels, weight=w)

    return loss


def training_arguments(
    output_dir: str | os.PathLike, settings: Mapping[str, Any], *, seed: int, use_cpu: bool | None = None, compute=None
):
    """``transformers.TrainingArguments`` of one attempt: evaluate and checkpoint every epoch, keep the epoch with
    the best validation ``macro_f1``. ``settings``: epochs, batch_size, eval_batch_size, lr, weight_decay,
    warmup_steps (< 1: a fraction of the steps), grad_clip, logging_steps. ``compute`` (a
    :class:`domainlm.common.compute.ComputePolicy`) turns on the Trainer's bf16 autocast; None = fp32."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=float(settings["epochs"]),
        per_device_train_batch_size=int(settings["batch_size"]),
        per_device_eval_batch_size=int(settings["eval_batch_size"]),
        learning_rate=float(settings["lr"]),
        weight_decay=float(settings["weight_decay"]),
        warmup_steps=float(settings["warmup_steps"]),
        lr_scheduler_type="linear",
        max_grad_norm=float(settings["grad_clip"]),
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        save_only_model=True,
        load_best_model_at_end=True,
        metric_for_best_model="macro_f1",
        greater_is_better=True,
        logging_strategy="steps",
        logging_steps=int(settings["logging_steps"]),
        train_sampling_strategy="group_by_length",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        report_to="none",
        bf16=bool(compute is not None and compute.bf16),
        use_cpu=(not torch.cuda.is_available()) if use_cpu is None else use_cpu,
    )


def _log_callback(on_log: Callable[[int, dict[str, float]], None]):
    from transformers import TrainerCallback

    class LogFigures(TrainerCallback):
        """Pass every numeric figure the Trainer logs (loss, lr, eval_loss, eval_macro_f1, …) to ``on_log``."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            figures = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            if figures:
                on_log(int(state.global_step), figures)

    return LogFigures()


def windows_params(params: Mapping[str, Any]) -> tuple[int, int]:
    """``(train, predict)``: windows per document read in training and pooled in prediction (``classifier.windows``;
    both 1 when the section is missing).

    Raises:
        ValueError: a count below 1.
    """
    w = params.get("windows") or {}
    n_train, n_predict = int(w.get("train", 1)), int(w.get("predict", 1))
    if n_train < 1 or n_predict < 1:
        raise ValueError(f"classifier.windows.train and .predict must be >= 1, got {n_train} and {n_predict}")
    return n_train, n_predict


def scoring_kwargs(params: Mapping[str, Any], compute=None) -> dict[str, Any]:
    """The keyword arguments of :func:`domainlm.classify.model.predict_proba` with which every classifier is scored
    (``train_classifier``'s attempts and test predictions, and the round's re-score of the deployed model), from the
    ``classifier`` params section: ``max_length`` (tokens per window), ``batch_size`` (``train.eval_batch_size``,
    windows per forward pass), ``max_windows`` (``windows.predict``, :func:`windows_params`) and ``compute`` (a
    resolved :class:`domainlm.common.compute.ComputePolicy`, or None for fp32).

    Raises:
        KeyError: ``params`` lacks ``max_length`` or ``train.eval_batch_size``.
        ValueError: a window count below 1.
    """
    _, n_predict = windows_params(params)
    return {
        "max_length": int(params["max_length"]),
        "batch_size": int(params["train"]["eval_batch_size"]),
        "max_windows": n_predict,
        "compute": compute,
    }


def _in_order_trainer():
    """``transformers.Trainer`` whose evaluation reads the eval dataset in its own order.

    With ``train_sampling_strategy="group_by_length"`` the Trainer also length-groups (shuffles) the *eval* set;
    validation pools window logits per document by position, so it needs the windows in dataset order.
    """
    from transformers import Trainer

    class InOrderEvalTrainer(Trainer):
        def _get_eval_sampler(self, eval_dataset):
            return torch.utils.data.SequentialSampler(eval_dataset) if eval_dataset is not None else None

    return InOrderEvalTrainer


def train_attempt(
    lm_dir: str | os.PathLike,
    train: LabelledSplit,
    val: LabelledSplit,
    classes: Sequence[str],
    params: Mapping[str, Any],
    settings: Mapping[str, Any],
    *,
    seed: int,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    init_adapter: str | os.PathLike | None = None,
    compute=None,
):
    """Train one LoRA classifier on ``train`` and keep its best epoch by macro-F1 on ``val``.

    Args:
        lm_dir: the merged LM's HF folder (weights + tokenizer).
        train, val: labelled documents (:func:`domainlm.classify.data.read_splits`); val documents whose label
            is not in ``classes`` are left out of validation.
        classes: the class list (index = class id).
        params: the ``classifier`` params (``max_length``, ``windows``, ``lora``, ``train.early_stopping_patience``,
            ``attn_implementation``, ``compile``: train and validate with compiled decoder layers,
            :func:`domainlm.classify.model.compiled_layers`; missing = false).
        settings: this attempt's training settings (:func:`domainlm.classify.gate.attempt_settings`).
        seed: seeds the head, the LoRA matrices, the data order, the windows drawn and dropout.
        on_log: called as ``on_log(step, figures)`` at every Trainer log event (e.g. MLflow ``log_metrics``).
        init_adapter: a saved classifier's ``adapter/`` folder to continue training from (its LoRA matrices and
            score head; a retry, or the deployed model); None = a fresh head and fresh LoRA matrices.
        compute: the compute policy (:mod:`domainlm.common.compute`; None = fp32).

    Returns:
        ``(peft_model, tokenizer, info)``: the model with its best epoch loaded, in eval mode, and ``info`` with
        ``val_macro_f1`` (of the kept epoch), ``best_epoch``, ``epochs_run``, ``steps``, ``train_loss``,
        ``train_s`` (seconds), ``trainable_params``, ``total_params``, ``val_docs_scored``, ``class_weighted``
        (0/1), ``attn_implementation`` (:func:`domainlm.classify.model.attention_implementation`),
        ``compiled_layers`` (0 = eager).

    Raises:
        ValueError: no val document has a known label (nothing to early-stop on), or a train label is not in
            ``classes``.
    """
    from transformers import DataCollatorWithPadding, EarlyStoppingCallback

    label_id = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(train.labels) - set(label_id))
    if unknown:
        raise ValueError(f"train labels {unknown} are not among the classes {list(classes)}")
    val_rows = [i for i, lab in enumerate(val.labels) if lab in label_id]
    if not val_rows:
        raise ValueError("no val document has a label the classifier knows: nothing to early-stop on")
    max_length = int(params["max_length"])
    n_train_windows, n_predict_windows = windows_params(params)

    attn = cls_model.attention_implementation(params.get("attn_implementation"))
    if init_adapter is not None:
        from transformers import set_seed

        set_seed(seed)
        model, tokenizer = cls_model.load_adapter(
            lm_dir, classes, init_adapter, trainable=True, attn_implementation=attn
        )
    else:
        base, tokenizer = cls_model.load_sequence_classifier(lm_dir, classes, attn_implementation=attn)
        model = cls_model.attach_lora(base, params["lora"], seed=seed)
    y_train = [label_id[lab] for lab in train.labels]
    train_ds = WindowSampledDataset(
        cls_model.encode_windows(tokenizer, train.texts, max_length, n_train_windows), y_train, seed=seed
    )
    val_windows = cls_model.encode_windows(tokenizer, [val.texts[i] for i in val_rows], max_length, n_predict_windows)
    val_doc_of = [d for d, doc in enumerate(val_windows) for _ in doc]
    val_y = [label_id[val.labels[i]] for i in val_rows]
    val_ds = EncodedDataset([w for doc in val_windows for w in doc], [val_y[d] for d in val_doc_of])
    trainable, total = model.get_nb_trainable_parameters()
    weights = balanced_class_weights(y_train, len(classes)) if settings.get("class_weighted") else None
    log.info(
        "LoRA classifier%s: %d classes, %d trainable of %d parameters, %d train documents (1 of <= %d windows "
        "per epoch) / %d val documents (%d windows) of <= %d tokens, %s epochs at lr %g%s",
        " continued from " + str(init_adapter) if init_adapter is not None else "",
        len(classes),
        trainable,
        total,
        len(train_ds),
        n_train_windows,
        len(val_rows),
        len(val_ds),
        max_length,
        settings["epochs"],
        float(settings["lr"]),
        ", class-weighted loss" if weights is not None else "",
    )

    def compute_metrics(pred) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        doc_logits = cls_model.pool_window_logits(np.asarray(logits, dtype=np.float64), val_doc_of, len(val_rows))
        y_true = [classes[i] for i in val_y]
        y_pred = [classes[i] for i in doc_logits.argmax(axis=1)]
        return {"macro_f1": macro_f1(y_true, y_pred)}

    callbacks = [
        EarlyStoppingCallback(early_stopping_patience=int(params["train"].get("early_stopping_patience", 2))),
        epoch_callback(train_ds),
    ]
    if on_log is not None:
        callbacks.append(_log_callback(on_log))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="train_classifier_ckpt_") as ckpt_dir:
        trainer = _in_order_trainer()(
            model=model,
            args=training_arguments(ckpt_dir, settings, seed=seed, compute=compute),
            train_dataset=train_ds,
            eval_dataset=val_ds,
            data_collator=DataCollatorWithPadding(tokenizer, padding="longest"),
            compute_metrics=compute_metrics,
            compute_loss_func=weighted_cross_entropy(weights),
            callbacks=callbacks,
        )
        with cls_model.compiled_layers(model, enabled=bool(params.get("compile", False))) as n_compiled:
            result = trainer.train()
        state = trainer.state
    train_s = time.perf_counter() - t0
    model = trainer.model.eval()
    evals = [h for h in state.log_history if "eval_macro_f1" in h]
    best = max(evals, key=lambda h: h["eval_macro_f1"]) if evals else {"eval_macro_f1": float("nan"), "epoch": 0}
    return (
        model,
        tokenizer,
        {
            "val_macro_f1": float(best["eval_macro_f1"]),
            "best_epoch": float(best.get("epoch", 0.0)),
            "epochs_run": float(state.epoch or 0.0),
            "steps": int(state.global_step),
            "train_loss": float(result.training_loss),
            "train_s": train_s,
            "trainable_params": int(trainable),
            "total_params": int(total),
            "val_docs_scored": len(val_rows),
            "continued": int(init_adapter is not None),
            "class_weighted": int(weights is not None),
            "attn_implementation": attn,
            "compiled_layers": int(n_compiled),
        },
    )
