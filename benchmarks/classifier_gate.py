"""The classifier's gate with every retry spent, sdpa attention uncompiled at batch 16 against params.yaml's
settings: train_classifier's own gate loop (``domainlm.classify.gate.attempt_settings``, ``training.train_attempt``,
``model.predict_proba`` on the test split, ``save_classifier`` for the next retry to continue from), 4 attempts
(6 + 3 + 3 + 3 epochs), on this checkout's ``data/split``, label table and ``models/merged`` (run ``dvc repro
train_classifier`` first).

Settings:

- ``sdpa_uncompiled_batch16``: sdpa attention, uncompiled, batch 16, lr 1.5e-3;
- ``params``: ``classifier`` as in params.yaml (by default compiled decoder layers with eager attention, batch 32,
  lr 2.2e-3).

The two alternate for ``--rounds`` rounds, so a slow spell of the machine hits both. One row per attempt: its
seconds of training (steps + validation, compile included) and of test prediction, its epochs, validation and
test macro-F1, and the steal time meanwhile (CPU time a virtual machine's host gave to other guests: ``steal`` of
``/proc/stat``, seconds summed over cores). Writes ``benchmarks/results/classifier_gate.csv``; prints each
setting's total seconds and the ratio.
What the stage adds around the gate (token statistics, the TF-IDF baseline, the bootstrap, MLflow, the registry:
~20 s) is not in these rows.

    python benchmarks/classifier_gate.py [--rounds 2]
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from measure import alternating_run, deep_update, gate_attempts, steal_s, write_csv  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "classifier_gate.csv"
#: ``classifier`` params overrides per setting; the ``params`` setting overrides nothing.
SETTINGS = {
    "sdpa_uncompiled_batch16": {
        "attn_implementation": "sdpa",
        "compile": False,
        "train": {"batch_size": 16, "lr": 1.5e-3},
    },
    "params": {},
}


def main() -> None:
    args, prm, compute = alternating_run(__doc__)
    from domainlm.classify.data import class_list, read_splits

    splits = read_splits("data/split", "data/labels/split_labels.parquet", prm["domains"])
    classes = class_list(splits["train"])
    rows = []
    for r in range(args.rounds):
        for name, overrides in SETTINGS.items():
            cfg = deep_update(copy.deepcopy(prm["classifier"]), overrides)
            with tempfile.TemporaryDirectory(prefix="classifier_gate_") as work:
                s0 = steal_s()
                for a in gate_attempts(cfg, splits, classes, compute, work, retries=int(cfg["gate"]["max_retries"])):
                    info = a["info"]
                    rows.append(
                        {
                            "round": r,
                            "setting": name,
                            "attempt": a["attempt"],
                            "epochs": info["epochs_run"],
                            "train_s": round(a["train_s"], 2),
                            "predict_save_s": round(a["predict_save_s"], 2),
                            "val_macro_f1": round(info["val_macro_f1"], 4),
                            "test_macro_f1": round(a["test_macro_f1"], 4),
                            "compiled_layers": info["compiled_layers"],
                            "attn": info["attn_implementation"],
                            "batch_size": int(cfg["train"]["batch_size"]),
                            "steal_s": round(steal_s() - s0, 2),
                            "dtype": compute.dtype,
                            "threads": compute.threads,
                        }
                    )
                    s0 = steal_s()
                    print(rows[-1], flush=True)
    totals = {
        name: sum(x["train_s"] + x["predict_save_s"] for x in rows if x["setting"] == name) / args.rounds
        for name in SETTINGS
    }
    print(
        f"every retry spent, mean seconds per gate: sdpa_uncompiled_batch16 {totals['sdpa_uncompiled_batch16']:.1f}, "
        f"params {totals['params']:.1f} ({totals['sdpa_uncompiled_batch16'] / totals['params']:.2f}x)"
    )
    write_csv(OUT, rows)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
