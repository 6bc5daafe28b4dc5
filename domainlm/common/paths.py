"""Every path the pipeline reads or writes, declared once (relative to the repository root).

``dvc.yaml`` names the same paths as deps and outs; stages take them from here, tests pass their own.
"""

from __future__ import annotations

from pathlib import Path

PARAMS_FILE = Path("params.yaml")

# ---- data half
RAW_DIR = Path("data/raw")  # corpus: <domain>.jsonl, MANIFEST.json
VALIDATED_DIR = Path("data/validated")  # validate: <domain>.jsonl, rejects.jsonl
DEDUP_DIR = Path("data/dedup")  # dedup: <domain>.jsonl, removed.jsonl, candidates.json
PARQUET_DIR = Path("data/parquet")  # parquet: <domain>.parquet, schema.txt
SPLIT_DIR = Path("data/split")  # split: <domain>/{train,val,test}.parquet
LABELS_DIR = Path("data/labels")
OVERRIDES_PATH = LABELS_DIR / "overrides.parquet"  # dvc add-ed label overrides (id, label)
LABELS_PATH = LABELS_DIR / "split_labels.parquet"  # split: id, domain, split, source_label, label
SPLITS = ("train", "val", "test")
# ---- the LM release (dvc add-ed; cut only by `domainlm release-lm`, never by a stage): release.json and, once a
# release is cut, the frozen <domain>/{train,val,test}.parquet and split_labels.parquet of that day's split
RELEASE_DIR = Path("data/release")
RELEASE_MANIFEST = RELEASE_DIR / "release.json"
RELEASE_LABELS_PATH = RELEASE_DIR / "split_labels.parquet"  # id, domain, split, ...: the split sticks to it
LM_DATA_DIR = Path("data/lm")  # lm_data: the LM stages' documents, <domain>/{train,val,test}.parquet

# ---- model half
BASE_DIR = Path("models/base")
LORA_DIR = Path("models/lora")  # train_lora@<domain>: models/lora/<domain>/
DIFF_DIR = Path("models/diff")
MERGED_DIR = Path("models/merged")

# ---- label refinement
REFINED_DIR = Path("data/refined")
REFINED_DB = REFINED_DIR / "sentences.db"
SNAPSHOT_DIR = REFINED_DIR / "snapshots"
REVIEW_QUEUE = REFINED_DIR / "review_queue.jsonl"

# ---- metrics, plots, logs, reports
METRICS_DIR = Path("metrics")
DIFF_METRICS_DIR = METRICS_DIR / "diff"
TRAIN_METRICS_DIR = METRICS_DIR / "train_lora"
SUMMARY_CSV = METRICS_DIR / "summary.csv"
ALERTS_JSON = METRICS_DIR / "alerts.json"
PLOTS_DIR = Path("plots")
COSINE_CSV = PLOTS_DIR / "task_vector_cosine.csv"
PERPLEXITY_CSV = PLOTS_DIR / "perplexity.csv"
TRAIN_LOSS_CSV = PLOTS_DIR / "train_loss.csv"
REFINE_HISTORY_CSV = PLOTS_DIR / "refine_history.csv"
EVAL_DIR = Path("eval")
COMPARISON_MD = EVAL_DIR / "eval_prompt_comparison.md"
REFERENCE_PERPLEXITY_JSON = EVAL_DIR / "reference_perplexity.json"  # evaluate_experts: base + experts
LOG_DIR = Path("logs")  # train_<domain>.log (DVC outs) + the two logs below
RUN_LOG = LOG_DIR / "pipeline_run.log"  # one line per stage run (git-ignored, .dvcignore-d)
ERROR_LOG = LOG_DIR / "pipeline_errors.log"  # stack trace of each failed stage run (likewise)


def split_path(root: str | Path, domain: str, split: str) -> Path:
    """``<root>/<domain>/<split>.parquet``.

    Raises:
        ValueError: when ``split`` is not one of :data:`SPLITS`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return Path(root) / domain / f"{split}.parquet"


def train_log_path(domain: str, root: str | Path = LOG_DIR) -> Path:
    """The HF Trainer log of ``train_lora@<domain>``: ``logs/train_<domain>.log``."""
    return Path(root) / f"train_{domain}.log"


# ---- downstream classifier (train_classifier)
CLASSIFIER_DIR = Path("models/classifier")  # model/ (adapter merged, serve-ready) and adapter/ (peft)
TOKEN_STATS_JSON = METRICS_DIR / "token_stats.json"
CLASSIFIER_ALERTS_JSON = METRICS_DIR / "classifier_alerts.json"  # evaluate owns alerts.json
CLASSIFIER_CONFUSION_CSV = PLOTS_DIR / "classifier_confusion.csv"  # test rows: id, actual, predicted (LoRA)
BASELINE_CONFUSION_CSV = PLOTS_DIR / "classifier_baseline_confusion.csv"  # the same for the TF-IDF baseline

# ---- the deployed classifier (dvc add-ed input; replaced only by the round's promote, never by a stage)
DEPLOYED_DIR = Path("models/deployed")  # model/, adapter/ (as models/classifier) + deployed.json
DEPLOYED_MANIFEST = DEPLOYED_DIR / "deployed.json"
