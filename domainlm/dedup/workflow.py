"""The dedup steps over a work folder: streaming, bounded in memory, resumable, engine-agnostic.

Each named step reads its inputs from the work folder and writes its result there before the next
one starts, so a failed run resumes from the last completed step (and, inside a step, from the
last completed task). The heavy steps are split into tasks that an engine
(:mod:`domainlm.dedup.engines`) runs where it likes; the light ones run in this process.

==============  ======  ==========================================================================
step            where   result in the work folder
==============  ======  ==========================================================================
``index``       here    line offsets of every input document (``doc_file``, ``doc_offset``, ``doc_length``)
``background``  here    exact Jaccard of a seeded sample of document pairs → bands × rows
``signatures``  tasks   per block of documents: ids, exact keys (Parquet), MinHash signatures
                        (``signatures.u32``, ``n × num_perm``) and band keys (``band_keys.u64``, ``bands × n``)
``exact``       here    exact-duplicate keepers (``keeper_of.npy``): smallest id per normalized text
``candidates``  tasks   per band: candidate pairs of the exact keepers, sort-based grouping of band keys
``estimate``    tasks   per chunk of candidate pairs: signature-estimated Jaccard, pairs above the floor kept
``verify``      tasks   per chunk of kept pairs: exact Jaccard of the re-shingled documents
``cluster``     here    union-find over verified pairs, representatives, removal rows
==============  ======  ==========================================================================

Memory: this process holds per-document arrays of a few bytes (offsets, keeper, id ranks) plus the
ids as one Arrow array; tasks hold one block, one band (``n`` keys) or one chunk of pairs. Candidate
pairs are bounded by the banding (:func:`~domainlm.dedup.minhash_lsh.choose_bands_rows`). Connected
components run here, over the verified pairs only (they are far fewer than documents: 52,537 for
1M documents with 9% planted near duplicates); a corpus whose verified pairs do not fit one process
would need a distributed components step (large-star/small-star), not needed at the sizes measured.
Scattered signature rows are read with ``os.preadv``, not through a memory map (see :func:`read_rows`).

Documents are numbered in input order (domains in params order, then lines); every intermediate is
keyed by that number, so tasks may run in any order, on any engine, and give the same outputs. The
input files and the work folder must be readable (and the work folder writable) by every worker: on
one machine any folder; on a Ray cluster of several machines, storage all nodes mount.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from domainlm.dedup import minhash_lsh as mh
from domainlm.korean.hangul import normalize_text, raw_shingle_ids, shingle_id_parts_many, to_hash32, unique_sorted

WORKFLOW_VERSION = 1  # bump when an intermediate's format or meaning changes: old work folders are not resumed
STEPS = ("index", "background", "signatures", "exact", "candidates", "estimate", "verify", "cluster")
LSH_BACKENDS = ("sort", "redis")
SIGN_BATCH = 512  # texts shingled and signed together inside a signature task
INLINE_DOCS = 20_000  # below about this much work a step runs in this process: a pool costs more than it saves
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DedupParams:
    """The ``dedup`` params the algorithm reads (see params.yaml for each one's meaning)."""

    num_perm: int = 256
    threshold: float = 0.8
    min_recall: float = 0.99
    seed: int = 1
    estimate_sigmas: float = 5.0
    max_bucket_size: int = 1000
    background_docs: int = 2000
    background_pairs: int = 20000
    max_false_candidates_per_doc: float = 10.0
    lsh_backend: str = "sort"
    redis: dict[str, Any] | None = None

    def check(self) -> None:
        """Raise ``ValueError`` naming the first bad parameter."""
        if not isinstance(self.num_perm, int) or self.num_perm < 2:
            raise ValueError(f"dedup.num_perm must be an integer >= 2, got {self.num_perm!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"dedup.threshold must be in (0, 1), got {self.threshold!r}")
        if self.lsh_backend not in LSH_BACKENDS:
            raise ValueError(f"dedup.lsh_backend must be one of {LSH_BACKENDS}, got {self.lsh_backend!r}")
        if self.lsh_backend == "redis":
            missing = [k for k in ("host", "port") if k not in (self.redis or {})]
            if missing:
                raise ValueError(f"dedup.redis is missing {missing} (needed for lsh_backend: redis)")
        for name in ("max_bucket_size", "background_docs", "background_pairs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 2:
                raise ValueError(f"dedup.{name} must be an integer >= 2, got {getattr(self, name)!r}")
        if not self.estimate_sigmas >= 0:
            raise ValueError(f"dedup.estimate_sigmas must be >= 0, got {self.estimate_sigmas!r}")


# ------------------------------------------------------------------ reading documents


def parse_record(line: bytes, path: str, lineno: int, domain: str) -> tuple[dict[str, Any], str, bytes]:
    """One validated JSONL line → ``(record, normalized text, exact key)``, checked as the stage requires.

    Raises:
        ValueError: naming ``path:lineno`` (empty line, not JSON, not an object, another domain) or the
            record (``id``/``text`` not a string, text empty after normalization or not valid Unicode).
    """
    if not line.strip():
        raise ValueError(f"{path}:{lineno}: empty line")
    try:
        rec = json.loads(line)
    except ValueError as err:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from err
    if not isinstance(rec, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
    if rec.get("domain") != domain:
        raise ValueError(f"{path}:{lineno}: record domain {rec.get('domain')!r} != file domain {domain!r}")
    for key in ("id", "text"):
        if not isinstance(rec.get(key), str):
            raise ValueError(
                f"{path}:{lineno} (id {rec.get('id')!r}): field {key!r} must be a string, "
                f"got {type(rec.get(key)).__name__}"
            )
    norm = normalize_text(rec["text"])
    if not norm:
        raise ValueError(f"record {rec['id']!r} ({domain}): text is empty after whitespace normalization")
    try:
        key = mh.exact_key(norm)
    except UnicodeEncodeError as err:  # a lone surrogate from a JSON escape
        raise ValueError(
            f"record {rec['id']!r} ({domain}): text is not valid Unicode ({err.reason} at character {err.start})"
        ) from err
    return rec, norm, key


def line_offsets(path: str | os.PathLike, chunk_bytes: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """Start offset and length (bytes, without ``\n`` / ``\r\n``) of every line of a file.

    Reads ``chunk_bytes`` at a time and finds the newlines with numpy; a last line without a
    newline counts. Memory: the chunk plus 17 bytes per line.

    Returns:
        ``(offsets int64, lengths int64)``, each of shape ``(lines,)``.

    Raises:
        FileNotFoundError: when ``path`` is missing.
    """
    ends: list[np.ndarray] = []
    crs: list[np.ndarray] = []
    size = 0
    prev_last = 0  # the byte before the current chunk
    with open(path, "rb") as fh:
        while True:
            buf = fh.read(chunk_bytes)
            if not buf:
                break
            arr = np.frombuffer(buf, dtype=np.uint8)
            nl = np.flatnonzero(arr == 10)
            before = np.where(nl > 0, arr[np.maximum(nl - 1, 0)], prev_last)  # the byte before each newline
            ends.append(nl + size)
            crs.append(before == 13)
            size += len(buf)
            prev_last = int(arr[-1])
    newline = np.concatenate(ends) if ends else np.empty(0, dtype=np.int64)
    cr = np.concatenate(crs) if crs else np.empty(0, dtype=bool)
    if size and prev_last != 10:
        newline = np.append(newline, size)  # a last line without a newline
        cr = np.append(cr, prev_last == 13)
    starts = np.concatenate(([0], newline[:-1] + 1)).astype(np.int64) if len(newline) else np.empty(0, np.int64)
    lengths = (newline - starts).astype(np.int64)
    lengths -= (cr & (lengths > 0)).astype(np.int64)  # drop the '\r' of '\r\n' line ends
    return starts, lengths


def read_lines(path: str, offsets: np.ndarray, lengths: np.ndarray) -> list[bytes]:
    """The lines at the given offsets (ascending order is fastest), by ``os.pread``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return [os.pread(fd, int(n), int(o)) for o, n in zip(offsets, lengths)]
    finally:
        os.close(fd)


# ------------------------------------------------------------------ the work folder


class WorkDir:
    """The work folder of one run: a sub-folder named by a fingerprint of the inputs and params.

    A step is complete when ``steps/<step>.json`` exists (it holds the step's stats); every file is
    written atomically (temporary name, then ``os.replace``).
    """

    def __init__(self, root: str | os.PathLike, fingerprint: str):
        self.root = Path(root)
        self.path = self.root / fingerprint[:20]
        self.fingerprint = fingerprint

    def prepare(self) -> bool:
        """Create the folder; drop stale work folders (other fingerprints) left by failed runs in the same root.
        Returns True when resuming."""
        self.root.mkdir(parents=True, exist_ok=True)
        for other in self.root.iterdir():  # only folders this class made: 20 hex digits holding steps/
            if (
                other.is_dir()
                and other.name != self.path.name
                and len(other.name) == 20
                and all(c in "0123456789abcdef" for c in other.name)
                and (other / "steps").is_dir()
            ):
                shutil.rmtree(other, ignore_errors=True)
        resuming = (self.path / "steps").is_dir() and any((self.path / "steps").iterdir())
        (self.path / "steps").mkdir(parents=True, exist_ok=True)
        return resuming

    def file(self, *parts: str) -> Path:
        p = self.path.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def done(self, step: str) -> dict[str, Any] | None:
        p = self.path / "steps" / f"{step}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def mark(self, step: str, stats: dict[str, Any]) -> None:
        save_json(self.path / "steps" / f"{step}.json", stats)


def save_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def save_npy(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def fingerprint(inputs: Sequence[tuple[str, str]], params: DedupParams) -> str:
    """SHA-256 of the inputs (domain, absolute path, size, mtime) and the params: a work folder is
    resumed only by a run over the same files with the same params."""
    desc = {"version": WORKFLOW_VERSION, "params": asdict(params), "inputs": []}
    for domain, path in inputs:
        st = os.stat(path)
        desc["inputs"].append([domain, str(Path(path).resolve()), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------ memory of the process tree


class TreeRss:
    """Samples the resident memory of this process and all its descendants (pool workers, Ray
    raylets and workers started here) every ``interval`` s on a thread; ``peak_mb`` since the last
    :meth:`reset`. Uses psutil; shared pages are counted once per process (an upper bound)."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self._proc = psutil.Process()
        self._psutil = psutil
        self.interval = interval
        self.peak_mb = 0.0
        self.run_peak_mb = 0.0
        self.driver_peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> float:
        total = 0
        try:
            procs = [self._proc] + self._proc.children(recursive=True)
        except self._psutil.Error:
            procs = [self._proc]
        for p in procs:
            try:
                total += p.memory_info().rss
            except self._psutil.Error:
                pass
        mb = total / 2**20
        self.peak_mb = max(self.peak_mb, mb)
        self.run_peak_mb = max(self.run_peak_mb, mb)
        try:
            self.driver_peak_mb = max(self.driver_peak_mb, self._proc.memory_info().rss / 2**20)
        except self._psutil.Error:
            pass
        return mb

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def reset(self) -> None:
        self.driver_peak_mb = 0.0
        self.peak_mb = self.sample()

    def __enter__(self) -> TreeRss:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# ------------------------------------------------------------------ task functions (run by an engine)


def sign_task(task: dict[str, Any]) -> dict[str, Any]:
    """Signatures of one block of documents (step ``signatures``).

    Reads the block's lines, checks and normalizes each record (:func:`parse_record`), computes its
    exact key, its shingle hashes (:func:`~domainlm.korean.hangul.shingle_hashes_many`), its MinHash
    signature and band keys, and writes: ``blocks/<k>.parquet`` (``doc`` int64, ``id`` string,
    ``exact_hi``/``exact_lo`` uint64), the signature rows into ``signatures.u32`` and the band keys
    into ``band_keys.u64`` at the block's document offset.
    """
    work = Path(task["work"])
    out = work / "blocks" / f"{task['block']:06d}.parquet"
    if out.exists():
        return {"docs": task["stop"] - task["start"], "skipped": 1}
    t0 = time.perf_counter()
    offsets = np.load(work / "doc_offset.npy", mmap_mode="r")[task["start"] : task["stop"]]
    lengths = np.load(work / "doc_length.npy", mmap_mode="r")[task["start"] : task["stop"]]
    lines = read_lines(task["path"], offsets, lengths)
    ids, norms, his, los = [], [], [], []
    for k, line in enumerate(lines):
        rec, norm, key = parse_record(line, task["path"], task["first_line"] + k, task["domain"])
        ids.append(rec["id"])
        norms.append(norm)
        his.append(int.from_bytes(key[:8], "big"))
        los.append(int.from_bytes(key[8:], "big"))
    docs = np.arange(task["start"], task["stop"], dtype=np.int64)
    perms = (np.asarray(task["perm_a"], np.uint32), np.asarray(task["perm_b"], np.uint32))
    sigs = np.empty((len(docs), task["num_perm"]), dtype=np.uint32)
    shingles = 0
    for s in range(0, len(docs), SIGN_BATCH):  # bounded scratch: the shingle arrays of SIGN_BATCH texts
        # jamo and word shingles signed in turn into the same rows (the MinHash of their union); repeats
        # kept, they do not change a minimum
        jamo, jb, words, wb = shingle_id_parts_many(norms[s : s + SIGN_BATCH])
        part = mh.signatures(to_hash32(jamo), jb, perms)
        sigs[s : s + SIGN_BATCH] = mh.signatures(to_hash32(words), wb, perms, out=part)
        shingles += int(jb[-1] + wb[-1])
    del norms
    keys = mh.band_keys(sigs, task["bands"], task["rows"], docs)
    fd = os.open(work / "signatures.u32", os.O_WRONLY)
    try:
        os.pwrite(fd, sigs.tobytes(), task["start"] * task["num_perm"] * 4)
    finally:
        os.close(fd)
    fd = os.open(work / "band_keys.u64", os.O_WRONLY)
    try:
        for j in range(task["bands"]):
            os.pwrite(fd, np.ascontiguousarray(keys[:, j]).tobytes(), (j * task["n"] + task["start"]) * 8)
    finally:
        os.close(fd)
    table = pa.table(
        {
            "doc": docs,
            "id": pa.array(ids, pa.string()),
            "exact_hi": np.array(his, dtype=np.uint64),
            "exact_lo": np.array(los, dtype=np.uint64),
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, out)
    return {"docs": len(docs), "shingles": shingles, "seconds": time.perf_counter() - t0, "skipped": 0}


def candidates_task(task: dict[str, Any]) -> dict[str, Any]:
    """Candidate pairs of one band (step ``candidates``): the band's keys of the exact keepers,
    grouped by sorting (:func:`~domainlm.dedup.minhash_lsh.bucket_pairs`); writes ``bands/<j>.npy``."""
    work = Path(task["work"])
    out = work / "bands" / f"{task['band']:04d}.npy"
    meta = out.with_suffix(".json")
    if out.exists() and meta.exists():
        return {**json.loads(meta.read_text()), "skipped": 1}
    n = task["n"]
    keys = np.fromfile(work / "band_keys.u64", dtype=np.uint64, count=n, offset=task["band"] * n * 8)
    keeper_of = np.load(work / "keeper_of.npy", mmap_mode="r")
    docs = np.flatnonzero(keeper_of == np.arange(n))
    pairs, oversized = mh.bucket_pairs(keys[docs], docs, task["max_bucket"])
    save_npy(out, pairs)
    stats = {
        "pairs": int(len(pairs)),
        "oversized_buckets": len(oversized),
        "largest_oversized_bucket": int(max(oversized, default=0)),
        "skipped": 0,
    }
    save_json(meta, stats)
    return stats


def read_rows(path: Path, rows: np.ndarray, width: int) -> np.ndarray:
    """Rows ``rows`` (ascending, distinct) of the row-major ``uint32`` file of ``width`` columns at ``path``.

    Runs of consecutive rows are read with one ``os.preadv`` each, straight into the result. Not a
    memory map: faulting in scattered rows of a mapped file maps the pages around each one too, and
    a few thousand scattered rows then add hundreds of MiB to the resident set.

    Returns:
        ``uint32`` array of shape ``(len(rows), width)``.
    """
    out = np.empty((len(rows), width), dtype=np.uint32)
    if not len(rows):
        return out
    row_bytes = width * 4
    view = memoryview(out).cast("B")
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [len(rows)]))
    fd = os.open(path, os.O_RDONLY)
    try:
        for s, e in zip(starts.tolist(), stops.tolist()):
            want = (e - s) * row_bytes
            got = os.preadv(fd, [view[s * row_bytes : e * row_bytes]], int(rows[s]) * row_bytes)
            if got != want:
                raise OSError(f"{path}: short read ({got} of {want} bytes at row {int(rows[s])})")
    finally:
        os.close(fd)
    return out


def estimate_task(task: dict[str, Any]) -> dict[str, Any]:
    """Signature-estimated Jaccard of one chunk of candidate pairs (step ``estimate``); the pairs at or
    above the floor (:func:`~domainlm.dedup.minhash_lsh.estimate_floor`) go to ``estimate/<k>.npz``."""
    work = Path(task["work"])
    out = work / "estimate" / f"{task['chunk']:06d}.npz"
    if out.exists():
        with np.load(out) as z:
            return {"pairs": task["stop"] - task["start"], "kept": int(len(z["pairs"])), "skipped": 1}
    packed = np.load(work / "candidates.npy", mmap_mode="r")[task["start"] : task["stop"]]
    kept_pairs, kept_est = [], []
    for s in range(0, len(packed), 4096):  # 4096 pairs: at most 8192 signature rows held at once
        part = np.asarray(packed[s : s + 4096])
        a, b = mh.unpack_pairs(part)
        rows, inverse = np.unique(np.concatenate((a, b)), return_inverse=True)
        sig = read_rows(work / "signatures.u32", rows, task["num_perm"])
        est = mh.estimated_jaccard(sig[inverse[: len(a)]], sig[inverse[len(a) :]])
        keep = est >= task["floor"]
        kept_pairs.append(part[keep])
        kept_est.append(est[keep])
    pairs = np.concatenate(kept_pairs) if kept_pairs else np.empty(0, np.uint64)
    save_npz(out, pairs=pairs, est=np.concatenate(kept_est) if kept_est else np.empty(0))
    return {"pairs": len(packed), "kept": int(len(pairs)), "skipped": 0}


def shingle_sets(work: Path, docs: np.ndarray, inputs: Sequence[dict[str, Any]]) -> dict[int, np.ndarray]:
    """Exact shingle sets (sorted unique ``uint64``, :func:`~domainlm.korean.hangul.shingle_ids`) of
    the given documents, re-read from the input files by offset and re-shingled."""
    doc_file = np.load(work / "doc_file.npy", mmap_mode="r")
    offsets = np.load(work / "doc_offset.npy", mmap_mode="r")
    lengths = np.load(work / "doc_length.npy", mmap_mode="r")
    docs = np.unique(docs)
    sets: dict[int, np.ndarray] = {}
    files = np.asarray(doc_file[docs])
    for f in np.unique(files).tolist():
        mine = docs[files == f]
        spec = inputs[f]
        for doc, line in zip(mine.tolist(), read_lines(spec["path"], offsets[mine], lengths[mine])):
            _, norm, _ = parse_record(line, spec["path"], doc - spec["first_doc"] + 1, spec["domain"])
            sets[doc] = unique_sorted(raw_shingle_ids(norm))
    return sets


def verify_task(task: dict[str, Any]) -> dict[str, Any]:
    """Exact Jaccard of one chunk of pairs (step ``verify``): re-shingles only the documents in them.

    Writes ``<task['folder']>/<k>.npz``: ``pairs`` (packed), ``jaccard`` (float64), ``docs`` and
    ``shingles`` (the distinct-shingle count of every document in the chunk, int64).
    """
    work = Path(task["work"])
    out = work / task["folder"] / f"{task['chunk']:06d}.npz"
    if out.exists():
        return {"pairs": task["stop"] - task["start"], "skipped": 1}
    with np.load(work / task["pairs_file"]) as z:
        packed = z["pairs"][task["start"] : task["stop"]]
    a, b = mh.unpack_pairs(packed)
    sets = shingle_sets(work, np.concatenate((a, b)), task["inputs"])
    jac = np.array([mh.jaccard(sets[i], sets[j]) for i, j in zip(a.tolist(), b.tolist())], dtype=np.float64)
    docs = np.array(sorted(sets), dtype=np.int64)
    save_npz(
        out,
        pairs=packed,
        jaccard=jac,
        docs=docs,
        shingles=np.array([len(sets[d]) for d in docs.tolist()], dtype=np.int64),
    )
    return {"pairs": int(len(packed)), "docs": int(len(docs)), "skipped": 0}


# ------------------------------------------------------------------ the driver


@dataclass
class DedupOutcome:
    """What :func:`run_workflow` decided; document indices are global (inputs in domain order, then line order).

    Attributes:
        ids: every document's id (``pa.Array`` of strings). domains: every input's domain, in order.
        doc_domain: ``int32`` input index of every document. inputs: per input ``path``, ``domain``,
            ``first_doc``, ``docs``. removed: removal rows (:func:`~domainlm.dedup.minhash_lsh.removal_rows`).
        removed_mask: ``bool`` per document. checked: per exactly verified pair ``(a, b, estimated, exact)``.
        counts: per-domain counts. banding: :func:`~domainlm.dedup.minhash_lsh.banding_report` plus the
            background summary. stats: counts and per-step rows/seconds/peak memory.
    """

    ids: pa.Array
    domains: list[str]
    doc_domain: np.ndarray
    inputs: list[dict[str, Any]]
    removed: list[dict[str, Any]]
    removed_mask: np.ndarray
    checked: dict[str, np.ndarray]
    counts: dict[str, dict[str, int]]
    banding: dict[str, Any]
    stats: dict[str, Any] = field(default_factory=dict)


def _block_docs(n: int) -> int:
    """Documents per signature task: about 64 tasks, between 256 and 4096 documents each (a function
    of the corpus size only, so a resumed run splits the same way whatever its engine or workers)."""
    return int(min(4096, max(256, math.ceil(n / 64))))


def _chunks(total: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, total)) for s in range(0, total, size)]


class Workflow:
    """One dedup run: the named steps in order, each skipped when the work folder already holds it.

    Args:
        inputs: ``(domain, path)`` per input JSONL file, in output order.
        params: the algorithm's parameters. engine: a :mod:`~domainlm.dedup.engines` engine (entered).
        work_root: the work folder root (``dedup.work_dir``); a sub-folder per fingerprint.
        rss: the process-tree memory sampler (per-step peaks).
    """

    def __init__(
        self,
        inputs: Sequence[tuple[str, str]],
        params: DedupParams,
        engine,
        work_root: str | os.PathLike,
        rss: TreeRss | None = None,
        pair_chunk: int = 65536,
        verify_chunk: int = 2048,
    ):
        params.check()
        self.inputs = [(d, str(p)) for d, p in inputs]
        for _, path in self.inputs:
            if not Path(path).exists():
                raise FileNotFoundError(f"{path} not found: the dedup stage reads the validate stage's output")
        self.params = params
        self.engine = engine
        self.work = WorkDir(work_root, fingerprint(self.inputs, params))
        self.rss = rss
        self.pair_chunk = pair_chunk
        self.verify_chunk = verify_chunk
        self.step_stats: dict[str, dict[str, Any]] = {}
        self.resumed: list[str] = []

    # -- step bookkeeping
    def _step(self, name: str, fn) -> dict[str, Any]:
        done = self.work.done(name)
        if done is not None:
            self.resumed.append(name)
            self.step_stats[name] = {**done, "resumed": 1}
            return done
        if self.rss:
            self.rss.reset()
        t0 = time.perf_counter()
        stats = fn()
        stats = {
            **stats,
            "seconds": time.perf_counter() - t0,
            "peak_rss_mb": self.rss.peak_mb if self.rss else 0.0,
            "driver_peak_rss_mb": self.rss.driver_peak_mb if self.rss else 0.0,
            "resumed": 0,
        }
        self.work.mark(name, stats)
        self.step_stats[name] = stats
        _log.info(
            "step %s: %s",
            name,
            {
                k: (round(v, 3) if isinstance(v, float) else v)
                for k, v in stats.items()
                if not isinstance(v, (dict, list))
            },
        )
        return stats

    @property
    def path(self) -> Path:
        return self.work.path

    # -- steps
    def _index(self) -> dict[str, Any]:
        files, offs, lens = [], [], []
        for f, (_domain, path) in enumerate(self.inputs):
            o, l_ = line_offsets(path)
            files.append(np.full(len(o), f, dtype=np.int32))
            offs.append(o)
            lens.append(l_)
        save_npy(self.work.file("doc_file.npy"), np.concatenate(files) if files else np.empty(0, np.int32))
        save_npy(self.work.file("doc_offset.npy"), np.concatenate(offs) if offs else np.empty(0, np.int64))
        save_npy(self.work.file("doc_length.npy"), np.concatenate(lens) if lens else np.empty(0, np.int64))
        per_file = [int(len(o)) for o in offs]
        return {"rows": int(sum(per_file)), "per_input": per_file}

    def _load_index(self) -> None:
        self.doc_file = np.load(self.path / "doc_file.npy")
        self.n = int(len(self.doc_file))
        per_input = np.bincount(self.doc_file, minlength=len(self.inputs)).tolist()
        first = np.concatenate(([0], np.cumsum(per_input)[:-1])).tolist() if per_input else []
        self.input_specs = [
            {"path": p, "domain": d, "first_doc": int(first[f]), "docs": int(per_input[f])}
            for f, (d, p) in enumerate(self.inputs)
        ]

    def _background(self) -> dict[str, Any]:
        p = self.params
        rng = np.random.default_rng(p.seed)
        k = min(self.n, p.background_docs)
        sample = np.sort(rng.choice(self.n, size=k, replace=False)) if k else np.empty(0, np.int64)
        sets = shingle_sets(self.path, sample, self.input_specs)
        docs = sample.tolist()
        pairs = mh.sample_pairs(k, p.background_pairs, p.seed)
        bg = np.array([mh.jaccard(sets[docs[i]], sets[docs[j]]) for i, j in pairs.tolist()], dtype=np.float64)
        save_npy(self.work.file("background.npy"), bg)
        bands, rows = mh.choose_bands_rows(p.num_perm, p.threshold, p.min_recall, bg)
        report = mh.banding_report(p.num_perm, p.threshold, bands, rows, bg, self.n)
        report["background"] = mh.background_summary(bg)
        report["background"]["docs"] = int(k)
        per_doc_rate = 2.0 * p.max_false_candidates_per_doc / max(self.n - 1, 1)
        if report["expected_false_candidate_pairs_per_doc"] > p.max_false_candidates_per_doc:
            advice = mh.num_perm_for(per_doc_rate, p.threshold, p.min_recall, bg)
            _log.warning(
                "banding %d x %d expects %.1f false candidate pairs per document at %d documents "
                "(dedup.max_false_candidates_per_doc = %s); dedup.num_perm: %s would keep it under",
                bands,
                rows,
                report["expected_false_candidate_pairs_per_doc"],
                self.n,
                p.max_false_candidates_per_doc,
                advice,
            )
        save_json(self.work.file("banding.json"), report)
        return {"rows": int(len(bg)), "bands": bands, "banding_rows": rows}

    def _signatures(self) -> dict[str, Any]:
        p, n = self.params, self.n
        for name, width in (("signatures.u32", p.num_perm * 4), ("band_keys.u64", self.banding["bands"] * 8)):
            path = self.work.file(name)
            if not path.exists() or path.stat().st_size != n * width:
                with open(path, "wb") as fh:
                    fh.truncate(n * width)
        block = _block_docs(n)
        perm_a, perm_b = mh.permutations(p.num_perm, p.seed)
        tasks = []
        for spec in self.input_specs:
            for s, e in _chunks(spec["docs"], block):
                tasks.append(
                    {
                        "work": str(self.path),
                        "block": len(tasks),
                        "path": spec["path"],
                        "domain": spec["domain"],
                        "start": spec["first_doc"] + s,
                        "stop": spec["first_doc"] + e,
                        "first_line": s + 1,
                        "n": n,
                        "num_perm": p.num_perm,
                        "perm_a": perm_a,
                        "perm_b": perm_b,
                        "bands": self.banding["bands"],
                        "rows": self.banding["rows"],
                    }
                )
        results = self.engine.map(sign_task, tasks, "dedup: shingles + MinHash", inline=n < INLINE_DOCS)
        return {
            "rows": n,
            "tasks": len(tasks),
            "block_docs": block,
            "shingles": int(sum(r.get("shingles", 0) for r in results)),
        }

    def _ids(self) -> pa.Array:
        files = sorted((self.path / "blocks").glob("*.parquet"))
        table = (
            pa.concat_tables([pq.read_table(f, columns=["doc", "id", "exact_hi", "exact_lo"]) for f in files])
            if files
            else pa.table(
                {
                    "doc": pa.array([], pa.int64()),
                    "id": pa.array([], pa.string()),
                    "exact_hi": pa.array([], pa.uint64()),
                    "exact_lo": pa.array([], pa.uint64()),
                }
            )
        )
        order = np.argsort(table["doc"].to_numpy())
        return table.take(order)

    def _exact(self) -> dict[str, Any]:
        table = self._ids()
        ids = table["id"].combine_chunks()
        id_order = pc.sort_indices(ids).to_numpy()
        sorted_ids = ids.take(pa.array(id_order))
        if len(sorted_ids) > 1:
            same = pc.equal(sorted_ids.slice(1), sorted_ids.slice(0, len(sorted_ids) - 1)).to_numpy(
                zero_copy_only=False
            )
            if same.any():
                raise ValueError(
                    f"duplicate document id {sorted_ids[int(np.argmax(same))].as_py()!r}: "
                    "ids must be unique across all domains"
                )
        rank = np.empty(len(id_order), dtype=np.int64)
        rank[id_order] = np.arange(len(id_order))
        keeper_of = mh.exact_keepers(table["exact_hi"].to_numpy(), table["exact_lo"].to_numpy(), rank)
        save_npy(self.work.file("keeper_of.npy"), keeper_of)
        save_npy(self.work.file("id_rank.npy"), rank)
        keepers = int((keeper_of == np.arange(self.n)).sum())
        return {"rows": self.n, "keepers": keepers, "exact_duplicates": self.n - keepers}

    def _candidates(self) -> dict[str, Any]:
        p, bands = self.params, self.banding["bands"]
        if p.lsh_backend == "redis":
            from domainlm.dedup.redis_index import redis_band_pairs

            results = redis_band_pairs(self.path, self.n, self.banding, p)
        else:
            tasks = [
                {"work": str(self.path), "band": j, "n": self.n, "max_bucket": p.max_bucket_size} for j in range(bands)
            ]
            results = self.engine.map(candidates_task, tasks, "dedup: band buckets", inline=self.n < 10 * INLINE_DOCS)
        parts = [np.load(self.path / "bands" / f"{j:04d}.npy") for j in range(bands)]
        pairs = np.unique(np.concatenate(parts)) if parts else np.empty(0, np.uint64)
        del parts
        save_npy(self.work.file("candidates.npy"), pairs)
        keepers = int(self.step_stats["exact"]["keepers"])
        return {
            "rows": int(len(pairs)),
            "band_pairs": int(sum(r["pairs"] for r in results)),
            "candidate_pairs_per_doc": len(pairs) / keepers if keepers else 0.0,
            "oversized_buckets": int(sum(r["oversized_buckets"] for r in results)),
            "largest_oversized_bucket": int(max((r["largest_oversized_bucket"] for r in results), default=0)),
        }

    def _estimate(self) -> dict[str, Any]:
        p = self.params
        total = int(np.load(self.path / "candidates.npy", mmap_mode="r").shape[0])
        floor = mh.estimate_floor(p.threshold, p.num_perm, p.estimate_sigmas)
        tasks = [
            {
                "work": str(self.path),
                "chunk": k,
                "start": s,
                "stop": e,
                "n": self.n,
                "num_perm": p.num_perm,
                "floor": floor,
            }
            for k, (s, e) in enumerate(_chunks(total, self.pair_chunk))
        ]
        self.engine.map(estimate_task, tasks, "dedup: estimated Jaccard", inline=total < 10 * INLINE_DOCS)
        pairs, est = [], []
        for k in range(len(tasks)):
            with np.load(self.path / "estimate" / f"{k:06d}.npz") as z:
                pairs.append(z["pairs"])
                est.append(z["est"])
        pairs_a = np.concatenate(pairs) if pairs else np.empty(0, np.uint64)
        est_a = np.concatenate(est) if est else np.empty(0)
        save_npz(self.work.file("estimated.npz"), pairs=pairs_a, est=est_a)
        return {"rows": total, "kept": int(len(pairs_a)), "estimate_floor": floor}

    def _verify_pairs(self, pairs_file: str, folder: str, count: int, desc: str) -> tuple[np.ndarray, ...]:
        tasks = [
            {
                "work": str(self.path),
                "chunk": k,
                "start": s,
                "stop": e,
                "pairs_file": pairs_file,
                "folder": folder,
                "inputs": self.input_specs,
            }
            for k, (s, e) in enumerate(_chunks(count, self.verify_chunk))
        ]
        self.engine.map(verify_task, tasks, desc, inline=count < INLINE_DOCS // 4)
        pairs, jac, docs, counts = [], [], [], []
        for k in range(len(tasks)):
            with np.load(self.path / folder / f"{k:06d}.npz") as z:
                pairs.append(z["pairs"])
                jac.append(z["jaccard"])
                docs.append(z["docs"])
                counts.append(z["shingles"])
        cat = lambda xs, dt: np.concatenate(xs) if xs else np.empty(0, dt)  # noqa: E731
        return cat(pairs, np.uint64), cat(jac, np.float64), cat(docs, np.int64), cat(counts, np.int64)

    def _verify(self) -> dict[str, Any]:
        with np.load(self.path / "estimated.npz") as z:
            count = len(z["pairs"])
        pairs, jac, docs, counts = self._verify_pairs("estimated.npz", "verify", count, "dedup: verify")
        uniq, first = np.unique(docs, return_index=True)
        save_npz(self.work.file("verified.npz"), pairs=pairs, jaccard=jac, docs=uniq, shingles=counts[first])
        return {"rows": count, "verified": int((jac >= self.params.threshold).sum()), "docs": int(len(uniq))}

    def _cluster(self) -> dict[str, Any]:
        t = self.params.threshold
        with np.load(self.path / "verified.npz") as z:
            pairs, jac, docs, counts = z["pairs"], z["jaccard"], z["docs"], z["shingles"]
        a, b = mh.unpack_pairs(pairs[jac >= t])
        clusters = mh.cluster(zip(a.tolist(), b.tolist()))
        shingle_counts = dict(zip(docs.tolist(), counts.tolist()))
        ids = self._ids()["id"].combine_chunks()
        id_of = _IdLookup(ids)
        representative = mh.choose_representatives(clusters, shingle_counts, id_of)
        # exact Jaccard of every clustered non-representative to its representative
        known = dict(zip(pairs.tolist(), jac.tolist()))
        need = sorted({(min(k, r) << 32) | max(k, r) for k, r in representative.items() if k != r})
        missing = np.array([q for q in need if q not in known], dtype=np.uint64)
        save_npz(self.work.file("rep_pairs.npz"), pairs=missing)
        if len(missing):
            mp_, mj, _, _ = self._verify_pairs("rep_pairs.npz", "rep_jaccard", len(missing), "dedup: representatives")
            known.update(zip(mp_.tolist(), mj.tolist()))
        rep_jaccard = {}
        for k, r in representative.items():
            if k != r:
                q = (min(k, r) << 32) | max(k, r)
                rep_jaccard[k] = known[q]
        keeper_of = np.load(self.path / "keeper_of.npy")
        doc_domain_names = _DomainLookup(self.doc_file, [d for d, _ in self.inputs])
        removed = mh.removal_rows(id_of, doc_domain_names, keeper_of, representative, rep_jaccard)
        save_json(self.work.file("removed.json"), removed)
        sizes: dict[int, int] = {}
        for row in removed:
            sizes[row["cluster_id"]] = sizes.get(row["cluster_id"], 0) + 1
        return {
            "rows": int(len(a)),
            "clusters": len(sizes),
            "largest_cluster": max(sizes.values(), default=-1) + 1,
            "near_clusters": len(clusters),
            "rep_pairs_verified": int(len(missing)),
            "removed": len(removed),
        }

    def run(self) -> DedupOutcome:
        """Run every step not yet in the work folder; return the :class:`DedupOutcome`.

        Raises:
            ValueError: on a bad record (naming file and line or id), a duplicate id, bad params.
            FileNotFoundError: when an input file is missing.
        """
        resuming = self.work.prepare()
        if resuming:
            _log.info("resuming from %s", self.path)
        self._step("index", self._index)
        self._load_index()
        self._step("background", self._background)
        self.banding = json.loads((self.path / "banding.json").read_text())
        self._step("signatures", self._signatures)
        self._step("exact", self._exact)
        self._step("candidates", self._candidates)
        self._step("estimate", self._estimate)
        self._step("verify", self._verify)
        self._step("cluster", self._cluster)
        return self.outcome()

    def outcome(self) -> DedupOutcome:
        removed = json.loads((self.path / "removed.json").read_text())
        ids = self._ids()["id"].combine_chunks()
        removed_mask = np.zeros(self.n, dtype=bool)
        if removed:
            pos = {r["id"] for r in removed}
            removed_mask = pc.is_in(ids, value_set=pa.array(sorted(pos), pa.string())).to_numpy(zero_copy_only=False)
        with np.load(self.path / "estimated.npz") as z:
            est = dict(zip(z["pairs"].tolist(), z["est"].tolist()))
        with np.load(self.path / "verified.npz") as z:
            pairs, jac = z["pairs"], z["jaccard"]
        a, b = mh.unpack_pairs(pairs)
        checked = {
            "a": a,
            "b": b,
            "estimated": np.array([est[q] for q in pairs.tolist()], dtype=np.float64),
            "jaccard": jac,
        }
        domains = [d for d, _ in self.inputs]
        before = {d: 0 for d in domains}
        for spec in self.input_specs:
            before[spec["domain"]] += spec["docs"]
        counts = mh.domain_counts(domains, before, removed)
        stats = {
            k: v
            for s in ("exact", "candidates", "estimate", "verify", "cluster")
            for k, v in self.step_stats.get(s, {}).items()
            if k not in ("seconds", "peak_rss_mb", "resumed", "rows")
        }
        stats["candidate_pairs"] = int(self.step_stats["candidates"]["rows"])
        stats["estimate_kept_pairs"] = int(self.step_stats["estimate"]["kept"])
        stats["verified_pairs"] = int(self.step_stats["verify"]["verified"])
        stats["steps"] = {
            s: {k: v for k, v in self.step_stats[s].items() if isinstance(v, (int, float))}
            for s in STEPS
            if s in self.step_stats
        }
        stats["resumed_steps"] = list(self.resumed)
        return DedupOutcome(
            ids, domains, self.doc_file, self.input_specs, removed, removed_mask, checked, counts, self.banding, stats
        )


class _IdLookup:
    """``ids[k]`` → the Python string of document ``k`` (from an Arrow array, without a list of n strings)."""

    def __init__(self, ids: pa.Array):
        self._ids = ids

    def __getitem__(self, k: int) -> str:
        return self._ids[int(k)].as_py()

    def __len__(self) -> int:
        return len(self._ids)


class _DomainLookup:
    """``domains[k]`` → the domain name of document ``k`` (from its input index)."""

    def __init__(self, doc_file: np.ndarray, names: Sequence[str]):
        self._doc_file, self._names = doc_file, list(names)

    def __getitem__(self, k: int) -> str:
        return self._names[int(self._doc_file[int(k)])]

    def __len__(self) -> int:
        return len(self._doc_file)
