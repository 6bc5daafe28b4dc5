"""What the project promises about reproducing a run, and the check of that promise.

- **Same machine, same settings** (CPU model, ``compute`` policy, thread count): ``dvc repro -f`` gives the same
  ``dvc.lock`` hash for every data and model output. Everything is seeded, and the same kernels run the same sums in
  the same order. Metrics files, training logs and the report also hold wall times, throughput and peak memory, so
  their hashes differ from run to run (:data:`TIMED_OUTPUTS`). :func:`compare_locks` checks it.
- **Another machine**: the models are not bit-identical. Matrix kernels (oneDNN, MKL, cuBLAS) choose their
  blocking and instructions by processor, so float sums round differently and training drifts apart; with
  ``compute.dtype: auto`` a CPU without bf16 even trains in fp32. What is promised instead is that every quality
  figure lands within a stated tolerance of the committed one (:data:`TOLERANCES`); :func:`compare_metrics` checks it.

``python -m domainlm.common.reproducibility OTHER_CHECKOUT`` compares this checkout's ``dvc.lock`` and ``metrics/``
with another's (a second clone after its own ``make repro``) and exits 1 when the promise is broken.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from domainlm.common.metrics import flatten_numbers

#: (metrics file glob, flattened key glob, kind, tolerance): ``rel`` = |a − b| / |a|, ``abs`` = |a − b|. Quality
#: figures only: timings, memory and counts of work done are not promised across machines.
TOLERANCES: tuple[tuple[str, str, str, float], ...] = (
    ("base_model.json", "val_perplexity.*", "rel", 0.05),
    ("base_model.json", "train_loss", "rel", 0.02),
    ("train_lora/*.json", "val_loss", "rel", 0.02),
    ("evaluate.json", "perplexity.*", "rel", 0.05),
    ("evaluate.json", "mean_retained_gain", "abs", 0.10),
    ("evaluate.json", "gate.passed", "abs", 0.0),
    ("classifier.json", "lora.macro_f1", "abs", 0.05),
    ("classifier.json", "lora.accuracy", "abs", 0.05),
    # the TF-IDF baseline's lbfgs runs on OpenBLAS, whose kernels are picked per CPU (or by OPENBLAS_CORETYPE): the
    # Haswell kernels and the kernels it picked itself gave 0.7719 and 0.7736 on one machine (one test document of
    # 265), on the same labels
    ("classifier.json", "baseline.macro_f1", "abs", 0.05),
    ("refine.json", "label_change_rate", "abs", 0.02),
    ("dedup.json", "totals.*", "abs", 0.0),
    ("split.json", "total.*", "abs", 0.0),
)


#: Outputs that record when, how long or with how much memory a run ran, so their hashes change with every run:
#: metrics, Trainer logs, the report, and ``data/refined`` (``sentences.db`` stores load and update timestamps; its
#: labels and snapshots are what to compare).
TIMED_OUTPUTS = ("*:metrics/*", "*:logs/*", "*:reports/*", "refine_labels:data/refined")


def lock_outputs(lock_path: str | Path) -> dict[str, str]:
    """``{"<stage>:<out path>": md5}`` of every output in a ``dvc.lock``.

    Raises:
        FileNotFoundError: no such lock file.
    """
    lock = yaml.safe_load(Path(lock_path).read_text(encoding="utf-8")) or {}
    return {
        f"{stage}:{out['path']}": str(out.get("md5"))
        for stage, entry in (lock.get("stages") or {}).items()
        for out in entry.get("outs", [])
    }


def compare_locks(lock_a: str | Path, lock_b: str | Path, *, ignore: Iterable[str] = ()) -> list[str]:
    """The outputs whose hashes differ between two ``dvc.lock`` files (or exist in one only), as
    ``"<stage>:<path>"``; outputs matching a glob in ``ignore`` are left out."""
    a, b = lock_outputs(lock_a), lock_outputs(lock_b)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not any(fnmatch.fnmatch(k, g) for g in ignore)]


def compare_metrics(
    dir_a: str | Path, dir_b: str | Path, tolerances: Iterable[tuple[str, str, str, float]] = TOLERANCES
) -> list[dict[str, Any]]:
    """Every promised figure of two ``metrics/`` folders, with its difference and whether it is within tolerance.

    Returns:
        One row per compared figure: ``file``, ``key``, ``a``, ``b``, ``diff`` (relative or absolute, per
        ``kind``), ``tolerance``, ``ok`` (bool). A figure present on one side only is a row with ``ok`` False.
    """
    dir_a, dir_b = Path(dir_a), Path(dir_b)
    rows = []
    for file_glob, key_glob, kind, tol in tolerances:
        for path in sorted(dir_a.glob(file_glob)):
            rel = path.relative_to(dir_a)
            fa = flatten_numbers(json.loads(path.read_text(encoding="utf-8")))
            other = dir_b / rel
            fb = flatten_numbers(json.loads(other.read_text(encoding="utf-8"))) if other.exists() else {}
            for key in sorted(k for k in fa if fnmatch.fnmatch(k, key_glob)):
                va, vb = fa[key], fb.get(key)
                if vb is None:
                    rows.append(
                        {
                            "file": str(rel),
                            "key": key,
                            "a": va,
                            "b": None,
                            "diff": math.inf,
                            "tolerance": tol,
                            "ok": False,
                        }
                    )
                    continue
                diff = abs(va - vb) / abs(va) if kind == "rel" and va else abs(va - vb)
                rows.append(
                    {
                        "file": str(rel),
                        "key": key,
                        "a": va,
                        "b": vb,
                        "diff": diff,
                        "tolerance": tol,
                        "ok": diff <= tol + 1e-12,
                    }
                )
    return rows


def check(here: str | Path, other: str | Path, *, same_machine: bool = False) -> int:
    """Compare two checkouts, print one line per metric and a summary, and return the exit status.

    Args:
        here: this checkout (its ``metrics/`` and ``dvc.lock``).
        other: another checkout, after its own ``dvc repro``.
        same_machine: also require identical ``dvc.lock`` hashes of every data and model output
            (:func:`compare_locks` without :data:`TIMED_OUTPUTS`): the same-machine promise.

    Returns:
        0 when the promise holds, 1 when a figure is outside its tolerance (or, with ``same_machine``, an output
        hash differs).
    """
    here, other = Path(here), Path(other)
    rows = compare_metrics(here / "metrics", other / "metrics")
    bad = [r for r in rows if not r["ok"]]
    for r in rows:
        print(
            f"{'ok ' if r['ok'] else 'OFF'} {r['file']:24s} {r['key']:40s} {r['a']!s:>12.10} {r['b']!s:>12.10} "
            f"diff {r['diff']:.4g} (tol {r['tolerance']})"
        )
    differing = compare_locks(here / "dvc.lock", other / "dvc.lock", ignore=TIMED_OUTPUTS)
    timed = sorted(set(compare_locks(here / "dvc.lock", other / "dvc.lock")) - set(differing))
    print(
        f"{len(rows) - len(bad)} of {len(rows)} figures within tolerance; "
        f"{len(differing)} data/model outputs differ in dvc.lock{': ' + ', '.join(differing) if differing else ''}; "
        f"{len(timed)} timed outputs (metrics, logs, report) differ, as they do on every run"
    )
    return int(bool(bad) or (same_machine and bool(differing)))


def main(argv: list[str] | None = None) -> int:
    """``python -m domainlm.common.reproducibility OTHER``: parse ``argv`` (default ``sys.argv[1:]``), then
    :func:`check`."""
    ap = argparse.ArgumentParser(prog="python -m domainlm.common.reproducibility", description=__doc__.splitlines()[0])
    ap.add_argument("other", help="another checkout (after its own dvc repro) to compare with this one")
    ap.add_argument("--here", default=".", help="this checkout (default: the current folder)")
    ap.add_argument(
        "--same-machine",
        action="store_true",
        help="also require identical dvc.lock output hashes (the same-machine promise)",
    )
    args = ap.parse_args(argv)
    return check(args.here, args.other, same_machine=args.same_machine)


if __name__ == "__main__":
    sys.exit(main())
