"""Load the same documents through a torch DataLoader from JSONL and from Parquet; compare speed, memory, size.

Loaders (all ``torch.utils.data.IterableDataset``s yielding batches of ``--batch-rows`` documents as
``{"id": [...], "text": [...], "domain": [...], "label": [...]}`` Python lists, the form a tokenizer
takes; ``DataLoader(batch_size=None, collate_fn=<identity>)``, so the loader adds the same, small,
per-batch cost to every format instead of walking every string):

* ``jsonl``          the baseline: data/dedup/*.jsonl read line by line, ``json.loads`` per line.
* ``jsonl_arrow``    the same files through pyarrow's streaming JSON reader (``pyarrow.json.open_json``),
                     so the Parquet gain can be split into "C++ parser" and "columnar format".
* ``parquet``        data/parquet/*.parquet with ``ParquetFile.iter_batches`` (one row group decoded
                     at a time), same four columns.
* ``parquet_text``   Parquet reading only the ``text`` column (column projection; JSONL has to
                     parse every field of every line, so its baseline stays ``jsonl``).

Each loader lives in its own spawned process (so its peak RSS is its own) and makes one untimed
warm-up pass (page cache warm for every loader alike). Then ``--repeats`` rounds each time every
loader once, one at a time, in a rotated order (background load hits all alike); a timed run reads
the files ``--epochs`` times. Medians of wall and CPU time (``time.process_time``: all threads of
the loader's process, less sensitive than wall time to other jobs on a shared machine) are
reported, with speed-ups against the ``jsonl`` baseline measured in the same run. Every run must
see the same documents and characters, or the benchmark aborts. Writes
benchmarks/results/io_speed.csv and its ``.meta.json`` sidecar (hardware, commit, date).

Run from the repository root: ``python benchmarks/io_speed.py [--repeats 7]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the `domainlm` package importable
    sys.path.insert(0, str(ROOT))

COLUMNS = ["id", "text", "domain", "label"]
LOADERS = ("jsonl", "jsonl_arrow", "parquet", "parquet_text")
BASELINE = "jsonl"


def _make_dataset(kind: str, files: list[str], batch_rows: int):
    """The IterableDataset for loader ``kind`` over ``files`` (sharded by file across DataLoader workers)."""
    import torch.utils.data as tud

    class Docs(tud.IterableDataset):
        def __iter__(self):
            info = tud.get_worker_info()
            mine = files if info is None else files[info.id :: info.num_workers]
            for path in mine:
                yield from _batches(kind, path, batch_rows)

    return Docs()


def _batches(kind: str, path: str, batch_rows: int):
    if kind == "jsonl":
        cols: dict[str, list] = {c: [] for c in COLUMNS}
        with open(path, "rb") as fh:
            for line in fh:
                if not line.strip():
                    continue
                rec = json.loads(line)
                for c in COLUMNS:
                    cols[c].append(rec.get(c))
                if len(cols["id"]) == batch_rows:
                    yield cols
                    cols = {c: [] for c in COLUMNS}
        if cols["id"]:
            yield cols
    elif kind == "jsonl_arrow":
        from domainlm.documents.conversion import read_jsonl_batches, rebatch

        for batch in rebatch(read_jsonl_batches(path), batch_rows):
            yield batch.select(COLUMNS).to_pydict()
    elif kind in ("parquet", "parquet_text"):
        from domainlm.documents.schema import iter_doc_batches

        columns = ["text"] if kind == "parquet_text" else COLUMNS
        for batch in iter_doc_batches(path, batch_rows=batch_rows, columns=columns):
            yield batch.to_pydict()
    else:
        raise ValueError(f"unknown loader {kind!r}; expected one of {LOADERS}")


def _as_is(batch):
    """DataLoader ``collate_fn``: pass a ready batch through (no per-string ``default_convert`` walk)."""
    return batch


def _one_pass(kind: str, files: list[str], batch_rows: int, workers: int) -> tuple[float, float, int, int]:
    """Wall seconds, CPU seconds (this process, all threads), documents and characters of one pass."""
    from torch.utils.data import DataLoader

    loader = DataLoader(_make_dataset(kind, files, batch_rows), batch_size=None, num_workers=workers, collate_fn=_as_is)
    docs = chars = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for batch in loader:
        docs += len(batch["text"])
        chars += sum(len(t) for t in batch["text"])
    return time.perf_counter() - t0, time.process_time() - c0, docs, chars


def _child(kind: str, files: list[str], batch_rows: int, workers: int, conn) -> None:
    """One loader's process: warm up, then run a timed pass per ``"run"`` message until ``"stop"``."""
    import pyarrow.parquet  # noqa: F401
    import torch  # noqa: F401  (imported before the RSS baseline, in every loader's process alike)

    import domainlm.documents.conversion  # noqa: F401
    from domainlm.common.metrics import peak_rss_mb

    rss0 = peak_rss_mb()
    _one_pass(kind, files, batch_rows, workers)  # warm-up, not timed
    conn.send("ready")
    while conn.recv() == "run":
        conn.send(_one_pass(kind, files, batch_rows, workers))
    rss1 = peak_rss_mb()
    conn.send({"peak_rss_mb": rss1, "rss_growth_mb": rss1 - rss0})


def measure(files: dict[str, list[str]], batch_rows: int, workers: int, repeats: int) -> dict[str, dict]:
    """Time every loader ``repeats`` times, interleaved, each in its own spawned process.

    Round ``i`` runs the loaders one after another in an order rotated by ``i``, so a change in
    background load hits all loaders alike; only one loader runs at a time.

    Returns:
        ``{loader: {"seconds": [...], "cpu_seconds": [...], "docs": {...}, "chars": {...},
        "peak_rss_mb", "rss_growth_mb"}}`` (seconds per timed run; docs/chars: the set seen).
    """
    ctx = mp.get_context("spawn")
    procs, conns = {}, {}
    for kind, paths in files.items():
        parent, child = ctx.Pipe()
        procs[kind] = ctx.Process(target=_child, args=(kind, paths, batch_rows, workers, child))
        procs[kind].start()
        conns[kind] = parent
    for kind, conn in conns.items():
        if conn.recv() != "ready":
            raise RuntimeError(f"loader {kind} did not start")
    results = {k: {"seconds": [], "cpu_seconds": [], "docs": set(), "chars": set()} for k in files}
    order = list(files)
    for i in range(repeats):
        for kind in order[i % len(order) :] + order[: i % len(order)]:
            conns[kind].send("run")
            seconds, cpu_seconds, docs, chars = conns[kind].recv()
            results[kind]["seconds"].append(seconds)
            results[kind]["cpu_seconds"].append(cpu_seconds)
            results[kind]["docs"].add(docs)
            results[kind]["chars"].add(chars)
        print(f"io_speed: round {i + 1}/{repeats} done", file=sys.stderr)
    for kind, conn in conns.items():
        conn.send("stop")
        results[kind].update(conn.recv())
        procs[kind].join()
        if procs[kind].exitcode:
            raise RuntimeError(f"loader {kind} exited with {procs[kind].exitcode}")
    return results


def find_inputs(jsonl_dir: Path, parquet_dir: Path, domains: list[str]) -> tuple[list[Path], list[Path]]:
    """Matching ``<domain>.jsonl`` / ``<domain>.parquet`` lists for ``domains`` (same order).

    Raises:
        SystemExit: with a message saying which stage to run when inputs are missing.
    """
    jsonl = [jsonl_dir / f"{d}.jsonl" for d in domains]
    parquet = [parquet_dir / f"{d}.parquet" for d in domains]
    for paths, stage in ((jsonl, "dedup"), (parquet, "parquet")):
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise SystemExit(f"io_speed: {missing} not found; run `dvc repro {stage}` first")
    return jsonl, parquet


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jsonl-dir", type=Path, default=ROOT / "data" / "dedup")
    ap.add_argument("--parquet-dir", type=Path, default=ROOT / "data" / "parquet")
    ap.add_argument("--domains", nargs="+", default=None, help="default: `domains` in params.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "io_speed.csv")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch-rows", type=int, default=256)
    ap.add_argument(
        "--epochs",
        type=int,
        default=5,
        help="passes over the files per timed run (the corpus is small; this lifts timings above noise)",
    )
    ap.add_argument("--workers", type=int, default=0, help="DataLoader num_workers (files are sharded per worker)")
    args = ap.parse_args(argv)

    from domainlm.common.params import domains as param_domains

    domains = args.domains or param_domains(ROOT / "params.yaml")
    jsonl, parquet = find_inputs(args.jsonl_dir, args.parquet_dir, domains)
    files = {"jsonl": jsonl, "jsonl_arrow": jsonl, "parquet": parquet, "parquet_text": parquet}
    files = {k: [str(p) for p in v] * args.epochs for k, v in files.items()}
    load_1m = os.getloadavg()[0]  # context: other jobs on the machine widen wall-time spread
    measured = measure(files, args.batch_rows, args.workers, args.repeats)
    rows = []
    for kind in LOADERS:
        paths = files[kind]
        r = measured[kind]
        if len(r["docs"]) != 1 or len(r["chars"]) != 1:
            raise RuntimeError(f"{kind}: passes disagree on documents/characters: {r['docs']} {r['chars']}")
        median = statistics.median(r["seconds"])
        median_cpu = statistics.median(r["cpu_seconds"])
        docs = r["docs"].pop()
        rows.append(
            {
                "loader": kind,
                "columns": "text" if kind == "parquet_text" else "+".join(COLUMNS),
                "files": len(paths) // args.epochs,
                "epochs": args.epochs,
                "bytes_on_disk": sum(os.path.getsize(p) for p in paths) // args.epochs,
                "docs": docs,
                "chars": r["chars"].pop(),
                "repeats": args.repeats,
                "batch_rows": args.batch_rows,
                "workers": args.workers,
                "cpu_count": os.cpu_count(),
                "load_avg_1m_at_start": round(load_1m, 2),
                "median_s": round(median, 5),
                "min_s": round(min(r["seconds"]), 5),
                "max_s": round(max(r["seconds"]), 5),
                "median_cpu_s": round(median_cpu, 5),
                "docs_per_s": round(docs / median, 1),
                "peak_rss_mb": round(r["peak_rss_mb"], 1),
                "rss_growth_mb": round(r["rss_growth_mb"], 1),
            }
        )
    base = next(r for r in rows if r["loader"] == BASELINE)
    for r in rows:
        if (r["docs"], r["chars"]) != (base["docs"], base["chars"]):
            raise RuntimeError(
                f"{r['loader']} loaded {r['docs']} docs / {r['chars']} chars, "
                f"{BASELINE} {base['docs']} / {base['chars']}: not the same documents"
            )
        r["speedup_vs_jsonl"] = round(base["median_s"] / r["median_s"], 3)
        r["cpu_speedup_vs_jsonl"] = round(base["median_cpu_s"] / r["median_cpu_s"], 3)
        r["size_ratio_vs_jsonl"] = round(r["bytes_on_disk"] / base["bytes_on_disk"], 4)
    from measure import write_meta

    from domainlm.common.atomic import atomic_path

    with atomic_path(args.out) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_meta(args.out)
    for r in rows:
        print(
            f"{r['loader']:>13}: {r['median_s'] * 1000:8.1f} ms median ({r['median_cpu_s'] * 1000:.1f} ms CPU), "
            f"{r['docs_per_s']:>8.0f} docs/s, x{r['speedup_vs_jsonl']:.2f} vs jsonl "
            f"(CPU x{r['cpu_speedup_vs_jsonl']:.2f}), {r['bytes_on_disk'] / 1e6:.2f} MB on disk "
            f"({r['size_ratio_vs_jsonl']:.2f}x), peak RSS {r['peak_rss_mb']:.0f} MB "
            f"(+{r['rss_growth_mb']:.0f} MB)"
        )
    print(f"io_speed: wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
