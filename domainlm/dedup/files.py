"""The dedup stage's files: run the workflow over ``<input_dir>/<domain>.jsonl``, write the ``data/dedup``
folder atomically, and build ``metrics/dedup.json``. The algorithm is :mod:`domainlm.dedup.minhash_lsh`,
its steps :mod:`domainlm.dedup.workflow`, where they run :mod:`domainlm.dedup.engines`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from domainlm.common.atomic import atomic_path
from domainlm.dedup.engines import make_engine, resolve_workers
from domainlm.dedup.minhash_lsh import datasketch_default_banding
from domainlm.dedup.workflow import DedupOutcome, DedupParams, TreeRss, Workflow

__all__ = ["resolve_workers", "deduplicate_domains", "deduplicate_records", "write_outputs", "build_metrics"]
_COPY_BYTES = 1 << 20


def candidate_rows(outcome: DedupOutcome, threshold: float) -> list[dict[str, Any]]:
    """Every exactly verified candidate pair as ``{"a", "b" (ids, a = the earlier document), "estimated_jaccard",
    "jaccard", "verified"}``, sorted by ``(a, b)``."""
    c = outcome.checked
    ids = outcome.ids
    rows = [
        {
            "a": ids[i].as_py(),
            "b": ids[j].as_py(),
            "estimated_jaccard": est,
            "jaccard": jac,
            "verified": jac >= threshold,
        }
        for i, j, est, jac in zip(c["a"].tolist(), c["b"].tolist(), c["estimated"].tolist(), c["jaccard"].tolist())
    ]
    rows.sort(key=lambda r: (r["a"], r["b"]))
    return rows


def _write_candidates(path: Path, header: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """``json.dumps({**header, "pairs": rows}, ensure_ascii=False, indent=1)`` written pair by pair
    (the same bytes, without building the whole text in memory)."""
    head = json.dumps({**header, "pairs": None}, ensure_ascii=False, indent=1)
    before, after = head.rsplit("null", 1)
    with path.open("w", encoding="utf-8") as fh:
        fh.write(before)
        if not rows:
            fh.write("[]")
        else:
            fh.write("[\n")
            for k, row in enumerate(rows):
                text = json.dumps(row, ensure_ascii=False, indent=1)
                fh.write("\n".join("  " + line for line in text.split("\n")))
                fh.write(",\n" if k + 1 < len(rows) else "\n")
            fh.write(" ]")
        fh.write(after)
        fh.write("\n")


def _copy_kept(src: str, dst, removed: np.ndarray) -> int:
    """Copy the lines of ``src`` whose document is not removed to the binary file ``dst``, byte for byte
    (a kept record is written exactly as validate wrote it). Returns the lines written."""
    written = 0
    with open(src, "rb") as fh:
        for k, line in enumerate(fh):
            if not removed[k]:
                if not line.endswith(b"\n"):
                    line += b"\n"
                elif line.endswith(b"\r\n"):
                    line = line[:-2] + b"\n"
                dst.write(line)
                written += 1
    return written


def write_outputs(outcome: DedupOutcome, out_dir: str | os.PathLike, domains: Sequence[str], threshold: float) -> None:
    """Write the ``data/dedup`` folder atomically (built beside it, then swapped in).

    Files: ``<domain>.jsonl`` (kept records, their input lines unchanged, one file per domain even if
    empty), ``removed.jsonl`` (:func:`~domainlm.dedup.minhash_lsh.removal_rows`), ``candidates.json``
    (banding and every exactly verified candidate pair), ``dedup_log.csv`` (domain, before, after,
    exact_removed, near_removed).
    """
    with atomic_path(out_dir, is_dir=True) as tmp:
        handles = {d: (tmp / f"{d}.jsonl").open("wb") for d in domains}
        try:
            for spec in outcome.inputs:
                lo = spec["first_doc"]
                _copy_kept(spec["path"], handles[spec["domain"]], outcome.removed_mask[lo : lo + spec["docs"]])
        finally:
            for fh in handles.values():
                fh.close()
        with (tmp / "removed.jsonl").open("w", encoding="utf-8") as fh:
            for row in outcome.removed:  # the JSONL form of domainlm.documents.jsonl.dumps
                fh.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
        b = outcome.banding
        header = {
            "num_perm": b["num_perm"],
            "threshold": b["threshold"],
            "bands": b["bands"],
            "rows": b["rows"],
            "candidate_pairs": outcome.stats["candidate_pairs"],
            "estimate_floor": outcome.stats["estimate_floor"],
        }
        _write_candidates(tmp / "candidates.json", header, candidate_rows(outcome, threshold))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["domain", "before", "after", "exact_removed", "near_removed"])
        for d in domains:
            c = outcome.counts[d]
            w.writerow([d, c["before"], c["after"], c["exact_removed"], c["near_removed"]])
        (tmp / "dedup_log.csv").write_text(buf.getvalue(), encoding="utf-8")


def build_metrics(
    outcome: DedupOutcome, wall_s: float, workers: int, engine: str, backend: str, peak_rss_tree_mb: float, nodes: int
) -> dict[str, Any]:
    """The ``metrics/dedup.json`` content (stable keys; rates in [0, 1]; seconds; MiB)."""
    totals = {
        k: sum(c[k] for c in outcome.counts.values()) for k in ("before", "after", "exact_removed", "near_removed")
    }
    before = totals["before"] or 1
    s = outcome.stats
    b = outcome.banding
    steps = s["steps"]
    keepers = s.get("keepers", totals["before"])
    lsh = {
        k: b[k]
        for k in (
            "num_perm",
            "threshold",
            "bands",
            "rows",
            "perms_used",
            "p_candidate_at_threshold",
            "false_positive_area",
            "false_negative_area",
            "expected_false_candidate_rate",
            "expected_false_candidate_pairs_per_doc",
            "s_curve",
        )
    }
    return {
        "totals": {
            **totals,
            "removed_rate": (totals["exact_removed"] + totals["near_removed"]) / before,
            "exact_removed_rate": totals["exact_removed"] / before,
            "near_removed_rate": totals["near_removed"] / before,
        },
        "per_domain": outcome.counts,
        "bands": b["bands"],
        "rows": b["rows"],
        "lsh": {
            **lsh,
            "background": b["background"],
            "datasketch_default": datasketch_default_banding(b["num_perm"], b["threshold"]),
        },
        "candidate_pairs": s["candidate_pairs"],
        "candidate_pairs_per_doc": s["candidate_pairs"] / keepers if keepers else 0.0,
        "oversized_buckets": s.get("oversized_buckets", 0),
        "largest_oversized_bucket": s.get("largest_oversized_bucket", 0),
        "estimate_floor": s["estimate_floor"],
        "estimate_kept_pairs": s["estimate_kept_pairs"],
        "verified_pairs": s["verified_pairs"],
        "verified_rate": s["verified_pairs"] / s["candidate_pairs"] if s["candidate_pairs"] else 0.0,
        "clusters": s["clusters"],
        "largest_cluster": s["largest_cluster"],
        "workers": workers,
        "ray_engine": int(engine == "ray"),
        "ray_nodes": nodes if engine == "ray" else 0,
        "redis_backend": int(backend == "redis"),
        "steps": steps,
        "time": {f"{name}_s": st.get("seconds", 0.0) for name, st in steps.items()},
        "wall_s": wall_s,
        "docs_per_s": totals["before"] / wall_s if wall_s > 0 else 0.0,
        "peak_rss_mb_tree": peak_rss_tree_mb,
    }


def deduplicate_domains(
    domains: Sequence[str],
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    params: DedupParams,
    engine: str = "local",
    workers: int = 1,
    ray: dict[str, Any] | None = None,
    work_dir: str | os.PathLike | None = None,
    keep_work: bool = False,
) -> dict[str, Any]:
    """Deduplicate ``<input_dir>/<domain>.jsonl`` of every domain together and write ``output_dir``.

    Args:
        domains: domain names, in output order (a domain with an empty file gets zero counts and an
            empty output file).
        params: :class:`~domainlm.dedup.workflow.DedupParams`. engine: ``local`` | ``ray``.
        workers: processes (local) or CPUs of a Ray started here. ray: ``dedup.ray`` (``address``,
            ``object_store_mb``). work_dir: the intermediates' root (a temporary folder when ``None``);
            a failed run leaves them there and the next run with the same inputs and params resumes.
        keep_work: keep the intermediates after a successful run (they are removed by default).

    Returns:
        The ``metrics/dedup.json`` content (:func:`build_metrics`).

    Raises:
        ValueError: when ``domains`` is empty, on a bad record, duplicate ids or bad params.
        FileNotFoundError: when a domain's input file is missing.
    """
    import time

    if not domains:
        raise ValueError("params.yaml has no domains to deduplicate")
    t0 = time.perf_counter()
    inputs = [(d, str(Path(input_dir) / f"{d}.jsonl")) for d in domains]
    temporary = work_dir is None
    root = Path(tempfile.mkdtemp(prefix="dedup-work-")) if temporary else Path(work_dir)
    try:
        with TreeRss() as rss, make_engine(engine, workers, ray) as eng:
            flow = Workflow(inputs, params, eng, root, rss=rss)
            outcome = flow.run()
            write_outputs(outcome, output_dir, domains, params.threshold)
            nodes = len(eng.nodes)
        metrics = build_metrics(
            outcome, time.perf_counter() - t0, workers, engine, params.lsh_backend, rss.run_peak_mb, nodes
        )
        metrics["resumed_steps"] = len(outcome.stats["resumed_steps"])
        if not keep_work:
            shutil.rmtree(flow.path, ignore_errors=True)
        return metrics
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)


@dataclass
class DedupResult:
    """:func:`deduplicate_records`' answer, read back from the written outputs."""

    kept: list[dict[str, Any]]
    removed: list[dict[str, Any]]
    candidates: list[dict[str, Any]]
    counts: dict[str, dict[str, int]]
    metrics: dict[str, Any] = field(default_factory=dict)


def deduplicate_records(
    records: Sequence[dict[str, Any]],
    params: DedupParams | None = None,
    *,
    engine: str = "local",
    workers: int = 1,
    ray: dict[str, Any] | None = None,
) -> DedupResult:
    """Deduplicate in-memory records through the real stage path (tests, benchmarks).

    Writes the records as ``<domain>.jsonl`` (domains in order of first appearance) to a temporary
    folder, runs :func:`deduplicate_domains` and reads the outputs back. ``kept`` follows the domain
    files' order.
    """
    params = params or DedupParams()
    with tempfile.TemporaryDirectory(prefix="dedup-records-") as tmp:
        inp = Path(tmp) / "in"
        inp.mkdir()
        domains: list[str] = []
        handles = {}
        try:
            for n, rec in enumerate(records):
                d = rec.get("domain") if isinstance(rec, dict) else None
                if not isinstance(d, str):
                    raise ValueError(f"record #{n}: field 'domain' must be a string")
                if d not in handles:
                    domains.append(d)
                    handles[d] = (inp / f"{d}.jsonl").open("w", encoding="utf-8")
                handles[d].write(json.dumps(rec) + "\n")  # ASCII escapes: a lone surrogate reaches the checks
        finally:
            for fh in handles.values():
                fh.close()
        out = Path(tmp) / "out"
        metrics = deduplicate_domains(
            domains, inp, out, params=params, engine=engine, workers=workers, ray=ray, work_dir=Path(tmp) / "work"
        )
        kept = [
            json.loads(line) for d in domains for line in (out / f"{d}.jsonl").read_text(encoding="utf-8").splitlines()
        ]
        removed = [json.loads(line) for line in (out / "removed.jsonl").read_text(encoding="utf-8").splitlines()]
        cands = json.loads((out / "candidates.json").read_text(encoding="utf-8"))["pairs"]
        return DedupResult(kept, removed, cands, metrics["per_domain"], metrics)
