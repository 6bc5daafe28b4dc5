"""The classifier's data path at 10k, 100k and 1M training documents: memory-mapped window caches (streamed) against
texts and token windows held in Python lists (in memory).

1. **data**: for each size, a synthetic labelled split in the pipeline's layout, ``<work>/<size>/split/<domain>/
   {train,val,test}.parquet`` (``id``, ``text``) and its label table (:data:`domainlm.documents.labels.LABELS_SCHEMA`,
   label = domain), written in batches of 10,000 documents (``pyarrow.parquet.ParquetWriter``). A document is a run
   of sentences drawn with a seeded generator from its domain's sentences and lines in the bundled corpus
   (``data/split``), cut to a log-normal length (median 600 characters, 150 to 1,500; the bundled train documents
   have a median of ~214 tokens at ~3.2 characters a token). The training documents are spread evenly over the four
   domains; val has 1,000 and test 2,000 documents at every size.
2. **cases**: each size is run twice, each time in a fresh process (so its peak RSS is the case's own), with
   ``models/merged``, ``params.yaml``'s ``classifier`` section and its compute policy
   (:func:`domainlm.common.compute.resolve`, applied). Compiled decoder layers (``classifier.compile``) are off in
   both paths unless ``--compile`` is given, and DeepSpeed is off.

   - **streamed**: ``read_splits(with_texts=False)`` (ids, labels and rows only) and ``split_caches`` building the
     train, val and test window caches from scratch in a fresh folder; ``train_attempt(windows=caches)``;
     ``predict_windows`` on the test cache. This is what ``train_classifier`` runs.
   - **in_memory** (the baseline): ``read_splits`` with texts, then ``encode_windows`` of train, val and test wrapped
     in ``InMemoryWindows``: the windows ``train_attempt(windows=None)`` and ``predict_proba`` encode (identical
     windows, ``tests/test_window_cache.py``), encoded once here so that their cost is timed apart from training;
     then ``train_attempt`` and ``predict_windows`` on those lists. At a size where the linear extrapolation of its
     peak RSS from the two largest sizes measured below it exceeds ``--memory-limit-mb`` (12,288 MB), it is not
     run: its row says ``skipped`` and gives the extrapolated figure.

   Each case records ``prep_s`` (data preparation as above, in seconds; ``prep_s_per_1k_docs`` over the train, val
   and test documents), ``steps_s`` (one epoch of ``--steps`` optimizer steps, ``max_steps_per_epoch``: the
   Trainer's ``train_runtime`` minus the ``eval_runtime`` of its end-of-epoch validation, so the steps plus one
   adapter checkpoint save), ``step_s_median`` (median seconds between the Trainer's per-step log events,
   ``logging_steps`` 1, from the second step on), ``eval_s`` (validation of the 1,000 val documents),
   ``predict_s_per_1k_docs`` (the 2,000 test documents), ``base_rss_mb`` (RSS after the imports and the tokenizer,
   before any data is read), ``prep_peak_rss_mb`` and ``peak_rss_mb`` (``ru_maxrss`` after preparation and at the
   end), the documents and windows, the window caches' size on disk (``cache_mb``) and the split files'
   (``split_mb``), the training loss and the test macro-F1 (both paths read the same windows, so these agree).

3. **bars** (printed at the end and stored in the ``.json`` and the sidecars): the streamed path's peak RSS at 1M
   documents is at most 4,096 MB, and its preparation seconds per document at 1M are at most 1.3 × those at 100k.
   When ``--sizes`` lacks 100k or 1M, the same checks compare the largest size with the one below it and say so.

Writes ``benchmarks/results/classifier_scale.csv`` (one row per size and path) and ``classifier_scale.json`` (rows,
bars, settings), each with its ``.meta.json`` sidecar (hardware, commit, date).

Usage, from the repository root: ``python benchmarks/classifier_scale.py [--sizes 10000,100000,1000000]
[--steps 20] [--work DIR] [--keep] [--compile]``. About 15 minutes on 2 idle cores (several times longer when they
are shared), half of it the 1M-document train window cache; the in-memory case at 100k needs about 6 GB of RAM. A
quick check, ``--sizes 2000,5000 --steps 2 --val-docs 200 --test-docs 400``, takes a few minutes. The work folder
(a temporary folder under /tmp by default) needs about 2 GB at 1M documents and is removed at the end unless
``--keep``; with ``--keep`` and the same ``--work``, a later run reuses the synthetic splits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "benchmarks"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from measure import vm_rss_mb, write_csv, write_meta  # noqa: E402

from domainlm.common.metrics import peak_rss_mb  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "classifier_scale"
DOMAINS = ("law", "bill", "office_help", "faq")
SPLITS = ("train", "val", "test")
LM_DIR = ROOT / "models" / "merged"
#: Documents written (and generated) at a time.
BATCH_DOCS = 10_000
#: Synthetic document length in characters: log-normal around the median, clipped.
MEDIAN_CHARS, SIGMA, MIN_CHARS, MAX_CHARS = 600, 0.55, 150, 1500
#: Sentences longer than this are cut (a few bundled lines are whole tables).
MAX_SENTENCE_CHARS = 300
SENTENCE_END = re.compile(r"(?<=[.?!])\s+|\n+")
#: The issue's bars on the streamed path.
RSS_BAR_MB, PREP_RATIO_BAR, BAR_SIZES = 4096, 1.3, (100_000, 1_000_000)


# --------------------------------------------------------------------------------------------------- data
def sentence_pool(split_dir: str | os.PathLike, domain: str) -> list[str]:
    """The distinct sentences and lines (8 characters or more, cut at :data:`MAX_SENTENCE_CHARS`) of one domain's
    bundled documents, train, val and test, in order of first appearance.

    Raises:
        ValueError: the domain has no such sentence.
    """
    import pyarrow.parquet as pq

    from domainlm.common.paths import split_path

    seen: dict[str, None] = {}
    for split in SPLITS:
        for text in pq.read_table(split_path(split_dir, domain, split), columns=["text"])["text"].to_pylist():
            for s in SENTENCE_END.split(text or ""):
                s = s.strip()[:MAX_SENTENCE_CHARS]
                if len(s) >= 8:
                    seen.setdefault(s, None)
    if not seen:
        raise ValueError(f"no sentence in {split_dir}/{domain}")
    return list(seen)


def synthetic_texts(pool: Sequence[str], n: int, rng) -> list[str]:
    """``n`` documents: sentences of ``pool`` drawn uniformly by ``rng`` (a numpy Generator) and joined with
    spaces until the document reaches its drawn length, then cut to it."""
    lengths = rng.lognormal(mean=math.log(MEDIAN_CHARS), sigma=SIGMA, size=n)
    lengths = lengths.clip(MIN_CHARS, MAX_CHARS).astype(int)
    picks = iter(rng.integers(len(pool), size=n * 16).tolist())
    out = []
    for target in lengths.tolist():
        parts, size = [], 0
        while size < target:
            k = next(picks, None)
            s = pool[k if k is not None else int(rng.integers(len(pool)))]
            parts.append(s)
            size += len(s) + 1
        out.append(" ".join(parts)[:target])
    return out


def split_counts(n: int) -> list[int]:
    """``n`` documents spread over :data:`DOMAINS` as evenly as integers allow."""
    return [n // len(DOMAINS) + (i < n % len(DOMAINS)) for i in range(len(DOMAINS))]


def write_synthetic_split(
    out: Path, n_train: int, n_val: int, n_test: int, seed: int, source: str | os.PathLike = ROOT / "data" / "split"
) -> dict[str, Any]:
    """Write ``out/split/<domain>/{train,val,test}.parquet`` and ``out/labels.parquet`` (see the module docstring),
    :data:`BATCH_DOCS` documents at a time, each file atomically; ``out/data.json`` last, so a finished folder is
    recognisable and reused. Each ``(domain, split)`` has its own generator, seeded ``[seed, domain, split]``, so
    the val and test documents are the same at every size and a smaller train split is a prefix of a larger one.

    Returns:
        ``data.json``'s content: ``docs`` per split, ``sentences`` per domain, ``mean_chars`` of the train
        documents, ``split_mb`` (the split files and label table on disk) and ``generate_s``.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from domainlm.common.atomic import atomic_path
    from domainlm.common.paths import split_path
    from domainlm.documents.labels import LABELS_SCHEMA

    marker = out / "data.json"
    want = {"train": n_train, "val": n_val, "test": n_test}
    if marker.is_file():
        done = json.loads(marker.read_text(encoding="utf-8"))
        if done.get("docs") == want and done.get("seed") == seed:
            return done
    t0 = time.perf_counter()
    doc_schema = pa.schema([("id", pa.string()), ("text", pa.string())])
    counts = {split: split_counts(n) for split, n in want.items()}
    pools = {d: sentence_pool(source, d) for d in DOMAINS}
    chars = n_chars = 0
    with (
        atomic_path(out / "labels.parquet") as labels_tmp,
        pq.ParquetWriter(labels_tmp, LABELS_SCHEMA, compression="zstd") as labels,
        tqdm(total=sum(want.values()), desc=f"synthetic split ({n_train:,} train)", unit="doc") as bar,
    ):
        for di, domain in enumerate(DOMAINS):  # the label table's order: domains, then train/val/test
            for si, split in enumerate(SPLITS):
                rng = np.random.default_rng([seed, di, si])
                n = counts[split][di]
                with (
                    atomic_path(split_path(out / "split", domain, split)) as tmp,
                    pq.ParquetWriter(tmp, doc_schema, compression="zstd") as docs,
                ):
                    for start in range(0, n, BATCH_DOCS):
                        ids = [f"{domain}-{split}-{i:07d}" for i in range(start, min(n, start + BATCH_DOCS))]
                        texts = synthetic_texts(pools[domain], len(ids), rng)
                        if split == "train":
                            chars += sum(map(len, texts))
                            n_chars += len(texts)
                        docs.write_table(pa.table({"id": ids, "text": texts}, schema=doc_schema))
                        tags = [domain] * len(ids)
                        labels.write_table(
                            pa.table(
                                {
                                    "id": ids,
                                    "domain": tags,
                                    "split": [split] * len(ids),
                                    "source_label": tags,
                                    "label": tags,
                                },
                                schema=LABELS_SCHEMA,
                            )
                        )
                        bar.update(len(ids))
    done = {
        "seed": seed,
        "docs": want,
        "sentences": {d: len(p) for d, p in pools.items()},
        "mean_chars": round(chars / max(n_chars, 1), 1),
        "split_mb": round(folder_mb(out), 1),
        "generate_s": round(time.perf_counter() - t0, 1),
    }
    marker.write_text(json.dumps(done, indent=2) + "\n", encoding="utf-8")
    return done


def folder_mb(folder: str | os.PathLike) -> float:
    """Bytes of the files under ``folder`` (recursively), in MiB; 0 when it does not exist."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20


# ------------------------------------------------------------------------------------------------ one case
def run_case(path: str, data: Path, cache_root: Path, steps: int, compile_layers: bool, seed: int) -> dict[str, Any]:
    """One case in this process (see the module docstring): ``path`` is ``streamed`` or ``in_memory``; ``data`` a
    folder of :func:`write_synthetic_split`; ``cache_root`` the streamed path's (empty) window cache folder."""
    import numpy as np
    import torch  # noqa: F401  (imported before the base RSS is read)
    import yaml
    from transformers import AutoTokenizer

    from domainlm.classify.data import class_list, read_splits
    from domainlm.classify.gate import attempt_settings
    from domainlm.classify.metrics import score
    from domainlm.classify.model import encode_windows, predict_windows
    from domainlm.classify.training import split_caches, train_attempt, windows_params
    from domainlm.classify.window_cache import InMemoryWindows
    from domainlm.common.compute import resolve

    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    compute = resolve(params.get("compute"))
    compute.apply()
    cfg = params["classifier"]
    cfg["compile"] = bool(compile_layers)
    cfg["deepspeed"] = {**(cfg.get("deepspeed") or {}), "enabled": False}
    tok = AutoTokenizer.from_pretrained(LM_DIR, local_files_only=True)
    base = vm_rss_mb()
    split_dir, labels_path = data / "split", data / "labels.parquet"

    t0 = time.perf_counter()
    if path == "streamed":
        splits = read_splits(split_dir, labels_path, DOMAINS, with_texts=False)
        caches = split_caches(tok, LM_DIR, split_dir, DOMAINS, cfg, cache_root)
        windows = {"train": caches["train"], "val": caches["val"]}
        test_windows, test_docs = caches["test"], splits["test"].rows
        n_windows = {s: int(c.manifest["windows"]) for s, c in caches.items()}
    elif path == "in_memory":
        splits = read_splits(split_dir, labels_path, DOMAINS)  # the texts stay held, as the stage holds them
        n_train, n_predict = windows_params(cfg)
        max_length = int(cfg["max_length"])
        enc = {
            s: InMemoryWindows(encode_windows(tok, splits[s].texts, max_length, n_train if s == "train" else n_predict))
            for s in SPLITS
        }
        windows = {"train": enc["train"], "val": enc["val"]}
        test_windows, test_docs = enc["test"], None
        n_windows = {s: int(w.n_windows.sum()) for s, w in enc.items()}
    else:
        raise ValueError(f"path must be streamed or in_memory, got {path!r}")
    prep_s = time.perf_counter() - t0
    prep_peak = peak_rss_mb()

    train, val, test = splits["train"], splits["val"], splits["test"]
    classes = class_list(train)
    settings = {
        **attempt_settings(cfg["train"], cfg["gate"], 0),
        "epochs": 1,
        "max_steps_per_epoch": int(steps),
        "logging_steps": 1,
    }
    logs: list[tuple[float, int, dict[str, float]]] = []
    model, tok, info = train_attempt(
        LM_DIR,
        train,
        val,
        classes,
        cfg,
        settings,
        seed=seed,
        on_log=lambda step, figures: logs.append((time.perf_counter(), step, figures)),
        compute=compute,
        windows=windows,
    )
    step_times = [t for t, _, f in logs if "loss" in f and "eval_loss" not in f]
    train_runtime = next((f["train_runtime"] for _, _, f in logs if "train_runtime" in f), float("nan"))
    eval_s = sum(f["eval_runtime"] for _, _, f in logs if "eval_runtime" in f)

    t0 = time.perf_counter()
    proba = predict_windows(
        model, tok, test_windows, test_docs, batch_size=int(cfg["train"]["eval_batch_size"]), compute=compute
    )
    predict_s = time.perf_counter() - t0
    docs = {s: len(splits[s]) for s in SPLITS}
    return {
        "docs": docs,
        "windows": n_windows,
        "prep_s": prep_s,
        "steps": int(info["steps"]),
        "train_runtime_s": train_runtime,
        "steps_s": train_runtime - eval_s,
        "step_s_median": statistics.median(np.diff(step_times)) if len(step_times) > 1 else float("nan"),
        "eval_s": eval_s,
        "train_s": float(info["train_s"]),
        "predict_s": predict_s,
        "train_loss": float(info["train_loss"]),
        "val_macro_f1": float(info["val_macro_f1"]),
        "test_macro_f1": float(score(test.labels, proba, classes)["macro_f1"]),
        "compiled_layers": int(info["compiled_layers"]),
        "compute": compute.dtype,
        "threads": int(compute.threads),
        "base_rss_mb": base,
        "prep_peak_rss_mb": prep_peak,
        "peak_rss_mb": peak_rss_mb(),
        "cache_mb": folder_mb(cache_root),
        "train_cache_mb": folder_mb(caches["train"].folder) if path == "streamed" else 0.0,
    }


def child(path: str, data: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`run_case` in a fresh ``python`` process (``--case``); returns its figures and wall seconds.

    Raises:
        subprocess.CalledProcessError: the case failed (its output went to this process's stdout and stderr).
    """
    cache_root = work / f"cache-{path}"
    shutil.rmtree(cache_root, ignore_errors=True)
    cache_root.mkdir(parents=True)
    out = work / f"{path}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--case", path, "--data", str(data), "--cache", str(cache_root)]
    cmd += ["--out", str(out), "--steps", str(args.steps), "--seed", str(args.seed)]
    cmd += ["--compile"] if args.compile else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    result = json.loads(out.read_text(encoding="utf-8"))
    result["wall_s"] = time.perf_counter() - t0
    shutil.rmtree(cache_root, ignore_errors=True)  # measured; the next size needs the disk
    return result


# --------------------------------------------------------------------------------------------------- driver
def extrapolated_rss(measured: Sequence[tuple[int, float]], size: int) -> float | None:
    """Peak RSS (MiB) at ``size`` documents on the line through the two largest measured ``(size, peak)`` points
    below it; None with fewer than two."""
    below = sorted(p for p in measured if p[0] < size)[-2:]
    if len(below) < 2:
        return None
    (n1, r1), (n2, r2) = below
    return r2 + (r2 - r1) / (n2 - n1) * (size - n2)


#: The CSV's columns, in order.
COLUMNS = (
    "train_docs",
    "path",
    "status",
    "docs",
    "windows",
    "train_windows",
    "prep_s",
    "prep_s_per_1k_docs",
    "steps",
    "steps_s",
    "step_s_median",
    "eval_s",
    "predict_s_per_1k_docs",
    "base_rss_mb",
    "prep_peak_rss_mb",
    "peak_rss_mb",
    "cache_mb",
    "split_mb",
    "train_loss",
    "test_macro_f1",
    "extrapolated_peak_rss_mb",
)


def row(size: int, path: str, r: dict[str, Any] | None, split_mb: float, extrapolated: float | None) -> dict:
    """One CSV row of a case's figures ``r`` (None: a skipped case)."""

    def rnd(x: float | None, k: int = 2) -> float | None:
        return None if x is None else round(float(x), k)

    if r is None:
        return {
            **dict.fromkeys(COLUMNS),
            "train_docs": size,
            "path": path,
            "status": "skipped",
            "split_mb": rnd(split_mb, 1),
            "extrapolated_peak_rss_mb": rnd(extrapolated, 0),
        }
    docs, windows = sum(r["docs"].values()), sum(r["windows"].values())
    out = {
        "train_docs": size,
        "path": path,
        "status": "measured",
        "docs": docs,
        "windows": windows,
        "train_windows": r["windows"]["train"],
        "prep_s": rnd(r["prep_s"]),
        "prep_s_per_1k_docs": rnd(1000 * r["prep_s"] / docs, 4),
        "steps": r["steps"],
        "steps_s": rnd(r["steps_s"]),
        "step_s_median": rnd(r["step_s_median"], 3),
        "eval_s": rnd(r["eval_s"]),
        "predict_s_per_1k_docs": rnd(1000 * r["predict_s"] / r["docs"]["test"]),
        "base_rss_mb": rnd(r["base_rss_mb"], 0),
        "prep_peak_rss_mb": rnd(r["prep_peak_rss_mb"], 0),
        "peak_rss_mb": rnd(r["peak_rss_mb"], 0),
        "cache_mb": rnd(r["cache_mb"], 1),
        "split_mb": rnd(split_mb, 1),
        "train_loss": rnd(r["train_loss"], 4),
        "test_macro_f1": rnd(r["test_macro_f1"], 4),
        "extrapolated_peak_rss_mb": rnd(extrapolated, 0),
    }
    if list(out) != list(COLUMNS):
        raise AssertionError(f"row columns {list(out)} differ from {COLUMNS}")
    return out


def bars(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The issue's two bars on the streamed rows: peak RSS at the largest size ≤ :data:`RSS_BAR_MB`, and preparation
    seconds per document at the largest size ≤ :data:`PREP_RATIO_BAR` × those at the size below it (1M and 100k
    when both were run; ``at_issue_sizes`` says whether they were)."""
    streamed = {r["train_docs"]: r for r in rows if r["path"] == "streamed" and r["status"] == "measured"}
    if not streamed:
        return {}
    sizes = sorted(streamed)
    big = BAR_SIZES[1] if BAR_SIZES[1] in streamed else sizes[-1]
    small = (
        BAR_SIZES[0] if BAR_SIZES[0] in streamed and big == BAR_SIZES[1] else (sizes[-2] if len(sizes) > 1 else None)
    )
    out: dict[str, Any] = {
        "at_issue_sizes": (small, big) == BAR_SIZES,
        "peak_rss": {
            "train_docs": big,
            "peak_rss_mb": streamed[big]["peak_rss_mb"],
            "bar_mb": RSS_BAR_MB,
            "holds": streamed[big]["peak_rss_mb"] <= RSS_BAR_MB,
        },
    }
    if small is not None:
        ratio = streamed[big]["prep_s_per_1k_docs"] / streamed[small]["prep_s_per_1k_docs"]
        out["prep_per_doc"] = {
            "train_docs": [small, big],
            "prep_s_per_1k_docs": [streamed[small]["prep_s_per_1k_docs"], streamed[big]["prep_s_per_1k_docs"]],
            "ratio": round(ratio, 3),
            "bar_ratio": PREP_RATIO_BAR,
            "holds": ratio <= PREP_RATIO_BAR,
        }
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="training documents, comma-separated")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps trained (max_steps_per_epoch, 1 epoch)")
    ap.add_argument("--val-docs", type=int, default=1000)
    ap.add_argument("--test-docs", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="classifier.compile on in both paths (default off)")
    ap.add_argument("--memory-limit-mb", type=float, default=12288, help="skip in_memory above this extrapolation")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--out", type=Path, default=RESULTS, help="result path without suffix")
    ap.add_argument("--case", choices=["streamed", "in_memory"], help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.case:  # one case, in the fresh process the driver started
        os.chdir(ROOT)
        result = run_case(args.case, args.data, args.cache, args.steps, args.compile, args.seed)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return None

    sizes = sorted(int(s) for s in args.sizes.split(","))
    work = args.work or Path(tempfile.mkdtemp(prefix="classifier_scale_", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    memory_peaks: list[tuple[int, float]] = []
    try:
        for size in sizes:
            folder = work / str(size)
            data = write_synthetic_split(folder, size, args.val_docs, args.test_docs, args.seed)
            details[str(size)] = {"data": data}
            for path in ("streamed", "in_memory"):
                guess = extrapolated_rss(memory_peaks, size) if path == "in_memory" else None
                if guess is not None and guess > args.memory_limit_mb:
                    print(f"{size:,} documents, in_memory: skipped (extrapolated peak RSS {guess:,.0f} MB)", flush=True)
                    rows.append(row(size, path, None, data["split_mb"], guess))
                    details[str(size)][path] = {"skipped": True, "extrapolated_peak_rss_mb": guess}
                    continue
                r = child(path, folder, folder, args)
                if path == "in_memory":
                    memory_peaks.append((size, r["peak_rss_mb"]))
                rows.append(row(size, path, r, data["split_mb"], guess))
                details[str(size)][path] = r
                print(json.dumps(rows[-1]), flush=True)
        checks = bars(rows)
        settings = {
            "sizes": sizes,
            "steps": args.steps,
            "val_docs": args.val_docs,
            "test_docs": args.test_docs,
            "seed": args.seed,
            "compile": bool(args.compile),
            "memory_limit_mb": args.memory_limit_mb,
            "document_chars": {"median": MEDIAN_CHARS, "sigma": SIGMA, "min": MIN_CHARS, "max": MAX_CHARS},
        }
        from domainlm.common.atomic import write_json

        json_path = write_json(
            args.out.with_suffix(".json"), {"settings": settings, "bars": checks, "rows": rows, "cases": details}
        )
        write_meta(json_path, settings=settings, bars=checks)
        write_csv(args.out.with_suffix(".csv"), rows, settings=settings, bars=checks)
        print_bars(checks)
        return {"rows": rows, "bars": checks}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def print_bars(checks: dict[str, Any]) -> None:
    """Print the bars of :func:`bars`, one line each."""
    if not checks:
        print("bars: no streamed case measured")
        return
    where = "" if checks["at_issue_sizes"] else " (not the issue's sizes, 100k and 1M)"
    rss = checks["peak_rss"]
    print(
        f"bar, streamed peak RSS at {rss['train_docs']:,} documents: {rss['peak_rss_mb']:,.0f} MB "
        f"<= {rss['bar_mb']:,} MB: {'holds' if rss['holds'] else 'FAILS'}{where}"
    )
    if "prep_per_doc" in checks:
        p = checks["prep_per_doc"]
        (a, b), (sa, sb) = p["train_docs"], p["prep_s_per_1k_docs"]
        print(
            f"bar, streamed preparation per 1k documents: {sb:.3f} s at {b:,} / {sa:.3f} s at {a:,} = "
            f"{p['ratio']:.2f} <= {p['bar_ratio']}: {'holds' if p['holds'] else 'FAILS'}{where}"
        )


if __name__ == "__main__":
    main()
