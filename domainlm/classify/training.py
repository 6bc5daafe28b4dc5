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

With ``classifier.deepspeed`` on (:func:`deepspeed_config`: the switch and code ``train_lora`` uses,
:mod:`domainlm.common.zero`), an attempt trains under DeepSpeed ZeRO-2 on every rank of the launch (Rajbhandari et al.
2020). Rank 0 runs the stage and leads (:func:`leading_attempts`): before each attempt it sends the attempt's
arguments to the other ranks, which follow (:func:`follow_attempts`): they train their share of each batch and write,
score and log nothing. The retry's starting adapter travels with the arguments, so no rank reads another's disk.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import gc
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from domainlm.classify import model as cls_model
from domainlm.classify.data import LabelledSplit, class_list, read_splits
from domainlm.classify.metrics import macro_f1
from domainlm.classify.window_cache import InMemoryWindows
from domainlm.common import zero

log = logging.getLogger(__name__)
# True on rank 0 inside leading_attempts(): each train_attempt first sends its arguments to the following ranks.
_LEADING: contextvars.ContextVar[bool] = contextvars.ContextVar("classifier_leading_attempts", default=False)


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


class AllWindowsDataset(torch.utils.data.Dataset):
    """Every window of the chosen documents, document by document: item ``i`` is ``{"input_ids": list[int],
    "labels": int}`` of the ``i``-th window, labelled with its document's label; :attr:`doc_of_window` gives each
    window's document (its position in ``docs``), for pooling the logits per document.

    Args:
        windows: a :class:`domainlm.classify.window_cache.WindowSource`.
        docs: which of its documents, in order.
        labels: one class id per entry of ``docs``.
        max_windows: at most the first this many windows of a document (None = all it has).
    """

    def __init__(self, windows, docs: Sequence[int], labels: Sequence[int], *, max_windows: int | None = None):
        if len(docs) != len(labels):
            raise ValueError(f"{len(docs)} documents but {len(labels)} labels")
        self.windows = windows
        self.docs = np.asarray(docs, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        counts = np.asarray(windows.n_windows, dtype=np.int64)[self.docs]
        if max_windows is not None:
            counts = np.minimum(counts, int(max_windows))
        self.doc_of_window = np.repeat(np.arange(len(self.docs)), counts)
        self._k = np.arange(len(self.doc_of_window)) - np.repeat(np.cumsum(counts) - counts, counts)

    def __len__(self) -> int:
        return len(self.doc_of_window)

    def __getitem__(self, i: int) -> dict[str, Any]:
        d = int(self.doc_of_window[i])
        return {"input_ids": self.windows.window(int(self.docs[d]), int(self._k[i])), "labels": int(self.labels[d])}


class WindowSampledDataset(torch.utils.data.Dataset):
    """One window per document and epoch: item ``i`` is ``{"input_ids": list[int], "labels": int}`` where the window
    is drawn from document ``j``'s windows by a generator seeded with ``(seed, epoch, j)``. :func:`epoch_callback`
    moves :attr:`epoch` at each epoch's start (the Trainer's data loader runs in this process:
    ``dataloader_num_workers=0``). A document with one window always gives that window.

    Without ``docs_per_epoch`` (or with one ≥ the documents), an epoch reads every document once: ``j = i``. With
    ``docs_per_epoch`` = ``k`` < ``n`` documents, an epoch reads ``k`` of them: epoch ``e`` reads positions
    ``e·k … e·k + k − 1`` (modulo ``n``) of one permutation of the documents drawn from ``seed``, so consecutive
    epochs read different documents and every document is read once before any is read twice.

    Args:
        windows: per-document token windows: a :class:`domainlm.classify.window_cache.WindowSource` (a
            memory-mapped ``WindowCache``) or a list (``windows[d]`` = document ``d``'s windows).
        labels: one class id per document read (per entry of ``docs``).
        seed: seeds the window draws and the permutation.
        docs: which documents of ``windows``, in order (None = all).
        docs_per_epoch: documents an epoch reads (None = all).

    Raises:
        ValueError: labels and documents differ in number, a document has no window, or ``docs_per_epoch`` < 1.
    """

    def __init__(
        self,
        windows,
        labels: Sequence[int],
        *,
        seed: int,
        docs: Sequence[int] | None = None,
        docs_per_epoch: int | None = None,
    ):
        from domainlm.classify.window_cache import InMemoryWindows

        self.windows = InMemoryWindows(windows) if isinstance(windows, (list, tuple)) else windows
        self.docs = np.arange(len(self.windows)) if docs is None else np.asarray(docs, dtype=np.int64)
        if len(self.docs) != len(labels):
            raise ValueError(f"{len(self.docs)} documents but {len(labels)} labels")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.n_windows = np.asarray(self.windows.n_windows, dtype=np.int64)[self.docs]
        if len(self.n_windows) and self.n_windows.min() < 1:
            raise ValueError("every document needs at least one window")
        if docs_per_epoch is not None and int(docs_per_epoch) < 1:
            raise ValueError(f"docs_per_epoch must be >= 1 or None, got {docs_per_epoch}")
        self.seed, self.epoch = int(seed), 0
        n = len(self.docs)
        self.docs_per_epoch = n if docs_per_epoch is None else min(n, int(docs_per_epoch))
        self._order = np.random.default_rng([self.seed]).permutation(n) if self.docs_per_epoch < n else None

    def __len__(self) -> int:
        return self.docs_per_epoch

    def position(self, i: int) -> int:
        """Which document (index into ``docs``) item ``i`` of this epoch reads."""
        if self._order is None:
            return int(i)
        return int(self._order[(self.epoch * self.docs_per_epoch + int(i)) % len(self._order)])

    def window_index(self, j: int) -> int:
        """Which of document ``j``'s windows (``j`` indexes ``docs``) this epoch reads."""
        n = int(self.n_windows[j])
        if n == 1:
            return 0
        return int(np.random.default_rng([self.seed, self.epoch, j]).integers(n))

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = self.position(i)
        return {
            "input_ids": self.windows.window(int(self.docs[j]), self.window_index(j)),
            "labels": int(self.labels[j]),
        }

    def lengths(self) -> list[int]:
        """Tokens of each item of this epoch (the Trainer's ``group_by_length`` sampler groups by them), read from
        the window lengths without loading the windows."""
        out = []
        for i in range(len(self)):
            j = self.position(i)
            out.append(self.windows.window_length(int(self.docs[j]), self.window_index(j)))
        return out


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


def deepspeed_config(params: Mapping[str, Any]) -> dict | None:
    """The DeepSpeed config of the ``classifier`` params' ``deepspeed`` section, or None to train without DeepSpeed:
    the switch every stage shares (:func:`domainlm.common.zero.deepspeed_config`; ``auto`` = on GPU only).

    Raises:
        ValueError, ImportError, RuntimeError: as :func:`domainlm.common.zero.deepspeed_config`.
    """
    return zero.deepspeed_config(params.get("deepspeed"), section="classifier")


def training_arguments(
    output_dir: str | os.PathLike,
    settings: Mapping[str, Any],
    *,
    seed: int,
    use_cpu: bool | None = None,
    compute=None,
    deepspeed: dict | None = None,
    accelerator_config: dict | None = None,
):
    """``transformers.TrainingArguments`` of one attempt: evaluate and checkpoint every epoch, keep the epoch with
    the best validation ``macro_f1``. ``settings``: epochs, batch_size, eval_batch_size, lr, weight_decay,
    warmup_steps (< 1: a fraction of the steps), grad_clip, logging_steps, gradient_checkpointing and
    gradient_accumulation_steps (optional; false and 1). Without
    DeepSpeed, ``compute`` (a :class:`domainlm.common.compute.ComputePolicy`) turns on the Trainer's bf16 autocast
    (None = fp32). With ``deepspeed`` (a config from :func:`deepspeed_config`), ``bf16`` follows the config's
    ``bf16.enabled`` (the Trainer requires them to agree) and checkpoints hold DeepSpeed's whole state (the Trainer
    refuses ``save_only_model`` with ``load_best_model_at_end`` under DeepSpeed). ``use_cpu`` defaults to
    ``not torch.cuda.is_available()`` (DeepSpeed needs ``False``: ``True`` bypasses it); ``accelerator_config``: see
    :func:`domainlm.common.zero.accelerator_config`."""
    from transformers import TrainingArguments

    if deepspeed:
        bf16 = bool(deepspeed.get("bf16", {}).get("enabled", False))
    else:
        bf16 = bool(compute is not None and compute.bf16)
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=float(settings["epochs"]),
        per_device_train_batch_size=int(settings["batch_size"]),
        gradient_accumulation_steps=int(settings.get("gradient_accumulation_steps") or 1),
        per_device_eval_batch_size=int(settings["eval_batch_size"]),
        learning_rate=float(settings["lr"]),
        weight_decay=float(settings["weight_decay"]),
        warmup_steps=float(settings["warmup_steps"]),
        lr_scheduler_type="linear",
        max_grad_norm=float(settings["grad_clip"]),
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        save_only_model=deepspeed is None,
        load_best_model_at_end=True,
        metric_for_best_model="macro_f1",
        greater_is_better=True,
        logging_strategy="steps",
        logging_steps=int(settings["logging_steps"]),
        train_sampling_strategy="group_by_length",
        # weighted_cross_entropy is each rank's (weighted) mean, not a sum over the Trainer's num_items_in_batch:
        # under DeepSpeed the ranks' gradients are averaged, which is the global batch's mean; True would scale the
        # loss by the number of ranks (one process: by 1)
        average_tokens_across_devices=False,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        report_to="none",
        bf16=bf16,
        deepspeed=deepspeed,
        activation_checkpointing=bool(settings.get("gradient_checkpointing", False)),  # transformers' newer name
        activation_checkpointing_kwargs={"use_reentrant": False},  # recomputes without inputs that require grad
        use_cpu=(not torch.cuda.is_available()) if use_cpu is None else use_cpu,
        accelerator_config=accelerator_config,
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


def docs_per_epoch(settings: Mapping[str, Any], *, world_size: int = 1) -> int | None:
    """Train documents an epoch reads: ``max_steps_per_epoch`` optimizer steps × ``batch_size`` ×
    ``gradient_accumulation_steps`` × ``world_size`` ranks, or None (every document) when ``max_steps_per_epoch``
    is unset (the ``classifier.train`` settings).

    Raises:
        ValueError: ``max_steps_per_epoch`` below 1.
    """
    steps = settings.get("max_steps_per_epoch")
    if steps is None:
        return None
    if int(steps) < 1:
        raise ValueError(f"classifier.train.max_steps_per_epoch must be >= 1 or null, got {steps}")
    accum = int(settings.get("gradient_accumulation_steps") or 1)
    return int(steps) * int(settings["batch_size"]) * accum * int(world_size)


#: Window caches the stage keeps in its cache folder (the three splits' of this run and of the previous ones).
CACHES_KEPT = 6


def split_caches(
    tokenizer,
    lm_dir: str | os.PathLike,
    split_dir: str | os.PathLike,
    domains: Sequence[str],
    params: Mapping[str, Any],
    cache_root: str | os.PathLike,
) -> dict[str, Any]:
    """``{"train", "val", "test"}`` → each split's memory-mapped window cache
    (:func:`domainlm.classify.window_cache.split_windows`): ``max_length`` tokens per window, ``windows.train``
    windows per train document and ``windows.predict`` per val and test document (the ``classifier`` params);
    built when missing, then all but the :data:`CACHES_KEPT` most recently used caches of ``cache_root`` are
    removed.

    Raises:
        FileNotFoundError: a split file is missing.
        ValueError: a window count below 1.
    """
    from domainlm.classify.window_cache import prune, split_windows

    n_train, n_predict = windows_params(params)
    caches = {
        split: split_windows(
            tokenizer,
            lm_dir,
            split_dir,
            domains,
            split,
            cache_root,
            max_length=int(params["max_length"]),
            max_windows=n_train if split == "train" else n_predict,
        )
        for split in ("train", "val", "test")
    }
    prune(cache_root, keep=CACHES_KEPT)
    return caches


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
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class InOrderEvalTrainer(Trainer):
        def _get_eval_sampler(self, eval_dataset):
            return torch.utils.data.SequentialSampler(eval_dataset) if eval_dataset is not None else None

        def _get_train_sampler(self, train_dataset=None):
            # the Trainer's own group_by_length sampler, with the lengths read from the window lengths
            # (WindowSampledDataset.lengths) instead of from every item of the dataset
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if self.args.train_sampling_strategy != "group_by_length" or not hasattr(dataset, "lengths"):
                return super()._get_train_sampler(train_dataset)
            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                dataset=dataset,
                lengths=dataset.lengths(),
            )

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
    windows: Mapping[str, Any] | None = None,
):
    """Train one LoRA classifier on ``train`` and keep its best epoch by macro-F1 on ``val``.

    Args:
        lm_dir: the merged LM's HF folder (weights + tokenizer).
        train, val: labelled documents (:func:`domainlm.classify.data.read_splits`); val documents whose label
            is not in ``classes`` are left out of validation.
        classes: the class list (index = class id).
        params: the ``classifier`` params (``max_length``, ``windows``, ``lora``, ``train.early_stopping_patience``,
            ``attn_implementation``, ``compile``: train and validate with compiled decoder layers,
            :func:`domainlm.classify.model.compiled_layers`, missing = false; ``deepspeed``: :func:`deepspeed_config`).
        settings: this attempt's training settings (:func:`domainlm.classify.gate.attempt_settings`).
        seed: seeds the head, the LoRA matrices, the data order, the windows drawn and dropout.
        on_log: called as ``on_log(step, figures)`` at every Trainer log event (e.g. MLflow ``log_metrics``).
        init_adapter: a saved classifier's ``adapter/`` folder to continue training from (its LoRA matrices and
            score head; a retry, or the deployed model); None = a fresh head and fresh LoRA matrices.
        compute: the compute policy (:mod:`domainlm.common.compute`; None = fp32).
        windows: ``{"train": source, "val": source}``, the splits' token windows on disk
            (:func:`domainlm.classify.window_cache.split_windows`, built with ``windows.train`` and
            ``windows.predict`` windows per document), read at ``train.rows`` / ``val.rows``; None = encode
            ``train.texts`` and ``val.texts`` in memory (:func:`domainlm.classify.model.encode_windows`). Both give
            the same windows.

    An epoch reads every train document once, or ``train.max_steps_per_epoch`` steps' worth of them when that is
    set (:func:`docs_per_epoch`; :class:`WindowSampledDataset`).

    Under DeepSpeed (:func:`deepspeed_config`) every rank calls this with the same arguments (a collective; the
    stage's ranks do so through :func:`leading_attempts` and :func:`follow_attempts`). ``classifier.compile`` is
    then off, with a logged reason: DeepSpeed compiles through its own engine (``compile`` in its config), and the
    regional compilation of the decoder layers inside the engine is not a combination DeepSpeed or transformers
    supports. Rank 0 gets back a plain fp32 copy of the trained model (:func:`rebuilt_classifier`); the other
    ranks, which score nothing, get None in its place.

    Returns:
        ``(peft_model, tokenizer, info)``: the model with its best epoch loaded, in eval mode (None on a DeepSpeed
        rank other than 0), and ``info`` with ``val_macro_f1`` (of the kept epoch), ``best_epoch``, ``epochs_run``,
        ``steps``, ``train_loss``, ``train_s`` (seconds), ``trainable_params``, ``total_params``,
        ``val_docs_scored``, ``docs_per_epoch`` (train documents an epoch read), ``docs_seen`` (train documents
        read over the attempt, repeats included), ``continued`` (0/1), ``class_weighted`` (0/1), ``attn_implementation``
        (:func:`domainlm.classify.model.attention_implementation`), ``compiled_layers`` (0 = eager), ``deepspeed``
        (0/1) and ``world_size`` (ranks that trained).

    Raises:
        ValueError: no val document has a known label (nothing to early-stop on), or a train label is not in
            ``classes``; bad ``deepspeed`` params (:func:`deepspeed_config`).
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

    ds = deepspeed_config(params)
    compile_layers = bool(params.get("compile", False))
    if ds is not None:
        zero.init_process_group()
        zero.reset_accelerator_state()  # a previous attempt's Trainer left its DeepSpeed plugin there
        if _LEADING.get():
            zero.broadcast_object(
                {
                    "lm_dir": str(lm_dir),
                    "classes": list(classes),
                    "settings": dict(settings),
                    "seed": int(seed),
                    "init_adapter": _folder_files(init_adapter),
                }
            )
        if compile_layers:
            log.warning(
                "classifier.compile is off under DeepSpeed: its engine compiles through its own `compile` config, "
                "and compiling the decoder layers inside the engine is not a combination DeepSpeed supports"
            )
            compile_layers = False
    ds_on_cpu = ds is not None and not torch.cuda.is_available()
    main = ds is None or zero.is_main_process()  # under DeepSpeed, rank 0 alone removes the shared checkpoints

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
    val_y = [label_id[val.labels[i]] for i in val_rows]
    world = int(os.environ.get("WORLD_SIZE", "1")) if ds is not None else 1
    per_epoch = docs_per_epoch(settings, world_size=world)
    if windows is not None:  # the splits' memory-mapped window caches, read at the documents' rows
        train_ds = WindowSampledDataset(windows["train"], y_train, seed=seed, docs=train.rows, docs_per_epoch=per_epoch)
        val_ds = AllWindowsDataset(windows["val"], [val.rows[i] for i in val_rows], val_y)
    else:
        train_ds = WindowSampledDataset(
            cls_model.encode_windows(tokenizer, train.texts, max_length, n_train_windows),
            y_train,
            seed=seed,
            docs_per_epoch=per_epoch,
        )
        val_windows = cls_model.encode_windows(
            tokenizer, [val.texts[i] for i in val_rows], max_length, n_predict_windows
        )
        val_ds = AllWindowsDataset(InMemoryWindows(val_windows), range(len(val_rows)), val_y)
    val_doc_of = val_ds.doc_of_window
    trainable, total = model.get_nb_trainable_parameters()
    probe_base = zero.frozen_digest(model) if ds is not None and os.environ.get(zero.PROBE_ENV) else ""
    weights = balanced_class_weights(y_train, len(classes)) if settings.get("class_weighted") else None
    log.info(
        "LoRA classifier%s: %d classes, %d trainable of %d parameters, %s train documents (1 of <= %d windows "
        "per epoch) / %d val documents (%d windows) of <= %d tokens, %s epochs at lr %g%s; DeepSpeed %s",
        " continued from " + str(init_adapter) if init_adapter is not None else "",
        len(classes),
        trainable,
        total,
        len(train_ds) if len(train_ds) == len(y_train) else f"{len(train_ds)} of {len(y_train)}",
        n_train_windows,
        len(val_rows),
        len(val_ds),
        max_length,
        settings["epochs"],
        float(settings["lr"]),
        ", class-weighted loss" if weights is not None else "",
        "on" if ds is not None else "off",
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
    prefix = "train_classifier_ckpt_"
    ckpt_dir = zero.shared_tempdir(prefix) if ds is not None else tempfile.mkdtemp(prefix=prefix)
    try:
        trainer = _in_order_trainer()(
            model=model,
            args=training_arguments(
                ckpt_dir,
                settings,
                seed=seed,
                compute=compute,
                deepspeed=ds,
                use_cpu=False if ds_on_cpu else None,
                accelerator_config=zero.accelerator_config() if ds_on_cpu else None,
            ),
            train_dataset=train_ds,
            eval_dataset=val_ds,
            data_collator=DataCollatorWithPadding(tokenizer, padding="longest"),
            compute_metrics=compute_metrics,
            compute_loss_func=weighted_cross_entropy(weights),
            callbacks=callbacks,
        )
        with cls_model.compiled_layers(model, enabled=compile_layers) as n_compiled:
            result = trainer.train()
        state = trainer.state
        world_size = int(trainer.args.world_size)
        grad_accum = int(trainer.args.gradient_accumulation_steps)
        if ds is not None:
            zero.barrier()  # every rank has reloaded the best checkpoint before rank 0 removes the folder
    finally:
        if main:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    train_s = time.perf_counter() - t0
    if ds is None:
        model = trainer.model.eval()
    else:  # keep the trained adapter, let the engine go, and give rank 0 a plain model of its own
        zero.write_probe(trainer, trainer.model, probe_base, name=f"rank{zero.process_rank()}_seed{seed}")
        adapter = trained_adapter(trainer.model)
        zero.release_engine(trainer)
        del trainer, model
        gc.collect()
        model = rebuilt_classifier(lm_dir, classes, attn, *adapter) if zero.is_main_process() else None
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
            "docs_per_epoch": len(train_ds),
            "docs_seen": int(state.global_step) * int(settings["batch_size"]) * grad_accum * world_size,
            "continued": int(init_adapter is not None),
            "class_weighted": int(weights is not None),
            "attn_implementation": attn,
            "compiled_layers": int(n_compiled),
            "deepspeed": int(ds is not None),
            "world_size": world_size,
        },
    )


def trained_adapter(model) -> tuple[Any, dict[str, torch.Tensor], torch.device]:
    """What :func:`rebuilt_classifier` needs of a classifier trained under DeepSpeed: ``(config, state, device)``,
    the active adapter's peft config (a copy), its tensors (LoRA matrices and the score head; peft's
    ``get_peft_model_state_dict``) as float32 CPU copies, and the device it trained on."""
    from peft import get_peft_model_state_dict

    config = copy.deepcopy(model.peft_config[model.active_adapter])
    state = {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
    return config, state, next(model.parameters()).device


def rebuilt_classifier(
    lm_dir: str | os.PathLike,
    classes: Sequence[str],
    attn_implementation: str,
    config,
    state: Mapping[str, torch.Tensor],
    device: torch.device,
):
    """A classifier trained under DeepSpeed as a plain fp32 peft model: the merged LM loaded again in fp32, the
    adapter ``config`` attached and its ``state`` copied in (:func:`trained_adapter`), moved to ``device``.

    The module DeepSpeed trained is not returned itself: the engine keeps forward hooks on it that call back into
    the engine (so :func:`domainlm.classify.model.save_classifier` could not deep-copy it for the merge), and with
    bf16 it has cast every weight, the frozen merged LM's included, to bf16.

    Returns:
        the peft model, in eval mode.

    Raises:
        RuntimeError: ``state`` holds tensors the rebuilt model has no place for.
    """
    from peft import get_peft_model, set_peft_model_state_dict

    base, _ = cls_model.load_sequence_classifier(lm_dir, classes, attn_implementation=attn_implementation)
    model = get_peft_model(base, copy.deepcopy(config))
    loaded = set_peft_model_state_dict(model, dict(state))
    if loaded.unexpected_keys:
        raise RuntimeError(f"the trained adapter does not fit the rebuilt classifier: {loaded.unexpected_keys[:5]}")
    return model.to(device).eval()


def _folder_files(folder: str | os.PathLike | None) -> dict[str, bytes] | None:
    """The files of a flat folder (a saved adapter) as ``{name: bytes}``; None for None."""
    if folder is None:
        return None
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


@contextlib.contextmanager
def leading_attempts(params: Mapping[str, Any]) -> Iterator[bool]:
    """Rank 0's side of a DeepSpeed launch of ``train_classifier``: inside the block, every :func:`train_attempt`
    first sends its arguments (classes, settings, seed, the starting adapter's files) to the other ranks, which
    train it with rank 0 (:func:`follow_attempts`); leaving the block tells them to stop and tears the process group
    down. Without DeepSpeed (``classifier.deepspeed``, :func:`deepspeed_config`) the block changes nothing.

    On an exception the other ranks are not told (they may be inside a collective of the failed attempt): rank 0's
    exit ends them (torchrun stops a launch's other workers when one fails; a pending gloo or NCCL call errors).

    Yields:
        True when DeepSpeed is on.
    """
    if deepspeed_config(params) is None:
        yield False
        return
    zero.init_process_group()
    token = _LEADING.set(True)
    try:
        yield True
    finally:
        _LEADING.reset(token)
    zero.broadcast_object(None)
    zero.finish()


def follow_attempts(
    lm_dir: str | os.PathLike,
    split_dir: str | os.PathLike,
    labels_path: str | os.PathLike,
    domains: Sequence[str],
    params: Mapping[str, Any],
    *,
    compute=None,
    window_cache_dir: str | os.PathLike | None = None,
) -> int:
    """A DeepSpeed rank other than 0 in ``train_classifier``: train every attempt rank 0 starts
    (:func:`leading_attempts`), with its arguments, until rank 0 says stop; write, score and log nothing.

    The train and val splits are read here as rank 0 reads them (:func:`domainlm.classify.data.read_splits`,
    without texts), and their windows from the window caches rank 0 built before the attempt
    (:func:`split_caches`; a rank on another machine builds its own); the starting adapter of a retry arrives as
    files and is written to a temporary folder. Each attempt names the LM it trains on (``models/merged``, or the
    deployed model's ``backbone/`` in the same checkout, :mod:`domainlm.classify.deployed`).

    Args:
        lm_dir: the merged LM, for an attempt that names none.
        split_dir, labels_path, domains, params, compute: as the stage's rank 0 has them.
        window_cache_dir: the stage's window cache folder (None = encode the texts in memory).

    Returns:
        the number of attempts trained (0 when ``classifier.deepspeed`` is off: rank 0 then trains alone).

    Raises:
        ValueError: rank 0's classes differ from the ones read here; see :func:`train_attempt`.
    """
    if deepspeed_config(params) is None:
        log.warning("rank %d: DeepSpeed is off (classifier.deepspeed), so rank 0 trains alone", zero.process_rank())
        return 0
    zero.init_process_group()
    splits = read_splits(split_dir, labels_path, domains, with_texts=window_cache_dir is None)
    classes = class_list(splits["train"])
    n, caches = 0, {}
    while (job := zero.broadcast_object(None)) is not None:
        if job["classes"] != classes:
            raise ValueError(f"rank 0 trains classes {job['classes']}, this rank read {classes}")
        backbone = job.get("lm_dir") or str(lm_dir)
        if backbone not in caches and window_cache_dir is not None:  # after rank 0 has built them
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(backbone, local_files_only=True)
            caches[backbone] = split_caches(tokenizer, backbone, split_dir, domains, params, window_cache_dir)
        with tempfile.TemporaryDirectory(prefix="train_classifier_init_") as tmp:
            init = None
            if job["init_adapter"] is not None:
                init = Path(tmp)
                for name, data in job["init_adapter"].items():
                    (init / name).write_bytes(data)
            train_attempt(
                backbone,
                splits["train"],
                splits["val"],
                classes,
                params,
                job["settings"],
                seed=job["seed"],
                init_adapter=init,
                compute=compute,
                windows=caches.get(backbone),
            )
        n += 1
    zero.finish()
    log.info("rank %d: trained %d attempt(s) with rank 0", zero.process_rank(), n)
    return n
