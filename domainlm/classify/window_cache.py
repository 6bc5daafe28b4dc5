"""The classifier's token windows on disk: one split's documents tokenized once, streamed from its Parquet files in
bounded batches, and written as memory-mapped Arrow IPC files (the format Hugging Face ``datasets`` caches in), so
that training, validation, prediction and the token statistics read windows without holding a split in memory.

A cache folder holds two Arrow IPC files and a manifest:

- ``windows.arrow``: one row per window, ``input_ids`` (``list<int32>``: at most ``max_length`` ids, EOS last), the
  windows of :func:`domainlm.classify.model.window_spans` in document order;
- ``docs.arrow``: one row per document of the split files, in file order (the domains as given, then file rows):
  ``id`` (string), ``domain`` (string), ``n_tokens`` (int32, the document's tokens before windowing, no special
  tokens), ``first_window`` (int64, its first row in ``windows.arrow``) and ``n_windows`` (int32, ≥ 1);
- ``manifest.json``: the settings and the key.

The folder is named by :func:`cache_key`, a SHA-256 of the split files' bytes, the tokenizer's files and the window
settings, so a cache is built once and reused by every gate attempt and every later run on the same data; a change
of any of them builds a new one. A cache is written to a temporary folder and renamed into place: a killed build
never looks finished.

Both :class:`WindowCache` (on disk) and :class:`InMemoryWindows` (the windows of a list of texts) answer the same
questions (:class:`WindowSource`), so the training datasets and :func:`domainlm.classify.model.predict_windows`
read either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from domainlm.common.paths import SPLITS, split_path

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: Where train_classifier keeps its caches (relative to the repository root; derived data, not a pipeline output).
DEFAULT_CACHE_DIR = Path(".cache/classifier_windows")
WINDOWS_FILE = "windows.arrow"
DOCS_FILE = "docs.arrow"
MANIFEST_FILE = "manifest.json"
WINDOWS_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32()))])
DOCS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("domain", pa.string()),
        ("n_tokens", pa.int32()),
        ("first_window", pa.int64()),
        ("n_windows", pa.int32()),
    ]
)
#: Files of a tokenizer folder that define its ids (the rest of an HF folder is the model).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


class WindowSource(Protocol):
    """Per-document token windows, indexed by document (``0 … len − 1``)."""

    n_windows: np.ndarray  # int32 [n_docs], ≥ 1

    def __len__(self) -> int: ...

    def window(self, doc: int, k: int) -> list[int]:
        """Document ``doc``'s ``k``-th window (int ids)."""
        ...

    def window_length(self, doc: int, k: int) -> int:
        """Tokens in document ``doc``'s ``k``-th window."""
        ...


class InMemoryWindows:
    """:class:`WindowSource` over windows held in lists: ``windows[d]`` is document ``d``'s windows
    (:func:`domainlm.classify.model.encode_windows`)."""

    def __init__(self, windows: Sequence[Sequence[Sequence[int]]]):
        self.windows = [[list(w) for w in doc] for doc in windows]
        self.n_windows = np.asarray([len(doc) for doc in self.windows], dtype=np.int32)

    def __len__(self) -> int:
        return len(self.windows)

    def window(self, doc: int, k: int) -> list[int]:
        return self.windows[doc][k]

    def window_length(self, doc: int, k: int) -> int:
        return len(self.windows[doc][k])


class WindowCache:
    """:class:`WindowSource` over a cache folder (see the module docstring), memory-mapped: opening it reads the
    per-document columns (17 bytes a document) and maps the windows, whose pages the OS loads when read.

    Attributes:
        folder: the cache folder.
        manifest: its ``manifest.json`` (``max_length``, ``max_windows``, ``docs``, ``windows``, ``key``, …).
        n_windows, first_window, n_tokens: numpy arrays ``[n_docs]`` (int32, int64, int32).
        domains: the document's domain, numpy object array ``[n_docs]``.

    Raises:
        FileNotFoundError: the folder lacks one of its files (an unfinished build is never renamed into place).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        for name in (WINDOWS_FILE, DOCS_FILE, MANIFEST_FILE):
            if not (self.folder / name).is_file():
                raise FileNotFoundError(f"window cache {self.folder} has no {name}")
        self.manifest = json.loads((self.folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        docs = pa.ipc.open_file(pa.memory_map(str(self.folder / DOCS_FILE))).read_all()
        self._docs = docs
        self.n_windows = docs["n_windows"].to_numpy().astype(np.int32, copy=False)
        self.first_window = docs["first_window"].to_numpy().astype(np.int64, copy=False)
        self.n_tokens = docs["n_tokens"].to_numpy().astype(np.int32, copy=False)
        self.domains = docs["domain"].to_numpy(zero_copy_only=False)
        column = pa.ipc.open_file(pa.memory_map(str(self.folder / WINDOWS_FILE))).read_all()["input_ids"]
        self._chunk_start = np.cumsum([0] + [len(c) for c in column.chunks], dtype=np.int64)
        self._offsets = [c.offsets.to_numpy() for c in column.chunks]  # zero-copy views of the mapped file
        self._values = [c.values.to_numpy() for c in column.chunks]

    def __len__(self) -> int:
        return len(self.n_windows)

    @property
    def ids(self) -> list[str]:
        """The documents' ids, in order (a list of ``len(self)`` str)."""
        return self._docs["id"].to_pylist()

    def _row(self, row: int) -> tuple[int, int]:
        c = int(np.searchsorted(self._chunk_start, row, side="right")) - 1
        return c, row - int(self._chunk_start[c])

    def window(self, doc: int, k: int) -> list[int]:
        c, j = self._row(int(self.first_window[doc]) + int(k))
        o = self._offsets[c]
        return self._values[c][o[j] : o[j + 1]].tolist()

    def window_length(self, doc: int, k: int) -> int:
        c, j = self._row(int(self.first_window[doc]) + int(k))
        o = self._offsets[c]
        return int(o[j + 1] - o[j])

    def doc_windows(self, doc: int) -> list[list[int]]:
        """All windows of document ``doc``."""
        return [self.window(doc, k) for k in range(int(self.n_windows[doc]))]


def tokenizer_sha256(tokenizer_dir: str | os.PathLike) -> str:
    """SHA-256 over the files of ``tokenizer_dir`` that define the tokenizer (:data:`TOKENIZER_FILES`, those present;
    names and bytes, hex). Raises FileNotFoundError when none is there."""
    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        path = Path(tokenizer_dir) / name
        if path.is_file():
            found = True
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    if not found:
        raise FileNotFoundError(f"{tokenizer_dir}: none of the tokenizer files {TOKENIZER_FILES}")
    return h.hexdigest()


def cache_key(
    files: Sequence[tuple[str, str | os.PathLike]],
    tokenizer_dir: str | os.PathLike,
    *,
    max_length: int,
    max_windows: int,
) -> str:
    """The cache folder's name: SHA-256 (hex, first 32 characters) over the format version, the window settings, the
    tokenizer (:func:`tokenizer_sha256`) and each ``(domain, parquet file)``'s domain and bytes, in order."""
    h = hashlib.sha256(
        json.dumps(
            {
                "format": FORMAT_VERSION,
                "max_length": int(max_length),
                "max_windows": int(max_windows),
                "tokenizer": tokenizer_sha256(tokenizer_dir),
            },
            sort_keys=True,
        ).encode()
    )
    for domain, path in files:
        h.update(str(domain).encode("utf-8") + b"\0")
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:32]


def build_window_cache(
    tokenizer,
    files: Sequence[tuple[str, str | os.PathLike]],
    out_dir: str | os.PathLike,
    *,
    max_length: int,
    max_windows: int,
    batch_docs: int = 1024,
    key: str = "",
    desc: str = "token windows",
) -> WindowCache:
    """Tokenize every document of ``files`` into windows, ``batch_docs`` documents at a time, and write the cache
    folder ``out_dir`` (through a temporary folder beside it, renamed at the end).

    Args:
        tokenizer: a transformers tokenizer with a pad token.
        files: ``(domain, path)`` of Parquet files with ``id`` and ``text`` columns, in order.
        out_dir: the cache folder to create; when it already exists (another process built it first), it is kept
            and this build is discarded.
        max_length, max_windows: as :func:`domainlm.classify.model.encode_windows`.
        batch_docs: documents read, tokenized and written at a time (memory grows with it, not with the split).
        key: recorded in the manifest.

    Returns:
        The opened :class:`WindowCache`.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: bad ``max_length``/``max_windows``, or the tokenizer has no pad token.
    """
    from domainlm.classify.model import encode_windows

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for _, path in files:
        if not Path(path).is_file():
            raise FileNotFoundError(f"split file {path} not found (run `dvc repro split` first)")
    total = sum(pq.ParquetFile(path).metadata.num_rows for _, path in files)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    n_docs = n_win = 0
    try:
        with (
            pa.OSFile(str(tmp / WINDOWS_FILE), "wb") as wsink,
            pa.OSFile(str(tmp / DOCS_FILE), "wb") as dsink,
            pa.ipc.new_file(wsink, WINDOWS_SCHEMA) as wwriter,
            pa.ipc.new_file(dsink, DOCS_SCHEMA) as dwriter,
            tqdm(total=total, desc=desc, unit="doc", leave=False) as bar,
        ):
            for domain, path in files:
                for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_docs, columns=["id", "text"]):
                    texts = batch.column("text").to_pylist()
                    windows, n_tokens = encode_windows(tokenizer, texts, max_length, max_windows, return_lengths=True)
                    counts = np.fromiter((len(w) for w in windows), dtype=np.int32, count=len(windows))
                    firsts = n_win + np.concatenate([[0], np.cumsum(counts[:-1], dtype=np.int64)])
                    flat = [w for doc in windows for w in doc]
                    wwriter.write_batch(
                        pa.record_batch([pa.array(flat, type=pa.list_(pa.int32()))], schema=WINDOWS_SCHEMA)
                    )
                    dwriter.write_batch(
                        pa.record_batch(
                            [
                                batch.column("id").cast(pa.string()),
                                pa.array([domain] * len(texts), type=pa.string()),
                                pa.array(n_tokens, type=pa.int32()),
                                pa.array(firsts, type=pa.int64()),
                                pa.array(counts, type=pa.int32()),
                            ],
                            schema=DOCS_SCHEMA,
                        )
                    )
                    n_docs += len(texts)
                    n_win += len(flat)
                    bar.update(len(texts))
        (tmp / MANIFEST_FILE).write_text(
            json.dumps(
                {
                    "format": FORMAT_VERSION,
                    "key": key,
                    "max_length": int(max_length),
                    "max_windows": int(max_windows),
                    "files": [[str(d), str(p)] for d, p in files],
                    "docs": n_docs,
                    "windows": n_win,
                    "build_s": round(time.perf_counter() - t0, 3),
                },
                indent=2,
            ),
            encoding="utf-8",
        )
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not (out_dir / MANIFEST_FILE).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same cache first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "window cache %s: %d documents, %d windows of <= %d tokens in %.1f s",
        out_dir.name,
        n_docs,
        n_win,
        max_length,
        time.perf_counter() - t0,
    )
    return WindowCache(out_dir)


def split_windows(
    tokenizer,
    tokenizer_dir: str | os.PathLike,
    split_dir: str | os.PathLike,
    domains: Sequence[str],
    split: str,
    cache_root: str | os.PathLike,
    *,
    max_length: int,
    max_windows: int,
    batch_docs: int = 1024,
) -> WindowCache:
    """The window cache of one split (``<split_dir>/<domain>/<split>.parquet`` over ``domains``, in order): opened
    from ``<cache_root>/<key>`` (:func:`cache_key`) when it exists, built first (:func:`build_window_cache`)
    otherwise. Its rows follow the split files, as :attr:`domainlm.classify.data.LabelledSplit.rows` counts them.

    Raises:
        ValueError: ``split`` is not one of train/val/test.
        FileNotFoundError: a split file is missing.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    files = [(d, split_path(split_dir, d, split)) for d in domains]
    for _, path in files:
        if not Path(path).is_file():
            raise FileNotFoundError(f"split file {path} not found (run `dvc repro split` first)")
    key = cache_key(files, tokenizer_dir, max_length=max_length, max_windows=max_windows)
    folder = Path(cache_root) / f"{split}-{key}"
    if (folder / MANIFEST_FILE).is_file():
        os.utime(folder)  # most recently used, for prune()
        log.info("window cache %s: reused (%s split)", folder.name, split)
        return WindowCache(folder)
    return build_window_cache(
        tokenizer,
        files,
        folder,
        max_length=max_length,
        max_windows=max_windows,
        batch_docs=batch_docs,
        key=key,
        desc=f"token windows ({split})",
    )


def prune(cache_root: str | os.PathLike, keep: int) -> list[Path]:
    """Remove all but the ``keep`` most recently used cache folders of ``cache_root``, and temporary folders of
    builds killed over an hour ago; return the folders removed."""
    root = Path(cache_root)
    if not root.is_dir():
        return []
    stale = time.time() - 3600  # a build of the last hour may still be running in another process
    leftovers = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".") and p.stat().st_mtime < stale]
    caches = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    removed = leftovers + caches[max(int(keep), 0) :]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
