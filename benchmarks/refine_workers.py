"""refine_labels with its (member, fold) fits in one process vs in ``refine.workers`` processes, alternating.

Runs the stage's own ``run`` (``stages/refine_labels.py``) on this checkout's ``data/split``, label table and
``models/merged`` with ``refine`` params as in ``params.yaml`` but ``workers`` set to 1 and to 2 in turn (outputs
and MLflow runs go to a temporary folder; set ``MLFLOW_TRACKING_URI`` to keep them out of ``mlflow.db``). Each row:
the refinement loop's seconds (``refine_s``), the stage's (``wall_s``), the labels it changed (the same for every
worker count: each fold is seeded alike wherever it runs) and the steal time meanwhile (CPU seconds a virtual
machine's host gave to other guests).
Writes ``benchmarks/results/refine_workers.csv``.

    MLFLOW_TRACKING_URI=sqlite:////tmp/bench_mlflow.db python benchmarks/refine_workers.py [--rounds 2]
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from measure import alternating_run, steal_s, write_csv  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "refine_workers.csv"


def main() -> None:
    args, prm, compute = alternating_run(__doc__)
    from domainlm.refine.loop import RefineConfig
    from stages.refine_labels import run

    rows = []
    with tempfile.TemporaryDirectory(prefix="refine_workers_") as tmp:
        for r in range(args.rounds):
            for workers in (1, 2):
                cfg = dataclasses.replace(RefineConfig.from_params(prm["refine"]), workers=workers)
                d = Path(tmp) / f"r{r}_w{workers}"
                s0 = steal_s()
                m = run(
                    prm["domains"],
                    cfg,
                    split_dir="data/split",
                    labels_path="data/labels/split_labels.parquet",
                    model_dir="models/merged",
                    db_path=f"{d}.db",
                    snapshot_dir=f"{d}_snapshots",
                    review_queue_path=f"{d}_queue.jsonl",
                    history_path=f"{d}_history.csv",
                    compute=compute,
                )
                rows.append(
                    {
                        "round": r,
                        "workers": workers,
                        "threads": cfg.threads,
                        "refine_s": round(m["refine_s"], 2),
                        "wall_s": round(m["wall_s"], 2),
                        "labels_changed": m["labels_changed"],
                        "steal_s": round(steal_s() - s0, 2),
                    }
                )
                print(rows[-1], flush=True)
    write_csv(OUT, rows)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
