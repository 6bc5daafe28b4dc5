"""The classifier's gate with every retry spent, session 9's settings against params.yaml's: train_classifier's own
gate loop (``domainlm.classify.gate.attempt_settings``, ``training.train_attempt``, ``model.predict_proba`` on the
test split, ``save_classifier`` for the next retry to continue from), 4 attempts (6 + 3 + 3 + 3 epochs), on this
checkout's ``data/split``, label table and ``models/merged`` (run ``dvc repro train_classifier`` first).

Settings:

- ``session9``: sdpa attention, uncompiled, batch 16, lr 1.5e-3 (the defaults before session 10);
- ``params``: ``classifier`` as in params.yaml (session 10: compiled eager decoder layers, batch 32, lr 2.2e-3).

The two alternate for ``--rounds`` rounds, so a slow spell of the machine hits both. One row per attempt: its
seconds of training (steps + validation, compile included) and of test prediction, its epochs, validation and
test macro-F1, and the CPU time the hypervisor stole meanwhile (``steal`` of ``/proc/stat``, seconds summed over
cores). Writes ``benchmarks/results/classifier_gate.csv``; prints each setting's total seconds and the ratio.
What the stage adds around the gate (token statistics, the TF-IDF baseline, the bootstrap, MLflow, the registry:
~20 s) is not in these rows.

    python benchmarks/classifier_gate.py [--rounds 2]
"""
from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from measure import alternating_run, steal_s, write_csv  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "classifier_gate.csv"
SESSION9 = {"attn_implementation": "sdpa", "compile": False, "train": {"batch_size": 16, "lr": 1.5e-3}}


def settings_of(classifier: dict, name: str) -> dict:
    """The ``classifier`` params of setting ``name`` (``session9`` or ``params``)."""
    cfg = copy.deepcopy(classifier)
    if name == "session9":
        cfg.update({k: v for k, v in SESSION9.items() if k != "train"})
        cfg["train"].update(SESSION9["train"])
    return cfg


def main() -> None:
    args, prm, compute = alternating_run(__doc__)
    from domainlm.classify.data import class_list, read_splits
    from domainlm.classify.gate import attempt_settings
    from domainlm.classify.metrics import score
    from domainlm.classify.model import ADAPTER_SUBDIR, predict_proba, save_classifier
    from domainlm.classify.training import train_attempt

    splits = read_splits("data/split", "data/labels/split_labels.parquet", prm["domains"])
    classes = class_list(splits["train"])
    test = splits["test"]
    rows = []
    for r in range(args.rounds):
        for name in ("session9", "params"):
            cfg = settings_of(prm["classifier"], name)
            previous = None
            with tempfile.TemporaryDirectory(prefix="classifier_gate_") as work:
                for attempt in range(int(cfg["gate"]["max_retries"]) + 1):
                    s0, t0 = steal_s(), time.perf_counter()
                    model, tok, info = train_attempt(
                        "models/merged", splits["train"], splits["val"], classes, cfg,
                        attempt_settings(cfg["train"], cfg["gate"], attempt), seed=int(cfg["seed"]) + attempt,
                        init_adapter=Path(previous) / ADAPTER_SUBDIR if previous else None, compute=compute)
                    t1 = time.perf_counter()
                    proba = predict_proba(model, tok, test.texts, max_length=int(cfg["max_length"]),
                                          batch_size=int(cfg["train"]["eval_batch_size"]),
                                          max_windows=int(cfg["windows"]["predict"]), compute=compute)
                    previous = save_classifier(model, tok, Path(work) / f"attempt_{attempt}")
                    rows.append({"round": r, "setting": name, "attempt": attempt, "epochs": info["epochs_run"],
                                 "train_s": round(t1 - t0, 2), "predict_save_s": round(time.perf_counter() - t1, 2),
                                 "val_macro_f1": round(info["val_macro_f1"], 4),
                                 "test_macro_f1": round(score(test.labels, proba, classes)["macro_f1"], 4),
                                 "compiled_layers": info["compiled_layers"], "attn": info["attn_implementation"],
                                 "batch_size": int(cfg["train"]["batch_size"]), "steal_s": round(steal_s() - s0, 2),
                                 "dtype": compute.dtype, "threads": compute.threads})
                    print(rows[-1], flush=True)
    totals = {name: sum(x["train_s"] + x["predict_save_s"] for x in rows if x["setting"] == name) / args.rounds
              for name in ("session9", "params")}
    print(f"every retry spent, mean seconds per gate: session9 {totals['session9']:.1f}, params "
          f"{totals['params']:.1f} ({totals['session9'] / totals['params']:.2f}x)")
    write_csv(OUT, rows)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
