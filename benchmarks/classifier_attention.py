"""Attention kernel of the LoRA classifier, sdpa vs eager, timed where it matters: whole training epochs of
train_classifier's own ``train_attempt`` (the Hugging Face Trainer, padded and length-grouped batches, validation
after the epoch), on this checkout's ``data/split``, label table and ``models/merged`` (run ``dvc repro
train_classifier`` first).

The two kernels alternate, one epoch each, for ``--rounds`` rounds, so a slow spell of the machine hits both. Each
row records the seconds of ``trainer.train()`` (steps + validation), the epoch's validation macro-F1, and the steal
time meanwhile (CPU time a virtual machine's host gave to other guests: ``steal`` of ``/proc/stat``, in seconds
summed over cores): a row with a large steal was not timed on an idle machine. Writes
``benchmarks/results/classifier_attention.csv``. Every other setting comes from params.yaml. The committed CSV was
measured uncompiled at batch 16 (``classifier.compile: false``, ``classifier.train.batch_size: 16``); with
params.yaml's defaults both kernels run in compiled decoder layers at batch 32 (``classifier.compile``).

    python benchmarks/classifier_attention.py [--rounds 2]
"""

from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from measure import alternating_run, steal_s, write_csv  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "classifier_attention.csv"


def main() -> None:
    args, prm, compute = alternating_run(__doc__)
    from domainlm.classify.data import class_list, read_splits
    from domainlm.classify.gate import attempt_settings
    from domainlm.classify.training import train_attempt

    splits = read_splits("data/split", "data/labels/split_labels.parquet", prm["domains"])
    classes = class_list(splits["train"])
    rows = []
    for r in range(args.rounds):
        for impl in ("sdpa", "eager"):
            cfg = copy.deepcopy(prm["classifier"])
            cfg["attn_implementation"] = impl
            settings = {**attempt_settings(cfg["train"], cfg["gate"], 0), "epochs": 1.0}
            s0 = steal_s()
            _, _, info = train_attempt(
                "models/merged",
                splits["train"],
                splits["val"],
                classes,
                cfg,
                settings,
                seed=int(cfg.get("seed", 0)),
                compute=compute,
            )
            rows.append(
                {
                    "round": r,
                    "attn": impl,
                    "epoch_s": round(info["train_s"], 2),
                    "steps": info["steps"],
                    "val_macro_f1": round(info["val_macro_f1"], 4),
                    "steal_s": round(steal_s() - s0, 2),
                    "dtype": compute.dtype,
                    "threads": compute.threads,
                }
            )
            print(rows[-1], flush=True)
    for impl in ("sdpa", "eager"):
        print(impl, "median epoch s", statistics.median(r["epoch_s"] for r in rows if r["attn"] == impl))
    write_csv(OUT, rows)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
