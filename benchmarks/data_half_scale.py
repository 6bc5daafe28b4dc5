"""The whole data half at corpus scale through the real CLI: ``dvc repro split`` on 1M synthetic documents.

Builds a temporary git + DVC repository holding this project's pipeline (``tests/conftest.py``'s
``make_pipeline_repo``), points the corpus stage at the seeded synthetic corpus of
``benchmarks/dedup_scale.py`` as ``type: jsonl`` sources (their folder declared as a dep of the corpus
stage, as the stage requires), and runs ``dvc repro split``: corpus → validate → dedup → parquet → split.
For every stage it records the wall time (between DVC's ``Running stage`` lines) and the peak of the
summed RSS of the stage's process tree (the stage's ``python -m stages.<name>`` and everything under it,
sampled every 0.2 s with psutil), next to the wall time and peak RSS each stage writes into its own
metrics file. Writes ``benchmarks/results/data_half_scale.{json,csv}``, each with its ``.meta.json`` sidecar
(hardware, commit, date).

Run from the repository root: ``python benchmarks/data_half_scale.py [--docs 1000000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO, REPO / "tests", REPO / "benchmarks"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import psutil  # noqa: E402
import yaml  # noqa: E402
from conftest import make_pipeline_repo  # noqa: E402
from dedup_scale import DOMAINS, generate  # noqa: E402
from measure import write_meta  # noqa: E402

from domainlm.common.atomic import atomic_path, write_json  # noqa: E402
from domainlm.common.metrics import rows_to_csv  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
STAGES = ("corpus", "validate", "dedup", "parquet", "split")


def stage_tree_rss_mb(root: psutil.Process, stage: str) -> float:
    """Summed RSS (MiB) of the process running ``python -m stages.<stage>`` under ``root`` and its descendants."""
    total = 0
    try:
        procs = root.children(recursive=True)
    except psutil.Error:
        return 0.0
    for p in procs:
        try:
            if f"stages.{stage}" in " ".join(p.cmdline()):
                for q in [p] + p.children(recursive=True):
                    try:
                        total += q.memory_info().rss
                    except psutil.Error:
                        pass
        except psutil.Error:
            pass
    return total / 2**20


def repro(repo: Path) -> dict[str, dict[str, float]]:
    """Run ``dvc repro split`` in ``repo``; per stage its wall seconds and peak process-tree RSS (MiB).

    Raises:
        RuntimeError: with the output's tail when DVC fails.
    """
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(
        ["dvc", "repro", "split"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    root = psutil.Process(proc.pid)
    stats: dict[str, dict[str, float]] = {}
    current: list[str] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            if current:
                s = stats[current[0]]
                s["peak_rss_mb_tree"] = max(s["peak_rss_mb_tree"], stage_tree_rss_mb(root, current[0]))

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line])[-60:]
        if line.startswith("Running stage '"):
            now = time.perf_counter()
            if current:
                stats[current[0]]["wall_s"] = now - stats[current[0]]["start"]
            name = line.split("'")[1]
            stats[name] = {"start": now, "wall_s": 0.0, "peak_rss_mb_tree": 0.0}
            current[:] = [name]
            print(line.rstrip(), flush=True)
    rc = proc.wait()
    stop.set()
    th.join()
    if current:
        stats[current[0]]["wall_s"] = time.perf_counter() - stats[current[0]]["start"]
    if rc != 0:
        raise RuntimeError(f"dvc repro split exited {rc}:\n{''.join(tail)}")
    for s in stats.values():
        s.pop("start", None)
    return stats


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the temporary repository")
    ap.add_argument("--out", type=Path, default=RESULTS / "data_half_scale")
    args = ap.parse_args(argv)

    corpus = generate(args.docs, args.seed, REPO / "data" / "validated")
    tmp = Path(tempfile.mkdtemp(prefix="data-half-"))
    try:
        repo = make_pipeline_repo(tmp / "repo", {"domains": list(DOMAINS), "dedup": {"workers": args.workers}})
        params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
        params["corpus"]["sources"] = {d: {"type": "jsonl", "uri": str(corpus / f"{d}.jsonl")} for d in DOMAINS}
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8")
        dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))
        dvc_yaml["stages"]["corpus"]["deps"].append(str(corpus))  # the corpus stage reads only declared inputs
        (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False, allow_unicode=True), encoding="utf-8")
        subprocess.run(["git", "commit", "-qam", "1M-document sources"], cwd=repo, check=True)
        t0 = time.perf_counter()
        stats = repro(repo)
        total = time.perf_counter() - t0
        rows = []
        for stage in STAGES:
            m = json.loads((repo / "metrics" / f"{stage}.json").read_text(encoding="utf-8"))
            s = stats.get(stage, {})
            rows.append(
                {
                    "stage": stage,
                    "docs_in": args.docs,
                    "wall_s": round(s.get("wall_s", 0.0), 1),
                    "stage_wall_s": m["stage"]["wall_s"],
                    "peak_rss_mb_tree": round(s.get("peak_rss_mb_tree", 0.0), 1),
                    "stage_peak_rss_mb": m["stage"]["peak_rss_mb"],
                    "dedup_peak_rss_mb_tree": m.get("peak_rss_mb_tree") if stage == "dedup" else None,
                }
            )
        dedup = json.loads((repo / "metrics" / "dedup.json").read_text(encoding="utf-8"))
        split = json.loads((repo / "metrics" / "split.json").read_text(encoding="utf-8"))
        results = {
            "docs": args.docs,
            "total_wall_s": total,
            "stages": rows,
            "dedup": {
                k: dedup[k]
                for k in (
                    "totals",
                    "bands",
                    "rows",
                    "candidate_pairs",
                    "verified_pairs",
                    "docs_per_s",
                    "peak_rss_mb_tree",
                )
            },
            "split_total": split["total"],
            "machine": {"cpu_count": os.cpu_count(), "loadavg": os.getloadavg()},
        }
        write_json(args.out.with_suffix(".json"), results)
        with atomic_path(args.out.with_suffix(".csv")) as out:
            out.write_text(rows_to_csv(rows), encoding="utf-8")
        write_meta(args.out.with_suffix(".json"))
        write_meta(args.out.with_suffix(".csv"))
        for row in rows:
            print(json.dumps(row), flush=True)
        return results
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
