"""Streaming JSON Lines I/O for local paths and ``s3://`` URIs (smart_open).

Readers yield one line at a time, so memory stays constant whatever the file size. Writers
go through :func:`domainlm.common.atomic.atomic_path`, so a crash never leaves a half-written file.
S3 endpoints other than AWS (MinIO, moto) are reached through the standard
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` environment variables, which boto3 reads.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from smart_open import open as sopen

from domainlm.common.atomic import atomic_path


def _s3_client():
    import boto3

    return boto3.client("s3")


def is_s3(uri: str) -> bool:
    """True for ``s3://bucket/key`` URIs."""
    return str(uri).startswith("s3://")


def expand_uris(pattern: str) -> list[str]:
    """Expand a local glob or an ``s3://bucket/prefix*`` glob into a sorted list of URIs.

    A pattern without wildcards is returned as is (a missing local file is then reported by
    the reader). S3 globs list the bucket under the literal prefix before the first wildcard.

    Raises:
        FileNotFoundError: when a pattern with wildcards matches nothing.
    """
    pattern = str(pattern)
    has_glob = any(c in pattern for c in "*?[")
    if not has_glob:
        return [pattern]
    if is_s3(pattern):
        bucket, _, key_glob = pattern[5:].partition("/")
        prefix = key_glob
        for i, c in enumerate(key_glob):
            if c in "*?[":
                prefix = key_glob[:i]
                break
        client = _s3_client()
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(o["Key"] for o in page.get("Contents", []) if fnmatch.fnmatchcase(o["Key"], key_glob))
        found = [f"s3://{bucket}/{k}" for k in sorted(keys)]
    else:
        found = sorted(glob.glob(pattern, recursive=True))
    if not found:
        raise FileNotFoundError(f"no input matches {pattern!r}")
    return found


def input_root(uri: str) -> str:
    """The folder (or file, or ``s3://`` prefix) a source URI reads from: the part before the first
    wildcard, cut back to its last ``/``. ``s3://b/news/*.jsonl`` → ``s3://b/news``; ``data/in/a.jsonl``
    → ``data/in/a.jsonl``; ``data/in/**/*.jsonl`` → ``data/in``."""
    uri = str(uri)
    cut = next((i for i, c in enumerate(uri) if c in "*?["), None)
    if cut is None:
        return uri.rstrip("/") or uri
    return uri[:cut].rsplit("/", 1)[0].rstrip("/")


def _transport_params(uri: str) -> dict[str, Any] | None:
    return {"client": _s3_client()} if is_s3(uri) else None


def iter_raw_lines(uri: str) -> Iterator[bytes]:
    """Yield the raw lines of ``uri`` as bytes, without the trailing newline.

    Bytes, not str: decoding is the caller's job, so one bad line is rejected alone rather than
    breaking the whole stream. ``.gz``/``.bz2``/``.zst`` files are decompressed by smart_open.
    A final line without a newline is still yielded.

    Raises:
        FileNotFoundError / OSError: when the file or object cannot be opened.
    """
    with sopen(uri, "rb", transport_params=_transport_params(uri)) as fh:
        for line in fh:
            if line.endswith(b"\n"):
                line = line[:-1]
            if line.endswith(b"\r"):
                line = line[:-1]
            yield line


def dumps(record: dict[str, Any]) -> str:
    """One JSONL line (no newline), UTF-8 text kept readable."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def write_records(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write ``records`` to ``path`` as JSONL, atomically. Returns the number written."""
    n = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(dumps(rec))
            fh.write("\n")
            n += 1
    return n


class JsonlWriters:
    """Several JSONL outputs written side by side (e.g. one per domain), all atomic.

    Use as a context manager: files appear under their final names only if the block exits
    without an exception. ``write(key, record)`` opens ``path_for(key)`` on first use.
    """

    def __init__(self, path_for):
        self._path_for = path_for
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def __enter__(self) -> JsonlWriters:
        self._stack.__enter__()
        return self

    def write(self, key: str, record: dict[str, Any]) -> None:
        fh = self._handles.get(key)
        if fh is None:
            tmp = self._stack.enter_context(atomic_path(Path(self._path_for(key))))
            fh = self._stack.enter_context(tmp.open("w", encoding="utf-8"))
            self._handles[key] = fh
            self.counts[key] = 0
        fh.write(dumps(record))
        fh.write("\n")
        self.counts[key] += 1

    def ensure(self, key: str) -> None:
        """Create ``key``'s file even if nothing is written to it."""
        if key not in self._handles:
            tmp = self._stack.enter_context(atomic_path(Path(self._path_for(key))))
            self._handles[key] = self._stack.enter_context(tmp.open("w", encoding="utf-8"))
            self.counts[key] = 0

    def __exit__(self, *exc) -> bool:
        return self._stack.__exit__(*exc)
